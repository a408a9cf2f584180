"""Pictures users look at before they trust a number (matplotlib, Agg, imported lazily).

- :func:`plot_marginals`: a task's marginals over time (the paper's "ground truth" rows): one row
  for the task's own time grid (training marginals grey, held-out targets violet), plus one row per
  query whose populations are not on that grid (``boids/unseen-init``). 2-D scatter; for higher
  dimensions (EB) the first two coordinates.
- :func:`plot_rollouts`: the paper's Figure 5 layout: the truth in the first row, one row per
  method below, columns = times, shared axes kept on the bulk of the truth (the figure counts the
  points that fall outside them).
- :func:`plot_curves`: loss / friction curves, a panel per variant, a line per seed.

Figures are built with ``matplotlib.figure.Figure`` and the Agg canvas directly, so importing this
module (or calling it) never changes pyplot's global backend.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

TRAIN_COLOR = "0.45"
HELDOUT_COLOR = "#7b3fb5"  # violet, as the paper marks held-out / forecast times
START_COLOR = "#1f77b4"
PRED_COLORS = ("#d62728", "#2ca02c", "#ff7f0e", "#17becf", "#8c564b", "#e377c2", "#bcbd22")


def _figure(nrows: int, ncols: int, panel: float = 1.9, sharex=True, sharey=True):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(panel * ncols, 4.0), panel * nrows + 0.5), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, sharex=sharex, sharey=sharey, squeeze=False)
    return fig, axes


def _save(fig: Any, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def _pick(n: int, k: int) -> list[int]:
    """``k`` (or fewer) evenly spread indices of ``range(n)``, first and last included."""
    if n <= k:
        return list(range(n))
    return sorted(set(np.linspace(0, n - 1, k).round().astype(int).tolist()))


def _limits(arrays: Sequence[np.ndarray], pad: float = 0.08, lo_q: float = 0.1,
            hi_q: float = 99.9) -> tuple[tuple[float, float], tuple[float, float]]:
    pts = np.concatenate([np.asarray(a)[:, :2] for a in arrays])
    lo = np.percentile(pts, lo_q, axis=0)  # a few far outliers must not shrink every panel
    hi = np.percentile(pts, hi_q, axis=0)
    span = np.maximum(hi - lo, 1e-9)
    lo, hi = lo - pad * span, hi + pad * span
    return (float(lo[0]), float(hi[0])), (float(lo[1]), float(hi[1]))


def _box_aspect(xlim: tuple[float, float], ylim: tuple[float, float]) -> float:
    """Panel height / width that keeps one unit the same length on both axes (clipped)."""
    return float(np.clip((ylim[1] - ylim[0]) / max(xlim[1] - xlim[0], 1e-12), 0.5, 2.0))


def _marker_size(n: int) -> float:
    return float(np.clip(300.0 / max(n, 1), 0.5, 8.0))


def _scatter(ax: Any, x: np.ndarray, color: str, label: str | None = None) -> None:
    x = np.asarray(x)
    ax.scatter(x[:, 0], x[:, 1], s=_marker_size(len(x)), c=color, alpha=0.7, linewidths=0, label=label)


def _timeline(task: Any) -> tuple[list[tuple[float, np.ndarray, str]], list[tuple[str, list[tuple[float, np.ndarray, str]]]]]:
    """The task's grid (index >= 0: train marginals and targets) and the off-grid query rows."""
    data = task.train_data()
    grid: dict[int, tuple[float, np.ndarray, str]] = {}
    loose: list[tuple[float, np.ndarray, str]] = []
    for m in data.marginals:
        if m.index >= 0:
            grid[m.index] = (m.t, m.x, "train")
        else:
            loose.append((m.t, m.x, "train"))
    extra: list[tuple[str, list[tuple[float, np.ndarray, str]]]] = []
    for q in task.queries():
        if q.start.index < 0 and all(tg.index < 0 for tg in q.targets):
            row = [(q.start.t, q.start.x, "start")] + [(tg.t, tg.x, tg.group) for tg in q.targets]
            extra.append((q.name, row))
            continue
        for tg in q.targets:
            if tg.index >= 0 and tg.index not in grid:
                grid[tg.index] = (tg.t, tg.x, "held-out" if tg.group == "test" else "train")
    main = [grid[k] for k in sorted(grid)] + loose
    main.sort(key=lambda r: r[0])
    return main, extra


