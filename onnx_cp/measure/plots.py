"""PNG plots for reports (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from onnx_cp.runtime.files import atomic_write

COLORS = ["#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3"]
MAX_ROWS = 30  # beyond this many layers a bar chart stops being readable: the rest are summed


def grouped_hbars(
    rows: Sequence[str],
    series: dict[str, Sequence[float]],
    path: Path,
    *,
    title: str,
    xlabel: str,
    value_format: str = "{:.3g}",
) -> Path:
    """One group of horizontal bars per row (top to bottom in the given order), one bar per series."""
    rows, series = _limit_rows(list(rows), {k: list(v) for k, v in series.items()})
    n_series = len(series)
    bar_height = 0.8 / n_series
    fig_height = max(2.5, 0.9 + 0.32 * len(rows) * max(1.0, n_series * 0.6))
    fig, ax = plt.subplots(figsize=(9, fig_height), dpi=110)
    peak = max((v for values in series.values() for v in values), default=0) or 1
    for s, (label, values) in enumerate(series.items()):
        offsets = [i + (s - (n_series - 1) / 2) * bar_height for i in range(len(rows))]
        bars = ax.barh(offsets, values, height=bar_height * 0.92, label=label,
                       color=COLORS[s % len(COLORS)])
        for rect, value in zip(bars, values):
            if value > 0:
                ax.text(rect.get_width() + peak * 0.01, rect.get_y() + rect.get_height() / 2,
                        value_format.format(value), va="center", fontsize=7, color="#333333")
    _style_hbars(ax, rows, label_size=8, xmax=peak * 1.18, xlabel=xlabel, title=title)
    ax.legend(fontsize=8, loc="lower right", frameon=False)
    fig.tight_layout()
    return _save(fig, path)


LABEL_GAP_POINTS = 24  # two lines of 8-point text


def _label_offsets(ax, xs: Sequence[float], ys: Sequence[float], x_span: float) -> list[float]:
    """Vertical offsets (points) that keep the labels of points at about the same speed-up (a
    reconstructed and a fine-tuned model, say) LABEL_GAP_POINTS apart, top to bottom."""
    low, high = ax.get_ylim()
    height = ax.get_window_extent().height * 72 / ax.figure.dpi
    per_unit = height / (high - low)
    offsets = [0.0] * len(ys)
    for i in sorted(range(len(ys)), key=lambda k: -ys[k]):
        above = [k for k in range(len(ys)) if abs(xs[k] - xs[i]) < 0.1 * x_span and
                 (ys[k] > ys[i] or (ys[k] == ys[i] and k < i))]
        for k in above:
            centre_k, centre_i = ys[k] * per_unit + offsets[k], ys[i] * per_unit + offsets[i]
            if centre_k - centre_i < LABEL_GAP_POINTS:
                offsets[i] -= LABEL_GAP_POINTS - (centre_k - centre_i)
    return offsets


def accuracy_vs_speedup(
    points: Sequence[tuple[str, float, float]],
    path: Path,
    *,
    xlabel: str,
    ylabel: str = "top-1 accuracy (%)",
    title: str = "Accuracy against speedup",
) -> Path:
    """points: (label, speedup, accuracy in %), drawn in order and joined by arrows."""
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=110)
    xs = [p[1] for p in points]
    ys = [p[2] for p in points]
    for i in range(1, len(points)):
        ax.annotate("", xy=(xs[i], ys[i]), xytext=(xs[i - 1], ys[i - 1]),
                    arrowprops={"arrowstyle": "->", "color": "#999999", "lw": 1,
                                    "shrinkA": 6, "shrinkB": 6})
    x_span = max(xs) - min(xs) or max(xs) * 0.5 or 1
    y_span = max(ys) - min(ys) or 5
    ax.set_xlim(min(xs) - 0.15 * x_span, max(xs) + 0.45 * x_span)
    ax.set_ylim(max(0, min(ys) - 0.4 * y_span), min(100.5, max(ys) + 0.4 * y_span))
    fig.tight_layout()
    offsets = _label_offsets(ax, xs, ys, x_span)
    for i, (label, x, y) in enumerate(points):
        ax.scatter([x], [y], s=70, color=COLORS[i % len(COLORS)], zorder=3, label=label)
        # right of the point, vertically centred, moved apart from the labels of nearby points
        ax.annotate(f"{label}\n{y:.1f}% @ {x:.2f}x", (x, y), textcoords="offset points",
                    xytext=(10, offsets[i]), va="center", fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    _open_frame(ax)
    fig.tight_layout()
    return _save(fig, path)


def latency_bars(models: Sequence[dict], path: Path, *, title: str) -> Path:
    """Median latency per model with a p10-p90 whisker, labelled with the speedup to the first."""
    names = [m["name"] for m in models]
    medians = [m["median_ms"] for m in models]
    low = [m["median_ms"] - m["p10_ms"] for m in models]
    high = [m["p90_ms"] - m["median_ms"] for m in models]
    fig, ax = plt.subplots(figsize=(8, max(2.2, 0.9 + 0.55 * len(models))), dpi=110)
    ax.barh(range(len(models)), medians, xerr=[low, high], height=0.6,
            color=[COLORS[i % len(COLORS)] for i in range(len(models))],
            error_kw={"ecolor": "#333333", "capsize": 3, "lw": 1})
    peak = max(m["p90_ms"] for m in models) or 1
    for i, m in enumerate(models):
        speed = m.get("speedup_vs_first")
        text = f"{m['median_ms']:.3g} ms" + (f"  ({speed:.2f}x)" if speed and i else "")
        ax.text(m["p90_ms"] + peak * 0.02, i, text, va="center", fontsize=8)
    _style_hbars(ax, names, label_size=9, xmax=peak * 1.35,
                 xlabel="latency per inference, ms (median; whiskers p10-p90)", title=title)
    fig.tight_layout()
    return _save(fig, path)


def _style_hbars(ax, rows: Sequence[str], *, label_size: int, xmax: float, xlabel: str, title: str) -> None:
    """The look both bar charts share: rows top to bottom in the given order (the first layer on
    top, as in the network; the baseline model first), a light vertical grid behind the bars."""
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels(rows, fontsize=label_size)
    ax.invert_yaxis()
    ax.set_xlim(0, xmax)
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    ax.set_axisbelow(True)
    _open_frame(ax)


def _open_frame(ax) -> None:
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def _limit_rows(rows: list[str], series: dict[str, list[float]]):
    if len(rows) <= MAX_ROWS:
        return rows, series
    # keep the rows that matter most in any series, in their original order; sum the rest
    weight = {r: max(values[i] for values in series.values()) for i, r in enumerate(rows)}
    keep = set(sorted(rows, key=lambda r: -weight[r])[: MAX_ROWS - 1])
    kept_rows = [r for r in rows if r in keep]
    rest = len(rows) - len(kept_rows)
    new_series = {}
    for label, values in series.items():
        kept = [v for r, v in zip(rows, values) if r in keep]
        kept.append(sum(v for r, v in zip(rows, values) if r not in keep))
        new_series[label] = kept
    return kept_rows + [f"({rest} other layers)"], new_series


def _save(fig, path: Path) -> Path:
    try:
        with atomic_write(path, "wb") as handle:  # readers never see half a PNG
            fig.savefig(handle, format="png")
    finally:
        plt.close(fig)
    return Path(path)
