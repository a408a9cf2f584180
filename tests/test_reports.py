"""Tables: aggregation against a hand computation, golden Markdown and LaTeX, --compare paper, marks,
captions, LaTeX that compiles onto a page; rollout figures."""

import math

import numpy as np
import pytest

from harness.reports import agrees, build_table, cells_frame, write_report


def _job(method, variant, seed, cells, status="ok", family="fam", used_v=False):
    return {"task": family, "variant": variant, "method": method, "profile": "quick", "seed": seed,
            "status": status, "used_velocities": used_v,
            "cells": [{"group": g, "key": k, "paper_variant": None, "value": v} for (g, k), v in cells.items()]}


ROWS = [
    # learner "a": two variants x two seeds; static; a failing learner "c"; interpolation-only "d"
    _job("a", "v1", 0, {("", "train_w1"): 0.10, ("", "forecast_w1"): 0.30}),
    _job("a", "v2", 0, {("", "train_w1"): 0.20, ("", "forecast_w1"): 0.50}),
    _job("a", "v1", 1, {("", "train_w1"): 0.30, ("", "forecast_w1"): 0.40}),
    _job("a", "v2", 1, {("", "train_w1"): 0.40, ("", "forecast_w1"): 0.60}),
    _job("d", "v1", 0, {("", "train_w1"): 0.50}),
    _job("d", "v2", 0, {("", "train_w1"): 0.70}),
    _job("static", "v1", 0, {("", "train_w1"): 0.55, ("", "forecast_w1"): 0.9}, used_v=False),
    _job("static", "v2", 0, {("", "train_w1"): 0.65, ("", "forecast_w1"): 1.1}),
    _job("c", "v1", 0, {}, status="failed"),
]


def test_aggregation_is_per_seed_over_variants_then_over_seeds():
    t = build_table(cells_frame(ROWS), "fam")
    agg = t.aggregate.set_index(["method", "key"])
    # seed 0: (0.1+0.2)/2 = 0.15, seed 1: (0.3+0.4)/2 = 0.35 -> mean 0.25, SE = std([.15,.35], ddof=1)/sqrt(2) = 0.1
    assert agg.loc[("a", "train_w1"), "mean"] == pytest.approx(0.25)
    assert agg.loc[("a", "train_w1"), "se"] == pytest.approx(0.1)
    assert agg.loc[("a", "train_w1"), "n"] == 2
    assert math.isnan(agg.loc[("d", "train_w1"), "se"])


GOLDEN_MD = """**fam**

| method   | Train W1             | Forecast W1       |
|----------|----------------------|-------------------|
| a        | **0.250 ± 0.100**    | **0.450 ± 0.050** |
| d        | <u>0.600</u> † (n=1) | —                 |
| c        | failed               | failed            |
| static   | 0.600 (n=1)          | 1.000 (n=1)       |

fam: exact W1 (lower is better); each cell averages the family's variants per seed, then mean ± SE over up to n = 2 seeds (fewer where marked); profile quick; 2-core CPU. Bold best, underlined second among learners. — = the method cannot answer (e.g. interpolation-only).
† does not beat `static` on this column.
(n=k) = a cell over fewer seeds than the table's most: the others were not run, or lack an ok job on some variant the cell averages.
"""

GOLDEN_TEX = r"""% fam: a W1 table written by popbench (run_all.py report or publish): regenerate it, do not edit it.
% Needs \usepackage{booktabs}. Sized for a 6.25 x 9 in text block (US letter or A4 with 1-inch margins).
\begin{table}[htbp]
\centering
\small
\caption{fam: W1, lower is better, mean $\pm$ SE over up to 2 seeds (profile quick).}\label{tab:fam}
\begin{tabular}{lrr}
\toprule
method & \multicolumn{1}{c}{Train W1} & \multicolumn{1}{c}{Forecast W1} \\
\midrule
a & \textbf{0.250 $\pm$ 0.100} & \textbf{0.450 $\pm$ 0.050} \\
d & \underline{0.600} (n=1)\rlap{$^\dagger$} & --- \\
c & failed & failed \\
static & 0.600 (n=1) & 1.000 (n=1) \\
\bottomrule
\end{tabular}
\par\smallskip
\begin{minipage}{\linewidth}\footnotesize\raggedright
Each cell averages the family's variants per seed, then the mean $\pm$ SE over up to n = 2 seeds (fewer where marked); run on 2-core CPU.\par
Bold best, underlined second among learners (the reference rows static, velocity\_extrapolation and oracle are not ranked). --- = the method cannot answer (e.g. interpolation-only).\par
$^\dagger$ does not beat static on this column.\par
(n=k) = a cell over fewer seeds than the table's most: the others were not run, or lack an ok job on some variant the cell averages.\par
\end{minipage}
\end{table}
"""


