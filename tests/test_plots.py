"""Every report figure is a readable PNG, and `soundfleet eval --out` writes its two figures."""

import json
import subprocess
import sys

import numpy as np
import pytest

from training.evaluate import confusion_table, window_metrics
from training.filterbank import mel_reference_hz
from training.plots import (
    confusion_matrix_from_table,
    plot_bars,
    plot_confusion,
    plot_filterbank,
    plot_lines,
    plot_per_class,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
LABELS = ("siren", "dog_bark", "speech")


def _assert_png(path, min_width_px=200, min_height_px=150):
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    import matplotlib.image

    height_px, width_px = matplotlib.image.imread(path).shape[:2]
    assert min_width_px <= width_px <= 4000 and min_height_px <= height_px <= 4000


def _eval_like(seed=0):
    """probs/targets of a small multi-label problem, through the real metric functions."""
    rng = np.random.default_rng(seed)
    targets = (rng.random((40, len(LABELS))) < 0.3).astype(np.float32)
    targets[:, 0] = 0  # siren never true: no row for it in the confusion table
    probs = np.clip(targets * 0.7 + 0.4 * rng.random(targets.shape), 0, 1)
    weights = np.ones_like(targets)
    return (
        window_metrics(probs, targets, weights, LABELS),
        confusion_table(probs, targets, weights, LABELS),
    )


def test_plot_filterbank_writes_a_png(tmp_path):
    freqs_hz = mel_reference_hz(64, 16_000) + np.random.default_rng(0).normal(0, 20, 64)
    path = plot_filterbank(freqs_hz, 16_000, tmp_path / "fb.png", "test bank")
    assert path == tmp_path / "fb.png"
    _assert_png(path)


def test_plot_confusion_accepts_what_eval_produces(tmp_path):
    _, table = _eval_like()
    matrix, rows, cols = confusion_matrix_from_table(table, LABELS)
    assert rows == ["dog_bark", "speech"]  # only labels with true windows
    assert cols == [*LABELS, "(none)"]
    assert matrix.shape == (2, 4)
    assert matrix[0, 1] == table["dog_bark"]["dog_bark"]
    _assert_png(plot_confusion(matrix, rows, cols, tmp_path / "confusion.png", "test"))
    # plain lists work too
    _assert_png(
        plot_confusion([[3, 1], [0, 2]], ["a", "b"], ["a", "b"], tmp_path / "small.png", "t")
    )


def test_plot_confusion_rejects_a_matrix_that_does_not_match_its_labels(tmp_path):
    with pytest.raises(ValueError, match=r"shape \(2, 3\).*2 row labels and 4 column labels"):
        plot_confusion(np.ones((2, 3)), ["a", "b"], ["a", "b", "c", "(none)"], tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_plot_confusion_of_an_empty_table_still_writes_a_figure(tmp_path):
    matrix, rows, cols = confusion_matrix_from_table({}, LABELS)
    _assert_png(plot_confusion(matrix, rows, cols, tmp_path / "empty.png", "nothing"))


def test_plot_per_class_writes_a_png(tmp_path):
    metrics, _ = _eval_like()
    _assert_png(plot_per_class(metrics["per_class"], tmp_path / "per_class.png", "test"))


def test_plot_lines_with_a_log2_axis_writes_a_png(tmp_path):
    ks = [16, 64, 256, 1024]
    series = {"probe top-1": [0.4, 0.5, 0.55, 0.56], "probe top-5": [0.7, 0.8, 0.82, 0.83]}
    path = tmp_path / "k.png"
    _assert_png(
        plot_lines(ks, series, path, "probe vs K", "codebook size K", "accuracy", logx=True)
    )
    with pytest.raises(ValueError, match="3 values for 4 x values"):
        plot_lines(ks, {"short": [1, 2, 3]}, tmp_path / "bad.png", "t", "x", "y")


def test_plot_bars_plain_and_grouped_write_pngs(tmp_path):
    _assert_png(plot_bars({"wavenet": 0.41, "transformer": 0.47}, tmp_path / "a.png", "t", "top-1"))
    grouped = {"wavenet": {"top-1": 0.41, "top-5": 0.7}, "transformer": {"top-1": 0.47}}
    _assert_png(plot_bars(grouped, tmp_path / "b.png", "S1", "accuracy"))
    with pytest.raises(ValueError, match="all numbers or all"):
        plot_bars({"a": 1.0, "b": {"x": 1.0}}, tmp_path / "c.png", "t", "y")


def test_eval_with_out_writes_confusion_and_per_class_pngs(tmp_path):
    corpus = tmp_path / "corpus"
    cli = [sys.executable, "-m", "soundfleet.cli"]
    synth = subprocess.run(
        [*cli, "data", "synth", "--out", str(corpus), "--minutes", "1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert synth.returncode == 0, synth.stderr[-2000:]
    out_dir = tmp_path / "report"
    out_dir.mkdir()  # a directory: the report goes to DIR/eval.json
    result = subprocess.run(
        [*cli, "eval", "--data", str(corpus), "--out", str(out_dir)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out_dir / "eval.json").read_text())
    assert report == json.loads(result.stdout)
    assert report["plots"] == {
        "confusion": str(out_dir / "confusion.png"),
        "per_class": str(out_dir / "per_class.png"),
    }
    for name in ("confusion.png", "per_class.png"):
        _assert_png(out_dir / name)
    assert "plots written" in result.stderr
