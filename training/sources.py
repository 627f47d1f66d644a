"""Training data beyond the built-in corpus: dataset layouts on disk, and the fleet archive.

Every dataset layout loads into the same :class:`Dataset` of :class:`Clip` s (the
attribute names of :class:`training.corpus.CorpusClip`, so the pipeline takes
either). :func:`load_dataset` detects the layout; ``layout=`` forces one of
:data:`LAYOUTS`. The label-free side, the fleet archive, is
``training.fleet_archive``. ``docs/DATA.md`` shows every layout as a tree.

Audio may have any rate and channel count (resampling happens later); only WAV
headers are read here, for the durations.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from shared_models.constants import EVENT_LABELS
from shared_models.wavio import WavFormatError, read_wav_info
from training import corpus

log = logging.getLogger(__name__)


class DatasetError(ValueError):
    """A dataset directory is not a known layout, or a file in it is missing or malformed."""


@dataclass(frozen=True)
class ClipEvent:
    """One labelled event of a clip, in seconds from its start (duck-types LabelledEvent).

    Unlike LabelledEvent the label is free text: each dataset has its own label set.
    """

    label: str
    onset_s: float
    offset_s: float

    def __post_init__(self) -> None:
        if not self.label:
            raise ValueError("event label must be a non-empty string")
        if not 0 <= self.onset_s < self.offset_s:
            raise ValueError(
                f"event {self.label!r}: need 0 <= onset_s < offset_s, "
                f"got {self.onset_s!r} .. {self.offset_s!r}"
            )


@dataclass
class Clip:
    """One audio file and its events (same attribute names as ``CorpusClip``)."""

    wav_path: Path
    events: list[ClipEvent]
    duration_s: float
    weak: bool = False
    """True when each label spans the whole file (a folder's or a CSV's label), not a timed event."""


@dataclass
class Dataset:
    """Clips (sorted by path), the dataset's own label set, its name and a hash of its bytes."""

    clips: list[Clip]
    labels: tuple[str, ...]
    """Sorted, except the built-in corpus: its manifest's order (the classifier's output order)."""
    name: str
    data_sha256: str
    """SHA-256 over the metadata file(s) and the selected audio files, in sorted path order."""
    layout: str = ""
    """Which entry of :data:`LAYOUTS` loaded it."""


@dataclass(frozen=True)
class DatasetLayout:
    """One registered layout: how to recognise a directory, how to load it, what it expects."""

    detect: Callable[[Path], bool]
    load: Callable[..., Dataset]
    expects: str


# --- detection and the registry ------------------------------------------------------


def load_dataset(path: Path, layout: str | None = None, **options) -> Dataset:
    """Load the dataset at ``path``, in the first layout of :data:`LAYOUTS` that matches.

    ``layout`` forces one; ``options`` go to its loader (``folds=`` for esc50,
    ``splits=`` for fsd50k).
    """
    path = Path(path)
    if not path.is_dir():
        raise DatasetError(f"{path}: not a directory")
    if layout is None:
        layout = next((name for name, spec in LAYOUTS.items() if spec.detect(path)), None)
        if layout is None:
            known = "; ".join(f"{name}: {spec.expects}" for name, spec in LAYOUTS.items())
            raise DatasetError(f"{path}: no known dataset layout. Known layouts: {known}")
    elif layout not in LAYOUTS:
        raise DatasetError(f"unknown dataset layout {layout!r}; known: {', '.join(LAYOUTS)}")
    log.info("loading %s as a %s dataset", path, layout)
    dataset = LAYOUTS[layout].load(path, **options)
    dataset.layout = layout
    return dataset


def _is_builtin(root: Path) -> bool:
    return all(
        (root / name).exists()
        for name in (corpus.MANIFEST_FILE, corpus.LABELS_FILE, corpus.CLIPS_DIR)
    )


def _is_esc50(root: Path) -> bool:
    return (root / ESC50_CSV).is_file()


def _is_fsd50k(root: Path) -> bool:
    return any((root / FSD50K_TRUTH / f"{split}.csv").is_file() for split in FSD50K_PARTS)


def _is_folders(root: Path) -> bool:
    return bool(_label_folders(root))