def test_golden_markdown_and_latex():
    t = build_table(cells_frame(ROWS), "fam", method_order=["a", "d", "c", "static"], profile="quick",
                    hardware="2-core CPU")
    assert t.markdown() == GOLDEN_MD
    assert t.latex() == GOLDEN_TEX


def test_ties_share_bold():
    rows = [_job("x", "v", 0, {("", "k"): 0.2}), _job("y", "v", 0, {("", "k"): 0.2}), _job("z", "v", 0, {("", "k"): 0.3})]
    t = build_table(cells_frame(rows), "fam")
    cells = dict(t.rows)
    assert cells["x"][0].startswith("**") and cells["y"][0].startswith("**")
    assert cells["z"][0].startswith("<u>")


def test_compare_paper_puts_the_published_number_beside_ours():
    rows = [_job("wlm", "interpolation", s, {("interpolation", "w1_holdout_1"): v}, family="vortex")
            for s, v in enumerate([0.038, 0.040, 0.041])]
    t = build_table(cells_frame(rows), "vortex", compare="paper", paper_table={"interpolation": (2, "interpolation")})
    cell = dict(t.rows)["wlm"][0]
    assert "[paper 0.039 ± 0.002 ✓]" in cell
    published = dict(t.rows)
    assert "curly_fm (published)" in published and published["curly_fm (published)"][0] == "0.019 ± 0.003"
    assert any("0 of 1 cells disagree" in f for f in t.footnotes)
    # LaTeX: the published number in a row of its own under ours, in the same column; the notes explain it
    tex = t.latex()
    assert "wlm & \\textbf{0.040 $\\pm$ 0.001} \\\\\n\\quad\\textit{paper} & 0.039 $\\pm$ 0.002 \\\\\n" in tex
    assert r"\textit{paper} = the published number under ours" in tex and "[paper" not in tex


def test_a_cell_over_fewer_variants_than_its_column_is_marked_unranked_and_not_compared():
    """Table 1's paired column averages 5 SDEs: a method run on one of them gets a 1-SDE mean,
    which must neither rank against 5-SDE means nor be checked against the paper's 5-SDE mean."""
    from tasks.gf_sde import GFSDE, POTENTIALS

    col = ("paired", "train_w1")
    rows = [_job("wlm", f"{p}-paired", s, {col: 0.2}, family="gf_sde") for p in POTENTIALS for s in (0, 1)]
    rows += [_job("nn_appex", "bohachevsky-paired", s, {col: 0.08 + 0.001 * s}, family="gf_sde") for s in (0, 1)]
    t = build_table(cells_frame(rows), "gf_sde", compare="paper", paper_table=GFSDE.paper_table,
                    column_averages=GFSDE.column_averages)
    cells = dict(t.rows)
    assert cells["nn_appex"][0].startswith("0.081 ± 0.001 (1 of 5 variants) [paper ")
    assert ": not compared, 1 of 5 variants]" in cells["nn_appex"][0] and "✓" not in cells["nn_appex"][0]
    assert cells["wlm"][0].startswith("**0.200")  # the only full cell is the best, not nn_appex's 0.081
    assert "[paper 0.062 ± 0.004 ✗]" in cells["wlm"][0] and "not compared" not in cells["wlm"][0]
    assert any(f.startswith("(k of K variants) = ") for f in t.footnotes)
    # every method on 2 of the 5 SDEs (a run with --tasks): nothing is compared with the 5-SDE mean
    two = [r for r in rows if r["variant"] in ("quadratic-paired", "styblinski_tang-paired")]
    t = build_table(cells_frame(two), "gf_sde", compare="paper", paper_table=GFSDE.paper_table,
                    column_averages=GFSDE.column_averages)
    cell = dict(t.rows)["wlm"][0]
    assert cell.startswith("**0.200 ± 0.000** (2 of 5 variants) [paper")  # labelled, still ranked: all have 2
    assert "not compared, 2 of 5 variants]" in cell
    plain = build_table(cells_frame(two), "gf_sde", paper_table=GFSDE.paper_table, column_averages=GFSDE.column_averages)
    assert "(2 of 5 variants)" in dict(plain.rows)["wlm"][0]  # said without --compare too
    assert not any("cells disagree" in f for f in t.footnotes)
    assert any(f.startswith("not compared = ") for f in t.footnotes)


