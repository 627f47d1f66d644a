"""`soundfleet data real`: Debian packages -> a source-split, deduplicated, documented corpus.

The packages here are real .deb files built by `dpkg-deb --build` (xz, gzip and zstd
data archives) around audio of several rates, channel counts and formats, so the whole
path runs: ar archive, data tar, links, decoding, resampling, fingerprints, cutting,
the manifest and the folders layout that training reads.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile

from edge.resample import resample
from shared_models import bundle
from shared_models.wavio import read_wav, read_wav_info
from soundfleet.cli import main
from training import real_corpus
from training.debian_audio import DebianError, PackageFiles, fetch_deb
from training.real_corpus import (
    CATALOGUE,
    RealCorpusError,
    build_real_corpus,
    is_reserved,
    load_catalogue,
)
from training.sources import load_dataset

FIXTURES = Path(__file__).parent / "fixtures"
SOUNDS = "usr/share/sounds/demo"
pytestmark = pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs Debian's dpkg-deb")


def make_deb(cache: Path, name: str, files: dict[str, bytes], compression: str = "xz",
             links: dict[str, str] | None = None, licence: str = "CC0-1.0") -> Path:
    """A real .deb holding ``files`` (path -> bytes) and a DEP-5 copyright file."""
    root = cache / f"build-{name}"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text(
        f"Package: {name}\nVersion: 1.2-3\nArchitecture: all\nMaintainer: t <t@example.org>\n"
        "Description: test sounds\n")
    doc = root / "usr" / "share" / "doc" / name
    doc.mkdir(parents=True)
    (doc / "copyright").write_text(f"Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n\n"
                                   f"Files: *\nLicense: {licence}\n")
    for path, data in files.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(data)
    for path, target in (links or {}).items():
        (root / path).symlink_to(target)
    deb = cache / f"{name}_1.2-3_all.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", f"-Z{compression}", "--build", str(root), str(deb)],
                   check=True, capture_output=True)
    shutil.rmtree(root)
    return deb


def encoded(audio: np.ndarray, rate_hz: int, fmt: str, channels: int = 1) -> bytes:
    import io

    buffer = io.BytesIO()
    data = np.repeat(audio[:, None], channels, axis=1) if channels > 1 else audio
    soundfile.write(buffer, data, rate_hz, format=fmt, subtype="VORBIS" if fmt == "OGG" else "PCM_16")
    return buffer.getvalue()


def tone_bursts(seconds: float, rate_hz: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate_hz)) / rate_hz
    gate = (np.sin(2 * np.pi * 1.3 * t) > 0).astype(np.float32)
    return (0.4 * gate * np.sin(2 * np.pi * rng.uniform(300, 900) * t) + 0.01 * rng.standard_normal(t.size)
            ).astype(np.float32)


CATALOGUE_TOML = """
[[package]]
name = "sf-test-barks"
split = "train"
licence = "CC0-1.0"
rules = [
  { glob = "usr/share/sounds/demo/dog*", label = "dog_bark" },
  { glob = "usr/share/sounds/demo/street*", role = "background" },
  { glob = "usr/share/sounds/demo/*", role = "confuser" },
]

