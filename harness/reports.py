"""Tables from result rows (protocol.md sections 4 and 9).

Aggregation, exactly as the protocol says: per job, each query's per-target W1 becomes table cells
(``Task.summarize``); per seed, a family-level cell averages the family's variants that report that
column (the 5 SDEs of Table 1, the 3 EB holdouts of Table 3); across seeds, mean and standard error
(std with ddof 1 over seeds / sqrt(n)), with n shown.

Rendering:

- Markdown for the terminal (tabulate ``github``);
- LaTeX with booktabs (``pandas.Styler``), ``mean $\\pm$ SE``, best mean per column in bold and
  second underlined among the learners (reference rows ``static``, ``velocity_extrapolation`` and
  ``oracle`` are calibration, not competitors), "—" where a method cannot answer;
- CSV: the long result rows and the aggregated table (never parsed back from LaTeX).

Markers: ``(v)`` after a method that used the task's velocities; ``†`` on a learner's cell that
does not beat ``static``; with ``compare="paper"`` each cell also shows the paper's number and
whether the two agree within their combined error bars (✓ / ✗), and the paper's methods that the
harness does not run are listed as published-only rows.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd

REFERENCE_METHODS = ("static", "velocity_extrapolation", "oracle")
KEY_LABELS = {
    "train_w1": "Train W1",
    "forecast_w1": "Forecast W1",
    "w1_mean_holdouts": "mean",
    "w1_t10_from_t0": "t10 from t0",
    "w1_t10_from_t9": "t10 from t9",
}


def key_label(key: str) -> str:
    if key in KEY_LABELS:
        return KEY_LABELS[key]
    m = re.fullmatch(r"w1_holdout[-_](\d+)", key)
    if m:
        return f"h={m.group(1)}"
    return key.removeprefix("w1_")


def column_label(group: str, key: str) -> str:
    return f"{group} {key_label(key)}".strip()


# --------------------------------------------------------------------------------------------
# Published numbers


def load_paper_results() -> pd.DataFrame:
    with resources.files("harness").joinpath("reference/paper_results.csv").open() as fh:
        return pd.read_csv(fh)


def paper_lookup(paper: pd.DataFrame, table: int | None, task: str, variant: str, method: str, key: str):
    sel = paper[(paper.task == task) & (paper.variant == variant) & (paper.method == method) & (paper.column == key)]
    if table is not None:
        sel = sel[sel.table == table]
    if sel.empty:
        return None
    r = sel.iloc[0]
    err = float(r.err) if pd.notna(r.err) else float("nan")
    return float(r.value), err


def agrees(mean: float, se: float, p_value: float, p_err: float) -> bool:
    """Agreement within combined error bars: |ours − paper| ≤ SE_ours + err_paper (a missing
    error counts as 0, so a number without error bars must match to the printed precision)."""
    tol = (0.0 if not math.isfinite(se) else se) + (0.0 if not math.isfinite(p_err) else p_err)
    return abs(mean - p_value) <= tol + 5e-4


# --------------------------------------------------------------------------------------------
# Aggregation


def cells_frame(job_rows: Iterable[dict]) -> pd.DataFrame:
    """One row per (job, table cell) for ok jobs; failed jobs appear with ``value`` NaN."""
    recs = []
    for r in job_rows:
        common = {
            "task": r["task"],
            "variant": r["variant"],
            "method": r["method"],
            "profile": r["profile"],
            "seed": r["seed"],
            "status": r.get("status"),
            "used_velocities": bool(r.get("used_velocities", False)),
            "hardware": r.get("hardware") or "hardware not recorded",
        }
        if r.get("status") != "ok":
            recs.append({**common, "group": None, "key": None, "paper_variant": None, "value": np.nan})
            continue
        for c in r.get("cells") or []:
            recs.append({**common, "group": c["group"], "key": c["key"], "paper_variant": c.get("paper_variant"),
                         "value": c["value"]})
    cols = ["task", "variant", "method", "profile", "seed", "status", "used_velocities", "hardware", "group", "key",
            "paper_variant", "value"]
    return pd.DataFrame.from_records(recs, columns=cols)


def hardware_caption(cells: pd.DataFrame) -> str:
    """The hardware that ran the jobs behind ``cells``: one name, or per name the methods that ran
    on it (``"2-core CPU (am, dice); NVIDIA H100 80GB HBM3 (wlm)"``) when a table mixes machines."""
    if cells.empty or "hardware" not in cells:
        return ""
    by_hw = {hw: list(dict.fromkeys(g["method"])) for hw, g in cells.groupby("hardware", sort=True)}
    if len(by_hw) == 1:
        return next(iter(by_hw))
    return "; ".join(f"{hw} ({', '.join(ms)})" for hw, ms in by_hw.items())


def _mean_se(values: Sequence[float]) -> tuple[float, float, int]:
    v = np.asarray([x for x in values if np.isfinite(x)], dtype=float)
    if v.size == 0:
        return float("nan"), float("nan"), 0
    se = float(v.std(ddof=1) / np.sqrt(v.size)) if v.size > 1 else float("nan")
    return float(v.mean()), se, int(v.size)


def column_variants(cells: pd.DataFrame) -> dict[tuple[str, str, str], set[str]]:
    """(task, group, key) -> the variants whose ok jobs (of any method) feed that column."""
    ok = cells.dropna(subset=["key"])
    return {k: set(v) for k, v in ok.groupby(["task", "group", "key"], sort=False)["variant"]}


def _complete_seeds(cells: pd.DataFrame, ok: pd.DataFrame) -> pd.Series:
    """Mask over ``ok``: the row's seed has an ok job on every variant its column averages (those
    the column has, among those the method was run on with any seed, whatever the status). A seed
    whose hardest variant failed must not be averaged over the easy ones alone."""
    feeds = column_variants(cells)
    ran = {k: set(v) for k, v in cells.groupby(["task", "method"], sort=False)["variant"]}
    have = {k: set(v) for k, v in ok.groupby(["task", "method", "group", "key", "seed"], sort=False)["variant"]}
    complete = {k: v >= (feeds[(k[0], k[2], k[3])] & ran[(k[0], k[1])]) for k, v in have.items()}
    return pd.Series([complete[k] for k in zip(ok.task, ok.method, ok.group, ok.key, ok.seed)], index=ok.index,
                     dtype=bool)


def aggregate(cells: pd.DataFrame, by_variant: bool = False) -> pd.DataFrame:
    """Mean ± SE over seeds of the per-seed cells.

    Family level (default): per (method, group, key, seed) the mean over variants, then over seeds;
    a seed without an ok job on every variant of the column is left out (``n`` counts the rest).
    ``variants`` lists, space-separated, the variants a cell averages (``n_variants`` per seed).
    ``by_variant``: per (variant, method, group, key), over seeds.
    """
    ok = cells.dropna(subset=["key"])
    if not by_variant and not ok.empty:
        ok = ok[_complete_seeds(cells, ok)]
    if ok.empty:
        return pd.DataFrame(columns=["task", "variant", "method", "group", "key", "mean", "se", "n", "n_variants",
                                     "variants"])
    keys = ["task", "method", "group", "key"] + (["variant"] if by_variant else [])
    per_seed = ok.groupby(keys + ["seed"], sort=False).agg(value=("value", "mean"), n_variants=("variant", "nunique")).reset_index()
    averaged = {k: " ".join(sorted(set(v))) for k, v in ok.groupby(keys, sort=False)["variant"]}
    out = []
    for k, g in per_seed.groupby(keys, sort=False):
        mean, se, n = _mean_se(g["value"].tolist())
        rec = dict(zip(keys, k))
        rec.update(mean=mean, se=se, n=n, n_variants=int(g["n_variants"].min()), variants=averaged[k])
        out.append(rec)
    agg = pd.DataFrame(out)
    if not by_variant:
        agg["variant"] = ""
    return agg


# --------------------------------------------------------------------------------------------
# Tables


@dataclass
class Table:
    """A rendered-ready table: string cells plus what the caption must say."""

    title: str
    caption: str
    columns: list[str]
    rows: list[tuple[str, list[str]]]  # (row label, cells)
    latex_cells: list[list[str]] = field(default_factory=list)
    footnotes: list[str] = field(default_factory=list)
    aggregate: pd.DataFrame | None = None

    def markdown(self) -> str:
        from tabulate import tabulate

        body = tabulate([[label, *cells] for label, cells in self.rows], headers=["method", *self.columns],
                        tablefmt="github", disable_numparse=True)
        notes = "".join(f"\n{n}" for n in self.footnotes)
        return f"**{self.title}**\n\n{body}\n\n{self.caption}{notes}\n"

    def latex(self) -> str:
        df = pd.DataFrame([cells for cells in self.latex_cells], columns=self.columns,
                          index=[label for label, _ in self.rows])
        styler = df.style.format_index(escape="latex", axis=0).format_index(escape="latex", axis=1)
        # the caption carries the footnotes too: the marks in the LaTeX cells ($^\dagger$, $\times$)
        # need the same explanation as in Markdown
        caption = " ".join([_latex_escape(self.caption), *(_latex_note(n) for n in self.footnotes)])
        return styler.to_latex(hrules=True, caption=caption, position_float="centering")


# the Markdown marks and what the LaTeX cells show instead (an agreeing cell carries no mark there;
# the published number stands in brackets without the word "paper")
_LATEX_MARKS = {"[paper …]": r"[\ldots{}]", "✓": "unmarked:", "✗": r"$\times$:", "†": r"$^\dagger$",
                "…": r"\ldots{}"}


def _latex_note(note: str) -> str:
    """A Markdown footnote in the LaTeX cells' own marks (agreeing cells carry no mark there)."""
    s = _latex_escape(note.replace("`", ""))
    for mark, tex in _LATEX_MARKS.items():
        s = s.replace(mark, tex)
    return s