def test_a_published_only_row_is_blank_where_the_paper_has_no_number():
    rows = [_job("wlm", "interpolation", s, {("interpolation", "w1_holdout_1"): v, ("unseen", "w1_mix"): v},
                 family="vortex") for s, v in enumerate([0.038, 0.040])]
    t = build_table(cells_frame(rows), "vortex", compare="paper", paper_table={"interpolation": (2, "interpolation")})
    published = dict(t.rows)["curly_fm (published)"]
    assert published[0] == "0.019 ± 0.003" and published[1] == ""  # not "—", which means "cannot answer"
    assert any(f.startswith("(published) = ") and "blank" in f for f in t.footnotes)


def test_compare_paper_on_a_family_without_published_numbers_says_so():
    t = build_table(cells_frame(ROWS), "fam", compare="paper", paper_table={})
    assert not any("[paper" in c for _, cells in t.rows for c in cells)
    assert any("publishes no numbers for fam" in f for f in t.footnotes)


def test_a_task_table_note_is_printed_under_every_table_of_the_family(tmp_path):
    from tasks.eb import EB300

    assert "stand-in" in EB300.table_note
    rows = [_job("wlm", "holdout-1", 0, {("eb300", "w1_holdout_1"): 0.9}, family="eb300")]
    tables = write_report(rows, [], tmp_path, compare="paper", notes={"eb300": EB300.table_note})
    assert EB300.table_note in tables[0].markdown()
    assert "stand-in" in (tmp_path / "eb300.md").read_text()
    assert "stand-in" in (tmp_path / "eb300.tex").read_text()  # LaTeX captions carry the footnotes


def test_agreement_rule():
    assert agrees(0.05, 0.01, 0.039, 0.002)
    assert not agrees(0.10, 0.01, 0.039, 0.002)
    assert agrees(0.704, float("nan"), 0.704, float("nan"))
    assert not np.isnan(0.0)


def test_a_seed_missing_a_variant_is_left_out_of_the_family_cell_not_averaged_over_the_rest():
    # seed 2's hard variant failed: averaging its easy variant alone would give 0.05 and a bold best
    rows = [_job("w", v, s, {("", "train_w1"): x}) for s in (0, 1) for v, x in (("easy", 0.05), ("hard", 1.0))]
    rows += [_job("w", "easy", 2, {("", "train_w1"): 0.05}), _job("w", "hard", 2, {}, status="failed")]
    rows += [_job("static", v, s, {("", "train_w1"): 0.5}) for s in (0, 1, 2) for v in ("easy", "hard")]
    t = build_table(cells_frame(rows), "fam")
    agg = t.aggregate.set_index(["method", "key"])
    assert agg.loc[("w", "train_w1"), "mean"] == pytest.approx(0.525)  # (0.05 + 1.0) / 2, seeds 0 and 1
    assert agg.loc[("w", "train_w1"), "n"] == 2
    cell = dict(t.rows)["w"][0]
    assert cell == "**0.525 ± 0.000** † (n=2)"  # the only learner, so bold; worse than static
    assert any(f.startswith("(n=k)") for f in t.footnotes)