def plot_marginals(task: Any, path: str | os.PathLike, max_panels: int = 11) -> Path:
    """Write a PNG of ``task``'s marginals over time (training grey, held-out violet)."""
    main, extra = _timeline(task)
    rows = [("ground truth", main)] + [(f"query {name}", row) for name, row in extra]
    ncols = min(max_panels, max(len(r) for _, r in rows))
    picked = [[row[i] for i in _pick(len(row), ncols)] for _, row in rows]
    fig, axes = _figure(len(rows), ncols)
    xlim, ylim = _limits([x for row in picked for _, x, _ in row])
    dim = main[0][1].shape[1]
    for r, ((label, _), row) in enumerate(zip(rows, picked)):
        for c in range(ncols):
            ax = axes[r, c]
            ax.set_xlim(*xlim)
            ax.set_ylim(*ylim)
            ax.set_box_aspect(_box_aspect(xlim, ylim))
            ax.tick_params(labelsize=6)
            if c >= len(row):
                ax.set_axis_off()
                continue
            t, x, kind = row[c]
            color = {"train": TRAIN_COLOR, "start": START_COLOR}.get(kind, HELDOUT_COLOR)
            _scatter(ax, x, color)
            ax.set_title(f"t={t:g}" + ("" if kind == "train" else f" ({kind})"), fontsize=7,
                         color=HELDOUT_COLOR if kind not in ("train", "start") else "black")
            if r == len(rows) - 1 or c >= len(picked[r + 1]):  # no panel below this one
                ax.set_xlabel("$x_1$", fontsize=7)
        axes[r, 0].set_ylabel(f"{label}\n$x_2$", fontsize=8)
    title = f"{task.name}: marginals over time (grey: training, violet: held out / scored)"
    if dim > 2:
        title += f"; first 2 of {dim} coordinates"
    fig.suptitle(title, fontsize=9)
    return _save(fig, path)


