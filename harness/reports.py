"""Tables from result rows (the protocol: docs/protocol.md).

Aggregation, exactly as the protocol says: per job, each query's per-target W1 becomes table cells
(``Task.summarize``); per seed, a family-level cell averages the family's variants that report that
column (the 5 SDEs of Table 1, the 3 EB holdouts of Table 3); across seeds, mean and standard error
(std with ddof 1 over seeds / sqrt(n)), with n shown.

Rendering:

- Markdown for the terminal (tabulate ``github``);
- LaTeX (:func:`render_latex`) that fits a page as generated: booktabs rules, numbers right-aligned
  with their marks in the column's margin and the published numbers in sub-columns of their own, a
  one-line caption and the notes under the table, landscape or one tabular per column group when
  wide, several floats when tall; a comment at its top names the packages it needs;
- CSV: the long result rows and the aggregated table (never parsed back from LaTeX).

In both, the best mean per column is bold and the second underlined among the learners (reference
rows ``static``, ``velocity_extrapolation`` and ``oracle`` are calibration, not competitors), and
"—" marks a column the method cannot answer. Markers: ``(v)`` after a method whose jobs used the
task's velocities (the job row's ``used_velocities``); ``†`` on a learner's cell that does not beat
``static``; ``‡`` on a learner's cell below the ``oracle``'s, the finite-sample floor of W1 (a
suspicious result); with ``compare="paper"`` each cell also shows the paper's number and whether
the two agree within their combined error bars (✓ / ✗), and the paper's methods that the harness
does not run are listed as published-only rows.
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
    m = re.fullmatch(r"w1_t(\d+)_from_t(\d+)", key)
    if m:
        return f"t{m.group(1)} from t{m.group(2)}"
    return key.removeprefix("w1_")


def _display_name(task: str) -> str:
    """The name a table is headed with and its files are named after: the task class's family
    (``three_well`` for ``popbench_example.three_well:ThreeWell``), the stored name otherwise."""
    if ":" not in task:
        return task
    from harness import registry

    return registry.family_name(task)


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
class TexCell:
    """A LaTeX cell in three parts, so that numbers line up in their column: ``core`` (the number,
    bold or underlined, or a status word), ``marks`` (superscript marks such as $^\\dagger$, drawn
    in the column's right margin so they do not push the number left) and ``paper`` (the published
    number, in a sub-column of its own)."""

    core: str = ""
    marks: str = ""
    paper: str = ""

    def empty(self) -> bool:
        return not (self.core or self.marks or self.paper)


@dataclass
class Table:
    """A rendered-ready table: Markdown and LaTeX cells plus what the caption and notes must say."""

    title: str
    caption: str
    columns: list[str]
    rows: list[tuple[str, list[str]]]  # (row label, Markdown cells)
    latex_cells: list[list[TexCell]] = field(default_factory=list)
    footnotes: list[str] = field(default_factory=list)
    aggregate: pd.DataFrame | None = None
    keys: list[tuple[str, str]] = field(default_factory=list)  # (group, key) of each column
    latex_labels: list[str] = field(default_factory=list)  # row labels, LaTeX (no variant prefix)
    row_variants: list[str] = field(default_factory=list)  # per row: its variant in a per-variant table, else ""
    latex_caption: str = ""  # one line
    latex_notes: list[str] = field(default_factory=list)  # under the table
    name: str = ""  # the file stem, also the LaTeX label

    def markdown(self) -> str:
        from tabulate import tabulate

        body = tabulate([[label, *cells] for label, cells in self.rows], headers=["method", *self.columns],
                        tablefmt="github", disable_numparse=True)
        notes = "".join(f"\n{n}" for n in self.footnotes)
        return f"**{self.title}**\n\n{body}\n\n{self.caption}{notes}\n"

    def latex(self) -> str:
        return render_latex(self)


def _latex_escape(s: str) -> str:
    out = []
    for ch in s:
        out.append({"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "_": r"\_", "#": r"\#", "$": r"\$",
                    "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                    "±": r"$\pm$", "—": "---", "…": r"\ldots{}", "†": r"$^\dagger$", "‡": r"$^\ddagger$",
                    "×": r"$\times$", "<": r"$<$", ">": r"$>$"}.get(ch, ch))
    return "".join(out)


def _fmt(mean: float, se: float, digits: int) -> str:
    if not math.isfinite(mean):
        return "—"
    if math.isfinite(se):
        return f"{mean:.{digits}f} ± {se:.{digits}f}"
    return f"{mean:.{digits}f}"


def _seeds_text(seeds_n: Sequence[int], tex: bool = False) -> str:
    """What a cell is over: ``mean ± SE over n = 3 seeds``, or one seed (no SE), or a mix."""
    pm = r"$\pm$" if tex else "±"
    if not seeds_n:
        return "no finished job"
    if max(seeds_n) == 1:
        return "one seed (no SE)"
    if len(seeds_n) == 1:
        return f"mean {pm} SE over n = {seeds_n[0]} seeds"
    return f"mean {pm} SE over up to n = {max(seeds_n)} seeds (fewer where marked)"


def _known_tokens(family: str, paper_table: dict) -> set[str]:
    """Names a task's protocol text may open a clause with: its column groups and variants."""
    tokens = {g for g in paper_table if g}
    try:
        from harness import registry

        tokens |= set(registry.tasks.load(family).variants)
    except Exception:  # noqa: BLE001 - an unregistered family (a test's) has no variants to know
        pass
    return tokens