def test_a_column_whose_jobs_failed_says_so_instead_of_cannot_answer():
    rows = [_job("w", "interpolation", 0, {("", "w1_holdout_1"): 0.1}),
            _job("w", "forecast", 0, {}, status="timeout"),
            _job("am", "interpolation", 0, {("", "w1_holdout_1"): 0.2}),  # no forecast job
            _job("static", "interpolation", 0, {("", "w1_holdout_1"): 0.5}),
            _job("static", "forecast", 0, {("", "train_w1"): 0.9})]
    t = build_table(cells_frame(rows), "fam")
    cells = dict(t.rows)
    col = t.columns.index("Train W1")
    assert cells["w"][col] == "timeout" and cells["am"][col] == "not run"


def test_rows_long_gives_a_partial_jobs_targets_the_jobs_status(tmp_path):
    job = {**_job("w", "v1", 0, {("", "train_w1"): 0.1}), "status": "partial", "job_id": "j", "attempt_id": "a1"}
    target = {"row_type": "target", "task": "fam", "variant": "v1", "method": "w", "profile": "quick", "seed": 0,
              "query": "rollout", "group": "train", "t": 1.0, "index": 1, "w1": 0.1, "status": "ok",
              "job_id": "j", "attempt_id": "a1"}
    write_report([job], [target], tmp_path)
    import pandas as pd

    assert pd.read_csv(tmp_path / "rows_long.csv").status.tolist() == ["partial"]


def test_the_caption_names_the_hardware_that_ran_the_jobs_not_the_one_that_renders():
    def on(hw, *args):
        return {**_job(*args), "hardware": hw}

    cpu = [on("2-core CPU", "a", "v1", s, {("", "k"): 0.1}) for s in (0, 1)]
    gpu = [on("NVIDIA H100 80GB HBM3", "wlm", "v1", s, {("", "k"): 0.2}) for s in (0, 1)]
    assert "; 2-core CPU. Bold" in build_table(cells_frame(cpu), "fam").caption
    mixed = build_table(cells_frame(cpu + gpu), "fam").caption
    assert "; 2-core CPU (a); NVIDIA H100 80GB HBM3 (wlm). Bold" in mixed
    unknown = build_table(cells_frame([_job("a", "v1", 0, {("", "k"): 0.1})]), "fam").caption
    assert "; hardware not recorded. Bold" in unknown  # rows from before jobs recorded it


def test_a_job_row_records_its_hardware():
    import os

    from harness.runner import Job, run_job

    row = run_job(Job("ou", "paired", "static", "smoke", 0))["job"]
    assert row["hardware"] == f"{os.cpu_count()}-core CPU"


def test_a_column_the_method_has_no_job_for_says_not_run_not_cannot_answer():
    rows = [_job("a", "v1", 0, {("g1", "k1"): 0.1}), _job("b", "v1", 0, {("g1", "k1"): 0.2}),
            _job("b", "v2", 0, {("g2", "k2"): 0.3, ("g2", "k3"): 0.4}),
            _job("c", "v2", 0, {("g2", "k2"): 0.5})]  # c ran on v2 but cannot answer k3
    t = build_table(cells_frame(rows), "fam")
    cells = dict(t.rows)
    k3 = t.columns.index("g2 k3")
    assert cells["a"][k3] == "not run" and cells["c"][k3] == "—"
    assert "not run = no job of this method on the variant behind the column" in t.markdown()


def test_a_per_holdout_column_is_not_labelled_short_only_the_mean_the_paper_publishes():
    """EB: each h column comes from one holdout by design; only the mean (Table 3's number) needs
    all three, and a run of 2 holdouts says so there."""
    from tasks.eb import EB

    rows = [_job("am", f"holdout-{h}", s, {("", f"w1_holdout_{h}"): 0.9, ("", "w1_mean_holdouts"): 0.9}, family="eb")
            for h in (1, 2, 3) for s in (0, 1)]
    t = build_table(cells_frame(rows), "eb", paper_table=EB.paper_table, column_averages=EB.column_averages)
    assert not any("variants)" in c for c in dict(t.rows)["am"])
    two = [r for r in rows if r["variant"] != "holdout-3"]
    t = build_table(cells_frame(two), "eb", paper_table=EB.paper_table, column_averages=EB.column_averages)
    assert [("variants)" in c) for c in dict(t.rows)["am"]] == [False, False, True]  # h=1, h=2, mean