def _latex_escape(s: str) -> str:
    return (s.replace("\\", r"\textbackslash{}").replace("&", r"\&").replace("%", r"\%").replace("_", r"\_")
            .replace("#", r"\#").replace("±", r"$\pm$").replace("—", "---"))


def _fmt(mean: float, se: float, digits: int) -> str:
    if not math.isfinite(mean):
        return "—"
    if math.isfinite(se):
        return f"{mean:.{digits}f} ± {se:.{digits}f}"
    return f"{mean:.{digits}f}"


def build_table(
    cells: pd.DataFrame,
    family: str,
    *,
    by_variant: bool = False,
    compare: str | None = None,
    paper_table: dict | None = None,
    method_order: Sequence[str] | None = None,
    profile: str = "",
    hardware: str | None = None,
    digits: int = 3,
    note: str = "",
    protocol: str = "",
    column_averages: dict[tuple[str, str], Sequence[str]] | None = None,
) -> Table:
    """The family's table (or its per-variant table) from a cells frame of that family. The
    caption names the hardware its jobs ran on (``hardware`` overrides).

    A family-level cell that averages fewer variants than its column has (those any method's ok
    jobs feed) says so, ``(1 of 5 variants)``, and is neither ranked nor compared with the paper:
    a mean over the easy variants alone must not pass for the family's. Nor is a cell compared
    whose variants miss one that its column averages by definition, as the paper's number does
    (``column_averages``: (group, key) -> variants, ``Task.column_averages``), e.g. a run of 2 of
    Table 1's 5 SDEs, or eb300's mean over 2 of its 3 holdouts."""
    fam = cells[cells.task == family]
    if hardware is None:
        hardware = hardware_caption(fam)
    agg = aggregate(fam, by_variant=by_variant)
    paper = load_paper_results() if compare == "paper" else None
    paper_table = paper_table or {}
    # column order: first appearance in the job cells
    ok = fam.dropna(subset=["key"])
    colkeys = _order_columns(list(dict.fromkeys(zip(ok["group"], ok["key"]))))
    methods = list(dict.fromkeys(method_order or [])) or []
    methods += [m for m in fam["method"].unique() if m not in methods]
    methods = [m for m in methods if m in set(fam["method"])]
    learners = [m for m in methods if m not in REFERENCE_METHODS]
    refs = [m for m in methods if m in REFERENCE_METHODS]
    ordered = learners + refs
    variants = [""] if not by_variant else list(dict.fromkeys(fam["variant"]))
    seeds_n = sorted({int(n) for n in agg["n"]}) if not agg.empty else []
    feeds = column_variants(fam)

    def short(s, ck) -> int:
        """How many variants of its column a family-level cell lacks (0 per variant)."""
        if by_variant:
            return 0
        return len(feeds.get((family, *ck), set()) - set(str(s["variants"]).split()))

    def uncovered(s, ck) -> tuple[int, int] | None:
        """(k, K) when a family-level cell averages k of the K variants it should (its column's,
        or those the column averages by definition), else None: such a cell is not compared with
        the paper."""
        have = set(str(s["variants"]).split())
        if short(s, ck):
            return len(have), len(have) + short(s, ck)
        needed = set((column_averages or {}).get(ck, ())) if not by_variant else set()
        return (len(have & needed), len(needed)) if not needed <= have else None

    def stat(method, variant, group, key):
        sel = agg[(agg.method == method) & (agg.group == group) & (agg.key == key)]
        if by_variant:
            sel = sel[sel.variant == variant]
        if sel.empty:
            return None
        return sel.iloc[0]

    rows: list[tuple[str, list[str]]] = []
    latex_rows: list[list[str]] = []
    footnotes: list[str] = []
    flagged = fewer = not_run = partial_cells = uncompared = False
    disagreements = compared = 0
    for variant in variants:
        vfam = fam if not by_variant else fam[fam.variant == variant]
        vcolkeys = colkeys if not by_variant else list(dict.fromkeys(
            zip(vfam.dropna(subset=["key"])["group"], vfam.dropna(subset=["key"])["key"])))
        if by_variant and not vcolkeys:
            continue
        # best / second per column among learners
        rank: dict[tuple[str, str], dict[str, int]] = {}
        for ck in colkeys:
            vals = []
            for m in learners:
                s = stat(m, variant, *ck)
                if s is not None and math.isfinite(s["mean"]) and not short(s, ck):
                    vals.append((round(float(s["mean"]), digits), m))
            distinct = sorted({v for v, _ in vals})
            rank[ck] = {m: distinct.index(v) for v, m in vals if distinct.index(v) < 2}
        for m in ordered:
            mrows = vfam[vfam.method == m]
            if mrows.empty:
                continue
            label = m + (" (v)" if mrows["used_velocities"].any() else "")
            if by_variant:
                label = f"{variant} · {label}"
            failed = mrows[(mrows.status != "ok")]
            md_cells, tex_cells = [], []
            for ck in colkeys:
                if by_variant and ck not in vcolkeys:
                    md_cells.append("")
                    tex_cells.append("")
                    continue
                s = stat(m, variant, *ck)
                if s is None:  # what happened to the jobs this column needed; "—": they ran and cannot answer
                    needed = feeds.get((family, *ck), set())
                    fed = failed[failed.variant.isin(needed)]
                    if not fed.empty:
                        text = "/".join(dict.fromkeys(fed.status.astype(str)))
                    elif mrows[mrows.variant.isin(needed)].empty:
                        text, not_run = "not run", True  # e.g. a suite run with --tasks: not a capability
                    else:
                        text = "—"
                    md_cells.append(text)
                    tex_cells.append("---" if text == "—" else text)
                    continue
                mean, se = float(s["mean"]), float(s["se"])
                text = _fmt(mean, se, digits)
                tex = f"{mean:.{digits}f} $\\pm$ {se:.{digits}f}" if math.isfinite(se) else f"{mean:.{digits}f}"
                r = rank.get(ck, {}).get(m)
                if r == 0:
                    text, tex = f"**{text}**", f"\\textbf{{{tex}}}"
                elif r == 1:
                    text, tex = f"<u>{text}</u>", f"\\underline{{{tex}}}"
                if m not in REFERENCE_METHODS and not short(s, ck):  # static's cell averages other variants
                    st = stat("static", variant, *ck)
                    if (st is not None and math.isfinite(st["mean"])
                            and round(mean, digits) >= round(float(st["mean"]), digits)):
                        text += " †"
                        tex += r"$^\dagger$"
                        flagged = True
                if seeds_n and int(s["n"]) != max(seeds_n):
                    text += f" (n={int(s['n'])})"
                    tex += f" (n={int(s['n'])})"
                    fewer = True
                cover = uncovered(s, ck)  # fewer variants than its column, or than the paper's number averages
                if cover:
                    k_of = " ({} of {} variants)".format(*cover)
                    text, tex, partial_cells = text + k_of, tex + k_of, True
                if paper is not None:
                    pv = _paper_value(paper, family, paper_table, by_variant, variant, s, m, ck, mrows)
                    if pv is not None and cover:
                        ptxt = _fmt(pv[0], pv[1], digits)
                        text += f" [paper {ptxt}: not compared, {cover[0]} of {cover[1]} variants]"
                        tex += f" [{_latex_escape(ptxt)}: not compared, {cover[0]} of {cover[1]} variants]"
                        uncompared = True
                    elif pv is not None:
                        ok_ = agrees(mean, se, *pv)
                        disagreements += not ok_
                        compared += 1
                        ptxt = _fmt(pv[0], pv[1], digits)
                        text += f" [paper {ptxt} {'✓' if ok_ else '✗'}]"
                        mark = "" if ok_ else r" $\times$"
                        tex += f" [{_latex_escape(ptxt)}{mark}]"
                md_cells.append(text)
                tex_cells.append(tex)
            rows.append((label, md_cells))
            latex_rows.append(tex_cells)
        if paper is not None and not by_variant:
            for pm, cells_ in _published_only_rows(paper, family, paper_table, colkeys, set(methods), digits):
                rows.append((f"{pm} (published)", cells_))
                latex_rows.append([_latex_escape(c) for c in cells_])
    columns = [column_label(*ck) if not by_variant else column_label(*ck) for ck in colkeys]
    n_text = "/".join(str(n) for n in seeds_n) if seeds_n else "0"
    scope = ("per variant" if by_variant else "each cell averages the family's variants per seed, then")
    caption = (
        f"{family}: exact W1 (lower is better){'; ' + protocol + ';' if protocol else ','} {scope} mean ± SE "
        f"over n = {n_text} seeds"
        + (f"; profile {profile}" if profile else "")
        + (f"; {hardware}" if hardware else "")
        + ". Bold best, underlined second among learners; — = the method cannot answer (interpolation-only)."
    )
    if flagged:
        footnotes.append("† does not beat `static` on this column.")
    if not_run:
        footnotes.append("not run = no job of this method on the variant behind the column (not a missing capability).")
    if fewer:
        footnotes.append("(n=k) = a cell over fewer seeds than the table's most: the others were not run, or lack an "
                         "ok job on some variant the cell averages.")
    if partial_cells:
        footnotes.append("(k of K variants) = the cell averages only k of the K variants of its column (the "
                         "family's, as the paper averages them, or those other methods ran); a cell with fewer "
                         "than other methods' in its column is neither ranked nor marked †.")
    if uncompared:
        footnotes.append("not compared = the paper's number averages variants this cell lacks.")
    if any("(v)" in lbl for lbl, _ in rows):
        footnotes.append("(v) = the method used the task's observed velocities.")
    if paper is not None and compared:
        footnotes.append(
            "[paper …] = the published number; ✓ agrees within combined error bars (our SE over seeds + the "
            "paper's printed ±, which measures different things in different tables: harness/reference/README.md), "
            f"✗ does not ({disagreements} of {compared} cells disagree)."
        )
    elif paper is not None:
        footnotes.append(f"The paper publishes no numbers for {family}: nothing to compare.")
    if any(lbl.endswith(" (published)") for lbl, _ in rows):
        footnotes.append("(published) = a method of the paper not run here: its published numbers, "
                         "blank where the paper has none.")
    if note:
        footnotes.append(note)
    title = f"{family}" + (" (per variant)" if by_variant else "")
    return Table(title, caption, columns, rows, latex_rows, footnotes, agg)