def protocol_shown(protocol: str, known: set[str], shown: set[str], labels: set[str]) -> str:
    """The part of a family's protocol text (``; ``-separated clauses) that describes the columns
    a table shows: a clause about a column group or variant it does not show (``forecast (trained
    on t0..t9): ...``) and a definition of a column it does not show (``Forecast W1 = over ...``)
    are left out."""
    out = []
    for clause in protocol.split("; "):
        m = re.match(r"([\w-]+)(?: \([^)]*\))?: ", clause)
        if m and m.group(1) in known and m.group(1) not in shown:
            continue
        parts = []
        for part in clause.split(", "):
            d = re.match(r"(.+?) = ", part)
            if d and d.group(1) in KNOWN_COLUMN_LABELS and d.group(1) not in labels:
                continue
            parts.append(part)
        if parts:
            out.append(", ".join(parts))
    return "; ".join(out)


KNOWN_COLUMN_LABELS = set(KEY_LABELS.values())

AGREEMENT_NOTE = ("our SE over seeds + the paper's printed ±, which measures different things in different "
                  "tables: see docs/protocol.md")


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
    Table 1's 5 SDEs, or eb300's mean over 2 of its 3 holdouts.

    Marks: ``(v)`` after a method whose jobs used the task's velocities (per cell where only some
    of its jobs did); ``†`` on a learner's cell that does not beat ``static``; ``‡`` on a learner's
    cell below the ``oracle``'s (the true dynamics with fresh noise: the finite-sample floor of W1),
    which is suspicious."""
    fam = cells[cells.task == family]
    name = _display_name(family)  # a plug-in's `module:Class` is headed by its family's name
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
    latex_rows: list[list[TexCell]] = []
    latex_labels: list[str] = []
    row_variants: list[str] = []
    flagged = floor_flagged = fewer = not_run = partial_cells = uncompared = ranked = second = dash = False
    some_v = False
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
            # (v): from the job rows, which say whether velocities reached the method
            scored = mrows[mrows.status == "ok"]
            scored = scored if not scored.empty else mrows
            all_v = bool(scored["used_velocities"].all())
            mixed_v = bool(scored["used_velocities"].any()) and not all_v
            label = m + (" (v)" if all_v else "")
            failed = mrows[(mrows.status != "ok")]
            md_cells, tex_cells = [], []
            for ck in colkeys:
                if by_variant and ck not in vcolkeys:
                    md_cells.append("")
                    tex_cells.append(TexCell())
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
                        text, dash = "—", True
                    md_cells.append(text)
                    tex_cells.append(TexCell(core=_latex_escape(text)))
                    continue
                mean, se = float(s["mean"]), float(s["se"])
                text = _fmt(mean, se, digits)
                tex = f"{mean:.{digits}f} $\\pm$ {se:.{digits}f}" if math.isfinite(se) else f"{mean:.{digits}f}"
                marks = ""
                r = rank.get(ck, {}).get(m)
                if r == 0:
                    text, tex, ranked = f"**{text}**", f"\\textbf{{{tex}}}", True
                elif r == 1:
                    text, tex, ranked, second = f"<u>{text}</u>", f"\\underline{{{tex}}}", True, True
                if m not in REFERENCE_METHODS and not short(s, ck):  # static's cell averages other variants
                    st = stat("static", variant, *ck)
                    if st is not None and math.isfinite(st["mean"]) and round(mean, digits) >= round(float(st["mean"]), digits):
                        text += " †"
                        marks += r"$^\dagger$"
                        flagged = True
                    o = stat("oracle", variant, *ck)
                    if (o is not None and math.isfinite(o["mean"])
                            and round(mean, digits) < round(float(o["mean"]), digits)):
                        text += " ‡"
                        marks += r"$^\ddagger$"
                        floor_flagged = True
                if mixed_v:
                    fed_by = [variant] if by_variant else str(s["variants"]).split()
                    if scored[scored.variant.isin(fed_by)]["used_velocities"].any():
                        text += " (v)"
                        tex += " (v)"
                        some_v = True
                if seeds_n and int(s["n"]) != max(seeds_n):
                    text += f" (n={int(s['n'])})"
                    tex += f" (n={int(s['n'])})"
                    fewer = True
                cover = uncovered(s, ck)  # fewer variants than its column, or than the paper's number averages
                if cover:
                    k_of = " ({} of {} variants)".format(*cover)
                    text, tex, partial_cells = text + k_of, tex + k_of, True
                ptex = ""
                if paper is not None:
                    pv = _paper_value(paper, family, paper_table, by_variant, variant, s, m, ck, mrows)
                    if pv is not None and cover:
                        ptxt = _fmt(pv[0], pv[1], digits)
                        text += f" [paper {ptxt}: not compared, {cover[0]} of {cover[1]} variants]"
                        ptex = _latex_escape(ptxt) + r"\rlap{$^\circ$}"
                        uncompared = True
                    elif pv is not None:
                        ok_ = agrees(mean, se, *pv)
                        disagreements += not ok_
                        compared += 1
                        ptxt = _fmt(pv[0], pv[1], digits)
                        text += f" [paper {ptxt} {'✓' if ok_ else '✗'}]"
                        ptex = _latex_escape(ptxt) + ("" if ok_ else r"\rlap{$^\times$}")
                md_cells.append(text)
                tex_cells.append(TexCell(core=tex, marks=marks, paper=ptex))
            rows.append((f"{variant} · {label}" if by_variant else label, md_cells))
            latex_rows.append(tex_cells)
            latex_labels.append(_latex_escape(label))
            row_variants.append(variant)
        if paper is not None and not by_variant:
            for pm, cells_ in _published_only_rows(paper, family, paper_table, colkeys, set(methods), digits):
                rows.append((f"{pm} (published)", cells_))
                latex_rows.append([TexCell(core=_latex_escape(c)) for c in cells_])
                latex_labels.append(_latex_escape(f"{pm} (published)"))
                row_variants.append("")
    columns = [column_label(*ck) for ck in colkeys]

    # caption and notes: only what the table shows
    groups_shown = {g for g, _ in colkeys}
    shown = groups_shown | set(fam.dropna(subset=["key"])["variant"])
    labels = {key_label(k) for _, k in colkeys}
    proto = protocol_shown(protocol, _known_tokens(family, paper_table), shown, labels) if protocol else ""
    averages = not by_variant and not agg.empty and bool((agg["n_variants"] > 1).any())
    seeds = _seeds_text(seeds_n)
    scope = ("per variant, " if by_variant else
             "each cell averages the family's variants per seed, then " if averages else "")
    caption = (f"{name}: exact W1 (lower is better){'; ' + proto if proto else ''}; {scope}{seeds}"
               + (f"; profile {profile}" if profile else "") + (f"; {hardware}" if hardware else "") + ".")
    ranking = ("Bold best, underlined second among learners." if second else "Bold: the best learner.") if ranked else ""
    if ranking:
        caption += " " + ranking
    if dash:
        caption += " — = the method cannot answer (e.g. interpolation-only)."
    short_seeds = ("one seed" if seeds_n and max(seeds_n) == 1 else
                   f"mean $\\pm$ SE over {'up to ' if len(seeds_n) > 1 else ''}{max(seeds_n)} seeds" if seeds_n else
                   "no finished job")
    tex_caption = (f"{_latex_escape(name)}{' per variant' if by_variant else ''}: W1, lower is better, {short_seeds}"
                   + (f" (profile {_latex_escape(profile)})" if profile else "") + ".")
    # (Markdown note, LaTeX note) pairs; LaTeX says how its own marks look
    notes: list[tuple[str, str]] = []
    first = (proto[:1].upper() + proto[1:] + ". ") if proto else ""
    how = (f"Each cell averages the family's variants per seed, then the {seeds}" if averages
           else f"Per variant, the {seeds}" if by_variant else f"Each cell is the {seeds}")
    notes.append(("", _latex_escape(first + how + (f"; run on {hardware}" if hardware else "") + ".")))
    if ranked or dash:
        notes.append(("", _latex_escape(" ".join(
            ([ranking[:-1] + " (the reference rows static, velocity_extrapolation and oracle are not ranked)."]
             if ranked else [])
            + (["— = the method cannot answer (e.g. interpolation-only)."] if dash else []))))) 
    if flagged:
        notes.append(("† does not beat `static` on this column.",
                      r"$^\dagger$ does not beat static on this column."))
    if floor_flagged:
        text = ("below the oracle's finite-sample floor on this column (the true dynamics with fresh noise "
                "score that W1 against the same truth): suspicious, e.g. a method that saw held-out data.")
        notes.append(("‡ " + text, r"$^\ddagger$ " + _latex_escape(text)))
    if not_run:
        text = "not run = no job of this method on the variant behind the column (not a missing capability)."
        notes.append((text, _latex_escape(text)))
    if fewer:
        text = ("(n=k) = a cell over fewer seeds than the table's most: the others were not run, or lack an "
                "ok job on some variant the cell averages.")
        notes.append((text, _latex_escape(text)))
    if partial_cells:
        text = ("(k of K variants) = the cell averages only k of the K variants of its column (the "
                "family's, as the paper averages them, or those other methods ran); a cell with fewer "
                "than other methods' in its column is neither ranked nor marked †.")
        notes.append((text, _latex_escape(text)))
    if uncompared:
        notes.append(("not compared = the paper's number averages variants this cell lacks.",
                      r"$^\circ$ on a paper number: not compared, it averages variants the cell above lacks."))
    if any("(v)" in lbl for lbl, _ in rows) or some_v:
        text = "(v) = the method used the task's observed velocities."
        notes.append((text, _latex_escape(text)))
    if paper is not None and compared:
        notes.append((
            f"[paper …] = the published number; ✓ agrees within combined error bars ({AGREEMENT_NOTE}), "
            f"✗ does not ({disagreements} of {compared} cells disagree).",
            r"\textit{paper} = the published number under ours; $^\times$ = the two disagree beyond their "
            r"combined error bars (our SE over seeds + the paper's printed $\pm$, which measures different things "
            f"in different tables): {disagreements} of {compared} cells."))
    elif paper is not None:
        text = f"The paper publishes no numbers for {name}: nothing to compare."
        notes.append((text, _latex_escape(text)))
    if any(lbl.endswith(" (published)") for lbl, _ in rows):
        text = "(published) = a method of the paper not run here: its published numbers, blank where the paper has none."
        notes.append((text, _latex_escape(text)))
    if note:
        notes.append((note, _latex_escape(note.replace("`", ""))))
    title = f"{name}" + (" (per variant)" if by_variant else "")
    return Table(title, caption, columns, rows, latex_rows, [md for md, _ in notes if md], agg, keys=list(colkeys),
                 latex_labels=latex_labels, row_variants=row_variants, latex_caption=tex_caption,
                 latex_notes=[tex for _, tex in notes], name=name + ("_per_variant" if by_variant else ""))


# --------------------------------------------------------------------------------------------
# LaTeX layout: booktabs, numbers right-aligned, a one-line caption, the notes under the table;
# landscape, or one tabular per column group, when the table is wider than the page; several
# floats when it is taller.

PAGE_WIDTH_PT = 452.0  # a 6.25 in x 9 in text block: US letter or A4 with 1-inch margins
PAGE_HEIGHT_PT = 650.0
_EM = 9.25  # \small's em (Computer Modern, 10 pt class), in pt
_SEP = 12.0  # 2 \tabcolsep
_ROW = 11.15  # a \small row (\baselineskip and a share of the rules)
_NOTE_ROW = 9.5  # a \footnotesize line
# glyph widths in em (Computer Modern roman; bold is about 15% wider); kerning is ignored, so the
# estimate is a few percent high
_GLYPH_EM = {**dict.fromkeys("0123456789a/*go", 0.5), **dict.fromkeys(".,;:[]'il", 0.278), "j": 0.306,
             "f": 0.306, **dict.fromkeys("rts", 0.394), **dict.fromkeys("cez", 0.444),
             **dict.fromkeys("bdhnpu", 0.556), **dict.fromkeys("kqvxy", 0.528), "w": 0.722, "m": 0.833,
             **dict.fromkeys("()", 0.389), "-": 0.333, " ": 0.333, "_": 0.36, **dict.fromkeys("=+±×", 0.778),
             "—": 1.0, "…": 0.9, **dict.fromkeys("†‡∘", 0.43), "·": 0.278}


def _plain(tex: str) -> tuple[str, bool]:
    """A LaTeX cell's visible text (roughly) and whether it is bold."""
    bold = r"\textbf" in tex
    s = (re.sub(r"\\rlap\{[^}]*\}", "", tex).replace(r"$\pm$", "±").replace(r"$^\dagger$", "†").replace(r"$^\ddagger$", "‡")
         .replace(r"$^\times$", "×").replace(r"$^\circ$", "∘").replace(r"\ldots{}", "…").replace("---", "—")
         .replace(r"\quad", "mm"))
    s = re.sub(r"\\text(bf|it)\{|\\underline\{", "", s)
    s = re.sub(r"\\(.)", r"\1", s).replace("{", "").replace("}", "").replace("$", "")
    return s, bold