def load_datasets(paths: Iterable[Path]) -> Dataset:
    """Several datasets trained on together (the synthetic corpus and a real one): their clips
    in the order given, the first dataset's labels in its order, then every other label sorted."""
    datasets = [load_dataset(Path(p)) for p in paths]
    if not datasets:
        raise DatasetError("no dataset given")
    if len(datasets) == 1:
        return datasets[0]
    labels = list(datasets[0].labels)
    labels += sorted({label for d in datasets[1:] for label in d.labels} - set(labels))
    digest = hashlib.sha256()
    for d in datasets:
        digest.update(f"{d.layout}:{d.name}:{d.data_sha256}\0".encode())
    return Dataset(
        [clip for d in datasets for clip in d.clips],
        tuple(labels),
        "+".join(d.name for d in datasets),
        digest.hexdigest(),
        layout="+".join(d.layout for d in datasets),
    )


# --- built-in corpus -----------------------------------------------------------------


def load_builtin(root: Path) -> Dataset:
    """The built-in corpus (:mod:`training.corpus`), strong labels; labels in manifest order."""
    try:
        clips = corpus.load_corpus(root)  # validates the manifest, labels.csv and the clips
        sha = corpus.corpus_hash(root)
    except corpus.CorpusError as exc:
        raise DatasetError(str(exc)) from None
    manifest = json.loads((root / corpus.MANIFEST_FILE).read_text())
    labels = tuple(manifest.get("labels", EVENT_LABELS))
    out = [
        Clip(
            c.wav_path, [ClipEvent(e.label, e.onset_s, e.offset_s) for e in c.events], c.duration_s
        )
        for c in clips
    ]
    return Dataset(out, labels, root.name, sha)


# --- labelled folders ----------------------------------------------------------------


def _wavs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() == ".wav")


def _label_folders(root: Path) -> list[Path]:
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    return [d for d in subdirs if _wavs(d)]


NONE_FOLDER = "_none"
"""In the folders layout, the folder of clips that are none of the labels (background, confusers)."""


def load_folders(root: Path) -> Dataset:
    """``ROOT/<label>/*.wav``: the folder name is the label of the whole clip (weak labels);
    clips in ``ROOT/_none/`` have no label (negatives)."""
    folders = _label_folders(root)
    if not [f for f in folders if f.name != NONE_FOLDER]:
        raise DatasetError(f"{root}: no sub-folder holds .wav files (expected ROOT/<label>/*.wav)")
    clips = []
    for folder in folders:
        labels_here = [] if folder.name == NONE_FOLDER else [folder.name]
        for wav in _wavs(folder):
            clips.append(_weak_clip(wav, labels_here, where=str(wav)))
    labels = tuple(sorted(f.name for f in folders if f.name != NONE_FOLDER))
    return Dataset(clips, labels, root.name, _hash_files(root, [], [c.wav_path for c in clips]))


# --- ESC-50 --------------------------------------------------------------------------

ESC50_CSV = Path("meta") / "esc50.csv"
ESC50_AUDIO = "audio"
ESC50_COLUMNS = ("filename", "fold", "target", "category", "esc10", "src_file", "take")


def load_esc50(root: Path, folds: Iterable[int] | None = None) -> Dataset:
    """ESC-50: label = ``category``, one per clip (weak); ``folds`` selects folds (all if None).

    ``labels`` is every category in the CSV, whichever folds are selected, so
    train and test splits share one label set.
    """
    csv_path = root / ESC50_CSV
    rows = _read_csv(csv_path, ESC50_COLUMNS)
    fold_of = {}
    for line, row in rows:
        try:
            fold_of[line] = int(row["fold"])
        except ValueError:
            raise DatasetError(
                f"{csv_path}:{line}: fold must be an integer, got {row['fold']!r}"
            ) from None
    present = sorted(set(fold_of.values()))
    wanted = set(present if folds is None else folds)
    if unknown := wanted - set(present):
        raise DatasetError(f"{csv_path}: no fold(s) {sorted(unknown)}; folds present: {present}")
    clips = [
        _weak_clip(
            _audio(csv_path, line, root / ESC50_AUDIO / row["filename"]),
            [row["category"]],
            where=f"{csv_path}:{line}",
        )
        for line, row in rows
        if fold_of[line] in wanted
    ]
    labels = tuple(sorted({row["category"] for _, row in rows}))
    name = (
        root.name if folds is None else f"{root.name}[folds={','.join(map(str, sorted(wanted)))}]"
    )
    return _dataset(clips, labels, name, root, [csv_path])


# --- FSD50K --------------------------------------------------------------------------

FSD50K_TRUTH = "FSD50K.ground_truth"
FSD50K_PARTS = {"dev": ("fname", "labels", "mids", "split"), "eval": ("fname", "labels", "mids")}
FSD50K_SPLITS = ("train", "val", "eval")
"""dev.csv's ``split`` column holds train/val; every eval.csv clip is in split "eval"."""