def _order_columns(colkeys: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Groups in order of first appearance; inside a group, holdouts by index and the mean last."""
    groups = list(dict.fromkeys(g for g, _ in colkeys))

    def rank(ck):
        g, k = ck
        m = re.fullmatch(r"w1_holdout[-_](\d+)", k)
        return (groups.index(g), 2 if k == "w1_mean_holdouts" else 1 if m else 0,
                int(m.group(1)) if m else colkeys.index(ck))

    return sorted(colkeys, key=rank)


def _paper_value(paper, family, paper_table, by_variant, variant, s, method, ck, mrows):
    group, key = ck
    if by_variant:
        pv_rows = mrows[(mrows.variant == variant) & (mrows.group == group) & (mrows.key == key)]
        pvar = pv_rows["paper_variant"].dropna()
        if pvar.empty:
            return None
        return paper_lookup(paper, None, family, pvar.iloc[0], method, key) if group in paper_table else None
    if group not in paper_table:
        return None
    table_no, pvariant = paper_table[group]
    return paper_lookup(paper, table_no, family, pvariant, method, key)


def _paper_column(paper, family, paper_table, ck) -> pd.DataFrame:
    """The paper's family-level numbers (every method's) for column ``ck`` = (group, key)."""
    group, key = ck
    if group not in paper_table:
        return paper.iloc[0:0]
    table_no, pvariant = paper_table[group]
    return paper[(paper.table == table_no) & (paper.task == family) & (paper.variant == pvariant) & (paper.column == key)]


def _published_only_rows(paper, family, paper_table, colkeys, methods, digits):
    out = []
    seen: dict[str, list[str]] = {}
    for ck in colkeys:
        for _, r in _paper_column(paper, family, paper_table, ck).iterrows():
            if r.method in methods:
                continue
            seen.setdefault(r.method, [""] * len(colkeys))  # blank: the paper has no such number
            err = float(r.err) if pd.notna(r.err) else float("nan")
            seen[r.method][colkeys.index(ck)] = _fmt(float(r.value), err, digits)
    for m, cells in seen.items():
        out.append((m, cells))
    return out


# --------------------------------------------------------------------------------------------
# Writing a report


def long_rows_frame(rows: Iterable[dict], job_rows: Iterable[dict] = ()) -> pd.DataFrame:
    """One row per target. ``status`` is the job's where that is not ``ok`` (a target of a fit
    stopped early is scored ``ok`` but belongs to a ``partial`` job), else the target's own."""
    job_status = {(j.get("job_id"), j.get("attempt_id")): j.get("status") for j in job_rows}
    recs = []
    for r in rows:
        if r.get("row_type") != "target":
            continue
        rec = {k: r.get(k) for k in ("task", "variant", "method", "profile", "seed", "query", "group", "t",
                                     "index", "w1", "w2", "mmd", "status", "device", "hparams_hash")}
        job = job_status.get((r.get("job_id"), r.get("attempt_id")))
        if job not in (None, "ok"):
            rec["status"] = job
        recs.append(rec)
    return pd.DataFrame.from_records(recs)


