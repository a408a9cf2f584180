"""Jobs that train on the same data fit once: one ``fit``, every job's queries, every job's rows.

``Twin`` is the ``ou`` task with three variants that all declare one training key: ``paired`` and
``paired-again`` do train on the same marginals (so one fit answers both, as Boids' two variants
do), ``unpaired`` does not (its data differ, which the runner must notice and fit again).
``CountsFits`` writes a line per ``fit`` call to a file, checkpoints its steps, and can be capped
(``max_steps``, a budget) or held mid-fit (while the file ``hold`` exists).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from harness.protocol import Marginal, Prediction, TrainData
from harness.store import RunStore
from harness.sweep import plan_jobs, run_plan
from harness.testing import _Base
from tasks.ou import OU

from .conftest import ROOT

HERE = "tests.test_shared_fits"
TWIN = f"{HERE}:Twin"
COUNTS = f"{HERE}:CountsFits"


class Twin(OU):
    family = "twin"
    variants = ("paired", "paired-again", "unpaired")

    @classmethod
    def training_key(cls, variant: str) -> str:
        return "one"  # declared by all three; unpaired's data differ all the same

    def _source(self) -> OU:
        return OU("unpaired" if self.variant == "unpaired" else "paired", seed=self.seed)

    def train_data(self) -> TrainData:
        return dataclasses.replace(self._source().train_data(), variant=self.variant)

    def queries(self):
        return self._source().queries()


class CountsFits(_Base):
    """Moves the start by the drift it learned (last minus first training mean). ``fit`` appends
    ``{"variant", "pid", "resumed", "checkpoint"}`` to the file ``log``; its state (the steps done)
    is checkpointed after each of ``steps`` steps; ``max_steps`` (a budget) stops it early."""

    name = "test_counts_fits"
    settings = {"log": "", "steps": 3, "max_steps": 0, "hold": ""}
    budget_keys = ("max_steps",)

    def fit(self, data: TrainData) -> None:
        ckpt = Path(self.checkpoint_path) if self.checkpoint_path else None
        state = json.loads(ckpt.read_text()) if ckpt is not None and ckpt.exists() else {"step": 0}
        self._resumed = state["step"]
        with open(self.hparams["log"], "a") as fh:
            fh.write(json.dumps({"variant": data.variant, "pid": os.getpid(), "resumed": state["step"],
                                 "checkpoint": ckpt.name if ckpt else None}) + "\n")
        steps, cap = self.hparams["steps"], self.hparams["max_steps"] or self.hparams["steps"]
        while state["step"] < min(steps, cap):
            while self.hparams["hold"] and state["step"] >= 1 and Path(self.hparams["hold"]).exists():
                time.sleep(0.05)
            state["step"] += 1
            if ckpt is not None:
                ckpt.parent.mkdir(parents=True, exist_ok=True)
                ckpt.write_text(json.dumps(state))
        self._state = state
        self._drift = (data.marginals[-1].x.mean(0) - data.marginals[0].x.mean(0)) / (data.t_max - data.t_min)

    def predict(self, start: Marginal, times: Sequence[float], *, seed: int) -> Prediction:
        return Prediction(tuple(start.x + self._drift * (t - start.t) for t in times))

    def learned(self) -> dict:
        steps = self.hparams["steps"]
        return {"iterations": self._state["step"], "iterations_target": steps, "resumed_from": self._resumed,
                "training_complete": self._state["step"] >= steps}


def _fits(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def _plan(tasks: str, log: Path, **settings):
    return plan_jobs(tasks, COUNTS, "smoke", [0], overrides={COUNTS: {"log": str(log), **settings}})


def _cells(row: dict) -> dict:
    return {c["key"]: c["value"] for c in row["cells"]}


def test_two_variants_on_the_same_training_data_fit_once_and_each_keeps_its_own_rows(tmp_path):
    log = tmp_path / "fits.jsonl"
    plan = _plan(f"{TWIN}/paired,{TWIN}/paired-again", log)
    store = RunStore(tmp_path / "run")
    latest = run_plan(plan, store, progress=False)
    assert len(_fits(log)) == 1  # one fit ...
    assert sorted(latest) == sorted(j.job_id for j in plan.jobs)  # ... two jobs, under their own ids
    a, b = (latest[j.job_id] for j in plan.jobs)
    assert a["status"] == b["status"] == "ok"
    assert (a["variant"], b["variant"]) == ("paired", "paired-again")
    assert a["fit_shared_with"] == [b["job_id"]] and b["fit_shared_with"] == [a["job_id"]]
    assert a["fit_s"] > 0 and b["fit_s"] == 0  # the fit's time is counted once
    assert a["attempt_id"] != b["attempt_id"]
    targets = [r for r in store.read_rows() if r["row_type"] == "target"]
    assert {r["job_id"] for r in targets} == {a["job_id"], b["job_id"]}
    assert a["n_targets"] == b["n_targets"] == 11
    # the same answers as each job fitted alone (the ids are the same jobs: stored in another run)
    alone = {}
    for job in plan.jobs:
        alone |= run_plan(dataclasses.replace(plan, jobs=[job]), RunStore(tmp_path / job.variant), progress=False)
    assert len(_fits(log)) == 3
    assert {jid: _cells(r) for jid, r in latest.items()} == {jid: _cells(r) for jid, r in alone.items()}
    assert "fit_shared_with" not in alone[a["job_id"]]
    # a rerun finds both done
    run_plan(plan, store, progress=False)
    assert len(_fits(log)) == 3


def test_variants_whose_data_differ_fit_apart_even_when_the_task_says_they_share(tmp_path):
    log = tmp_path / "fits.jsonl"
    store = RunStore(tmp_path / "run")
    latest = run_plan(_plan(TWIN, log), store, progress=False)  # paired, paired-again, unpaired: one unit
    assert sorted(f["variant"] for f in _fits(log)) == ["paired", "unpaired"]
    shared = {r["variant"]: r.get("fit_shared_with") for r in latest.values()}
    assert len(shared["paired"]) == len(shared["paired-again"]) == 1 and shared["unpaired"] is None
    assert all(r["status"] == "ok" for r in latest.values())
    # and a task that declares nothing: its two variants fit twice
    log2 = tmp_path / "ou.jsonl"
    run_plan(_plan("ou", log2), RunStore(tmp_path / "ou"), progress=False)
    assert sorted(f["variant"] for f in _fits(log2)) == ["paired", "unpaired"]


def test_a_failed_shared_fit_fails_every_job_of_it_with_the_same_reason(tmp_path):
    plan = plan_jobs(f"{TWIN}/paired,{TWIN}/paired-again", COUNTS, "smoke", [0],
                     overrides={COUNTS: {"log": str(tmp_path / "no" / "such" / "dir" / "fits.jsonl")}})
    latest = run_plan(plan, RunStore(tmp_path / "run"), progress=False)
    errors = {r["status"] + ": " + r["error"] for r in latest.values()}
    (error,) = errors
    assert error.startswith("failed: FileNotFoundError during fit"), error
    assert all(r["fit_shared_with"] for r in latest.values())


def test_a_partial_shared_fit_continues_from_its_checkpoint_once_for_both_jobs(tmp_path):
    """A budget stops the shared fit: both jobs partial. The same jobs without the cap continue
    the one checkpoint; and with one of them done, the other still gets (its one) fit."""
    log = tmp_path / "fits.jsonl"
    store = RunStore(tmp_path / "run")
    capped = run_plan(_plan(f"{TWIN}/paired,{TWIN}/paired-again", log, max_steps=1), store, progress=False)
    assert {r["status"] for r in capped.values()} == {"partial"}
    plan = _plan(f"{TWIN}/paired,{TWIN}/paired-again", log)
    assert sorted(capped) == sorted(j.job_id for j in plan.jobs)  # a budget: the same jobs
    first, second = plan.jobs
    assert store.checkpoint_path(first.job_id).exists() and not store.checkpoint_path(second.job_id).exists()
    done = run_plan(plan, store, progress=False)
    assert [(f["variant"], f["resumed"]) for f in _fits(log)] == [("paired", 0), ("paired", 1)]
    assert {r["status"] for r in done.values()} == {"ok"}
    assert {r["learned"]["resumed_from"] for r in done.values()} == {1}
    assert not any(store.checkpoint_path(j.job_id).exists() for j in plan.jobs)
    # one job of the pair forced again alone: it still fits (once)
    run_plan(dataclasses.replace(plan, jobs=[second]), store, force=True, progress=False)
    assert [f["variant"] for f in _fits(log)] == ["paired", "paired", "paired-again"]


def test_a_killed_shared_fit_resumes_from_the_checkpoint_the_first_job_left(tmp_path):
    """The driver is killed mid-fit; the rerun (same command) continues that checkpoint and
    stores both jobs once, under their ids."""
    log, hold, out = tmp_path / "fits.jsonl", tmp_path / "hold", tmp_path / "run"
    args = [sys.executable, str(ROOT / "run_all.py"), "--tasks", f"{TWIN}/paired,{TWIN}/paired-again",
            "--methods", COUNTS, "--profile", "smoke", "--set", f"{COUNTS}.log={log}", "--set",
            f"{COUNTS}.hold={hold}", "--out", str(out), "--no-progress"]
    store = RunStore(out)
    plan = _plan(f"{TWIN}/paired,{TWIN}/paired-again", log, hold=str(hold))
    ckpt = store.checkpoint_path(plan.jobs[0].job_id)
    hold.touch()
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (ckpt.exists() and json.loads(ckpt.read_text() or "{}").get("step") == 1):
            assert proc.poll() is None and time.monotonic() < deadline, "the fit never reached step 1"
            time.sleep(0.1)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not store.latest_jobs()
    hold.unlink()
    r = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert [(f["variant"], f["resumed"], f["checkpoint"]) for f in _fits(log)] == [
        ("paired", 0, ckpt.name), ("paired", 1, ckpt.name)]
    ids = [row["job_id"] for row in store.read_rows() if row["row_type"] == "job"]
    assert sorted(ids) == sorted(j.job_id for j in plan.jobs)  # each stored once
    assert not store.live_claims()
    assert all(store.fit_claimed_by(p.stem) is None for p in (out / "locks" / "fits").glob("*.lock"))


def test_a_driver_skips_a_fit_another_process_holds_for_a_job_of_its_own(tmp_path, capsys):
    """Two drivers, one run: the one that comes second finds the shared fit claimed (here by a
    driver running only the first variant) and leaves its job of that fit alone: no two fits of one model."""
    from harness.sweep import fit_key, sweep_outcome

    log = tmp_path / "fits.jsonl"
    store = RunStore(tmp_path / "run")
    plan = _plan(f"{TWIN}/paired,{TWIN}/paired-again", log)
    key = fit_key(plan.jobs[0])
    assert key is not None and key == fit_key(plan.jobs[1])
    fh = store.claim_fit(key)  # this test process plays the other driver
    try:
        latest = run_plan(plan, store, progress=True)
        _, running, vanished = sweep_outcome(plan, store)
    finally:
        fh.close()
    assert latest == {} and not _fits(log)
    assert running == {j.job_id for j in plan.jobs} and not vanished
    assert "another process is fitting its model" in capsys.readouterr().err
    assert len(run_plan(plan, store, progress=False)) == 2 and len(_fits(log)) == 1


@pytest.mark.ray
def test_under_ray_a_shared_fit_is_one_task_with_one_fit(tmp_path, ray_cluster):
    log = tmp_path / "fits.jsonl"
    plan = plan_jobs(f"{TWIN}/paired,{TWIN}/paired-again,ou/paired", COUNTS, "smoke", [0, 1],
                     overrides={COUNTS: {"log": str(log)}})
    latest = run_plan(plan, RunStore(tmp_path / "run"), executor="ray", workers=2, progress=False)
    assert sorted(latest) == sorted(j.job_id for j in plan.jobs) and len(latest) == 6
    assert all(r["status"] == "ok" for r in latest.values())
    # per seed: one fit for the two twin variants, one for ou/paired
    assert sorted(f["variant"] for f in _fits(log)) == ["paired"] * 4
    shared = {(r["task"], r["variant"], r["seed"]): r.get("fit_shared_with") for r in latest.values()}
    for seed in (0, 1):
        assert shared[(TWIN, "paired", seed)] and shared[(TWIN, "paired-again", seed)]
        assert shared[("ou", "paired", seed)] is None


def test_the_shared_data_are_really_equal(tmp_path):
    """The premise, checked on the task that declares it: Boids' two variants give equal training data."""
    from tasks.boids import Boids

    a, b = (Boids(v, seed=0).train_data() for v in Boids.variants)
    assert len(a.marginals) == len(b.marginals) == 50
    for ma, mb in zip(a.marginals, b.marginals):
        assert ma.t == mb.t and ma.index == mb.index
        np.testing.assert_array_equal(ma.x, mb.x)
        assert (ma.v is None) == (mb.v is None) and (ma.v is None or np.array_equal(ma.v, mb.v))
    assert Boids.training_key("default") == Boids.training_key("unseen-init") is not None