def _width(tex: str, scale: float = 1.0) -> float:
    """Estimated width in pt of a LaTeX cell set in \\small (``scale``: relative font size)."""
    s, bold = _plain(tex)
    em = sum(_GLYPH_EM.get(ch, 0.75 if ch.isupper() else 0.5) for ch in s)
    return em * _EM * scale * (1.15 if bold else 1.0)


def _lines(tex: str, width: float, scale: float) -> int:
    return max(1, math.ceil(_width(tex, scale) / width))


@dataclass
class _Block:
    """One tabular: some of the table's columns, the rows that have something in them, its
    estimated width and whether it goes on a landscape page."""

    cols: list[int]
    rows: list[int]
    cont: bool = False  # its column group continues from the previous block
    width: float = 0.0
    landscape: bool = False


def latex_layout(t: Table) -> list[list[_Block]]:
    """How :func:`render_latex` lays ``t`` out: floats (pages), each a list of tabulars (blocks).

    Columns: all in one tabular if they fit a portrait page, else a landscape one; else one
    tabular per column group (a group too wide for a landscape page is cut), neighbouring groups
    sharing one where they fit, each on a portrait page if it fits one. Rows: a tabular taller
    than a page is cut (in a per-variant table, before a variant's heading); the tabulars of one
    orientation share a float while they fit."""
    ncol = len(t.columns)
    groups = _groups(t)
    heads = _heads(t)

    def col_width(c: int) -> float:
        cells = [w for r in t.latex_cells for w in (_width(r[c].core) + max(_width(r[c].marks) - 6.0, 0.0),
                                                     _width(r[c].paper) + max(_width(_PAPER_MARK) - 6.0, 0.0))]
        return max(cells + [_width(heads[c])]) + _SEP

    widths = [col_width(c) for c in range(ncol)]
    per_variant = any(t.row_variants)
    label_w = max([_width(lbl) + (_EM if per_variant else 0.0) for lbl in t.latex_labels]
                  + [_width("method"), _width(_PAPER_LABEL) + (_EM if per_variant else 0.0)]) + _SEP

    def block_width(cols: Sequence[int]) -> float:
        w = label_w + sum(widths[c] for c in cols)
        for g in dict.fromkeys(groups[c] for c in cols):  # a group's name spans its columns
            span = [c for c in cols if groups[c] == g]
            w += max(0.0, _width(_latex_escape(g)) + _SEP - sum(widths[c] for c in span)) if g else 0.0
        return w

    def block(cols: list[int], cont: bool = False, rows: list[int] | None = None) -> _Block:
        if rows is None:
            rows = [i for i, r in enumerate(t.latex_cells) if any(not r[c].empty() for c in cols)]
        w = block_width(cols)
        return _Block(cols, rows, cont, w, w > PAGE_WIDTH_PT)

    everything = list(range(ncol))
    runs: list[list[int]] = []  # the column groups, in order
    for c in everything:
        if runs and groups[runs[-1][-1]] == groups[c]:
            runs[-1].append(c)
        else:
            runs.append([c])
    if block_width(everything) <= PAGE_WIDTH_PT and not (per_variant and len(runs) > 1):
        blocks = [block(everything)]  # a per-variant table's groups have rows of their own: one tabular each
    elif all(block_width(r) <= PAGE_WIDTH_PT for r in runs):
        blocks = _merge([(r, False) for r in runs], block_width, PAGE_WIDTH_PT, block, not per_variant)
    elif block_width(everything) <= PAGE_HEIGHT_PT and not per_variant:
        blocks = [block(everything)]
    else:
        chunks: list[tuple[list[int], bool]] = []
        for run in runs:
            part: list[int] = []
            first = True
            for c in run:
                if part and block_width(part + [c]) > PAGE_HEIGHT_PT:
                    chunks.append((part, not first))
                    part, first = [], False
                part.append(c)
            chunks.append((part, not first))
        blocks = _merge(chunks, block_width, PAGE_HEIGHT_PT, block, not per_variant)

    def block_height(b: _Block) -> float:
        headings = len(dict.fromkeys(t.row_variants[i] for i in b.rows)) if per_variant else 0
        papers = sum(any(t.latex_cells[i][c].paper for c in b.cols) for i in b.rows)
        return (len(b.rows) + papers + headings + (2 if any(groups[c] for c in b.cols) else 1)) * _ROW + 12.0

    def room(landscape: bool) -> float:
        line, page = (PAGE_HEIGHT_PT, PAGE_WIDTH_PT) if landscape else (PAGE_WIDTH_PT, PAGE_HEIGHT_PT)
        caption_h = _lines(t.latex_caption + " (part 9 of 9)", line, 1.0) * _ROW + 10.0
        notes_h = sum(_lines(n, line, 0.92) for n in t.latex_notes) * _NOTE_ROW + 8.0
        return page - caption_h - notes_h - 5.0  # the float's own skips

    pieces: list[_Block] = []
    for b in blocks:
        rows, limit = list(b.rows), room(b.landscape)
        while rows and block_height(block(b.cols, b.cont, rows)) > limit:
            fit = len(rows)
            while fit > 1 and block_height(block(b.cols, b.cont, rows[:fit])) > limit:
                fit -= 1
            starts = [k for k in range(1, fit + 1) if per_variant
                      and t.row_variants[rows[k]] != t.row_variants[rows[k - 1]]] if fit < len(rows) else []
            cut = starts[-1] if starts else fit
            pieces.append(block(b.cols, b.cont, rows[:cut]))
            rows = rows[cut:]
        if rows:
            pieces.append(block(b.cols, b.cont, rows))
    floats: list[list[_Block]] = []
    used = 0.0
    for b in pieces:
        h = block_height(b) + 12.0
        if floats and floats[-1][0].landscape == b.landscape and used + h <= room(b.landscape):
            floats[-1].append(b)
            used += h
        else:
            floats.append([b])
            used = h
    return floats


