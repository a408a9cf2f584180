"""Rebuild the bundle (``rows.jsonl.gz``) of a publication made before ``publish`` wrote one, from
its own CSVs, so that ``run_all.py restore`` can carry it into a new run. Kept for provenance: the
bundles of results published before 2026-11-24 were made by this script, and its rows say so.

    python results/rebuild_bundle.py results/paper/table3 [--check]

What the CSVs hold goes back as it was: every target's W1/W2/MMD (``rows_long.csv``), each job's
status, error, timings, hardware and learned scalars (``jobs.csv``), and each job's curves
(``<family>_<method>_curves.csv``, at the 6 significant digits published there). What they do not
hold is rebuilt or marked unknown, never invented:

- a job's table cells: recomputed by its task from the stored per-target W1, as the runner does;
- its settings: the method's defaults at the profile, used only where they hash to the published
  ``hparams_hash`` (else the script stops);
- ``used_velocities``: whether the method read velocities (WLM: its learned ``v0`` is "data"; others:
  their capability) and the task's query starts carry them;
- ``finished_at`` is 0 (unknown, and older than any real attempt, so a rerun of the job wins);
  ``attempt_id`` is derived from the job id; traceback, host and pid are unknown (None);
- predicted samples are not in any CSV: the figures drawn from them stay as published.

Every rebuilt job row carries ``rebuilt_from``. ``--check`` restores the bundle into a scratch run,
republishes it into a scratch directory, and compares every table, CSV and the bundle itself with
the published ones.
"""

from __future__ import annotations

import argparse
import filecmp
import hashlib
import math
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from harness import registry  # noqa: E402
from harness.runner import hparams_hash  # noqa: E402
from harness.store import BUNDLE, RunStore, _file_name, dumps, write_bundle  # noqa: E402

MARK = "jobs.csv + rows_long.csv + curves CSVs (results/rebuild_bundle.py)"


