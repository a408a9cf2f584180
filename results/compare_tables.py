"""Compare two sets of tables cell by cell: a rerun against a publication.

    python results/compare_tables.py results/quick/table2 results/runs/quick-table2/tables

Reads every ``*_aggregate.csv`` found in both directories (``publish`` and every sweep write them)
and prints, per method, how many cells agree exactly, the largest difference of a cell's mean and
that difference in units of the first directory's SE over seeds; then every cell that differs by
more than ``--tol``. Cells present on one side only are listed too. With ``--max-se X`` the exit
code is 1 when some cell differs by more than X of its SE (or by anything, where the SE is 0), or
is missing on one side.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

KEY = ["task", "method", "group", "key"]


def compare(first: Path, second: Path, tol: float = 1e-9):
    """One frame with a row per cell of every aggregate CSV both directories hold: the two means
    (``mean_a``, ``mean_b``), ``se_a``, ``diff`` (absolute), ``diff_se`` (diff / se_a; inf where
    se_a is 0 and the cells differ) and ``side`` (``both``, ``left_only``, ``right_only``)."""
    import numpy as np
    import pandas as pd

    names = sorted({p.name for p in first.glob("*_aggregate.csv")} & {p.name for p in second.glob("*_aggregate.csv")})
    if not names:
        raise SystemExit(f"no *_aggregate.csv in both {first} and {second}")
    frames = []
    for name in names:
        a, b = pd.read_csv(first / name), pd.read_csv(second / name)
        a, b = (d[d["variant"].isna()] if "variant" in d else d for d in (a, b))  # the family's cells, not per variant
        m = a[KEY + ["mean", "se"]].merge(b[KEY + ["mean", "se"]], on=KEY, how="outer", suffixes=("_a", "_b"),
                                          indicator="side")
        m["file"] = name
        frames.append(m)
    m = pd.concat(frames, ignore_index=True)
    m["side"] = m["side"].astype(str)
    m["diff"] = (m["mean_b"] - m["mean_a"]).abs()
    with np.errstate(divide="ignore", invalid="ignore"):
        m["diff_se"] = np.where(m["diff"] <= tol, 0.0, m["diff"] / m["se_a"].where(m["se_a"] > 0, 0.0))
    return m


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("first", type=Path, help="a directory of tables (e.g. results/quick/table2)")
    p.add_argument("second", type=Path, help="another (e.g. a rerun's results/runs/<name>/tables)")
    p.add_argument("--tol", type=float, default=1e-9, help="differences up to this count as equal (default 1e-9)")
    p.add_argument("--max-se", type=float, default=None, help="exit 1 if a cell differs by more than this many SEs")
    args = p.parse_args(argv)
    import numpy as np

    m = compare(args.first, args.second, args.tol)
    both = m[m["side"] == "both"]
    print(f"{len(both)} cells in both ({', '.join(sorted(set(m['file'])))}); "
          f"{int((both['diff'] <= args.tol).sum())} equal within {args.tol:g}")
    for method, g in both.groupby("method", sort=False):
        worst = g.loc[g["diff"].idxmax()]
        print(f"  {method}: {int((g['diff'] <= args.tol).sum())}/{len(g)} equal, largest difference "
              f"{worst['diff']:.3g} ({worst['diff_se']:.2f} SE) at {worst['group']} {worst['key']}")
    differ = both[both["diff"] > args.tol]
    if len(differ):
        print("cells that differ:")
        print(differ[KEY + ["mean_a", "mean_b", "se_a", "diff", "diff_se"]].to_string(index=False, float_format="%.6g"))
    alone = m[m["side"] != "both"]
    if len(alone):
        print("cells on one side only:")
        print(alone[KEY + ["side"]].to_string(index=False))
    if args.max_se is not None and (len(alone) or bool(np.any(differ["diff_se"] > args.max_se))):
        return 1
    return 0


if __name__ == "__main__":
    try:
        code = main()
        sys.stdout.flush()
    except BrokenPipeError:  # piped into `head`: stop quietly, but not with a pass (--max-se unchecked)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 1
    sys.exit(code)
