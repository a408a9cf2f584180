"""Refresh the tables that results/README.md and the README quote from the published files.

results/README.md is the commentary on every published table: its text is written by hand, and each
table in it is a verbatim copy of a published file, between ``<!-- quote: results/...md -->`` and
``<!-- /quote -->``. The README's short headline table, between ``<!-- headline:start -->`` and
``<!-- headline:end -->``, is computed from the published aggregate CSVs (``HEADLINE`` below).

After ``run_all.py publish`` rewrites a table, run ``python results/refresh_readme.py``: the quotes
and the headline then show exactly the committed numbers (tests/test_results.py fails while they
do not). ``--check`` changes nothing and exits 1 when something is stale.
"""

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS_README = ROOT / "results" / "README.md"
README = ROOT / "README.md"
# the body never contains "<!--", so a quote cannot swallow the text up to the next quote's end
# (an empty quote, freshly written, used to do just that); it may be empty
QUOTE = re.compile(r"(<!-- quote: (?P<path>[^ ]+) -->\n)(?P<body>(?:(?!<!--).)*?)\n?(<!-- /quote -->)", re.S)
HEADLINE = re.compile(r"(<!-- headline:start -->\n)(?P<body>.*?)(<!-- headline:end -->)", re.S)

# the headline: one published cell per line, (what it is, publication, family, group, key, the
# paper's table number and variant, or None where the paper has no counterpart)
HEADLINE_CELLS = [
    ("GF-SDE paired, Forecast W1", "quick/table1", "gf_sde", "paired", "forecast_w1", (1, "mean-of-5/paired")),
    ("GF-SDE unpaired, Forecast W1", "quick/table1", "gf_sde", "unpaired", "forecast_w1", (1, "mean-of-5/unpaired")),
    ("vortex interpolation, mean W1", "quick/table2", "vortex", "interpolation", "w1_mean_holdouts",
     (2, "interpolation")),
    ("vortex forecast, t10 from t0", "quick/table2", "vortex", "forecast", "w1_t10_from_t0", (2, "forecast")),
    ("EB (eb300 stand-in), mean W1", "quick/table3", "eb300", "", "w1_mean_holdouts", None),
    ("Boids, Forecast W1", "quick/table4", "boids", "", "forecast_w1", (4, "default")),
]
WLM_ROWS = {"wlm": "WLM", "wlm_full_gradient": "WLM, full gradient"}
REFERENCE = ("static", "velocity_extrapolation", "oracle")


def table_body(rel: str) -> str:
    """The file without its first line (the ``**family**`` heading)."""
    return (ROOT / rel).read_text().strip().split("\n", 1)[1].strip()


def refresh(text: str) -> str:
    """``text`` with every quote's body replaced by the current file's."""
    return QUOTE.sub(lambda m: m.group(1) + table_body(m.group("path")) + "\n" + m.group(4), text)


def _cell(mean: float, se: float) -> str:
    return f"{mean:.3f} ± {se:.3f}" if se == se else f"{mean:.3f}"


def headline() -> str:
    """The README's headline table, from the published aggregate CSVs and the paper's numbers."""
    import pandas as pd

    paper = pd.read_csv(ROOT / "harness" / "reference" / "paper_results.csv")
    tables = {pub: pd.read_csv(ROOT / "results" / pub / f"{family}_aggregate.csv", keep_default_na=False,
                               na_values={"mean": [""], "se": [""]})
              for _, pub, family, *_ in HEADLINE_CELLS}
    wlm_rows = [m for m in WLM_ROWS if any((t.method == m).any() for t in tables.values())]
    lines = ["| `quick` profile | " + " | ".join(WLM_ROWS[m] for m in wlm_rows)
             + " | best other learner | `static` | the paper's WLM |",
             "|---" * (4 + len(wlm_rows)) + "|"]
    for what, pub, family, group, key, ref in HEADLINE_CELLS:
        agg = tables[pub]
        col = agg[(agg.group.astype(str) == group) & (agg.key == key)]

        def cell(method: str) -> str:
            row = col[col.method == method]
            return _cell(float(row["mean"].iloc[0]), float(row["se"].iloc[0])) if len(row) else "not run"

        others = col[~col.method.isin([*WLM_ROWS, *REFERENCE]) & ~col.method.str.contains(r"[ (\[]", regex=True)]
        best = others.loc[others["mean"].idxmin()] if len(others) else None
        best_text = f"{best.method} {_cell(float(best['mean']), float(best['se']))}" if best is not None else "—"
        if ref is None:
            published = "no counterpart"
        else:
            p = paper[(paper.table == ref[0]) & (paper.task == family) & (paper.variant == ref[1])
                      & (paper.method == "wlm")]
            exact = p[p.column == key]
            if len(exact):
                published = _cell(float(exact.value.iloc[0]), float(exact.err.iloc[0]))
            elif key == "w1_mean_holdouts" and len(p):  # the paper prints each holdout, not their mean
                published = f"{p[p.column.str.startswith('w1_holdout')].value.mean():.3f} (mean of its holdouts)"
            else:
                published = "—"
        lines.append(f"| {what} | " + " | ".join(cell(m) for m in wlm_rows)
                     + f" | {best_text} | {cell('static')} | {published} |")
    return "\n".join(lines) + "\n"


def refresh_headline(text: str) -> str:
    return HEADLINE.sub(lambda m: m.group(1) + headline() + m.group(3), text)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="change nothing; exit 1 when a quote or the headline is stale")
    args = p.parse_args(argv)
    stale = []
    for path, update in ((RESULTS_README, refresh), (README, refresh_headline)):
        text = path.read_text()
        new = update(text)
        if new != text:
            stale.append(path.relative_to(ROOT).as_posix())
            if not args.check:
                path.write_text(new)
    n = len(QUOTE.findall(RESULTS_README.read_text()))
    verb = "stale" if args.check else "updated"
    print(f"{n} quoted tables and the headline: " + (f"{verb}: {', '.join(stale)}" if stale else "already current"))
    return 1 if (args.check and stale) else 0


if __name__ == "__main__":
    sys.exit(main())
