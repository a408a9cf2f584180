"""The shipped tasks, built on the task templates (gradient-flow SDE, snapshot file), still give the
published numbers: the reference rows (static, velocity_extrapolation, oracle) of the committed
quick-profile tables 1 and 2, seed 0, rerun through the runner, match them to the last digits.

These rows depend only on the task (its data, its t0 velocities, its simulator and its split) and
on the reference methods, so any change to a task's data or numbers shows here."""

from __future__ import annotations

import math

import numpy as np
import pytest

from harness import data, metrics
from harness.protocol import PopbenchError
from harness.runner import run_job
from harness.sweep import plan_jobs
from tasks.gf_sde import GFSDE

from .conftest import ROOT

REFERENCE = "static,velocity_extrapolation,oracle"
CASES = [("table1", f"gf_sde/{v}") for v in GFSDE.variants] + [
    ("table2", "vortex/interpolation"), ("table2", "vortex/forecast")]
SCORED_INDICES = (1, 9, 19)
"""gf_sde: W1 at t1, t9 (the last training time) and t19 (the last forecast) only: exact W1 on 1000
points costs ~0.2 CPU-s, and these three cover the data, the velocity push and the simulator."""


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("POPBENCH_CACHE_DIR", str(tmp_path / "cache"))  # generated afresh, not read back


def _score_only(monkeypatch, targets: list[np.ndarray]) -> None:
    """Make the runner score W1 against ``targets`` only (NaN elsewhere, no W2 or MMD)."""
    wanted = {t.tobytes() for t in targets}

    def w1_only(pred, true, weights=None):
        hit = np.ascontiguousarray(true).tobytes() in wanted
        return {"w1": metrics.w1(pred, true, weights) if hit else math.nan, "w2": None, "mmd": None}

    monkeypatch.setattr(metrics, "all_metrics", w1_only)


@pytest.mark.parametrize("table,task", CASES, ids=[t for _, t in CASES])
def test_reference_rows_reproduce_the_committed_tables(table, task, monkeypatch):
    pd = pytest.importorskip("pandas")
    family, variant = task.split("/")
    try:
        plan = plan_jobs(task, REFERENCE, "quick", [0])
    except PopbenchError as exc:  # a data file that cannot be had here
        pytest.skip(str(exc))
    if family == "gf_sde":
        (q,) = GFSDE(variant, seed=0).queries()
        _score_only(monkeypatch, [tg.x for tg in q.targets if tg.index in SCORED_INDICES])
    committed = pd.read_csv(ROOT / "results" / "quick" / table / "rows_long.csv")
    committed = committed[(committed.task == family) & (committed.variant == variant) & (committed.seed == 0)
                          & committed.method.isin(REFERENCE.split(","))]
    assert {j.method for j in plan.jobs} == set(committed.method)  # no oracle on real data
    for job in plan.jobs:
        result = run_job(job)
        assert result["job"]["status"] == "ok", result["job"]["error"]
        ours = pd.DataFrame([r for r in result["targets"] if r["w1"] is not None and math.isfinite(r["w1"])])
        theirs = committed[committed.method == job.method]
        assert set(theirs.hparams_hash) == {job.hparams_hash}, f"{job.method}'s quick settings changed"
        merged = ours.merge(theirs, on=["query", "t", "index", "group"], suffixes=("_now", "_committed"))
        expected = len(theirs) if family == "vortex" else len(SCORED_INDICES)
        assert len(ours) == len(merged) == expected, (job.method, len(ours), len(merged))
        np.testing.assert_allclose(merged.w1_now, merged.w1_committed, rtol=1e-9, atol=1e-12,
                                   err_msg=f"{job.method} on {task}")


def test_the_shipped_files_are_what_the_vortex_variants_read():
    from tasks.vortex import Vortex

    assert Vortex.data_files == ("ocean/oceans_with_v0.npz", "ocean/big_oceans_forecast.npz")
    assert all(f in data.REGISTRY for f in Vortex.data_files)
