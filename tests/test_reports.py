"""Tables: aggregation against a hand computation, golden Markdown and LaTeX, --compare paper."""

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

fam: exact W1 (lower is better), each cell averages the family's variants per seed, then mean ± SE over n = 1/2 seeds; profile quick; 2-core CPU. Bold best, underlined second among learners; — = the method cannot answer (interpolation-only).
† does not beat `static` on this column.
(n=k) = a cell over fewer seeds than the table's most: the others were not run, or lack an ok job on some variant the cell averages.
"""

GOLDEN_TEX = r"""\begin{table}
\centering
\caption{fam: exact W1 (lower is better), each cell averages the family's variants per seed, then mean $\pm$ SE over n = 1/2 seeds; profile quick; 2-core CPU. Bold best, underlined second among learners; --- = the method cannot answer (interpolation-only). $^\dagger$ does not beat static on this column. (n=k) = a cell over fewer seeds than the table's most: the others were not run, or lack an ok job on some variant the cell averages.}
\begin{tabular}{lll}
\toprule
 & Train W1 & Forecast W1 \\
\midrule
a & \textbf{0.250 $\pm$ 0.100} & \textbf{0.450 $\pm$ 0.050} \\
d & \underline{0.600}$^\dagger$ (n=1) & --- \\
c & failed & failed \\
static & 0.600 (n=1) & 1.000 (n=1) \\
\bottomrule
\end{tabular}
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
    # LaTeX: the cell shows the published number in brackets, and the caption explains that form
    tex = t.latex()
    assert r"[0.039 $\pm$ 0.002]" in tex
    assert r"[\ldots{}] = the published number" in tex and "paper \\ldots" not in tex


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
