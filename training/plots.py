"""PNG figures for the replication report and `soundfleet eval --out`.

Every function takes plain data (lists, dicts, numpy arrays) and an output
path, writes one PNG and returns its path. matplotlib (the `train` extra) is
imported inside the functions, so importing this module costs nothing and the
edge never needs it. Figures are built with ``matplotlib.figure.Figure``
rather than pyplot: no global figure state, no GUI backend to pick (this runs
on machines without a screen), and nothing left open between calls.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from training.filterbank import linear_reference_hz, mel_reference_hz

log = logging.getLogger(__name__)

DPI = 120
PER_CLASS_METRICS = ("precision", "recall", "f1")


def _figure(width_in: float, height_in: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width_in, height_in), layout="constrained")


def _save(fig, path: Path | str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, format="png")
    log.debug("wrote %s", path)
    return path


def plot_filterbank(
    freqs_hz: Sequence[float] | np.ndarray,
    sample_rate_hz: int,
    path: Path | str,
    title: str = "Learned front end: dominant frequency per neuron",
) -> Path:
    """Sorted dominant frequency per neuron (x: rank, y: Hz) against linear and mel banks."""
    freqs_hz = np.sort(np.asarray(freqs_hz, dtype=np.float64))
    n = len(freqs_hz)
    rank = np.arange(n)
    fig = _figure(7.0, 4.5)
    ax = fig.add_subplot()
    ax.plot(rank, freqs_hz, ".", markersize=4, label=f"learned ({n} neurons)")
    ax.plot(rank, linear_reference_hz(n, sample_rate_hz), "--", label="linear spacing")
    ax.plot(rank, mel_reference_hz(n, sample_rate_hz), "-", label="mel spacing")
    ax.set_xlabel("neuron rank (sorted by dominant frequency)")
    ax.set_ylabel("dominant frequency (Hz)")
    ax.set_ylim(0, sample_rate_hz / 2.0)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left")
    return _save(fig, path)


def confusion_matrix_from_table(
    table: Mapping[str, Mapping[str, int]], labels: Sequence[str]
) -> tuple[np.ndarray, list[str], list[str]]:
    """``training.evaluate.confusion_table`` output -> (matrix, row_labels, col_labels).

    The table is sparse: a row only for labels with true windows, a cell only
    for labels predicted at least once, plus a column for "nothing predicted"
    (its key is whatever confusion_table calls it). Rows follow ``labels``;
    columns are every label, then the extra keys in the order they appear.
    """
    row_labels = [name for name in labels if name in table]
    unknown_rows = sorted(set(table) - set(labels))
    if unknown_rows:
        raise ValueError(
            f"confusion table rows {unknown_rows} are not among the labels {list(labels)}"
        )
    extra_cols: list[str] = []
    for row in table.values():
        extra_cols += [key for key in row if key not in labels and key not in extra_cols]
    col_labels = list(labels) + extra_cols
    matrix = np.zeros((len(row_labels), len(col_labels)), dtype=np.int64)
    for i, name in enumerate(row_labels):
        for j, col in enumerate(col_labels):
            matrix[i, j] = table[name].get(col, 0)
    return matrix, row_labels, col_labels


def plot_confusion(
    matrix: Sequence[Sequence[int]] | np.ndarray,
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    path: Path | str,
    title: str = "Confusion (rows: true label, columns: predicted)",
) -> Path:
    """Annotated heat map of window counts.

    For `soundfleet eval` output, build the arguments with
    :func:`confusion_matrix_from_table` (rows: true labels; columns: every
    label plus "(none)").
    """
    matrix = np.asarray(matrix)
    if matrix.size == 0:
        matrix = matrix.reshape(len(row_labels), len(col_labels))
    expected = (len(row_labels), len(col_labels))
    if matrix.ndim != 2 or matrix.shape != expected:
        raise ValueError(
            f"confusion matrix has shape {matrix.shape} but there are {len(row_labels)} row labels "
            f"and {len(col_labels)} column labels (expected shape {expected})"
        )
    fig = _figure(max(4.0, 1.0 + 0.7 * len(col_labels)), max(3.0, 1.5 + 0.5 * len(row_labels)))
    ax = fig.add_subplot()
    ax.set_title(title)
    if not row_labels:
        # nothing to draw (no window had a true label); still write the file so the
        # report's links are not broken
        ax.text(0.5, 0.5, "no windows with a true label", ha="center", va="center")
        ax.set_axis_off()
        return _save(fig, path)
    image = ax.imshow(matrix, cmap="Blues", aspect="auto", vmin=0)
    fig.colorbar(image, ax=ax, label="windows")
    ax.set_xticks(range(len(col_labels)), col_labels, rotation=45, ha="right")
    ax.set_yticks(range(len(row_labels)), row_labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true label")
    # dark cells get white text so the count stays readable
    dark_above = 0.5 * matrix.max() if matrix.max() > 0 else math.inf
    for i in range(matrix.shape[0]):
        for j in range(matrix.shape[1]):
            colour = "white" if matrix[i, j] > dark_above else "black"
            ax.text(j, i, f"{matrix[i, j]:g}", ha="center", va="center", color=colour, fontsize=8)
    return _save(fig, path)


def _grouped_bars(ax, groups: Sequence[str], series: Mapping[str, Sequence[float]]) -> None:
    """One cluster of bars per group, one bar per series within it; NaN leaves a gap."""
    width = 0.8 / max(len(series), 1)
    centres = np.arange(len(groups))
    for k, (name, heights) in enumerate(series.items()):
        offsets = centres - 0.4 + width * (k + 0.5)
        ax.bar(offsets, heights, width, label=name)
    # tilt the names only when they would not fit side by side (about 0.085 in per character)
    longest_chars = max((len(line) for g in groups for line in g.splitlines()), default=0)
    tilt = longest_chars * 0.085 > 0.9 * ax.figure.get_figwidth() / max(len(groups), 1)
    ax.set_xticks(centres, groups, rotation=30 if tilt else 0, ha="right" if tilt else "center")
    ax.grid(axis="y", alpha=0.3)


def plot_bars(
    values: Mapping[str, float] | Mapping[str, Mapping[str, float]],
    path: Path | str,
    title: str,
    ylabel: str,
) -> Path:
    """Bars per name (e.g. S1 model -> top-1), or grouped bars (model -> {metric -> value}).

    In the grouped form a metric missing for one name leaves a gap; mixing
    plain numbers and dicts is an error.
    """
    names = list(values)
    nested = [isinstance(v, Mapping) for v in values.values()]
    if any(nested) and not all(nested):
        raise ValueError("plot_bars: values must be all numbers or all {metric: number} dicts")
    if all(nested) and names:
        metrics: list[str] = []
        for per_name in values.values():
            metrics += [m for m in per_name if m not in metrics]
        series = {m: [float(values[n].get(m, np.nan)) for n in names] for m in metrics}
    else:
        series = {ylabel: [float(values[n]) for n in names]}
    fig = _figure(max(5.0, 1.5 + 0.35 * len(names) * max(len(series), 1)), 4.0)
    ax = fig.add_subplot()
    _grouped_bars(ax, names, series)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if len(series) > 1:
        ax.legend()
    return _save(fig, path)


def plot_per_class(
    metrics: Mapping[str, Mapping[str, float]],
    path: Path | str,
    title: str = "Per-class precision, recall and F1",
) -> Path:
    """Grouped precision / recall / F1 bars per label (``metrics["per_class"]`` of an eval report).

    Other keys (e.g. "support") are ignored; a label with support shows it
    under its name.
    """
    names = list(metrics)
    series = {m: [float(metrics[n].get(m, np.nan)) for n in names] for m in PER_CLASS_METRICS}
    groups = [f"{n}\n(n={metrics[n]['support']})" if "support" in metrics[n] else n for n in names]
    fig = _figure(max(5.0, 1.5 + 1.2 * len(names)), 4.0)
    ax = fig.add_subplot()
    _grouped_bars(ax, groups, series)
    ax.set_ylim(0.0, 1.18)  # headroom for the legend above the bars
    ax.set_yticks(np.linspace(0.0, 1.0, 6))
    ax.set_ylabel("score")
    ax.set_title(title)
    ax.legend(loc="upper center", ncols=len(PER_CLASS_METRICS))
    return _save(fig, path)


def plot_lines(
    x: Sequence[float],
    series: Mapping[str, Sequence[float]],
    path: Path | str,
    title: str,
    xlabel: str,
    ylabel: str,
    logx: bool = False,
) -> Path:
    """One line per series over shared x values (e.g. probe accuracy vs codebook size K).

    ``logx`` uses a base-2 log axis with a tick at each x value, which suits
    powers of two such as K = 16 .. 1024.
    """
    x = [float(v) for v in x]
    for name, ys in series.items():
        if len(ys) != len(x):
            raise ValueError(f"series {name!r} has {len(ys)} values for {len(x)} x values")
    fig = _figure(6.0, 4.0)
    ax = fig.add_subplot()
    for name, ys in series.items():
        ax.plot(x, [float(v) for v in ys], "o-", label=name)
    if logx:
        ax.set_xscale("log", base=2)
        ax.set_xticks(x, [f"{v:g}" for v in x])
        ax.minorticks_off()
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend()
    return _save(fig, path)


def plot_pr_curves(curves: Mapping[str, Mapping[str, Sequence[float]]], path: Path | str, title: str) -> Path:
    """One precision-recall curve per label (``training.evaluate.precision_recall_curves``)."""
    fig = _figure(6.0, 4.5)
    ax = fig.add_subplot()
    for name, curve in curves.items():
        ax.plot(curve["recall"], curve["precision"], ".-", label=name)
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("recall (windows)")
    ax.set_ylabel("precision (windows)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return _save(fig, path)