def test_eb300_s_mean_over_fewer_holdouts_says_so_though_the_paper_has_no_number_for_it():
    """The stand-in has no published column, but its mean is still defined over h = 1, 2, 3: a
    run that holds 2 holdouts (e.g. a sweep whose third job runs elsewhere) must not print their
    mean as the mean."""
    from tasks.eb import EB300

    rows = [_job("wlm", f"holdout-{h}", 0, {("", f"w1_holdout_{h}"): 0.9, ("", "w1_mean_holdouts"): 0.9},
                 family="eb300") for h in (1, 2)]
    t = build_table(cells_frame(rows), "eb300", paper_table=EB300.paper_table, column_averages=EB300.column_averages)
    assert dict(t.rows)["wlm"][-1].endswith("(2 of 3 variants)")
    assert not any("variants)" in c for c in dict(t.rows)["wlm"][:-1])
    full = rows + [_job("wlm", "holdout-3", 0, {("", "w1_holdout_3"): 0.9, ("", "w1_mean_holdouts"): 0.9},
                        family="eb300")]
    t = build_table(cells_frame(full), "eb300", paper_table=EB300.paper_table, column_averages=EB300.column_averages)
    assert not any("variants)" in c for c in dict(t.rows)["wlm"])


def test_a_learner_below_the_oracles_floor_is_flagged_and_the_notes_say_why():
    """The oracle (the true dynamics, fresh noise) scores the finite-sample floor of W1: a learner
    below it is suspicious (it may have seen held-out data), so its cell carries ‡."""
    rows = [_job("a", "v", s, {("", "k"): x}) for s, x in ((0, 0.04), (1, 0.05))]
    rows += [_job("b", "v", s, {("", "k"): 0.2}) for s in (0, 1)]
    rows += [_job("oracle", "v", s, {("", "k"): 0.06}, used_v=True) for s in (0, 1)]
    rows += [_job("static", "v", s, {("", "k"): 0.5}) for s in (0, 1)]
    t = build_table(cells_frame(rows), "fam")
    cells = dict(t.rows)
    assert cells["a"][0] == "**0.045 ± 0.005** ‡"  # (0.04 + 0.05) / 2 < 0.06
    assert "‡" not in cells["b"][0] and "‡" not in cells["oracle (v)"][0]
    assert any(f.startswith("‡ below the oracle's finite-sample floor") for f in t.footnotes)
    tex = t.latex()
    assert r"\textbf{0.045 $\pm$ 0.005}\rlap{$^\ddagger$}" in tex and r"$^\ddagger$ below the oracle" in tex
    without = build_table(cells_frame([r for r in rows if r["method"] != "oracle"]), "fam")
    assert "‡" not in dict(without.rows)["a"][0] and not any("‡" in f for f in without.footnotes)


def test_v_marks_only_what_used_velocities():
    """(v) comes from the job rows: a row whose every job used velocities is labelled; where only
    some did (WLM with v0 = data on one variant), only the cells those jobs feed are."""
    rows = [_job("w", "v1", 0, {("g1", "k"): 0.1}, used_v=True), _job("w", "v2", 0, {("g2", "k"): 0.2}),
            _job("x", "v1", 0, {("g1", "k"): 0.3}, used_v=True), _job("x", "v2", 0, {("g2", "k"): 0.3}, used_v=True),
            _job("y", "v1", 0, {("g1", "k"): 0.3})]
    t = build_table(cells_frame(rows), "fam")
    assert [label for label, _ in t.rows] == ["w", "x (v)", "y"]
    cells = dict(t.rows)
    assert cells["w"][0] == "**0.100** (v)" and "(v)" not in cells["w"][1]
    assert any(f.startswith("(v) = ") for f in t.footnotes)
    plain = build_table(cells_frame([rows[-1]]), "fam")
    assert not any("(v)" in f for f in plain.footnotes) and "(v)" not in plain.latex()


