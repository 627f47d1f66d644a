"""`soundfleet data real`: a corpus of real recordings from Debian packages, split by source.

The catalogue (``training/real_sources.toml``) names packages and, by glob, which of
their files become clips of which label (one of ``EVENT_LABELS``) or which are
negatives (``role = "background"`` or ``"confuser"``: real sounds that are none of the
labels). Each package is wholly ``train`` or wholly ``test``, so the test split holds
recordings the models never heard, not other cuts of the same file.

The build is deterministic: packages in catalogue order (train ones first), files in
sorted order; each file decoded (libsndfile: WAV, Ogg, FLAC, MP3), mixed to mono,
resampled to 16 kHz, cut into clips of at most ``max_clip_s``, written as 16-bit WAV:

    OUT/train/<label>/<package>__<file>[__<k>].wav     labelled clips (the `folders` layout)
    OUT/train/_none/...                                 negatives: no label (`folders` reads them so)
    OUT/test/...                                        the same for the test packages
    OUT/manifest.csv                                    one row per clip: provenance and licence
    OUT/licences/<package>.copyright                    each package's copyright file, verbatim
    OUT/corpus.json, OUT/README.md                      what went in, counts, the licence mix

The same file often ships in several games: a file whose audio fingerprint matches one
already taken is left out (a test file matching a train file too), and counted.
"""

from __future__ import annotations

import csv
import fnmatch
import hashlib
import io
import json
import logging
import re
import tomllib
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edge.resample import resample
from shared_models.constants import EVENT_LABELS, SAMPLE_RATE_HZ
from shared_models.wavio import write_wav
from training.corpus import progress_bar
from training.debian_audio import DebFile, PackageFiles, fetch_deb
from training.sources import NONE_FOLDER

log = logging.getLogger(__name__)

CATALOGUE = Path(__file__).with_name("real_sources.toml")
# The six Debian packages reserved for the independent evaluation (the project guide names
# them): never trained or tuned on. Kept as SHA-256 digests of their names, so this code
# refuses them without naming them.
RESERVED_PACKAGE_DIGESTS = frozenset({
    "154b36408ea7e55535814849f743baa9118935abf7a69846a31d6ae4200b4740",
    "40965bebf28ed6dc8bebe2c17ea59f7fa6f8a51b42dc43bcb0c875f9003f9210",
    "84aa99d1d9582fe48a2b58f3637e73a851dd063836241a6e1888fab2e8f20b8c",
    "8f4ff0493a81b777a80d30f5b4c395f73f99507ad8f51674b2811fefebb313a0",
    "9d357330b1d880468db3c47e0acfef0d3d1825b559d450b1ebaa7f6be9021824",
    "fc09eebf85e833bf7f0411d4cfc935a8ccb8d07e01adbe5b1a015bb228cf294a",
})
SPLITS = ("train", "test")
ROLES = ("background", "confuser")
AUDIO_SUFFIXES = (".wav", ".ogg", ".oga", ".flac", ".mp3")
MANIFEST_COLUMNS = ("clip", "split", "label", "role", "package", "package_version", "member", "licence",
                    "sha256", "original_rate_hz", "original_channels", "start_s", "duration_s")

MAX_CLIP_S = 10.0
MIN_CLIP_S = 0.2
SILENCE_DBFS = -70.0  # a clip whose RMS is below this is digital silence: left out
FINGERPRINT_FRAME = SAMPLE_RATE_HZ // 50  # 20 ms
FINGERPRINT_FLOOR_DB = -60.0
DUPLICATE_MEAN_DB = 1.5  # envelopes closer than this on average (and as long) are one recording


class RealCorpusError(ValueError):
    """A catalogue or build problem; the message names the package, rule or file."""


# ---- the catalogue -------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    glob: str
    label: str | None  # one of EVENT_LABELS, or None for a negative
    role: str  # "event" for a label, else "background" / "confuser"


@dataclass(frozen=True)
class Package:
    name: str
    split: str
    licence: str
    rules: tuple[Rule, ...]
    licence_note: str = ""

    def rule_for(self, path: str) -> Rule | None:
        return next((r for r in self.rules if fnmatch.fnmatchcase(path, r.glob)), None)


