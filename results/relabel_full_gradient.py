"""Relabel the WLM rows published before WLM had the ``force_gradient`` setting as the
full-gradient rows they are. Kept for provenance: the published bundles were relabelled by this
script on 2026-12-02, and their rows say so.

    python results/relabel_full_gradient.py results/quick/table1 [more publication dirs]

Until then WLM had one gradient, backpropagation through the whole rollout (the positions as well
as the forces), which is now ``force_gradient = "full"``, shown as ``wlm_full_gradient`` (and
``wlm_zero_friction_full_gradient``); ``wlm`` now means the authors' code's detached gradient. So
each published ``wlm`` / ``wlm_zero_friction`` row of a bundle (``rows.jsonl.gz``), job and target
rows alike, becomes the row the same fit would have under the new names:

- ``method``: ``wlm`` -> ``wlm_full_gradient``, ``wlm_zero_friction`` -> ``wlm_zero_friction_full_gradient``;
- ``hparams`` gain ``force_gradient: "full"`` (every other setting is unchanged), so ``hparams_hash``
  and ``job_id`` are recomputed exactly as the runner computes them; the job row's ``learned``
  gains ``force_gradient: "full"``;
- every relabelled row carries ``relabelled_from`` (its old method and job id).

Nothing else changes: the numbers, timings, curves and the ``trained_by`` code hash are the fit's
own. After relabelling, ``run_all.py restore`` + ``publish`` regenerate the tables and CSVs from the
bundle. A bundle with no old-style WLM row is left untouched (running the script twice is a no-op).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from harness.runner import hparams_hash  # noqa: E402
import gzip  # noqa: E402

from harness.store import BUNDLE, dumps, read_bundle  # noqa: E402
from methods.wlm import WLM  # noqa: E402

RENAME = {"wlm": "wlm_full_gradient", "wlm_zero_friction": "wlm_zero_friction_full_gradient"}


def relabel(row: dict) -> dict | None:
    """The relabelled row, or None when ``row`` is not a WLM row from before ``force_gradient``."""
    if row.get("method") not in RENAME or "force_gradient" in (row.get("hparams") or {}):
        return None
    hp = {**row["hparams"], "force_gradient": "full"}
    h = hparams_hash(hp, WLM.budget_keys)
    method = RENAME[row["method"]]
    new = {**row, "method": method, "hparams": hp, "hparams_hash": h,
           "job_id": f"{row['task']}/{row['variant']}|{method}|{row['profile']}|seed={row['seed']}|{h}",
           "relabelled_from": f"{row['method']} ({row['job_id']}): trained before force_gradient existed, "
                              "with the full gradient"}
    if row.get("row_type") == "job" and isinstance(row.get("learned"), dict):
        new["learned"] = {**row["learned"], "force_gradient": "full"}
    return new


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dirs", nargs="+", help="publication directories (results/<profile>/<suite>)")
    args = ap.parse_args(argv)
    for d in args.dirs:
        path = Path(d) / BUNDLE
        rows = read_bundle(path)
        out, n = [], 0
        for r in rows:
            new = relabel(r)
            n += new is not None
            out.append(new or r)
        if n:  # as store.write_bundle writes one (no time stamp); the curves are already inline
            with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as fh:
                fh.write("".join(dumps(r) + "\n" for r in out).encode())
        print(f"{path}: {n} of {len(rows)} rows relabelled")
    return 0


if __name__ == "__main__":
    sys.exit(main())
