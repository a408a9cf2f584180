"""The run store: atomic appends, torn lines, latest attempts."""

import json
import os

import pytest

from harness.store import RunStore


def _job(jid, status, t, attempt):
    return {"row_type": "job", "job_id": jid, "status": status, "finished_at": t, "attempt_id": attempt}


def test_latest_attempt_wins_and_ok_jobs_are_done(tmp_path):
    s = RunStore(tmp_path)
    s.append_rows([_job("a", "failed", 1.0, "x1")])
    s.append_rows([_job("a", "ok", 2.0, "x2"), {"row_type": "target", "job_id": "a", "attempt_id": "x2", "w1": 0.1}])
    s.append_rows([_job("b", "timeout", 3.0, "y1")])
    assert s.done_job_ids() == {"a"}
    rows = s.rows_of_latest_attempts()
    assert {r["attempt_id"] for r in rows} == {"x2", "y1"}


def test_a_torn_last_line_is_ignored_and_fenced_off(tmp_path):
    s = RunStore(tmp_path)
    s.append_rows([_job("a", "ok", 1.0, "x1")])
    with open(s.rows_path, "a") as fh:
        fh.write('{"row_type": "job", "job_id": "b", "sta')  # a crash mid-write
    assert s.done_job_ids() == {"a"}
    s.append_rows([_job("c", "ok", 2.0, "z1")])
    assert s.done_job_ids() == {"a", "c"}
    lines = s.rows_path.read_text().splitlines()
    assert json.loads(lines[-1])["job_id"] == "c"


def test_non_finite_numbers_are_stored_as_null(tmp_path):
    s = RunStore(tmp_path)
    s.append_rows([{**_job("a", "ok", 1.0, "x"), "w1": float("nan")}])
    assert s.read_rows()[0]["w1"] is None