def _merge(chunks, block_width, limit: float, block, merge: bool) -> list[_Block]:
    """Blocks of ``chunks`` ((columns, continued) pairs), neighbours sharing a tabular where they
    fit ``limit`` and, if wider than a portrait page, both were too (no portrait part turns landscape)."""
    merged: list[tuple[list[int], bool]] = []
    for cols, cont in chunks:
        joint = block_width(merged[-1][0] + cols) if merged else 0.0
        if (merge and merged and not cont and joint <= limit
                and (joint <= PAGE_WIDTH_PT or (block_width(merged[-1][0]) > PAGE_WIDTH_PT
                                                and block_width(cols) > PAGE_WIDTH_PT))):
            merged[-1] = (merged[-1][0] + cols, merged[-1][1])
        else:
            merged.append((cols, cont))
    return [block(cols, cont) for cols, cont in merged]


def _groups(t: Table) -> list[str]:
    return [g for g, _ in t.keys] if t.keys else [""] * len(t.columns)


def _heads(t: Table) -> list[str]:
    return [_latex_escape(key_label(k)) for _, k in t.keys] if t.keys else [_latex_escape(c) for c in t.columns]


def render_latex(t: Table) -> str:
    """``t`` as LaTeX that fits a page, laid out by :func:`latex_layout`. The published numbers
    (``--compare paper``) sit in a row of their own under each method's, aligned with its numbers."""
    floats = latex_layout(t)
    groups, heads, per_variant = _groups(t), _heads(t), any(t.row_variants)
    landscape = any(f[0].landscape for f in floats)
    packages = r"\usepackage{booktabs}" + (r" and \usepackage{pdflscape}" if landscape else "")
    out = [f"% {t.title}: a W1 table written by popbench (run_all.py report or publish): regenerate it, do not edit it.",
           f"% Needs {packages}. Sized for a 6.25 x 9 in text block (US letter or A4 with 1-inch margins)"
           + (", wide parts on landscape pages." if landscape else ".")]
    label = "tab:" + re.sub(r"[^A-Za-z0-9_-]+", "-", t.name or t.title)
    caption = t.latex_caption
    for k, fblocks in enumerate(floats):
        text = caption.replace(": ", f" ({k + 1} of {len(floats)}): ", 1) if len(floats) > 1 else caption
        out += [r"\begin{landscape}"] if fblocks[0].landscape else []
        out += [r"\begin{table}[htbp]", r"\centering", r"\small",
                r"\caption{" + text + "}" + r"\label{" + label + (f"-{k + 1}" if k else "") + "}"]
        for j, b in enumerate(fblocks):
            if j:
                out.append(r"\par\medskip")
            out += _tabular(t, b, groups, heads, per_variant)
        if k == len(floats) - 1 and t.latex_notes:
            out += [r"\par\smallskip", r"\begin{minipage}{\linewidth}\footnotesize\raggedright"]
            out += [n + r"\par" for n in t.latex_notes]
            out.append(r"\end{minipage}")
        out.append(r"\end{table}")
        out += [r"\end{landscape}"] if fblocks[0].landscape else []
    return "\n".join(out) + "\n"


