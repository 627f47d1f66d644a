"""Training audio sources: dataset layouts beyond the built-in corpus, and the fleet
archive (training/sources.py, training/fleet_archive.py).

The edge's sources (files, stdin, microphones) are in test_edge_sources.py.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from shared_models.constants import EVENT_LABELS, NS_PER_SECOND
from shared_models.wavio import write_wav
from training.fleet_archive import (
    FleetRow,
    FleetSequence,
    fleet_partitioning,
    read_fleet_archive,
    write_fleet_shard,
)
from training.sources import LAYOUTS, Clip, ClipEvent, DatasetError, load_dataset


def tone(path: Path, seconds: float = 0.5, rate_hz: int = 16_000, freq_hz: float = 440.0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(seconds * rate_hz)) / rate_hz
    write_wav(path, 0.3 * np.sin(2 * np.pi * freq_hz * t), rate_hz)
    return path


def write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
    return path


ESC50_HEADER = ["filename", "fold", "target", "category", "esc10", "src_file", "take"]


def make_esc50(root: Path) -> Path:
    rows = [
        ["1-100-A-0.wav", 1, 0, "dog", "True", "100", "A"],
        ["1-200-A-1.wav", 1, 1, "rooster", "False", "200", "A"],
        ["2-300-A-0.wav", 2, 0, "dog", "True", "300", "A"],
        ["3-400-A-2.wav", 3, 2, "rain", "False", "400", "A"],
    ]
    for row in rows:
        tone(root / "audio" / row[0], seconds=0.75, rate_hz=44_100)
    write_csv(root / "meta" / "esc50.csv", ESC50_HEADER, rows)
    return root


def make_fsd50k(root: Path) -> Path:
    truth = root / "FSD50K.ground_truth"
    write_csv(
        truth / "dev.csv",
        ["fname", "labels", "mids", "split"],
        [
            [64760, "Electric_guitar,Guitar,Music", "/m/02sgy,/m/0342h,/m/04rlf", "train"],
            [16399, "Bark,Dog,Animal", "/m/05tny_,/m/0bt9lr,/m/0jbk", "val"],
        ],
    )
    write_csv(truth / "eval.csv", ["fname", "labels", "mids"], [[37199, "Siren", "/m/03kmc9"]])
    tone(root / "FSD50K.dev_audio" / "64760.wav", seconds=1.0, rate_hz=44_100)
    tone(root / "FSD50K.dev_audio" / "16399.wav", seconds=0.5, rate_hz=44_100)
    tone(root / "FSD50K.eval_audio" / "37199.wav", seconds=0.6, rate_hz=22_050)
    return root


def make_builtin(root: Path) -> Path:
    tone(root / "clips" / "clip_00000.wav", seconds=1.0)
    tone(root / "clips" / "clip_00001.wav", seconds=0.5)
    write_csv(root / "labels.csv", ["clip", "label", "onset_s", "offset_s"],
              [["clip_00000.wav", "siren", "0.100", "0.600"]])  # fmt: skip
    (root / "manifest.json").write_text(json.dumps({"labels": list(EVENT_LABELS)}))
    return root


def test_builtin_corpus_loads_with_strong_labels_in_manifest_order(tmp_path):
    ds = load_dataset(make_builtin(tmp_path / "corpus"))
    assert ds.labels == EVENT_LABELS
    assert [c.wav_path.name for c in ds.clips] == ["clip_00000.wav", "clip_00001.wav"]
    assert ds.clips[0].events == [ClipEvent("siren", 0.1, 0.6)]
    assert ds.clips[1].events == []
    assert [c.duration_s for c in ds.clips] == pytest.approx([1.0, 0.5])
    assert all(isinstance(c, Clip) for c in ds.clips)


def test_labelled_folders_give_weak_whole_clip_labels(tmp_path):
    root = tmp_path / "folders"
    tone(root / "cat" / "a.wav", seconds=0.5, rate_hz=8_000)
    tone(root / "cat" / "b.WAV", seconds=0.8, rate_hz=8_000)
    tone(root / "alarm" / "c.wav", seconds=1.0, rate_hz=48_000)
    (root / "empty").mkdir()
    ds = load_dataset(root)
    assert ds.labels == ("alarm", "cat")
    assert ds.name == "folders"
    by_name = {c.wav_path.name: c for c in ds.clips}
    assert {n: c.duration_s for n, c in by_name.items()} == pytest.approx(
        {"a.wav": 0.5, "b.WAV": 0.8, "c.wav": 1.0}
    )
    for name, label in [("a.wav", "cat"), ("b.WAV", "cat"), ("c.wav", "alarm")]:
        assert by_name[name].events == [ClipEvent(label, 0.0, by_name[name].duration_s)]


def test_clips_in_the_none_folder_are_negatives_with_no_label(tmp_path):
    root = tmp_path / "folders"
    tone(root / "siren" / "a.wav", seconds=0.5, rate_hz=8_000)
    tone(root / "_none" / "rain.wav", seconds=0.7, rate_hz=16_000)
    ds = load_dataset(root)
    assert ds.labels == ("siren",)
    assert {c.wav_path.name: c.events for c in ds.clips}["rain.wav"] == []
    only_negatives = tmp_path / "negatives"
    tone(only_negatives / "_none" / "rain.wav", seconds=0.7, rate_hz=16_000)
    with pytest.raises(DatasetError, match="no sub-folder holds .wav files"):
        load_dataset(only_negatives, layout="folders")


def test_esc50_layout_labels_durations_and_fold_selection(tmp_path):
    root = make_esc50(tmp_path / "ESC-50-master")
    ds = load_dataset(root)
    assert ds.labels == ("dog", "rain", "rooster")
    assert len(ds.clips) == 4
    assert all(c.duration_s == pytest.approx(0.75) for c in ds.clips)
    assert {c.wav_path.name: c.events[0].label for c in ds.clips}["1-200-A-1.wav"] == "rooster"

    part = load_dataset(root, folds=[1, 3])
    assert [c.wav_path.name for c in part.clips] == [
        "1-100-A-0.wav",
        "1-200-A-1.wav",
        "3-400-A-2.wav",
    ]
    assert part.labels == ds.labels  # the label set is the whole dataset's
    assert part.data_sha256 != ds.data_sha256
    with pytest.raises(DatasetError, match=r"no fold\(s\) \[7\]"):
        load_dataset(root, folds=[7])


def test_fsd50k_parses_quoted_comma_separated_multi_labels(tmp_path):
    root = make_fsd50k(tmp_path / "FSD50K")
    assert '"Electric_guitar,Guitar,Music"' in (root / "FSD50K.ground_truth/dev.csv").read_text()
    ds = load_dataset(root)
    assert ds.labels == ("Animal", "Bark", "Dog", "Electric_guitar", "Guitar", "Music", "Siren")
    by_name = {c.wav_path.name: c for c in ds.clips}
    guitar = by_name["64760.wav"]
    assert [e.label for e in guitar.events] == ["Electric_guitar", "Guitar", "Music"]
    assert all(e.onset_s == 0.0 and e.offset_s == guitar.duration_s for e in guitar.events)
    assert guitar.duration_s == pytest.approx(1.0)
    assert by_name["37199.wav"].duration_s == pytest.approx(0.6)
    assert by_name["37199.wav"].wav_path.parent.name == "FSD50K.eval_audio"

    evaluation = load_dataset(root, splits=["eval"])
    assert [c.wav_path.name for c in evaluation.clips] == ["37199.wav"]
    train = load_dataset(root, splits=["train"])
    assert [c.wav_path.name for c in train.clips] == ["64760.wav"]


def test_fsd50k_dev_only_is_detected(tmp_path):
    root = make_fsd50k(tmp_path / "FSD50K")
    (root / "FSD50K.ground_truth" / "eval.csv").unlink()
    ds = load_dataset(root)
    assert len(ds.clips) == 2 and "Siren" not in ds.labels


def test_missing_audio_error_names_the_csv_line(tmp_path):
    root = make_esc50(tmp_path / "esc")
    (root / "audio" / "2-300-A-0.wav").unlink()
    with pytest.raises(DatasetError, match=r"esc50\.csv:4: audio file not found: .*2-300-A-0\.wav"):
        load_dataset(root)
    assert len(load_dataset(root, folds=[1, 3]).clips) == 3  # other folds still load

    fsd = make_fsd50k(tmp_path / "fsd")
    (fsd / "FSD50K.eval_audio" / "37199.wav").unlink()
    with pytest.raises(DatasetError, match=r"eval\.csv:2: audio file not found"):
        load_dataset(fsd)


def test_unknown_layout_error_lists_the_known_layouts(tmp_path):
    (tmp_path / "notes.txt").write_text("nothing here")
    with pytest.raises(DatasetError) as info:
        load_dataset(tmp_path)
    for name in LAYOUTS:
        assert name in str(info.value)
    assert "meta/esc50.csv" in str(info.value)
    with pytest.raises(DatasetError, match="unknown dataset layout 'audioset'"):
        load_dataset(tmp_path, layout="audioset")


def test_forced_layout_overrides_detection(tmp_path):
    root = make_esc50(tmp_path / "esc")
    ds = load_dataset(root, layout="folders")  # audio/ is then just a folder of clips
    assert ds.labels == ("audio",) and len(ds.clips) == 4


def test_data_sha256_changes_with_one_audio_byte(tmp_path):
    root = make_esc50(tmp_path / "esc")
    before = load_dataset(root).data_sha256
    assert load_dataset(root).data_sha256 == before
    wav = root / "audio" / "3-400-A-2.wav"
    data = bytearray(wav.read_bytes())
    data[-1] ^= 1
    wav.write_bytes(bytes(data))
    assert load_dataset(root).data_sha256 != before


# --- fleet archive -------------------------------------------------------------------

T0_NS = 1_750_000_000 * NS_PER_SECOND  # 2025-06-15 UTC


def row(device: str, seq: int, codes, codebook_id: int = 7, site: str = "home") -> FleetRow:
    return FleetRow(site, device, seq, T0_NS + seq * NS_PER_SECOND, np.array(codes), codebook_id)


def test_fleet_archive_round_trip_splits_on_seq_gaps_and_filters_codebooks(tmp_path):
    rows = [
        row("kitchen", 10, [1, 2]),
        row("kitchen", 11, [3, 65535]),
        row("kitchen", 13, [4]),  # seq 12 missing: a new sequence
        row("hall", 0, [9, 9, 9]),
        row("hall", 0, [9, 9, 9]),  # a redelivery, kept once
        row("kitchen", 5, [100], codebook_id=8),
        row("garage", 1, [5], site="other site/ä"),
    ]
    written = write_fleet_shard(tmp_path, rows[:4])
    written += write_fleet_shard(tmp_path, [dict(r.__dict__) for r in rows[4:]])
    first = tmp_path / "codebook_id=7" / "site=home" / "date=2025-06-15"
    assert first / "part-0.parquet" in written and first / "part-1.parquet" in written

    import pyarrow.parquet as pq

    table = pq.ParquetFile(first / "part-0.parquet").read()
    assert table.schema.field("seq").type == "uint32"
    assert table.schema.field("codes").type == "binary"
    assert (
        pq.ParquetFile(first / "part-0.parquet").metadata.row_group(0).column(0).compression
        == "ZSTD"
    )

    seqs = list(read_fleet_archive(tmp_path, codebook_id=7))
    assert [(s.site, s.device, s.seq_first) for s in seqs] == [
        ("home", "hall", 0),
        ("home", "kitchen", 10),
        ("home", "kitchen", 13),
        ("other site/ä", "garage", 1),
    ]
    kitchen = seqs[1]
    assert isinstance(kitchen, FleetSequence) and kitchen.codes.dtype == np.uint16
    assert kitchen.codes.tolist() == [1, 2, 3, 65535]
    assert kitchen.t_start_ns == T0_NS + 10 * NS_PER_SECOND and kitchen.codebook_id == 7
    assert seqs[0].codes.tolist() == [9, 9, 9]
    site, device, seq_first, t_start_ns, codes, codebook_id = seqs[2]
    assert (device, seq_first, codes.tolist()) == ("kitchen", 13, [4])

    other = list(read_fleet_archive(tmp_path, codebook_id=8))
    assert [(s.device, s.codes.tolist(), s.codebook_id) for s in other] == [("kitchen", [100], 8)]
    assert len(list(read_fleet_archive(tmp_path))) == 5
    assert list(read_fleet_archive(tmp_path, codebook_id=99)) == []


def test_fleet_archive_reads_as_a_hive_partitioned_pyarrow_dataset(tmp_path):
    import pyarrow.dataset as pads

    write_fleet_shard(
        tmp_path, [row("a", 0, [1]), row("b", 0, [2], site="x y"), row("a", 1, [3], 8)]
    )
    table = pads.dataset(tmp_path, format="parquet", partitioning=fleet_partitioning()).to_table(
        filter=pads.field("codebook_id") == 7
    )
    assert sorted(zip(table["site"].to_pylist(), table["date"].to_pylist(), strict=True)) == [
        ("home", "2025-06-15"),
        ("x y", "2025-06-15"),
    ]


def test_fleet_rows_out_of_range_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="uint16"):
        write_fleet_shard(tmp_path, [row("d", 0, [70000])])


def test_synthesized_corpus_loads_with_the_manifest_hash(tmp_path):
    from training.corpus import synthesize_corpus

    manifest = synthesize_corpus(tmp_path, minutes=0.05, clip_seconds=1.0, progress=False)
    ds = load_dataset(tmp_path)
    assert ds.data_sha256 == manifest["data_sha256"]
    assert len(ds.clips) == 3 and all(c.duration_s == pytest.approx(1.0) for c in ds.clips)
    assert {e.label for c in ds.clips for e in c.events} <= set(ds.labels)