def load_catalogue(path: Path = CATALOGUE, only: Iterable[str] | None = None) -> list[Package]:
    """The catalogue's packages (``only``: just these names), validated; train packages first."""
    where = str(path)
    try:
        doc = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise RealCorpusError(f"{where}: {exc}") from None
    packages = []
    for i, entry in enumerate(doc.get("package", [])):
        name = entry.get("name", f"<package #{i + 1}>")
        unknown = set(entry) - {"name", "split", "licence", "licence_note", "rules"}
        if unknown:
            raise RealCorpusError(f"{where}: {name}: unknown keys {sorted(unknown)}")
        if is_reserved(name):
            raise RealCorpusError(f"{where}: {name} is reserved for the independent evaluation: "
                                  "never train or tune on it")
        if entry.get("split") not in SPLITS:
            raise RealCorpusError(f"{where}: {name}: split must be one of {SPLITS}, got {entry.get('split')!r}")
        if not entry.get("licence"):
            raise RealCorpusError(f"{where}: {name}: licence is required")
        packages.append(Package(name, entry["split"], entry["licence"], _rules(where, name, entry.get("rules")),
                                entry.get("licence_note", "")))
    names = [p.name for p in packages]
    if duplicated := sorted(n for n, k in Counter(names).items() if k > 1):
        raise RealCorpusError(f"{where}: packages listed twice: {duplicated}")
    if only is not None:
        wanted = set(only)
        if missing := sorted(wanted - set(names)):
            raise RealCorpusError(f"{where}: not in the catalogue: {missing}")
        packages = [p for p in packages if p.name in wanted]
    return sorted(packages, key=lambda p: SPLITS.index(p.split))  # stable: catalogue order within a split


def is_reserved(package: str) -> bool:
    """Whether ``package`` is one of the independent evaluation's packages."""
    return hashlib.sha256(package.encode()).hexdigest() in RESERVED_PACKAGE_DIGESTS


def _rules(where: str, package: str, rules: object) -> tuple[Rule, ...]:
    if not isinstance(rules, list) or not rules:
        raise RealCorpusError(f"{where}: {package}: rules must be a non-empty list")
    out = []
    for rule in rules:
        if not isinstance(rule, dict) or not isinstance(rule.get("glob"), str):
            raise RealCorpusError(f"{where}: {package}: every rule needs a glob: {rule!r}")
        label, role = rule.get("label"), rule.get("role")
        if (label is None) == (role is None) or set(rule) - {"glob", "label", "role"}:
            raise RealCorpusError(f"{where}: {package}: rule {rule['glob']!r} needs exactly one of label / role")
        if label is not None and label not in EVENT_LABELS:
            raise RealCorpusError(f"{where}: {package}: unknown label {label!r}; known: {', '.join(EVENT_LABELS)}")
        if role is not None and role not in ROLES:
            raise RealCorpusError(f"{where}: {package}: role must be one of {ROLES}, got {role!r}")
        out.append(Rule(rule["glob"], label, "event" if label else role))
    return tuple(out)


# ---- audio ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Decoded:
    audio: np.ndarray  # float32 mono at SAMPLE_RATE_HZ
    rate_hz: int  # the file's own
    channels: int


def decode(data: bytes, source: str) -> Decoded:
    """Any file libsndfile reads -> mono float32 at 16 kHz; RealCorpusError if it cannot."""
    import soundfile

    try:
        samples, rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except (RuntimeError, soundfile.LibsndfileError, TypeError, ValueError) as exc:
        raise RealCorpusError(f"{source}: cannot decode: {exc}") from None
    if samples.size == 0 or not np.all(np.isfinite(samples)):
        raise RealCorpusError(f"{source}: empty or not finite")
    mono = samples.mean(axis=1).astype(np.float32)
    return Decoded(np.clip(to_16k(mono, int(rate)), -1.0, 1.0), int(rate), samples.shape[1])


def to_16k(audio: np.ndarray, rate_hz: int) -> np.ndarray:
    """Resampled to 16 kHz; an odd rate (30594 Hz) is taken as the nearest multiple of 50 Hz,
    a pitch error under 0.1 %, because its exact ratio needs too many polyphase filters."""
    if rate_hz == SAMPLE_RATE_HZ:
        return audio
    try:
        return resample(audio, rate_hz, SAMPLE_RATE_HZ).astype(np.float32)
    except ValueError:
        return resample(audio, max(50, round(rate_hz / 50) * 50), SAMPLE_RATE_HZ).astype(np.float32)


def envelope_db(audio: np.ndarray) -> np.ndarray:
    """The fingerprint: 20 ms RMS envelope of the peak-normalised audio in dB, floored at -60."""
    n = len(audio) // FINGERPRINT_FRAME
    frames = audio[: n * FINGERPRINT_FRAME].reshape(n, FINGERPRINT_FRAME)  # (frames, 320)
    peak = float(np.max(np.abs(audio))) or 1.0
    rms = np.sqrt(np.mean((frames / peak) ** 2, axis=1)) + 1e-12
    return np.maximum(20 * np.log10(rms), FINGERPRINT_FLOOR_DB).astype(np.float32)