_PAPER_LABEL = r"\quad\textit{paper}"
_PAPER_MARK = r"$^\times$"


def _tabular(t: Table, b: _Block, groups, heads, per_variant: bool) -> list[str]:
    lines = [r"\begin{tabular}{l" + "r" * len(b.cols) + "}", r"\toprule"]
    if any(groups[c] for c in b.cols):
        spans, rules, pos = [], [], 2
        for g in dict.fromkeys(groups[c] for c in b.cols):
            n = sum(groups[c] == g for c in b.cols)
            name = _latex_escape(g) + (" (continued)" if b.cont and g == groups[b.cols[0]] else "")
            spans.append(r"\multicolumn{%d}{c}{%s}" % (n, name) if g else " & ".join([""] * n))
            if g:
                rules.append(r"\cmidrule(lr){%d-%d}" % (pos, pos + n - 1))
            pos += n
        lines += [" & " + " & ".join(spans) + r" \\", "".join(rules)]
    lines.append("method & " + " & ".join(r"\multicolumn{1}{c}{%s}" % heads[c] for c in b.cols) + r" \\")
    lines.append(r"\midrule")
    indent = r"\quad " if per_variant else ""
    last_variant = None
    for i in b.rows:
        if per_variant and t.row_variants[i] != last_variant:
            last_variant = t.row_variants[i]
            lines.append(r"\multicolumn{%d}{l}{\textit{%s}} \\" % (1 + len(b.cols), _latex_escape(last_variant)))
        cells = [t.latex_cells[i][c] for c in b.cols]
        lines.append(indent + t.latex_labels[i] + " & "
                     + " & ".join(c.core + (r"\rlap{" + c.marks + "}" if c.marks else "") for c in cells) + r" \\")
        if any(c.paper for c in cells):
            lines.append(indent + _PAPER_LABEL + " & " + " & ".join(c.paper for c in cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return lines


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
                                     "hparams_hash", "git_revision", "fit_shared_with")}
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
            stem = t.name  # the family's name (a plug-in's `module:Class` has a colon)
            (out / f"{stem}.md").write_text(t.markdown())
            (out / f"{stem}.tex").write_text(t.latex())
            if t.aggregate is not None:
                t.aggregate.to_csv(out / f"{stem}_aggregate.csv", index=False)
            tables.append(t)
    long_rows_frame(target_rows, job_rows).to_csv(out / "rows_long.csv", index=False)
    jobs_frame(job_rows).to_csv(out / "jobs.csv", index=False)
    return tables
