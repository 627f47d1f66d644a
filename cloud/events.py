"""Event logic: per-label thresholds with hysteresis, minimum duration and cooldown.

Pure Python with state as a plain dataclass, so replicas stay stateless: the
state of each (device, label) lives in Redis between windows.

An event starts after ``min_windows`` consecutive windows score at least
``on_threshold``, stays active while the score stays at least
``off_threshold`` (hysteresis), survives up to ``hold_windows`` windows below
it (so the pauses of a T3 smoke alarm do not split one alarm into three), and
is emitted, with its start and end, when it closes. After it closes the same label cannot
start again on that device for ``cooldown_ns``.

``label_policies`` is the one place a label's settings come from (the bundle's calibrated
thresholds and minimum windows, then the config, then the live Serve ``user_config``): the ingest, ``/v1/classify``
and ``soundfleet eval`` all call it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from soundfleet.config import CloudConfig


@dataclass(frozen=True)
class EventPolicy:
    on_threshold: float = 0.5
    off_threshold: float = 0.3
    min_windows: int = 1
    hold_windows: int = 1
    cooldown_ns: int = 2_000_000_000


@dataclass
class LabelState:
    streak: int = 0  # consecutive windows >= on_threshold while inactive
    active: bool = False
    misses: int = 0  # consecutive windows below off_threshold while active
    start_ns: int = 0
    end_ns: int = 0
    peak: float = 0.0
    seq_first: int = 0
    seq_last: int = 0
    cooldown_until_ns: int = 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> LabelState:
        return cls(**data)


@dataclass(frozen=True)
class ClosedEvent:
    start_ns: int
    end_ns: int
    score: float  # peak window probability
    seq_first: int
    seq_last: int


def step(
    state: LabelState, policy: EventPolicy, score: float, start_ns: int, end_ns: int, seq: int
) -> ClosedEvent | None:
    """Advance one label's state by one window; returns an event when one closes."""
    if state.active:
        if score >= policy.off_threshold:
            state.end_ns, state.seq_last, state.misses = end_ns, seq, 0
            state.peak = max(state.peak, score)
            return None
        state.misses += 1
        return close(state, policy) if state.misses > policy.hold_windows else None
    if score < policy.on_threshold or start_ns < state.cooldown_until_ns:
        state.streak = 0
        return None
    if state.streak == 0:  # the event's start is the first window above the threshold
        state.start_ns, state.seq_first, state.peak = start_ns, seq, 0.0
    state.streak += 1
    state.end_ns, state.seq_last = end_ns, seq
    state.peak = max(state.peak, score)
    if state.streak >= policy.min_windows:
        state.active = True
    return None


def close(state: LabelState, policy: EventPolicy) -> ClosedEvent | None:
    """Close an active event (also used when a device goes offline)."""
    if not state.active:
        state.streak = 0
        return None
    event = ClosedEvent(state.start_ns, state.end_ns, state.peak, state.seq_first, state.seq_last)
    state.active, state.streak, state.misses = False, 0, 0
    state.cooldown_until_ns = state.end_ns + policy.cooldown_ns
    return event


# ---- the settings of every label, from the bundle, the config and the live user_config ----

EVENT_KNOBS = ("on_threshold", "off_threshold", "min_windows", "hold_windows", "cooldown_s")


def label_policies(config: CloudConfig, manifest: dict, live: dict | None = None) -> dict[str, EventPolicy]:
    """One policy per label of the bundle.

    Precedence: the bundle's calibrated per-label thresholds and minimum windows, then the
    config's, then ``live``
    (the deployment's Serve ``user_config``, changeable at runtime), whose ``on_threshold`` may
    be one number or ``{label: number}``. Unknown knobs or labels are a ValueError."""
    live = dict(live or {})
    unknown = sorted(set(live) - set(EVENT_KNOBS))
    if unknown:
        raise ValueError(f"unknown event-logic settings {unknown}; known: {', '.join(EVENT_KNOBS)}")
    live_on = live.get("on_threshold")
    if isinstance(live_on, dict) and (bad := sorted(set(live_on) - set(manifest["labels"]))):
        raise ValueError(f"on_threshold for unknown labels {bad}; the bundle's labels: {manifest['labels']}")
    policies = {}
    for label in manifest["labels"]:
        on = config.on_threshold if config.on_threshold is not None else manifest.get("thresholds", {}).get(label, 0.5)
        if live_on is not None:
            on = live_on.get(label, on) if isinstance(live_on, dict) else live_on
        off = live.get("off_threshold", config.off_threshold)
        min_windows = config.min_windows if config.min_windows is not None else manifest.get("min_windows", {}).get(label, 1)
        policy = EventPolicy(
            on_threshold=float(on),
            off_threshold=min(float(off), float(on)),
            min_windows=int(live.get("min_windows", min_windows)),
            hold_windows=int(live.get("hold_windows", config.hold_windows)),
            cooldown_ns=int(float(live.get("cooldown_s", config.cooldown_s)) * 1e9),
        )
        if not 0 < policy.off_threshold <= policy.on_threshold < 1 or policy.min_windows < 1 or policy.hold_windows < 0:
            raise ValueError(f"bad event-logic settings for {label}: {policy}")
        policies[label] = policy
    return policies