def jobs_frame(job_rows: Iterable[dict]) -> pd.DataFrame:
    recs = []
    for r in job_rows:
        rec = {k: r.get(k) for k in ("task", "variant", "method", "profile", "seed", "status", "error", "fit_s",
                                     "predict_s", "wall_s", "peak_mem_mb", "device", "hardware",
                                     "hparams_hash", "git_revision")}
        if (r.get("learned") or {}).get("training_complete") is False:
            rec["status"] = "partial"  # also where a table relabels it "<method> (partial)" to show it
        for k, v in (r.get("learned") or {}).items():
            rec[f"learned.{k}"] = v
        recs.append(rec)
    return pd.DataFrame.from_records(recs)


def write_report(
    job_rows: list[dict],
    target_rows: list[dict],
    out_dir: str | Path,
    *,
    compare: str | None = None,
    method_order: Sequence[str] | None = None,
    profile: str = "",
    hardware: str | None = None,
    paper_tables: dict[str, dict] | None = None,
    column_averages: dict[str, dict] | None = None,
    protocols: dict[str, str] | None = None,
    per_variant_families: Sequence[str] = ("gf_sde",),
    notes: dict[str, str] | None = None,
) -> list[Table]:
    """Write Markdown, LaTeX and CSV tables per task family into ``out_dir``; return the tables."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cells = cells_frame(job_rows)
    tables = []
    for family in dict.fromkeys(cells["task"]):
        pt = (paper_tables or {}).get(family, {})
        for by_variant in (False, True) if family in per_variant_families else (False,):
            t = build_table(cells, family, by_variant=by_variant, compare=compare, paper_table=pt,
                            method_order=method_order, profile=profile, hardware=hardware,
                            note=(notes or {}).get(family, ""), column_averages=(column_averages or {}).get(family),
                            protocol=(protocols or {}).get(family, ""))
            stem = family + ("_per_variant" if by_variant else "")
            (out / f"{stem}.md").write_text(t.markdown())
            (out / f"{stem}.tex").write_text(t.latex())
            if t.aggregate is not None:
                t.aggregate.to_csv(out / f"{stem}_aggregate.csv", index=False)
            tables.append(t)
    long_rows_frame(target_rows, job_rows).to_csv(out / "rows_long.csv", index=False)
    jobs_frame(job_rows).to_csv(out / "jobs.csv", index=False)
    return tables
