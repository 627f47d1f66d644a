"""The built-in labelled corpus: deterministic synthetic clips on disk, and its loader.

Layout of a corpus directory (written by :func:`synthesize_corpus`; any
directory laid out the same way, real recordings included, loads with
:func:`load_corpus`)::

    DIR/clips/clip_00000.wav ...   16-bit PCM mono WAV clips
    DIR/labels.csv                 clip,label,onset_s,offset_s: one row per event, in
                                   seconds to the ms; a clip with no rows has no events
    DIR/manifest.json              how it was made: a JSON object (sorted keys, no timestamps)

Clip ``i`` of seed ``s`` is drawn from ``np.random.default_rng([s, i])`` alone,
so the same seed always gives the same bytes and :func:`corpus_hash` pins
the data a model was trained on.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shared_models.constants import EVENT_LABELS, SAMPLE_RATE_HZ
from shared_models.synth import LabelledEvent, espeak_available, random_scene
from shared_models.wavio import WavFormatError, read_wav_info, write_wav

log = logging.getLogger(__name__)

GENERATOR_VERSION = "soundfleet-synth/1"
"""Bump when the synthesiser changes what a seed produces."""

CLIPS_DIR = "clips"
LABELS_FILE = "labels.csv"
MANIFEST_FILE = "manifest.json"
LABELS_HEADER = ("clip", "label", "onset_s", "offset_s")

EVENT_FREE_EVERY = 10
"""Every 10th clip is background only (the classifier must learn "nothing")."""

EXTRA_EVENTS_P = (0.5, 0.3, 0.2)
"""Probability of 0, 1 or 2 extra random events on top of a clip's scheduled one."""


class CorpusError(ValueError):
    """A corpus directory is missing a file or has a malformed one; the message names it."""


@dataclass
class CorpusClip:
    """One clip of a corpus: its WAV file, its events and its length."""

    wav_path: Path
    events: list[LabelledEvent]
    duration_s: float


def clip_labels(index: int, seed: int, rng: np.random.Generator) -> list[str]:
    """Which events clip ``index`` gets: a balanced schedule plus random extras.

    Clips cycle through :data:`EVENT_LABELS` (each class in turn is some clip's
    first event), every :data:`EVENT_FREE_EVERY`-th clip has none, and
    0-2 random extra events are added to the rest.
    """
    if index % EVENT_FREE_EVERY == EVENT_FREE_EVERY - 1:
        return []
    n_with_events_before = index - index // EVENT_FREE_EVERY
    scheduled = EVENT_LABELS[(n_with_events_before + seed) % len(EVENT_LABELS)]
    n_extra = rng.choice(len(EXTRA_EVENTS_P), p=EXTRA_EVENTS_P)
    extras = [EVENT_LABELS[i] for i in rng.integers(0, len(EVENT_LABELS), n_extra)]
    return [scheduled, *extras]