def test_a_claim_is_exclusive_names_its_holder_and_dies_with_its_process(tmp_path):
    import os
    import subprocess
    import sys
    import time

    s = RunStore(tmp_path)
    assert s.claimed_by("j") is None
    fh = s.claim("j")
    assert fh is not None
    assert s.claim("j") is None  # another open file description: what a second process would see
    holder = s.claimed_by("j")
    assert holder["pid"] == os.getpid() and holder["host"] == os.uname().nodename
    assert s.claim("k") is not None  # claims are per job
    fh.close()
    assert s.claimed_by("j") is None
    assert s.claim("j") is not None
    # a killed holder leaves no stale claim
    code = ("import sys, time; from harness.store import RunStore; "
            f"fh = RunStore({str(tmp_path)!r}).claim('m'); print('held', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        assert s.claimed_by("m")["pid"] == proc.pid
        assert s.claim("m") is None
    finally:
        proc.kill()
        proc.wait()
    assert s.claimed_by("m") is None
    assert s.claim("m") is not None



@pytest.mark.parametrize("force", [False, True])
def test_a_job_another_process_stored_since_the_sweep_began_is_not_run_again_whatever_its_status(
        tmp_path, monkeypatch, capsys, force):
    """Two identical commands share a run directory: a job the other one stored meanwhile (even as a
    timeout, even under --force) is skipped, not trained a second time."""
    from harness.sweep import plan_jobs, run_plan

    store = RunStore(tmp_path)
    plan = plan_jobs("ou/paired", "static", "smoke", [0, 1])
    other = plan.jobs[1]
    real_claim = RunStore.claim

    def claim(self, job_id):
        if job_id == other.job_id:  # the other process stores its attempt just before this one claims
            self.append_rows([{"row_type": "job", "job_id": job_id, "attempt_id": "other", "status": "timeout",
                               "finished_at": 1.0, "task": "ou", "variant": "paired", "method": "static",
                               "profile": "smoke", "seed": 1}])
        return real_claim(self, job_id)

    monkeypatch.setattr(RunStore, "claim", claim)
    monkeypatch.setattr(os, "environ", dict(os.environ))  # an in-process CPU job sets CPU_ENV: keep it here
    latest = run_plan(plan, store, executor="serial", force=force, progress=False)
    assert latest[other.job_id]["attempt_id"] == "other"  # not rerun here
    assert latest[plan.jobs[0].job_id]["status"] == "ok"
    assert "another process ran it meanwhile" in capsys.readouterr().err


# -- bundles: a run carried between machines ------------------------------------------------


def _attempt(store, jid, attempt, w1, curve=None):
    job = {**_job(jid, "ok", 1.0, attempt), "cells": [{"group": "test", "key": "h1", "value": w1}]}
    if curve is not None:
        job["artifact"] = store.write_artifact(f"{attempt}_{jid}", {"job_id": jid, "loss_curve": curve})
    store.append_rows([job, {"row_type": "target", "job_id": jid, "attempt_id": attempt, "w1": w1}])


def test_a_bundle_restores_every_row_and_curve_once_and_is_byte_stable(tmp_path):
    from harness.store import read_bundle, write_bundle

    src = RunStore(tmp_path / "src")
    _attempt(src, "a", "x1", 0.5, curve=[3.0, 2.0, 1.5])
    _attempt(src, "b", "y1", 0.25)
    bundle = write_bundle(src.root, src.read_rows(), tmp_path / "pub" / "rows.jsonl.gz")
    first = bundle.read_bytes()
    assert write_bundle(src.root, src.read_rows(), bundle).read_bytes() == first  # no time stamp inside
    assert {r["row_type"] for r in read_bundle(bundle)} == {"job", "target"}

    dst = RunStore(tmp_path / "dst")
    _attempt(dst, "c", "z1", 0.75)  # a run that already holds other work keeps it
    assert dst.restore_bundle(bundle) == (2, 0)
    assert dst.restore_bundle(bundle) == (0, 2)  # known attempts are not appended twice
    assert dst.done_job_ids() == {"a", "b", "c"}
    restored = {r["attempt_id"]: r for r in dst.read_rows() if r["row_type"] == "job"}
    strip = lambda r: {k: v for k, v in r.items() if k != "restored_from"}  # noqa: E731
    original = {r["attempt_id"]: r for r in src.read_rows() if r["row_type"] == "job"}
    assert all(strip(restored[a]) == original[a] for a in original)
    assert restored["x1"]["restored_from"] == str(bundle) and "restored_from" not in restored["z1"]
    assert json.loads((dst.root / restored["x1"]["artifact"]).read_text())["loss_curve"] == [3.0, 2.0, 1.5]
    assert sorted(r["w1"] for r in dst.read_rows() if r["row_type"] == "target") == [0.25, 0.5, 0.75]


def test_a_file_that_is_not_a_bundle_is_refused_with_its_name(tmp_path):
    import gzip

    from harness.protocol import PopbenchError

    store = RunStore(tmp_path / "run")
    with pytest.raises(PopbenchError, match="no bundle at"):
        store.restore_bundle(tmp_path / "absent.gz")
    (tmp_path / "plain.gz").write_text("not gzip")
    with pytest.raises(PopbenchError, match="plain.gz is not a readable popbench bundle"):
        store.restore_bundle(tmp_path / "plain.gz")
    with gzip.open(tmp_path / "other.gz", "wt") as fh:
        fh.write('{"some": "json"}\n')
    with pytest.raises(PopbenchError, match="line 1 is not a job or target row"):
        store.restore_bundle(tmp_path / "other.gz")
    # a bad attempt anywhere in a bundle: nothing of it is written, not even its good attempts
    good = {**_job("a", "ok", 1.0, "x1"), "profile": "quick"}
    with gzip.open(tmp_path / "half.gz", "wt") as fh:
        for row in (good, {**_job("b", "ok", 1.0, "y1"), "profile": "quick"},
                    {**_job("b", "ok", 2.0, "y1"), "profile": "quick"}):
            fh.write(json.dumps(row) + "\n")
    with pytest.raises(PopbenchError, match="attempt y1 has 2 job rows"):
        store.restore_bundle(tmp_path / "half.gz")
    assert store.read_rows() == []
    # rows of another profile than the one asked for
    with gzip.open(tmp_path / "paper.gz", "wt") as fh:
        fh.write(json.dumps({**good, "profile": "paper"}) + "\n")
    with pytest.raises(PopbenchError, match="holds paper rows, not quick ones"):
        store.restore_bundle(tmp_path / "paper.gz", profile="quick")
    assert store.read_rows() == []


def test_a_restored_attempt_s_files_get_a_sweep_s_names_whatever_the_bundle_says(tmp_path):
    import gzip

    src = RunStore(tmp_path / "src")
    _attempt(src, "a", "x1", 0.5, curve=[1.0, 2.0])  # a real attempt, whose curves must survive
    with gzip.open(tmp_path / "b.gz", "wt") as fh:  # a bundle naming that file, and one outside the run
        fh.write(json.dumps({**_job("b", "ok", 1.0, "y1"), "artifact": src.read_rows()[0]["artifact"],
                             "artifact_payload": {"loss_curve": [9.0]}, "predictions": "../../../etc/passwd"}) + "\n")
        fh.write(json.dumps({**_job("c", "ok", 1.0, "z1"), "artifact": "../../evil.json",
                             "artifact_payload": {"loss_curve": [8.0]}}) + "\n")
    assert src.restore_bundle(tmp_path / "b.gz") == (2, 0)
    jobs = {r["attempt_id"]: r for r in src.read_rows() if r["row_type"] == "job"}
    assert json.loads((src.root / jobs["x1"]["artifact"]).read_text())["loss_curve"] == [1.0, 2.0]
    assert jobs["y1"]["artifact"] == "artifacts/y1_b.json" and jobs["y1"]["predictions"] == "artifacts/y1_b.npz"
    assert json.loads((src.root / jobs["z1"]["artifact"]).read_text())["loss_curve"] == [8.0]
    assert not (tmp_path / "evil.json").exists()


def test_environment_names_the_cpu_model():
    """environment.json says which CPU ran the jobs (the tables' captions only count its cores)."""
    from pathlib import Path

    from harness.store import environment

    env = environment()
    assert isinstance(env["cpu_model"], str)
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [ln.partition(":")[2].strip() for ln in cpuinfo.read_text().splitlines() if ln.startswith("model name")]
        if names:
            assert env["cpu_model"] == names[0]
