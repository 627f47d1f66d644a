"""Turn a labelled corpus into frame patches, frame labels and window labels."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shared_models.constants import FRAMES_PER_SECOND, HOP_SAMPLES, PATCH_SAMPLES
from shared_models.wavio import read_wav, resample_linear
from training.sources import Clip


def frame_patches(audio: np.ndarray) -> np.ndarray:
    """(S,) float32 -> (N, PATCH_SAMPLES) non-overlapping patches; a partial tail is dropped."""
    n = len(audio) // HOP_SAMPLES
    return audio[: n * PATCH_SAMPLES].reshape(n, PATCH_SAMPLES).astype(np.float32)


def frame_labels(events: list, n_frames: int, labels: tuple[str, ...]) -> np.ndarray:
    """(N, L) float32 multi-hot over ``labels``: a frame is active when an event covers its centre.

    ``events`` have ``label``, ``onset_s`` and ``offset_s`` (strong labels from
    the built-in corpus, or whole-clip weak labels from external datasets).
    """
    index = {name: i for i, name in enumerate(labels)}
    out = np.zeros((n_frames, len(labels)), dtype=np.float32)
    centres_s = (np.arange(n_frames) + 0.5) / FRAMES_PER_SECOND
    for ev in events:
        active = (centres_s >= ev.onset_s) & (centres_s < ev.offset_s)
        out[active, index[ev.label]] = 1.0
    return out


def window_targets(
    frame_lab: np.ndarray, start: int, window: int
) -> tuple[np.ndarray, np.ndarray]:
    """Targets and loss weights for the window [start, start + window) of one clip.

    Positive when the event fills at least half the window or at least half of
    the event (short knocks and barks) lies inside it; negative when it does
    not touch the window; in between is ambiguous and weighted 0.
    """
    inside = frame_lab[start : start + window].sum(axis=0)  # (L,)
    total = frame_lab.sum(axis=0)  # (L,) frames per label in the whole clip
    need = np.minimum(0.5 * window, 0.5 * np.maximum(total, 1))
    target = (inside >= need).astype(np.float32)
    weight = ((inside == 0) | (target == 1)).astype(np.float32)
    return target, weight


@dataclass
class FramedClip:
    patches: np.ndarray  # (N, PATCH_SAMPLES) float32
    labels: np.ndarray  # (N, L) float32
    weak: bool = False  # each label spans the whole recording (see training.sources.Clip.weak)
    padded_frames: int = 0  # digital silence appended to reach a minimum length (not heard audio)

    def carried(self, labels: tuple[str, ...]) -> frozenset[str]:
        """The labels active in any frame of the clip (``labels`` names the columns)."""
        return frozenset(labels[j] for j in np.flatnonzero(self.labels.any(axis=0)))


def load_framed(clips: list[Clip], labels: tuple[str, ...], min_frames: int = 0) -> list[FramedClip]:
    """Read, resample to 16 kHz mono and frame every clip, with frame labels over ``labels``.

    A clip shorter than ``min_frames`` (a 0.4 s bark, shorter than one classifier window) is
    padded with digital silence to that length, as ``soundfleet eval`` pads it; its labels
    cover only the recorded frames.
    """
    framed = []
    for clip in clips:
        audio, rate_hz = read_wav(clip.wav_path)
        patches = frame_patches(resample_linear(audio, rate_hz))
        frame_lab = frame_labels(clip.events, len(patches), labels)
        pad = max(0, min_frames - len(patches))
        if pad:
            patches = np.concatenate([patches, np.zeros((pad, PATCH_SAMPLES), np.float32)])
            frame_lab = np.concatenate([frame_lab, np.zeros((pad, len(labels)), np.float32)])
        framed.append(FramedClip(patches, frame_lab, getattr(clip, "weak", False), pad))
    return framed


def split_clips(n: int, holdout_fraction: float, seed: int,
                groups: Sequence[str] | None = None) -> tuple[list[int], list[int]]:
    """Deterministic train / held-out split of clip indices.

    With ``groups`` (one name per clip), every clip of a group lands on the same side: the
    held-out part then measures recordings from sources the other part never heard, not other
    cuts of the same file or other files of the same package. Groups are drawn in a seeded
    random order and held out while the held-out part stays within 1.5 times its share (a
    group too big for that is passed over), until it has its share. Clips without a group of
    their own (every name distinct) split exactly as clip by clip."""
    n_hold = max(1, int(round(n * holdout_fraction))) if n > 1 else 0
    if groups is None:
        order = np.random.default_rng(seed).permutation(n)
        return sorted(order[n_hold:].tolist()), sorted(order[:n_hold].tolist())
    if len(groups) != n:
        raise ValueError(f"{len(groups)} group names for {n} clips")
    members: dict[str, list[int]] = {}
    for i, group in enumerate(groups):
        members.setdefault(group, []).append(i)
    names = list(members)  # first seen first: the clips' own (sorted) order
    held: list[int] = []
    for g in np.random.default_rng(seed).permutation(len(names)):
        if len(held) >= n_hold:
            break
        if not held or len(held) + len(members[names[g]]) <= 1.5 * n_hold:
            held += members[names[g]]
    hold = set(held)
    return [i for i in range(n) if i not in hold], sorted(held)


def clip_source(clip: Clip) -> str:
    """The recording source a clip comes from, for splits that keep a source on one side:
    ``<source>__<rest>.wav`` (``soundfleet data real`` names clips ``<package>__...``; a user
    can name a session's recordings ``kitchen__001.wav``), else the clip's own path."""
    stem = Path(clip.wav_path).stem
    return stem.split("__", 1)[0] if "__" in stem else str(clip.wav_path)
