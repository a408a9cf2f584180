"""Figures from a stored run: rollouts against the truth (the paper's Figure 5 layout) and
learned curves (e.g. WLM's friction γ over training), drawn from the predictions and curves that
every job stores under ``artifacts/`` (nothing is refitted)."""

from __future__ import annotations

import json
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from harness import plots, registry
from harness.protocol import PopbenchError
from harness.store import RunStore, partial_label


def _latest(latest_jobs: dict[str, dict], family: str, variant: str, seed: int, method: str,
            statuses: Sequence[str] = ("ok",), profile: str | None = None) -> dict | None:
    rows = [r for r in latest_jobs.values()
            if r["task"] == family and r["variant"] == variant and r["seed"] == seed and r["method"] == method
            and r.get("status") in statuses and (profile is None or r.get("profile") == profile)]
    _one_setting(rows, f"{method} on {family}/{variant} seed {seed}")
    return rows[0] if rows else None


def _one_setting(rows: Sequence[dict], what: str) -> None:
    """A figure draws one configuration of a method: refuse rows of several (profile, settings)."""
    settings = sorted({f"{r.get('profile')} {r.get('hparams_hash')}" for r in rows})
    if len(settings) > 1:
        raise PopbenchError(f"the run holds {what} with {len(settings)} settings ({', '.join(settings)}): "
                            "a figure draws one; publish or plot from a run directory that holds one")


def rollout_panels(run_dir: str | Path, family: str, variant: str, methods: Sequence[str], seed: int = 0,
                   data_dir: str | None = None, include_partial: bool = False, profile: str | None = None,
                   ) -> tuple[list[float], list[np.ndarray], dict[str, list]]:
    """What :func:`rollout_figure` draws: the target times (every query's, in time order), the
    truth at each, and per method its stored prediction at each time, or None where it gave none
    (e.g. an interpolation-only method at a forecast time). With ``include_partial`` a method
    whose job stopped early (status ``partial``) is drawn too, labelled ``<method> (partial)``.
    ``profile``: only jobs of that profile. A method stored with several settings is refused."""
    return _rollout_panels(run_dir, family, variant, methods, seed, data_dir, include_partial, profile)[:3]