@dataclass
class Fingerprints:
    """Recordings taken so far, to find a file that is one of them again (re-encoded, resampled)."""

    by_length: dict[int, list[tuple[np.ndarray, str]]] = field(default_factory=dict)

    def match(self, env: np.ndarray) -> str | None:
        for n in range(len(env) - 2, len(env) + 3):
            for other, source in self.by_length.get(n, []):
                m = min(len(env), len(other))
                if m and float(np.mean(np.abs(env[:m] - other[:m]))) < DUPLICATE_MEAN_DB:
                    return source
        return None

    def add(self, env: np.ndarray, source: str) -> None:
        self.by_length.setdefault(len(env), []).append((env, source))


def clips_of(audio: np.ndarray, max_clip_s: float) -> list[tuple[int, np.ndarray]]:
    """(start sample, clip) pieces of at most ``max_clip_s``; a short tail joins no clip."""
    step = int(max_clip_s * SAMPLE_RATE_HZ)
    pieces = [(s, audio[s : s + step]) for s in range(0, len(audio), step)]
    return [(s, c) for s, c in pieces if len(c) >= MIN_CLIP_S * SAMPLE_RATE_HZ
            and (s == 0 or len(c) >= 1.0 * SAMPLE_RATE_HZ)]


def rms_dbfs(audio: np.ndarray) -> float:
    return float(20 * np.log10(np.sqrt(np.mean(np.square(audio, dtype=np.float64))) + 1e-12))


def clip_name(package: str, member: str, index: int | None) -> str:
    """``<package>__<folder>-<file>-<hash of the path>[__<k>].wav``: readable, and unique per member."""
    path = Path(member).with_suffix("")
    readable = re.sub(r"[^A-Za-z0-9._-]+", "-", f"{path.parent.name}-{path.name}").strip("-")[:60]
    unique = hashlib.sha1(member.encode()).hexdigest()[:6]
    return f"{package}__{readable}-{unique}" + (f"__{index:03d}" if index is not None else "") + ".wav"


def trim_quiet_ends(audio: np.ndarray, below_peak_db: float = 40.0) -> tuple[int, np.ndarray]:
    """(first sample kept, the event file without its leading and trailing near-silence):
    padding is not the event."""
    loud = np.flatnonzero(np.abs(audio) >= np.max(np.abs(audio)) * 10 ** (-below_peak_db / 20))
    return (int(loud[0]), audio[loud[0] : loud[-1] + 1]) if loud.size else (0, audio)


# ---- the build -----------------------------------------------------------------------------


@dataclass
class Build:
    """What a build took and left out, as it goes; written to corpus.json and README.md."""

    out: Path
    rows: list[dict] = field(default_factory=list)
    packages: dict[str, dict] = field(default_factory=dict)
    skipped: Counter = field(default_factory=Counter)
    duplicates: list[tuple[str, str]] = field(default_factory=list)  # (left out, same as)
    empty_rules: list[str] = field(default_factory=list)


def build_real_corpus(out: Path, cache_dir: Path, catalogue: Path = CATALOGUE, only: Iterable[str] | None = None,
                      max_clip_s: float = MAX_CLIP_S, progress: bool = True) -> dict:
    """Fetch, decode, deduplicate, cut and write the corpus; returns the summary in corpus.json."""
    if out.exists() and any(out.iterdir()):
        raise RealCorpusError(f"{out} exists and is not empty: give a new folder")
    if not MIN_CLIP_S < max_clip_s <= 60:
        raise RealCorpusError(f"max_clip_s must be in ({MIN_CLIP_S}, 60], got {max_clip_s}")
    packages = load_catalogue(catalogue, only)
    build = Build(out)
    fingerprints = Fingerprints()
    (out / "licences").mkdir(parents=True)
    for package in progress_bar(packages, progress, "packages", unit="package"):
        deb = fetch_deb(package.name, cache_dir)
        _add_package(build, package, deb, fingerprints, max_clip_s)
    return _write_summary(build, catalogue, max_clip_s)