def test_the_caption_describes_only_the_columns_the_table_shows():
    from tasks.boids import Boids
    from tasks.vortex import Vortex

    interp = [_job("am", "interpolation", 0, {("interpolation", "w1_holdout_1"): 0.4,
                                              ("interpolation", "w1_mean_holdouts"): 0.4}, family="vortex")]
    t = build_table(cells_frame(interp), "vortex", paper_table=Vortex.paper_table, protocol=Vortex.table_protocol)
    assert "held-out time h from h-1" in t.caption and "forecast" not in t.caption
    # one seed: no "± SE over n = 1 seeds"; no ranking text without a second learner to rank, no "—" text
    assert "one seed (no SE)" in t.caption and "±" not in t.caption and "— =" not in t.caption
    assert "one seed" in t.latex_caption and r"\pm" not in t.latex_caption
    forecast = [_job("wlm", "forecast", s, {("forecast", "train_w1"): 0.1 + s / 100}, family="vortex") for s in (0, 1)]
    t = build_table(cells_frame(forecast), "vortex", paper_table=Vortex.paper_table, protocol=Vortex.table_protocol)
    assert t.caption.startswith("vortex: exact W1 (lower is better); forecast (trained on t0..t9)")
    assert "interpolation" not in t.caption and "mean ± SE over n = 2 seeds" in t.caption
    assert "averages the family's variants" not in t.caption  # each column comes from one variant here
    default = [_job("jkonet_star", "default", 0, {("", "train_w1"): 3.0, ("", "forecast_w1"): 3.1}, family="boids")]
    t = build_table(cells_frame(default), "boids", paper_table=Boids.paper_table, protocol=Boids.table_protocol)
    assert "Train W1 = mean over t1..t49" in t.caption and "unseen-init" not in t.caption


# --------------------------------------------------------------------------------------------
# LaTeX that fits a page (compiled with pdflatex where it is installed; .ci/run installs it)

import re  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
from pathlib import Path  # noqa: E402

from harness.reports import PAGE_HEIGHT_PT, PAGE_WIDTH_PT, latex_layout  # noqa: E402

from .conftest import ROOT, run_cli  # noqa: E402

# the page the tables are sized for, with every package their header comments may name
TEX_PAGE = r"""\documentclass{article}
\usepackage[textwidth=6.25in,textheight=9in]{geometry}
\usepackage{booktabs}
\usepackage{pdflscape}
\let\oldtabular\tabular \let\endoldtabular\endtabular
\renewenvironment{tabular}{\setbox0=\hbox\bgroup\oldtabular}{\endoldtabular\egroup\typeout{TABULAR \the\wd0}\leavevmode\box0}
\begin{document}
\input{table}
\end{document}
"""
needs_pdflatex = pytest.mark.skipif(shutil.which("pdflatex") is None, reason="pdflatex is not installed")