[[package]]
name = "sf-test-heldout"
split = "test"
licence = "GPL-2+"
rules = [
  { glob = "usr/share/sounds/other/bark*", label = "dog_bark" },
  { glob = "usr/share/sounds/other/horn*", label = "car_horn" },
  { glob = "usr/share/sounds/never/*", role = "background" },
]
"""


@pytest.fixture
def packages(tmp_path) -> tuple[Path, Path]:
    """A catalogue and a cache of two packages: one train, one test."""
    cache = tmp_path / "cache"
    cache.mkdir()
    siren, rate = read_wav(FIXTURES / "siren_street.wav")
    bark = tone_bursts(1.5, 22_050, seed=1)
    make_deb(cache, "sf-test-barks", {
        f"{SOUNDS}/dog1.wav": encoded(bark, 22_050, "WAV", channels=2),
        f"{SOUNDS}/dog2.ogg": encoded(tone_bursts(2.0, 44_100, seed=2), 44_100, "OGG"),
        f"{SOUNDS}/street.flac": encoded(np.tile(siren, 3), rate, "FLAC"),  # 24 s: 10 + 10 + 4
        f"{SOUNDS}/silence.wav": encoded(np.zeros(8000, np.float32), 16_000, "WAV"),
        f"{SOUNDS}/broken.wav": b"RIFF\x10\x00\x00\x00WAVEnot really",
        f"{SOUNDS}/notes.txt": b"not audio",
    }, links={f"{SOUNDS}/dogz-link.wav": "dog1.wav"})  # a link: the same recording twice
    make_deb(cache, "sf-test-heldout", {
        "usr/share/sounds/other/bark-copy.wav": encoded(resample(bark, 22_050, 11_025), 11_025, "WAV"),  # resampled
        "usr/share/sounds/other/horn.wav": encoded(tone_bursts(3.0, 8_000, seed=3), 8_000, "WAV"),
    }, compression="gzip")
    catalogue = tmp_path / "real_sources.toml"
    catalogue.write_text(CATALOGUE_TOML)
    return catalogue, cache


def test_a_build_writes_the_source_split_folders_layout_with_provenance(packages, tmp_path):
    catalogue, cache = packages
    out = tmp_path / "real"
    summary = build_real_corpus(out, cache, catalogue, progress=False)

    train, test = load_dataset(out / "train"), load_dataset(out / "test")
    assert train.labels == ("dog_bark",) and test.labels == ("car_horn",)
    by_name = {c.wav_path.name.split("__")[1].rsplit("-", 1)[0]: c for c in train.clips}
    assert [e.label for e in by_name["demo-dog1"].events] == ["dog_bark"]
    negatives = [c for c in train.clips if c.wav_path.parent.name == "_none"]
    assert len(negatives) == 3 and all(c.events == [] for c in negatives)  # street.flac cut in 3
    assert sorted(round(c.duration_s) for c in negatives) == [4, 10, 10]

    rows = list(csv.DictReader((out / "manifest.csv").open()))
    assert len(rows) == summary["clips"] == len(train.clips) + len(test.clips)
    for row in rows:
        wav = out / row["clip"]
        assert hashlib.sha256(wav.read_bytes()).hexdigest() == row["sha256"]
        assert read_wav_info(wav).sample_rate_hz == 16_000
        assert row["package_version"] == "1.2-3"
        assert row["split"] == wav.relative_to(out).parts[0]
    dog1 = next(r for r in rows if r["member"].endswith("dog1.wav"))
    assert (dog1["original_rate_hz"], dog1["original_channels"], dog1["licence"]) == ("22050", "2", "CC0-1.0")
    assert {r["licence"] for r in rows if r["split"] == "test"} == {"GPL-2+"}

    skipped = summary["skipped"]
    assert skipped == {"cannot decode": 1, "duplicate recording": 2, "not an audio file": 1, "silent clip": 1}
    left_out = {d["left_out"].split(":")[1]: d["same_as"].split(":")[1] for d in summary["duplicates"]}
    assert left_out == {f"{SOUNDS}/dogz-link.wav": f"{SOUNDS}/dog1.wav",
                        "usr/share/sounds/other/bark-copy.wav": f"{SOUNDS}/dog1.wav"}  # test never holds a train recording
    assert summary["rules_matching_nothing"] == ["sf-test-heldout: usr/share/sounds/never/*"]
    assert "CC0-1.0" in (out / "licences" / "sf-test-barks.copyright").read_text()
    readme = (out / "README.md").read_text()
    assert re.search(r"\| dog_bark \| 2 \| 3\.\d s \|", readme) and "| GPL-2+ | 1 |" in readme


def test_the_same_debs_give_the_same_bytes(packages, tmp_path):
    catalogue, cache = packages
    first = build_real_corpus(tmp_path / "a", cache, catalogue, progress=False)
    second = build_real_corpus(tmp_path / "b", cache, catalogue, progress=False)
    assert first == second
    assert (tmp_path / "a" / "manifest.csv").read_bytes() == (tmp_path / "b" / "manifest.csv").read_bytes()
    assert load_dataset(tmp_path / "a" / "train").data_sha256 == load_dataset(tmp_path / "b" / "train").data_sha256


def test_the_command_line_builds_and_reports(packages, tmp_path, capsys):
    catalogue, cache = packages
    out = tmp_path / "cli"
    assert main(["data", "real", "--out", str(out), "--cache", str(cache), "--catalogue", str(catalogue),
                 "--packages", "sf-test-heldout", "--no-progress"]) == 0
    assert json.loads((out / "corpus.json").read_text())["packages"].keys() == {"sf-test-heldout"}
    assert main(["data", "real", "--out", str(out), "--cache", str(cache), "--catalogue", str(catalogue)]) == 1
    assert "exists and is not empty" in capsys.readouterr().err


def test_a_zstd_package_is_read_too(tmp_path):
    make_deb(tmp_path, "sf-test-zstd", {f"{SOUNDS}/a.wav": encoded(tone_bursts(1.0, 16_000, 4), 16_000, "WAV")},
             compression="zstd")
    files = PackageFiles(fetch_deb("sf-test-zstd", tmp_path))
    assert files.matching(f"{SOUNDS}/*") == [f"{SOUNDS}/a.wav"]
    assert files.read(f"{SOUNDS}/a.wav").startswith(b"RIFF")


def test_a_package_that_cannot_be_fetched_is_named(tmp_path):
    with pytest.raises(DebianError, match="soundfleet-no-such-package-xyz"):
        fetch_deb("soundfleet-no-such-package-xyz", tmp_path)


def test_a_file_that_is_not_a_package_is_refused(tmp_path):
    (tmp_path / "fake_1.0_all.deb").write_bytes(b"PK\x03\x04 a zip, not a deb")
    with pytest.raises(DebianError, match="not a Debian package"):
        PackageFiles(fetch_deb("fake", tmp_path))


def test_a_corrupt_package_is_refused_saying_how_to_recover(tmp_path):
    member = b"data.tar.xz".ljust(16) + b"0".ljust(12) + b"0".ljust(6) + b"0".ljust(6) + b"100644".ljust(8)
    payload = b"\xfd7zXZ\x00 truncated"
    deb = b"!<arch>\n" + member + str(len(payload)).encode().ljust(10) + b"`\n" + payload
    (tmp_path / "broken_1.0_all.deb").write_bytes(deb)
    with pytest.raises(DebianError, match="data.tar.xz is corrupt .*fetch the package again"):
        PackageFiles(fetch_deb("broken", tmp_path))


def test_the_reserved_evaluation_packages_are_refused(tmp_path, monkeypatch):
    assert len(real_corpus.RESERVED_PACKAGE_DIGESTS) == 6
    reserved = "sf-test-reserved"  # stands in for the six, which the code holds only as digests
    digest = hashlib.sha256(reserved.encode()).hexdigest()
    monkeypatch.setattr(real_corpus, "RESERVED_PACKAGE_DIGESTS", real_corpus.RESERVED_PACKAGE_DIGESTS | {digest})
    path = tmp_path / "c.toml"
    path.write_text(f'[[package]]\nname = "{reserved}"\nsplit = "train"\nlicence = "x"\n'
                    'rules = [{ glob = "*", role = "background" }]\n')
    with pytest.raises(RealCorpusError, match="reserved for the independent evaluation"):
        load_catalogue(path)


@pytest.mark.parametrize(("entry", "message"), [
    ('split = "dev"\nlicence = "x"\nrules = [{ glob = "*", role = "background" }]', "split must be one of"),
    ('split = "train"\nrules = [{ glob = "*", role = "background" }]', "licence is required"),
    ('split = "train"\nlicence = "x"\nrules = [{ glob = "*", label = "cat" }]', "unknown label 'cat'; known: siren"),
    ('split = "train"\nlicence = "x"\nrules = [{ glob = "*", label = "siren", role = "background" }]',
     "exactly one of label / role"),
    ('split = "train"\nlicence = "x"\nrules = []', "non-empty list"),
    ('split = "train"\nlicence = "x"\nurl = "y"\nrules = [{ glob = "*", role = "background" }]', "unknown keys"),
])
def test_a_bad_catalogue_entry_is_named(tmp_path, entry, message):
    path = tmp_path / "c.toml"
    path.write_text(f'[[package]]\nname = "p"\n{entry}\n')
    with pytest.raises(RealCorpusError, match=message):
        load_catalogue(path)
def test_the_shipped_catalogue_is_valid_and_keeps_every_package_in_one_split():
    packages = load_catalogue(CATALOGUE)
    assert packages, "training/real_sources.toml names no package"
    assert not [p.name for p in packages if is_reserved(p.name)]
    splits = {p.split for p in packages}
    assert splits == {"train", "test"}
    labels_in_test = {r.label for p in packages if p.split == "test" for r in p.rules if r.label}
    assert {"siren", "dog_bark", "car_horn", "speech"} <= labels_in_test


def test_the_real_audio_report_states_what_its_json_says(packages, tmp_path):
    from training.real_audio_report import (
        FALSE_EVENTS_PER_24H_TARGET,
        render,
        run_real_audio_report,
    )

    catalogue, cache = packages
    build_real_corpus(tmp_path / "real", cache, catalogue, progress=False)
    results = run_real_audio_report(tmp_path / "real", bundle.default_bundle_dir(), tmp_path / "out", "test")
    saved = json.loads((tmp_path / "out" / "real-audio.json").read_text())
    assert saved["evaluation"]["data"]["clips"] == 1  # the held-out package's horn (its bark repeats train)
    text = (tmp_path / "out" / "real-audio.md").read_text()
    pool = results["evaluation"]["events"]["negative_pool"]
    assert pool["hours"] == 0  # no negatives in that split: the rate cannot be given
    assert "**n/a per 24 h**" in text and f"at most {FALSE_EVENTS_PER_24H_TARGET:g}" in text
    horn = results["evaluation"]["events"]["recall"]["car_horn"]
    assert f"| car_horn | 1 | {horn['detected']} | {horn['recall']:.2f} |" in text
    assert "No real test clips for: siren, smoke_alarm" in text
    curve = results["evaluation"]["metrics"]["pr_curves"]["car_horn"]
    assert curve["recall"][0] == 1.0 and curve["recall"] == sorted(curve["recall"], reverse=True)
    assert results["plots"] == ["real-audio-pr.png"] and (tmp_path / "out" / "real-audio-pr.png").stat().st_size > 1000
    assert "[real-audio-pr.png](real-audio-pr.png)" in text
    assert "Not run: `soundfleet report real-audio --compare`" in text

    # with a comparison, the verdicts come from its numbers: here the CNN is the better model
    product_map = results["evaluation"]["metrics"]["mAP"]["mean"]
    results["comparison"] = {
        "cnn": {"mAP": product_map + 0.1, "AP": {"car_horn": 0.5}, "windows": 3, "parameters": 200_000, "width": 24,
                "product_parameters": 150_000, "epochs": 8, "wall_s": 1.0},
        "pretraining": {"bundle": {"pretrain_on": "all", "pretraining_clips": 90},
                        "ablation": {"pretrain_on": "labelled", "model_version": "sf1-abl", "pretraining_clips": 40,
                                     "mAP": product_map - 0.05, "AP": {}, "macro_f1": 0.1,
                                     "false_events_per_24h": None, "recall": {}, "wall_s": 1.0}},
    }
    text = render(results)
    assert f"{product_map:.3f} against the CNN's {product_map + 0.1:.3f} (at least the CNN's: **not met**)" in text
    assert "changes mAP by +0.050" in text
    assert "| `sf1-abl` (ablation) | codes -> code LM -> classifier | 150,000 | 40 (`labelled`) |" in text
    results["comparison"]["cnn"]["mAP"] = product_map
    assert "(at least the CNN's: met)" in render(results)


def test_the_real_audio_report_needs_a_built_corpus(tmp_path):
    from training.real_audio_report import ReportError, run_real_audio_report

    with pytest.raises(ReportError, match="soundfleet data real"):
        run_real_audio_report(tmp_path, bundle.default_bundle_dir(), tmp_path / "out", "test")