def _add_package(build: Build, package: Package, deb: DebFile, fingerprints: Fingerprints,
                 max_clip_s: float) -> None:
    files = PackageFiles(deb)
    (build.out / "licences" / f"{package.name}.copyright").write_text(files.copyright())
    chosen = [(path, rule) for path in files.paths() if (rule := package.rule_for(path)) is not None]
    for rule in package.rules:
        if not any(r is rule for _, r in chosen):
            log.warning("%s %s: rule %r matches no file (the catalogue may be out of date)",
                        package.name, deb.version, rule.glob)
            build.empty_rules.append(f"{package.name}: {rule.glob}")
    taken = 0
    for path, rule in chosen:
        source = f"{package.name}:{path}"
        if not path.lower().endswith(AUDIO_SUFFIXES):
            build.skipped["not an audio file"] += 1
            continue
        data = files.read(path)
        if data is None:
            build.skipped["unreadable or outside the package"] += 1
            continue
        try:
            decoded = decode(data, source)
        except RealCorpusError as exc:
            log.info("skipped %s", exc)
            build.skipped["cannot decode"] += 1
            continue
        env = envelope_db(decoded.audio)
        if (same := fingerprints.match(env)) is not None:
            build.duplicates.append((source, same))
            build.skipped["duplicate recording"] += 1
            continue
        fingerprints.add(env, source)
        offset, audio = trim_quiet_ends(decoded.audio) if rule.label else (0, decoded.audio)
        pieces = clips_of(audio, max_clip_s)
        for k, (start, clip) in enumerate(pieces):
            if rms_dbfs(clip) < SILENCE_DBFS:
                build.skipped["silent clip"] += 1
                continue
            folder = build.out / package.split / (rule.label or NONE_FOLDER)
            folder.mkdir(parents=True, exist_ok=True)
            wav = folder / clip_name(package.name, path, k if len(pieces) > 1 else None)
            write_wav(wav, clip, SAMPLE_RATE_HZ)
            build.rows.append({
                "clip": wav.relative_to(build.out).as_posix(), "split": package.split, "label": rule.label or "",
                "role": rule.role, "package": package.name, "package_version": deb.version, "member": path,
                "licence": package.licence, "sha256": hashlib.sha256(wav.read_bytes()).hexdigest(),
                "original_rate_hz": decoded.rate_hz, "original_channels": decoded.channels,
                "start_s": round((offset + start) / SAMPLE_RATE_HZ, 3), "duration_s": round(len(clip) / SAMPLE_RATE_HZ, 3),
            })
            taken += 1
    build.packages[package.name] = {"version": deb.version, "deb_sha256": deb.sha256, "split": package.split,
                                    "licence": package.licence, "licence_note": package.licence_note,
                                    "clips": taken}


def _write_summary(build: Build, catalogue: Path, max_clip_s: float) -> dict:
    build.rows.sort(key=lambda r: r["clip"])
    with (build.out / "manifest.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=MANIFEST_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(build.rows)
    totals: dict[str, dict[str, dict[str, float]]] = {s: {} for s in SPLITS}
    for row in build.rows:
        kind = row["label"] or row["role"]
        entry = totals[row["split"]].setdefault(kind, {"clips": 0, "minutes": 0.0})
        entry["clips"] += 1
        entry["minutes"] = round(entry["minutes"] + row["duration_s"] / 60, 3)
    summary = {
        "catalogue_sha256": hashlib.sha256(catalogue.read_bytes()).hexdigest(),
        "sample_rate_hz": SAMPLE_RATE_HZ, "max_clip_s": max_clip_s,
        "manifest_sha256": hashlib.sha256((build.out / "manifest.csv").read_bytes()).hexdigest(),
        "clips": len(build.rows), "totals": totals, "packages": build.packages,
        "licences": dict(Counter(r["licence"] for r in build.rows).most_common()),
        "skipped": dict(sorted(build.skipped.items())),
        "duplicates": [{"left_out": a, "same_as": b} for a, b in build.duplicates],
        "rules_matching_nothing": build.empty_rules,
    }
    (build.out / "corpus.json").write_text(json.dumps(summary, indent=2) + "\n")
    (build.out / "README.md").write_text(readme(summary))
    return summary


def readme(summary: dict) -> str:
    """The corpus's own README: where it came from, what is in each split, under which licences."""
    lines = ["# soundfleet real-audio corpus", "",
             "Written by `soundfleet data real` from Debian packages named in `training/real_sources.toml`",
             f"(catalogue sha256 {summary['catalogue_sha256'][:16]}). Every clip's package, version, file",
             "and licence is in `manifest.csv`; each package's copyright file is in `licences/`.",
             "A package is wholly in `train/` or wholly in `test/`. Clips in `_none/` are negatives.", ""]
    for split in SPLITS:
        lines += [f"## {split}", "", "| label / role | clips | audio |", "|---|---:|---:|"]
        lines += [f"| {kind} | {v['clips']} | {format_duration(v['minutes'])} |"
                  for kind, v in sorted(summary["totals"][split].items())]
        lines += [""]
    lines += ["## Licences (clips)", "", "| licence | clips |", "|---|---:|"]
    lines += [f"| {name} | {n} |" for name, n in summary["licences"].items()]
    lines += ["", "## Left out", ""]
    lines += [f"- {why}: {n}" for why, n in summary["skipped"].items()] or ["- nothing"]
    return "\n".join(lines) + "\n"


def format_duration(minutes: float) -> str:
    return f"{minutes * 60:.1f} s" if minutes < 2 else f"{minutes:.1f} min"