def _rollout_panels(run_dir, family, variant, methods, seed, data_dir, include_partial, profile,
                    skip_jobs=frozenset()):
    """:func:`rollout_panels`, plus the query each time's panels come from (the first query that
    targets that time: ``boids/unseen-init``'s three mixtures share their times, so its figure
    shows the first mixture) and every query of the task."""
    store = RunStore(run_dir)
    task = registry.tasks.load(family)(variant, seed=seed, data_dir=data_dir)
    preds: dict[str, dict] = {}
    latest_jobs = {k: r for k, r in store.latest_jobs().items()  # rows.jsonl read once, not once per method
                   if r.get("job_id") not in skip_jobs}
    for m in methods:
        row = _latest(latest_jobs, family, variant, seed, m, ("ok", "partial") if include_partial else ("ok",),
                      profile)
        if row is None or not row.get("predictions"):
            continue
        if row.get("restored_from") and not (store.root / row["predictions"]).exists():
            raise PopbenchError(f"{m}'s predicted samples on {family}/{variant} seed {seed} are not in {run_dir}: its "
                                f"rows were restored from {row['restored_from']}, which carries no samples; the "
                                "published figure stays as it is")
        try:
            with np.load(store.root / row["predictions"]) as f:
                preds[m if row["status"] == "ok" else partial_label(m)] = {k: f[k] for k in f.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:  # missing, or corrupt (truncated)
            raise PopbenchError(f"cannot read {m}'s stored predictions {store.root / row['predictions']}: {exc}") from exc
    if not preds:
        raise PopbenchError(f"{run_dir} has no stored predictions of {', '.join(methods)} on {family}/{variant} "
                            f"seed {seed}: run them first")
    # every target time that some method answered, in time order; for each method its answer from
    # the first query that asks for that time, or None: an empty "—" panel (e.g. an
    # interpolation-only method under the forecast columns), so no method hides another's times
    truth_at: dict[float, np.ndarray] = {}
    query_at: dict[float, str] = {}
    answers: dict[str, dict[float, np.ndarray]] = {m: {} for m in preds}
    for q in task.queries():
        for tg in q.targets:
            t = next((t for t in truth_at if abs(tg.t - t) < 1e-9), tg.t)
            truth_at.setdefault(t, tg.x)
            query_at.setdefault(t, q.name)
            for m, arrs in preds.items():
                ts = arrs.get(f"{q.name}/times")
                hit = np.flatnonzero(np.abs(ts - tg.t) < 1e-9) if ts is not None else []
                if len(hit) and t not in answers[m]:
                    answers[m][t] = arrs[f"{q.name}/samples"][hit[0]]
    times = sorted(t for t in truth_at if any(t in a for a in answers.values()))
    truth = [truth_at[t] for t in times]
    by_method = {m: [answers[m].get(t) for t in times] for m in preds}
    if not times:
        raise PopbenchError(f"the stored predictions answer no target time on {family}/{variant}")
    return times, truth, by_method, [query_at[t] for t in times], [q.name for q in task.queries()]


def rollout_figure(run_dir: str | Path, family: str, variant: str, methods: Sequence[str], path: str | Path,
                   seed: int = 0, data_dir: str | None = None, max_panels: int = 11,
                   include_partial: bool = False, profile: str | None = None,
                   skip_jobs: frozenset[str] = frozenset()) -> Path:
    """Truth row, then one row per method, columns = target times (every query's targets, in time
    order; at most ``max_panels`` of them, evenly spread); a method that does not answer a time
    gets an empty panel marked "—". ``include_partial``: as in :func:`rollout_panels`; ``skip_jobs``:
    job ids the figure leaves out (``publish --drop-superseded``'s)."""
    times, truth, by_method, queries, every = _rollout_panels(run_dir, family, variant, methods, seed, data_dir,
                                                              include_partial, profile, skip_jobs)
    names = list(dict.fromkeys(queries))
    shown = (f"query {names[0]}" if len(names) == 1 else "queries " + ", ".join(names))
    others = [q for q in every if q not in names]
    title = (f"{family}/{variant}, {shown}" + (f" (not shown: {', '.join(others)})" if others else "")
             + f"; seed {seed}, run {Path(run_dir).name}\n"
             "top row: the true population at each target time; below it, each method's prediction of it")
    return plots.plot_rollouts(times, truth, by_method, path, title=title, max_panels=max_panels)


def stored_curves(run_dir: str | Path, method: str, keys: Sequence[str], family: str | None = None,
                  seeds: set[int] | None = None, include_partial: bool = False,
                  profile: str | None = None) -> list[dict]:
    """Every stored curve named in ``keys`` of ``method`` (e.g. WLM's ``gamma_curve``, DICE's
    ``val_curve`` of (iteration, value) pairs), one dict per (curve, job) from the job's latest
    attempt: ``method``, ``curve``, ``task``, ``variant``, ``seed``, ``status``, ``values`` and
    ``steps``, the training iteration each value ends at (block means of a long fit; None where the
    job does not record its iteration count). Each job's artifact is read once for all ``keys``.
    With ``include_partial`` also jobs that stopped early (status ``partial``); ``profile``: only
    jobs of that profile. A method stored with several settings on one task variant is refused."""
    from harness.protocol import curve_steps

    store = RunStore(run_dir)
    statuses = ("ok", "partial") if include_partial else ("ok",)
    out = []
    rows = [r for r in store.latest_jobs().values()
            if r["method"] == method and r.get("status") in statuses and r.get("artifact")
            and not (family and r["task"] != family) and not (seeds is not None and r["seed"] not in seeds)
            and (profile is None or r.get("profile") == profile)]
    for fam, var in dict.fromkeys((r["task"], r["variant"]) for r in rows):
        _one_setting([r for r in rows if (r["task"], r["variant"]) == (fam, var)], f"{method} on {fam}/{var}")
    for r in rows:
        try:
            data = json.loads((store.root / r["artifact"]).read_text())
        except (OSError, ValueError) as exc:  # missing or corrupt
            raise PopbenchError(f"cannot read {method}'s stored curves {store.root / r['artifact']}: {exc}") from exc
        for key in keys:
            values = data.get(key)
            if not isinstance(values, list) or not values:
                continue
            if all(isinstance(v, (list, tuple)) and len(v) == 2 for v in values):  # (iteration, value) pairs (DICE)
                steps, values = [int(a) for a, _ in values], [float(b) for _, b in values]
            elif all(isinstance(v, (int, float)) for v in values):  # one value per iteration, or block means
                total = (r.get("learned") or {}).get("iterations")
                steps = curve_steps(int(total), len(values)) if total else None
            else:
                continue
            out.append({"method": method, "curve": key, "task": r["task"], "variant": r["variant"], "seed": r["seed"],
                        "status": r["status"], "values": values, "steps": steps})
    order = {key: i for i, key in enumerate(keys)}
    return sorted(out, key=lambda c: (order[c["curve"]], c["task"], c["variant"], c["seed"]))


def draw_curves(found: Sequence[dict], path: str | Path, ylabel: str | None = None) -> Path:
    """Curves of one method and key from :func:`stored_curves`: one panel per task variant, one
    line per seed, over training iterations where the jobs record them."""
    steps = all(c["steps"] is not None for c in found)  # else every line over its logged index
    panels: dict[str, dict] = {}
    for c in found:
        seed = f"seed {c['seed']}" + (" (partial)" if c["status"] == "partial" else "")
        panels.setdefault(f"{c['task']}/{c['variant']}", {})[seed] = (c["steps"] if steps else None, c["values"])
    return plots.plot_curves(panels, path, ylabel=ylabel or found[0]["curve"],
                             title=f"{found[0]['method']}: {found[0]['curve']}",
                             xlabel="training iteration" if steps else "logged step")


def curve_figure(run_dir: str | Path, method: str, key: str, path: str | Path, family: str | None = None,
                 ylabel: str | None = None, seeds: set[int] | None = None, include_partial: bool = False) -> Path:
    """A stored learned curve of a run, drawn by :func:`draw_curves`."""
    found = stored_curves(run_dir, method, [key], family, seeds, include_partial)
    if not found:
        raise PopbenchError(f"no stored {key!r} curve of {method}{' on ' + family if family else ''} in {run_dir}")
    return draw_curves(found, path, ylabel)


def curves_csv(found: Sequence[dict], path: str | Path) -> Path:
    """The numbers behind :func:`draw_curves` as a long CSV (task, variant, method, seed, status,
    curve, iteration, value): one row per stored value, so a published figure can be checked."""
    import pandas as pd

    rows = [{"task": c["task"], "variant": c["variant"], "method": c["method"], "seed": c["seed"],
             "status": c["status"], "curve": c["curve"], "iteration": step, "value": v}
            for c in found for step, v in zip(c["steps"] or [None] * len(c["values"]), c["values"])]
    path = Path(path)
    pd.DataFrame(rows).to_csv(path, index=False, float_format="%.6g")
    return path