def synthesize_corpus(
    out_dir: Path,
    minutes: float = 10.0,
    seed: int = 0,
    clip_seconds: float = 10.0,
    progress: bool = True,
) -> dict:
    """Write ``minutes`` of labelled clips to ``out_dir``; return the manifest.

    Existing ``clips/clip_*.wav`` files in ``out_dir`` are removed first, so a
    smaller corpus written over a larger one leaves no stale clips behind.
    """
    if minutes <= 0 or clip_seconds <= 0:
        raise ValueError(
            f"minutes and clip_seconds must be positive, got {minutes}, {clip_seconds}"
        )
    out_dir = Path(out_dir)
    clips_dir = out_dir / CLIPS_DIR
    clips_dir.mkdir(parents=True, exist_ok=True)
    for stale in clips_dir.glob("clip_*.wav"):
        stale.unlink()
    n_clips = max(1, round(minutes * 60 / clip_seconds))
    rows = []
    for i in progress_bar(range(n_clips), progress, desc="synthesising corpus"):
        rng = np.random.default_rng([seed, i])
        scene = random_scene(rng, duration_s=clip_seconds, labels=clip_labels(i, seed, rng))
        name = f"clip_{i:05d}.wav"
        write_wav(clips_dir / name, scene.audio, scene.sample_rate_hz)
        rows += [(name, e.label, f"{e.onset_s:.3f}", f"{e.offset_s:.3f}") for e in scene.events]
    with (out_dir / LABELS_FILE).open("w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(LABELS_HEADER)
        writer.writerows(rows)
    counts = {label: sum(row[1] == label for row in rows) for label in EVENT_LABELS}
    manifest = {
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "minutes": float(minutes),
        "clip_seconds": float(clip_seconds),
        "sample_rate_hz": SAMPLE_RATE_HZ,
        "n_clips": n_clips,
        "n_events": len(rows),
        "label_counts": counts,
        "labels": list(EVENT_LABELS),
        "espeak_ng": espeak_available(),
        "data_sha256": corpus_hash(out_dir),
    }
    text = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
    (out_dir / MANIFEST_FILE).write_text(text)
    log.info(
        "corpus %s: %d clips, %d events, sha256 %s",
        out_dir,
        n_clips,
        len(rows),
        manifest["data_sha256"],
    )
    return manifest


def load_corpus(data_dir: Path) -> list[CorpusClip]:
    """Every clip in ``data_dir/clips`` with its events from ``labels.csv``, in name order."""
    data_dir = Path(data_dir)
    _read_manifest(data_dir / MANIFEST_FILE)
    clips_dir = data_dir / CLIPS_DIR
    wavs = sorted(clips_dir.glob("*.wav")) if clips_dir.is_dir() else []
    if not wavs:
        raise CorpusError(f"{clips_dir}: no .wav clips (expected {CLIPS_DIR}/clip_00000.wav ...)")
    durations_s = {}
    for wav in wavs:
        try:
            durations_s[wav.name] = read_wav_info(wav).duration_s
        except WavFormatError as exc:
            raise CorpusError(str(exc)) from None
    events = _read_labels(data_dir / LABELS_FILE, durations_s)
    return [CorpusClip(w, events.get(w.name, []), durations_s[w.name]) for w in wavs]


def corpus_hash(data_dir: Path) -> str:
    """SHA-256 over labels.csv and every clip's name and bytes, clips in name order."""
    data_dir = Path(data_dir)
    labels = data_dir / LABELS_FILE
    if not labels.is_file():
        raise CorpusError(f"{labels}: labels file not found")
    digest = hashlib.sha256(labels.read_bytes())
    for wav in sorted((data_dir / CLIPS_DIR).glob("*.wav")):
        digest.update(wav.name.encode())
        digest.update(wav.read_bytes())
    return digest.hexdigest()


def _read_manifest(path: Path) -> dict:
    if not path.is_file():
        raise CorpusError(f"{path}: manifest not found (a corpus directory needs {MANIFEST_FILE})")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CorpusError(f"{path}: malformed JSON: {exc}") from None
    if not isinstance(manifest, dict):
        raise CorpusError(f"{path}: expected a JSON object, got {type(manifest).__name__}")
    return manifest


def _read_labels(path: Path, durations_s: dict[str, float]) -> dict[str, list[LabelledEvent]]:
    """Events per clip name, validated: known label, known clip, 0 <= onset < offset <= end."""
    if not path.is_file():
        raise CorpusError(f"{path}: labels file not found (header: {','.join(LABELS_HEADER)})")
    events: dict[str, list[LabelledEvent]] = {}
    with path.open(newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or tuple(h.strip() for h in header) != LABELS_HEADER:
            raise CorpusError(f"{path}:1: header must be {','.join(LABELS_HEADER)}, got {header}")
        for row in reader:
            line = reader.line_num
            if not row:
                continue
            if len(row) != len(LABELS_HEADER):
                raise CorpusError(f"{path}:{line}: expected 4 fields, got {len(row)}: {row}")
            clip, label, onset, offset = (field.strip() for field in row)
            if clip not in durations_s:
                raise CorpusError(f"{path}:{line}: clip {clip!r} is not in {CLIPS_DIR}/")
            try:
                event = LabelledEvent(label, float(onset), float(offset))
            except (KeyError, ValueError) as exc:  # unknown label, bad number, onset >= offset
                raise CorpusError(f"{path}:{line}: {exc.args[0]}") from None
            if event.offset_s > durations_s[clip] + 1e-3:
                raise CorpusError(
                    f"{path}:{line}: event ends at {event.offset_s} s, after the end of "
                    f"{clip} ({durations_s[clip]:.3f} s)"
                )
            events.setdefault(clip, []).append(event)
    return events


def progress_bar(items, enabled: bool, desc: str, unit: str = "clip"):
    """``items`` with a progress bar when ``enabled`` (and tqdm is installed)."""
    if not enabled:
        return items
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    return tqdm(items, desc=desc, unit=unit)