def _value(v):
    """A CSV cell as a row value: NaN -> None, numpy scalars -> Python."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    return v.item() if hasattr(v, "item") else v


TEXT_KEYS = {"resumed_at"}  # WLM's resume iterations, comma-joined: text that can look like a number


def _typed(key, text):
    """A learned scalar as published (read as text): 2418 -> int, 2000.0 -> float, True -> bool, NaN -> None."""
    if not isinstance(text, str):
        return None
    if key in TEXT_KEYS:
        return text
    if text in ("True", "False"):
        return text == "True"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _curves(pub: Path) -> dict[tuple, dict]:
    """(task, variant, method, seed) -> {curve: values} from the published curves CSVs."""
    out: dict[tuple, dict] = {}
    for path in sorted(pub.glob("*_curves.csv")):
        df = pd.read_csv(path)
        for (task, variant, method, seed, curve), g in df.groupby(["task", "variant", "method", "seed", "curve"],
                                                                  sort=False):
            if curve == "val_curve":  # DICE: (iteration, value) pairs
                values = [[int(i), float(v)] for i, v in zip(g["iteration"], g["value"])]
            else:  # one value per logged block: the iterations are recomputed from the job's count
                values = [float(v) for v in g["value"]]
            out.setdefault((task, variant, method, int(seed)), {})[curve] = values
    return out


def rebuild(pub: Path, data_dir: str | None) -> list[dict]:
    profile = pub.parent.name
    jobs = pd.read_csv(pub / "jobs.csv")
    learned_text = pd.read_csv(pub / "jobs.csv", dtype=str, keep_default_na=False, na_values=[""])
    targets = pd.read_csv(pub / "rows_long.csv")
    curves = _curves(pub)
    tasks: dict[tuple, object] = {}
    rows: list[dict] = []
    keys_of = {m: [k for k in g.columns if k.startswith("learned.") and g[k].notna().any()]
               for m, g in jobs.groupby("method")}
    for job, text in zip(jobs.to_dict("records"), learned_text.to_dict("records")):
        family, variant, method, seed = job["task"], job["variant"], job["method"], int(job["seed"])
        mcls = registry.methods.load(method)
        hp = dict(mcls.default_hparams(f"{family}/{variant}", profile))
        if hparams_hash(hp, tuple(mcls.budget_keys)) != job["hparams_hash"]:
            raise SystemExit(f"{pub}: {method} on {family}/{variant} was published with settings "
                             f"{job['hparams_hash']}, not today's {profile} defaults: cannot rebuild its settings")
        job_id = f"{family}/{variant}|{method}|{profile}|seed={seed}|{job['hparams_hash']}"
        attempt_id = "r" + hashlib.sha256(job_id.encode()).hexdigest()[:11]
        base = {"job_id": job_id, "attempt_id": attempt_id, "task": family, "variant": variant, "method": method,
                "profile": profile, "seed": seed, "hparams": hp, "hparams_hash": job["hparams_hash"],
                "device": job["device"], "host": None, "pid": None}
        # the method's learned keys in the published column order (None where this job had no value),
        # so that jobs.csv comes back with its columns in the same order
        learned = {k[len("learned."):]: _typed(k[len("learned."):], v) for k, v in text.items()
                   if k.startswith("learned.") and k in keys_of[method]}
        mine = targets[(targets.task == family) & (targets.variant == variant) & (targets.method == method)
                       & (targets.seed == seed) & (targets.hparams_hash == job["hparams_hash"])]
        key = (family, variant, seed)
        if key not in tasks:
            tasks[key] = registry.tasks.load(family)(variant, seed=seed, data_dir=data_dir)
        task = tasks[key]
        target_rows, cells = [], {}
        status = job["status"]
        if len(mine):
            for q in task.queries():
                qrows = mine[mine["query"] == q.name]
                if len(qrows) != len(q.targets):
                    raise SystemExit(f"{pub}: {job_id} has {len(qrows)} rows for query {q.name}, "
                                     f"the task {len(q.targets)} targets")
                w1s = []
                for tg, r in zip(q.targets, qrows.to_dict("records")):
                    # rows_long shows a partial job's status on its scored targets; their own is ok
                    tstatus = "ok" if r["status"] == "partial" else r["status"]
                    row = {**base, "row_type": "target", "query": q.name, "query_kind": q.kind, "group": r["group"],
                           "t": float(r["t"]), "index": int(r["index"]), "status": tstatus,
                           "w1": _value(r["w1"]), "w2": _value(r["w2"]), "mmd": _value(r["mmd"])}
                    target_rows.append(row)
                    w1s.append(math.nan if row["w1"] is None else row["w1"])
                cells.update(task.summarize(q, w1s))
            cells.update(task.extra_columns(cells))
        start = task.queries()[0].request()[0] if len(mine) else None
        job_row = {**base, "row_type": "job", "status": status, "error": _value(job["error"]), "traceback": None,
                   "fit_s": _value(job["fit_s"]), "predict_s": _value(job["predict_s"]),
                   "wall_s": _value(job["wall_s"]), "peak_mem_mb": _value(job["peak_mem_mb"]),
                   "hardware": _value(job["hardware"]), "git_revision": _value(job.get("git_revision")),
                   "finished_at": 0.0, "learned": learned, "rebuilt_from": MARK,
                   # WLM reports the start velocities it used (v0 "data" or "zero"); others read them
                   # whenever they declare so
                   "used_velocities": bool((learned["v0"] == "data" if learned.get("v0") else
                                            mcls.capabilities.uses_velocities)
                                           and start is not None and start.v is not None),
                   "cells": [{"group": c.group, "key": c.key, "paper_variant": c.paper_variant, "value": v}
                             for c, v in cells.items() if v is not None and math.isfinite(v)]}
        if any(r["status"] == "ok" for r in target_rows):  # it answered: its samples existed, and are not here
            job_row["predictions"] = f"artifacts/{_file_name(attempt_id + '_' + job_id)}.npz"
        found = curves.get((family, variant, method, seed))
        if found and status in ("ok", "partial"):
            job_row["artifact_payload"] = {"job_id": job_id, **found}
            job_row["artifact"] = f"artifacts/{_file_name(attempt_id + '_' + job_id)}.json"
        rows += [job_row, *target_rows]
    return rows


def write(pub: Path, rows: list[dict]) -> Path:
    """The bundle, through :func:`write_bundle` (curves go from a scratch run's artifact files)."""
    with tempfile.TemporaryDirectory() as tmp:
        store = RunStore(tmp)
        store.ensure()
        plain = []
        for r in rows:
            r = dict(r)
            payload = r.pop("artifact_payload", None)
            if payload is not None:
                (Path(tmp) / r["artifact"]).write_text(dumps(payload))
            plain.append(r)
        return write_bundle(tmp, plain, pub / BUNDLE)


def check(pub: Path, data_dir: str | None) -> bool:
    """Restore the bundle into a scratch run, republish, compare the tables and CSVs."""
    suite, profile = pub.name, pub.parent.name
    with tempfile.TemporaryDirectory() as tmp:
        run, out = Path(tmp) / "run", Path(tmp) / "out"
        cmd = [sys.executable, str(ROOT / "run_all.py")]
        subprocess.run([*cmd, "restore", "--suite", suite, "--profile", profile, "--from", str(pub),
                        "--run", str(run)], check=True, cwd=tmp)
        done = subprocess.run([*cmd, "publish", "--suite", suite, "--profile", profile, "--run", str(run),
                               "--out", str(out)] + (["--data-dir", data_dir] if data_dir else []),
                              cwd=tmp, capture_output=True, text=True)
        if done.returncode:
            print(f"{pub}: republishing failed: {done.stderr.strip()}")
            return False
        names = sorted(p.name for p in pub.iterdir() if p.suffix in (".md", ".tex", ".csv", ".gz"))
        same = True
        for name in names:
            if not (out / name).exists() or not filecmp.cmp(pub / name, out / name, shallow=False):
                print(f"  differs: {name}")
                same = False
        print(f"{pub}: {len(names)} tables, CSVs and bundle {'identical' if same else 'NOT identical'} on republishing")
        return same


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("published", nargs="+", type=Path, help="e.g. results/paper/table3")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--check", action="store_true", help="restore, republish into scratch, compare")
    args = p.parse_args()
    ok = True
    for pub in args.published:
        rows = rebuild(pub, args.data_dir)
        print(f"wrote {write(pub, rows)} ({sum(r['row_type'] == 'job' for r in rows)} jobs)")
        if args.check:
            ok &= check(pub, args.data_dir)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