def plot_rollouts(
    times: Sequence[float],
    truth: Sequence[np.ndarray],
    predictions: Mapping[str, Sequence[np.ndarray | None]],
    path: str | os.PathLike,
    title: str = "",
    max_panels: int = 11,
    axis_labels: tuple[str, str] = ("$x_1$", "$x_2$"),
) -> Path:
    """The paper's Figure 5: the truth (first row) and one row per method, columns = times. A
    ``None`` prediction (the method does not answer that time) is an empty panel marked "—".

    The axes stay on the bulk of the truth (:func:`truth_limits`), so a few runaway particles of
    a prediction cannot shrink the population to a dot; the figure says how many points of each
    row fall outside them."""
    cols = _pick(len(times), max_panels)
    names = list(predictions)
    fig, axes = _figure(1 + len(names), len(cols))
    xlim, ylim = truth_limits([truth[i] for i in cols])
    dim = np.asarray(truth[0]).shape[1]
    rows = [("ground truth", [truth[i] for i in cols], TRAIN_COLOR)] + [
        (n, [predictions[n][i] for i in cols], PRED_COLORS[k % len(PRED_COLORS)]) for k, n in enumerate(names)]
    outside = []
    for r, (label, arrs, color) in enumerate(rows):
        n_out = n_all = 0
        for c, arr in enumerate(arrs):
            ax = axes[r, c]
            if arr is None:
                ax.text(0.5, 0.5, "—", transform=ax.transAxes, ha="center", va="center", fontsize=14, color="0.5")
            else:
                _scatter(ax, arr, color)
                n_out += _count_outside(arr, xlim, ylim)
                n_all += len(arr)
            ax.set_xlim(*xlim)
            ax.set_ylim(*ylim)
            ax.set_box_aspect(_box_aspect(xlim, ylim))
            ax.tick_params(labelsize=6)
            if r == 0:
                ax.set_title(f"t={times[cols[c]]:g}", fontsize=7)
            if r == len(rows) - 1:
                ax.set_xlabel(axis_labels[0], fontsize=7)
        axes[r, 0].set_ylabel(f"{label}\n{axis_labels[1]}", fontsize=8)
        if n_out:
            outside.append(f"{label} {n_out:,} of {n_all:,}")
    note = ("axes: the truth's 0.5-99.5% range per coordinate, padded; points outside them: "
            + ("; ".join(outside) if outside else "none"))
    if dim > 2:
        note += f"; coordinates 1 and 2 of {dim}"
    fig.supxlabel(note, fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    return _save(fig, path)


def truth_limits(truth: Sequence[np.ndarray], lo_q: float = 0.5, hi_q: float = 99.5,
                 pad: float = 0.15) -> tuple[tuple[float, float], tuple[float, float]]:
    """Axis limits on the bulk of the true populations: per coordinate, the ``lo_q``-``hi_q``
    percentiles of every true point pooled, widened by ``pad`` of that span on each side."""
    return _limits(truth, pad=pad, lo_q=lo_q, hi_q=hi_q)


def _count_outside(x: np.ndarray, xlim: tuple[float, float], ylim: tuple[float, float]) -> int:
    x = np.asarray(x)
    inside = (x[:, 0] >= xlim[0]) & (x[:, 0] <= xlim[1]) & (x[:, 1] >= ylim[0]) & (x[:, 1] <= ylim[1])
    return int((~inside).sum())


def plot_curves(
    panels: Mapping[str, Mapping[str, tuple[Sequence[float] | None, Sequence[float]]]], path: str | os.PathLike,
    ylabel: str = "", xlabel: str = "step", title: str = "", logy: bool | None = None,
) -> Path:
    """Learned curves (loss, friction, ...) as small multiples: one panel per key of ``panels``
    (e.g. a task variant), one line per label inside it (e.g. a seed), each line ``(xs, ys)`` with
    ``xs`` None for 0, 1, .... Lines with the same label share a colour across panels; the legend
    is on the first panel. ``logy`` defaults to True for positive curves spanning more than two
    decades."""
    names = list(panels)
    ncols = min(5, max(len(names), 1))
    nrows = -(-len(names) // ncols) if names else 1
    fig, axes = _figure(nrows, ncols, panel=2.6 if len(names) > 1 else 3.2, sharex=False, sharey=True)
    labels = list(dict.fromkeys(label for lines in panels.values() for label in lines))
    color = {label: PRED_COLORS[k % len(PRED_COLORS)] for k, label in enumerate(labels)}
    vals = [np.asarray(ys, dtype=float) for lines in panels.values() for _, ys in lines.values()]
    vals = np.concatenate(vals) if vals else np.array([])
    vals = vals[np.isfinite(vals)]
    if logy is None:
        logy = bool(vals.size) and vals.min() > 0 and vals.max() / vals.min() > 100
    for k, ax in enumerate(axes.flat):
        if k >= len(names):
            ax.set_visible(False)
            continue
        for label, (xs, ys) in panels[names[k]].items():
            ys = np.asarray(ys, dtype=float)
            x = np.arange(len(ys)) if xs is None else np.asarray(xs, dtype=float)
            ax.plot(x, ys, label=label, color=color[label], lw=1.0)
        if logy:
            ax.set_yscale("log")
        if len(names) > 1:
            ax.set_title(names[k], fontsize=8)
        if k + ncols >= len(names):  # no panel below this one
            ax.set_xlabel(xlabel, fontsize=8)
        if k % ncols == 0:
            ax.set_ylabel(ylabel, fontsize=8)
        ax.tick_params(labelsize=7)
    if len(labels) > 1:
        axes[0, 0].legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    return _save(fig, path)


__all__ = ["plot_curves", "plot_marginals", "plot_rollouts", "truth_limits"]