def compile_tex(tex: str, workdir: Path) -> tuple[list[str], list[float]]:
    """pdflatex on ``tex`` in the page above: the log's overfull-box, too-large-float and error
    lines (none, for a table that fits), and the width of each tabular in pt."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "table.tex").write_text(tex)
    (workdir / "page.tex").write_text(TEX_PAGE)
    subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "page.tex"], cwd=workdir,
                   capture_output=True, timeout=120)
    log = (workdir / "page.log").read_text(errors="replace")
    problems = [line for line in log.splitlines() if re.search(r"Overfull|Float too large|^! ", line)]
    if "Output written" not in log:
        problems.append("no output: " + log[-500:])
    return problems, [float(w) for w in re.findall(r"TABULAR ([0-9.]+)pt", log)]


COMMITTED_TEX = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "results").glob("*/*/*.tex"))


@needs_pdflatex
@pytest.mark.parametrize("rel", COMMITTED_TEX)
def test_every_committed_tex_compiles_without_an_overfull_box(rel, tmp_path):
    problems, _ = compile_tex((ROOT / rel).read_text(), tmp_path)
    assert not problems, f"{rel} does not fit the page: {problems[:3]}"


def _wide_tall_rows():
    """A table as wide and as tall as a user may make: 3 groups x 5 columns, long method names,
    marks, fewer seeds; a per-variant table of 12 variants x 9 methods."""
    rows = []
    for g in ("interpolation", "forecast", "unseen-init"):
        for k in range(5):
            for m, base in (("a_rather_long_method_name (with settings)", 0.5), ("b", 0.2), ("static", 0.4),
                            ("oracle", 0.3)):
                for s in (0, 1, 2):
                    if m == "b" and s == 2 and g == "forecast":
                        continue
                    rows.append(_job(m, f"{g}-v", s, {(g, f"w1_holdout_{k}"): base + 10 * k + s / 7}))
    per_variant = [_job(m, f"variant-number-{v}-{'paired' if v % 2 else 'unpaired'}", s,
                        {("paired" if v % 2 else "unpaired", "train_w1"): 0.1 * (i + 1) + s / 9,
                         ("paired" if v % 2 else "unpaired", "forecast_w1"): 0.2 * (i + 1)}, family="many")
                   for v in range(12) for i, m in enumerate(["m1", "m2", "m3", "m4", "m5", "m6", "static", "oracle",
                                                           "velocity_extrapolation"]) for s in (0, 1)]
    return rows, per_variant


def test_a_wide_table_is_split_by_column_group_and_a_tall_one_into_floats():
    wide, tall = _wide_tall_rows()
    t = build_table(cells_frame(wide), "fam")
    floats = latex_layout(t)
    blocks = [b for f in floats for b in f]
    assert len(blocks) >= 3 and all(b.width <= (PAGE_HEIGHT_PT if b.landscape else PAGE_WIDTH_PT) for b in blocks)
    assert all(len({t.keys[c][0] for c in b.cols}) == 1 for b in blocks)  # no group split across tabulars here
    tex = t.latex()
    assert tex.startswith("% fam: a W1 table written by popbench") and r"\usepackage{booktabs}" in tex.split("\n")[1]
    assert ("landscape" in tex) == (r"\usepackage{pdflscape}" in tex.split("\n")[1])
    assert tex.count(r"\caption{") == len(floats) and tex.count(r"\begin{minipage}") == 1  # notes once, at the end
    assert all(spec == "l" + "r" * (len(spec) - 1) for spec in re.findall(r"\\begin\{tabular\}\{(\w+)\}", tex))
    per_variant = build_table(cells_frame(tall), "many", by_variant=True)
    floats = latex_layout(per_variant)
    assert len(floats) >= 2  # 12 x 9 rows do not fit one page
    assert all({per_variant.keys[c][0] for b in f for c in b.cols} in ({"paired"}, {"unpaired"}) for f in floats)


@needs_pdflatex
def test_wide_and_tall_tables_compile_without_an_overfull_box_and_the_width_estimate_is_not_low(tmp_path):
    wide, tall = _wide_tall_rows()
    for name, t in (("wide", build_table(cells_frame(wide), "fam", compare="paper")),
                    ("tall", build_table(cells_frame(tall), "many", by_variant=True, profile="quick"))):
        problems, widths = compile_tex(t.latex(), tmp_path / name)
        assert not problems, f"{name}: {problems[:3]}"
        estimated = [b.width for f in latex_layout(t) for b in f]
        assert len(widths) == len(estimated)
        assert all(w <= e + 1.0 for w, e in zip(widths, estimated)), (widths, estimated)


PUBLISHED = sorted(p.parent.relative_to(ROOT).as_posix() for p in (ROOT / "results").glob("*/*/rows.jsonl.gz"))


@needs_pdflatex
@pytest.mark.parametrize("published", PUBLISHED)
def test_tables_rendered_from_a_publication_compile_without_an_overfull_box(published, tmp_path):
    """Today's renderer on each publication's rows (restored into a scratch run), as `publish`
    renders them (--compare paper): every .tex fits the page."""
    suite, profile = Path(published).name, Path(published).parent.name
    run, out = tmp_path / "run", tmp_path / "tables"
    r = run_cli("restore", "--suite", suite, "--profile", profile, "--from", str(ROOT / published), "--run", str(run))
    assert r.returncode == 0, r.stderr
    r = run_cli("report", str(run), "--compare", "paper", "--out", str(out))
    assert r.returncode == 0, r.stderr
    texs = sorted(out.glob("*.tex"))
    assert texs
    for tex in texs:
        problems, _ = compile_tex(tex.read_text(), tmp_path / tex.stem)
        assert not problems, f"{tex.name} from {published}: {problems[:3]}"


# --------------------------------------------------------------------------------------------
# Figures (harness.figures, harness.plots)


def _drawn(monkeypatch) -> dict:
    """Keep the figure that harness.plots would save, to look at it."""
    from harness import plots

    drawn: dict = {}

    def keep(fig, path):
        drawn["fig"] = fig
        return Path(path)

    monkeypatch.setattr(plots, "_save", keep)
    return drawn


def test_rollout_axes_stay_on_the_truth_are_labelled_and_the_figure_counts_what_falls_outside(tmp_path, monkeypatch):
    from harness import plots

    drawn = _drawn(monkeypatch)
    rng = np.random.default_rng(0)
    truth = [rng.normal(size=(500, 2)) for _ in range(3)]
    runaway = [x + 0.1 for x in truth]
    runaway[2][:5] = 4000.0  # five particles pushed far out, as a learned potential can (Boids)
    plots.plot_rollouts([1.0, 2.0, 3.0], truth, {"m": runaway, "n": [None, truth[1], truth[2]]}, tmp_path / "r.png",
                        title="what it shows")
    fig = drawn["fig"]
    axes = np.array(fig.axes).reshape(3, 3)
    for ax in axes.flat:  # shared: the bulk of N(0, 1), not 4,000
        lo, hi = ax.get_xlim()
        assert -6 < lo < -2 and 2 < hi < 6
    assert [ax.get_xlabel() for ax in axes[-1]] == ["$x_1$"] * 3 and not axes[0, 0].get_xlabel()
    assert [ax.get_ylabel().split("\n") for ax in axes[:, 0]] == [["ground truth", "$x_2$"], ["m", "$x_2$"],
                                                                   ["n", "$x_2$"]]
    note = fig._supxlabel.get_text()  # "axes: ...; points outside them: ground truth 2 of 1,500; m 7 of 1,500"
    counts = {m.group(1): (int(m.group(2)), m.group(3)) for m in re.finditer(r"(?:: |; )([\w ]+?) (\d+) of ([\d,]+)", note)}
    assert 5 <= counts["m"][0] <= 10 and counts["m"][1] == "1,500"  # the five runaways, and m's few in the tails
    assert counts.get("n", (0, "1,000"))[1] == "1,000"  # the "—" panel holds no points
    assert fig._suptitle.get_text() == "what it shows"
    # the 0.5-99.5% range of each coordinate, widened by 15% of it on each side
    np.testing.assert_allclose(plots.truth_limits([np.array([[0.0, 0.0], [1.0, 2.0]])]), [[-0.15, 1.15], [-0.3, 2.3]],
                               atol=0.02)


def test_a_rollout_figure_says_which_query_it_shows(tmp_path, monkeypatch):
    from harness.figures import rollout_figure
    from harness.store import RunStore
    from harness.sweep import plan_jobs, run_plan

    run_plan(plan_jobs("ou/paired", "static", "smoke", [0]), RunStore(tmp_path), executor="serial", progress=False)
    drawn = _drawn(monkeypatch)
    rollout_figure(tmp_path, "ou", "paired", ["static"], tmp_path / "r.png")
    title = drawn["fig"]._suptitle.get_text()
    assert title.startswith("ou/paired, query rollout; seed 0") and "top row: the true population" in title
