"""Event logic: thresholds, hysteresis, minimum duration, cooldown, and state round trip."""

from cloud.events import EventPolicy, LabelState, close, step

S = 1_000_000_000  # ns per second


def run(scores, policy=None):
    policy = policy or EventPolicy()
    state, events = LabelState(), []
    for i, score in enumerate(scores):
        event = step(state, policy, score, i * S, (i + 1) * S, seq=i)
        if event:
            events.append(event)
    return state, events


def test_event_spans_windows_above_threshold_and_closes_below_off():
    state, events = run([0.1, 0.8, 0.9, 0.7, 0.1, 0.1])
    assert len(events) == 1
    event = events[0]
    assert (event.start_ns, event.end_ns) == (1 * S, 4 * S)
    assert (event.seq_first, event.seq_last) == (1, 3)
    assert event.score == 0.9
    assert not state.active


def test_hysteresis_keeps_one_event_through_a_dip_between_thresholds():
    _, events = run([0.9, 0.4, 0.9, 0.1, 0.1], EventPolicy(on_threshold=0.5, off_threshold=0.3, hold_windows=0))
    assert len(events) == 1 and events[0].end_ns == 3 * S


def test_hold_bridges_a_short_gap_but_not_a_long_one():
    policy = EventPolicy(hold_windows=1, cooldown_ns=0)
    _, events = run([0.9, 0.1, 0.9, 0.1, 0.1, 0.9, 0.1, 0.1], policy)
    # the one-window gap is bridged; the two-window gap closes the event (end = last window above)
    assert [(e.start_ns, e.end_ns) for e in events] == [(0, 3 * S), (5 * S, 6 * S)]


def test_dip_below_off_threshold_splits_events_without_hold_or_cooldown():
    _, events = run([0.9, 0.1, 0.9, 0.1], EventPolicy(hold_windows=0, cooldown_ns=0))
    assert [e.start_ns for e in events] == [0, 2 * S]


def test_min_windows_suppresses_single_window_blips():
    policy = EventPolicy(min_windows=2, hold_windows=0)
    _, events = run([0.9, 0.1, 0.9, 0.9, 0.1], policy)
    assert len(events) == 1 and events[0].start_ns == 2 * S


def test_cooldown_blocks_restart_of_same_label():
    policy = EventPolicy(cooldown_ns=3 * S, hold_windows=0)
    _, events = run([0.9, 0.1, 0.9, 0.1, 0.1, 0.9, 0.1], policy)
    # first event ends at 1 s -> cooldown until 4 s: the window at 2 s is ignored, the one at 5 s is not
    assert [e.start_ns for e in events] == [0, 5 * S]


def test_close_flushes_an_active_event_and_state_round_trips():
    state, events = run([0.2, 0.95])
    assert not events and state.active
    restored = LabelState.from_dict(state.to_dict())
    event = close(restored, EventPolicy())
    assert event is not None and (event.start_ns, event.end_ns) == (1 * S, 2 * S)
    assert close(restored, EventPolicy()) is None


def test_live_user_config_overrides_thresholds_per_label_and_rejects_unknowns():
    import pytest

    from cloud.events import label_policies
    from shared_models import bundle
    from soundfleet.config import CloudConfig

    manifest = bundle.load_manifest(bundle.default_bundle_dir())
    base = label_policies(CloudConfig(), manifest)
    assert base["siren"].on_threshold == pytest.approx(manifest["thresholds"]["siren"])
    live = label_policies(CloudConfig(), manifest, {"on_threshold": {"siren": 0.9}, "cooldown_s": 5})
    assert live["siren"].on_threshold == 0.9 and live["siren"].cooldown_ns == 5_000_000_000
    assert live["doorbell"].on_threshold == base["doorbell"].on_threshold  # only the label named
    assert label_policies(CloudConfig(), manifest, {"on_threshold": 0.7})["knock"].on_threshold == 0.7
    with pytest.raises(ValueError, match="unknown event-logic settings"):
        label_policies(CloudConfig(), manifest, {"on_treshold": 0.7})
    with pytest.raises(ValueError, match="unknown labels"):
        label_policies(CloudConfig(), manifest, {"on_threshold": {"sirens": 0.7}})
    with pytest.raises(ValueError, match="bad event-logic settings"):
        label_policies(CloudConfig(), manifest, {"on_threshold": 1.5})


def test_a_bundles_minimum_windows_apply_per_label_unless_the_config_or_live_settings_say_otherwise():
    from cloud.events import label_policies
    from soundfleet.config import CloudConfig

    manifest = {"labels": ["siren", "dog_bark"], "thresholds": {"siren": 0.4, "dog_bark": 0.8},
                "min_windows": {"siren": 3}}
    policies = label_policies(CloudConfig(), manifest)
    assert (policies["siren"].min_windows, policies["dog_bark"].min_windows) == (3, 1)  # 1 where it has none
    assert {p.min_windows for p in label_policies(CloudConfig(min_windows=2), manifest).values()} == {2}
    assert {p.min_windows for p in label_policies(CloudConfig(), manifest, {"min_windows": 4}).values()} == {4}
    older = label_policies(CloudConfig(), {k: v for k, v in manifest.items() if k != "min_windows"})
    assert {p.min_windows for p in older.values()} == {1}  # a bundle from before keeps one window


def test_serve_yaml_args_and_live_event_settings_are_valid():
    from pathlib import Path

    import yaml

    from cloud.events import label_policies
    from shared_models import bundle
    from soundfleet.config import CloudConfig

    app = yaml.safe_load((Path(__file__).parents[1] / "infra" / "serve.yaml").read_text())["applications"][0]
    config = CloudConfig(**app["args"])  # every arg is a CloudConfig field
    config.validate()
    (ingest,) = [d for d in app["deployments"] if d["name"] == "Ingest"]
    policies = label_policies(config, bundle.load_manifest(bundle.default_bundle_dir()), ingest["user_config"])
    assert policies["siren"].on_threshold == ingest["user_config"]["on_threshold"]["siren"]
