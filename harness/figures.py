"""Figures from a stored run: rollouts against the truth (the paper's Figure 5 layout) and
learned curves (e.g. WLM's friction γ over training), drawn from the predictions and curves that
every job stores under ``artifacts/`` (nothing is refitted)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from harness import plots, registry
from harness.protocol import PopbenchError
from harness.store import RunStore


def _latest_ok(store: RunStore, family: str, variant: str, seed: int, method: str) -> dict | None:
    rows = [r for r in store.latest_jobs().values()
            if r["task"] == family and r["variant"] == variant and r["seed"] == seed and r["method"] == method
            and r.get("status") == "ok"]
    return max(rows, key=lambda r: r.get("finished_at", 0)) if rows else None


def rollout_figure(run_dir: str | Path, family: str, variant: str, methods: Sequence[str], path: str | Path,
                   seed: int = 0, data_dir: str | None = None, max_panels: int = 11) -> Path:
    """Truth row, then one row per method, columns = target times (every query's targets, in order)."""
    store = RunStore(run_dir)
    task = registry.tasks.load(family)(variant, seed=seed, data_dir=data_dir)
    preds: dict[str, dict] = {}
    for m in methods:
        row = _latest_ok(store, family, variant, seed, m)
        if row is None or not row.get("predictions"):
            continue
        with np.load(store.root / row["predictions"]) as f:
            preds[m] = {k: f[k] for k in f.files}
    if not preds:
        raise PopbenchError(f"{run_dir} has no stored predictions of {', '.join(methods)} on {family}/{variant} "
                            f"seed {seed}: run them first")
    times, truth, by_method = [], [], {m: [] for m in preds}
    for q in task.queries():
        for tg in q.targets:
            if any(abs(tg.t - t) < 1e-9 for t in times):
                continue
            have = {}
            for m, arrs in preds.items():
                ts = arrs.get(f"{q.name}/times")
                if ts is None:
                    continue
                hit = np.flatnonzero(np.abs(ts - tg.t) < 1e-9)
                if hit.size:
                    have[m] = arrs[f"{q.name}/samples"][hit[0]]
            if len(have) != len(preds):
                continue  # a column only where every method answered (no "—" panels)
            times.append(tg.t)
            truth.append(tg.x)
            for m in preds:
                by_method[m].append(have[m])
    if not times:
        raise PopbenchError(f"the stored predictions share no target time on {family}/{variant}")
    order = np.argsort(times)
    return plots.plot_rollouts([times[i] for i in order], [truth[i] for i in order],
                               {m: [v[i] for i in order] for m, v in by_method.items()}, path,
                               title=f"{family}/{variant} (seed {seed}, {Path(run_dir).name})", max_panels=max_panels)


def curve_figure(run_dir: str | Path, method: str, key: str, path: str | Path, family: str | None = None,
                 ylabel: str | None = None, seeds: set[int] | None = None) -> Path:
    """One line per (variant, seed) of a stored learned curve, e.g. ``gamma_curve`` of ``wlm``."""
    store = RunStore(run_dir)
    curves = {}
    for r in store.latest_jobs().values():
        if r["method"] != method or r.get("status") != "ok" or not r.get("artifact"):
            continue
        if (family and r["task"] != family) or (seeds is not None and r["seed"] not in seeds):
            continue
        data = json.loads((store.root / r["artifact"]).read_text())
        if key in data:
            curves[f"{r['task']}/{r['variant']} s{r['seed']}"] = data[key]
    if not curves:
        raise PopbenchError(f"no stored {key!r} curve of {method} in {run_dir}")
    return plots.plot_curves(dict(sorted(curves.items())), path, ylabel=ylabel or key, xlabel="logged step",
                             title=f"{method}: {key}")