def load_fsd50k(root: Path, splits: Iterable[str] | None = None) -> Dataset:
    """FSD50K: comma-separated ``labels`` per clip, each spanning the whole clip (weak, multi-label).

    ``splits`` picks from train/val/eval (all present if None); ``labels`` is the
    union over every CSV present.
    """
    wanted = set(FSD50K_SPLITS if splits is None else splits)
    if unknown := wanted - set(FSD50K_SPLITS):
        raise DatasetError(f"unknown FSD50K split(s) {sorted(unknown)}; known: {FSD50K_SPLITS}")
    clips, labels, metadata = [], set(), []
    for part, columns in FSD50K_PARTS.items():
        csv_path = root / FSD50K_TRUTH / f"{part}.csv"
        if not csv_path.is_file():
            if splits is not None and wanted & ({"eval"} if part == "eval" else {"train", "val"}):
                raise DatasetError(f"{csv_path}: not found (needed for splits {sorted(wanted)})")
            continue
        metadata.append(csv_path)
        for line, row in _read_csv(csv_path, columns):
            clip_labels = [label.strip() for label in row["labels"].split(",") if label.strip()]
            if not clip_labels:
                raise DatasetError(f"{csv_path}:{line}: clip {row['fname']!r} has no labels")
            labels.update(clip_labels)
            split = row.get("split", "eval").strip()
            if split not in FSD50K_SPLITS:
                raise DatasetError(f"{csv_path}:{line}: unknown split {split!r}")
            if split in wanted:
                wav = _audio(csv_path, line, root / f"FSD50K.{part}_audio" / f"{row['fname']}.wav")
                clips.append(_weak_clip(wav, clip_labels, where=f"{csv_path}:{line}"))
    name = root.name if splits is None else f"{root.name}[splits={','.join(sorted(wanted))}]"
    return _dataset(clips, tuple(sorted(labels)), name, root, metadata)


# --- shared helpers ------------------------------------------------------------------


def _read_csv(path: Path, columns: tuple[str, ...]) -> list[tuple[int, dict[str, str]]]:
    """(line number, row) pairs of a CSV with a header that has at least ``columns``."""
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in reader.fieldnames or []]
        if missing := [c for c in columns if c not in header]:
            raise DatasetError(f"{path}:1: header lacks column(s) {missing}; got {header}")
        reader.fieldnames = header
        return [(reader.line_num, row) for row in reader]


def _audio(csv_path: Path, line: int, wav: Path) -> Path:
    if not wav.is_file():
        raise DatasetError(f"{csv_path}:{line}: audio file not found: {wav}")
    return wav


def _weak_clip(wav: Path, labels: list[str], where: str) -> Clip:
    """A clip whose every label spans the whole clip; duration from the WAV header."""
    try:
        duration_s = read_wav_info(wav).duration_s
    except WavFormatError as exc:
        raise DatasetError(f"{where}: {exc}") from None
    if duration_s <= 0:
        raise DatasetError(f"{where}: {wav} holds no audio")
    return Clip(wav, [ClipEvent(label, 0.0, duration_s) for label in labels], duration_s, weak=True)


def _dataset(clips, labels, name, root, metadata) -> Dataset:
    if not clips:
        raise DatasetError(f"{root}: the selection holds no clips")
    clips.sort(key=lambda c: c.wav_path)
    return Dataset(clips, labels, name, _hash_files(root, metadata, [c.wav_path for c in clips]))


def _hash_files(root: Path, metadata: list[Path], audio: list[Path]) -> str:
    """SHA-256 over each file's path (relative to root), size and bytes; metadata, then audio."""
    digest = hashlib.sha256()
    for path in [*sorted(metadata), *sorted(audio)]:
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(path.stat().st_size.to_bytes(8, "little"))
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


LAYOUTS: dict[str, DatasetLayout] = {
    "builtin": DatasetLayout(_is_builtin, load_builtin, "manifest.json + labels.csv + clips/*.wav"),
    "esc50": DatasetLayout(_is_esc50, load_esc50, "meta/esc50.csv + audio/<filename>"),
    "fsd50k": DatasetLayout(
        _is_fsd50k,
        load_fsd50k,
        f"{FSD50K_TRUTH}/dev.csv and/or eval.csv + FSD50K.dev_audio/ / FSD50K.eval_audio/",
    ),
    "folders": DatasetLayout(_is_folders, load_folders, "<label>/*.wav, one folder per label"),
}
"""Known layouts, tried in this order (``folders`` last: the others hold wav folders too)."""
