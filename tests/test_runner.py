"""Sweeps: fault statuses, resume, --force, a killed driver, exit codes, bad input."""

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.store import RunStore

from .conftest import ROOT, run_cli

FAULTS = "harness.testing:Raises,harness.testing:ReturnsNaN,harness.testing:KillsWorker,harness.testing:Exits,static"


def _jobs(out):
    return RunStore(out).latest_jobs()


def test_each_fault_gets_its_status_and_the_sweep_goes_on(tmp_path):
    out = tmp_path / "run"
    r = run_cli("--tasks", "ou/paired", "--methods", FAULTS + ",harness.testing:Sleeps", "--set",
                "harness.testing:Sleeps.sleep=60", "--timeout", "15", "--out", str(out), "--no-progress")
    assert r.returncode == 1, r.stderr
    status = {j["method"]: j["status"] for j in _jobs(out).values()}
    assert status == {
        "harness.testing:Raises": "failed",
        "harness.testing:ReturnsNaN": "diverged",
        "harness.testing:KillsWorker": "failed",
        "harness.testing:Sleeps": "timeout",
        "harness.testing:Exits": "failed",
        "static": "ok",
    }
    rows = {j["method"]: j for j in _jobs(out).values()}
    assert "injected failure" in rows["harness.testing:Raises"]["error"]
    assert "Traceback" in rows["harness.testing:Raises"]["traceback"]
    assert "died" in rows["harness.testing:KillsWorker"]["error"]
    log = RunStore(out).log_path(rows["harness.testing:KillsWorker"]["job_id"]).read_text()
    assert "test_kills_worker: about to die" in log  # a killed job's last words are kept
    assert "5 of 6 jobs did not finish ok" in r.stderr


def test_rerun_skips_done_jobs_and_force_redoes_them(tmp_path):
    out = tmp_path / "run"
    args = ("--tasks", "ou", "--methods", "static,oracle", "--seeds", "0,1,2", "--out", str(out), "--no-progress")
    first = run_cli(*args)
    assert first.returncode == 0, first.stderr
    from tasks.ou import OU

    assert f"ou: exact W1 (lower is better); {OU.table_protocol};" in first.stdout  # the caption says how
    n_rows = len(RunStore(out).read_rows())
    again = run_cli(*args)
    assert again.returncode == 0
    assert len(RunStore(out).read_rows()) == n_rows  # no work done
    assert again.stdout.split("**ou**")[1] == first.stdout.split("**ou**")[1]  # same table
    forced = run_cli(*args, "--force")
    assert forced.returncode == 0
    assert len(RunStore(out).read_rows()) == 2 * n_rows
    assert len(_jobs(out)) == 12


def test_a_killed_driver_loses_no_finished_row_and_duplicates_none(tmp_path):
    out = tmp_path / "run"
    args = ["--tasks", "ou/paired", "--methods", "harness.testing:Busy", "--set", "seconds=1.5", "--seeds", "0-5",
            "--out", str(out), "--no-progress"]
    proc = subprocess.Popen([sys.executable, str(ROOT / "run_all.py"), *args], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(RunStore(out).done_job_ids()) < 2:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = RunStore(out).done_job_ids()
    assert 2 <= len(done_before) < 6
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr
    jobs = [row for row in RunStore(out).read_rows() if row["row_type"] == "job"]
    ids = [j["job_id"] for j in jobs]
    assert len(ids) == len(set(ids)) == 6  # nothing duplicated, nothing lost
    for line in (out / "rows.jsonl").read_text().splitlines():
        json.loads(line)


def test_two_sweeps_of_one_plan_split_its_jobs_and_none_runs_twice(tmp_path):
    """The same command twice on one run directory: each job is claimed just before it starts, so
    the second runs the job the first has not reached and skips (naming its holder) the one the
    first is running; every job ends with exactly one row, run by one of the two processes."""
    out = tmp_path / "run"
    args = ["--tasks", "ou/paired", "--methods", "harness.testing:Busy", "--set", "seconds=8", "--seeds", "0,1",
            "--out", str(out), "--no-progress"]
    first = subprocess.Popen([sys.executable, str(ROOT / "run_all.py"), *args], cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        store = RunStore(out)
        deadline = time.time() + 60
        while time.time() < deadline and not (out / "logs").exists():  # seed 0 claimed and started
            time.sleep(0.1)
        dry = run_cli(*args, "--dry-run")
        assert dry.stdout.count(f"running now (pid {first.pid} on") == 1, dry.stdout
        second = run_cli(*args)
        assert f"skipped harness.testing:Busy on ou/paired (quick, seed 0): another process is running it in {out} " \
               f"(pid {first.pid}" in second.stderr
    finally:
        first_err = first.communicate(timeout=120)[1]
    ids = [r["job_id"] for r in store.read_rows() if r["row_type"] == "job"]
    assert len(ids) == len(set(ids)) == 2
    ran_in = {j["seed"]: j["pid"] for j in store.latest_jobs().values()}
    assert ran_in[0] == first.pid and ran_in[1] != first.pid, (ran_in, first_err)
    assert "seed 1" in first_err  # the first says why it did not run seed 1 (running, or finished, elsewhere)
    assert run_cli(*args).returncode == 0  # claims released: a rerun finds both done


def test_a_job_held_by_another_process_is_skipped_not_reported_as_this_runs_failure(tmp_path):
    from harness.sweep import plan_jobs

    out = tmp_path / "run"
    args = ("--tasks", "ou/paired", "--methods", "static", "--seeds", "0,1", "--out", str(out), "--no-progress")
    store = RunStore(out)
    held = plan_jobs("ou/paired", "static", "quick", [0]).jobs[0]
    store.append_rows([{"row_type": "job", "job_id": held.job_id, "attempt_id": "a", "task": "ou", "variant": "paired",
                        "method": "static", "profile": "quick", "seed": 0, "status": "failed", "error": "old",
                        "finished_at": 1.0}])
    fh = store.claim(held.job_id)  # this test process plays the other process
    try:
        r = run_cli(*args)
    finally:
        fh.close()
    assert r.returncode == 1
    assert "another process is running it" in r.stderr and "failed: static" not in r.stderr
    assert "1 of 2 jobs are running in another process: this table shows their earlier attempt" in r.stderr
    assert {j["seed"]: j["status"] for j in store.latest_jobs().values()} == {0: "failed", 1: "ok"}


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_a_stopped_driver_leaves_no_job_process_behind_under_timeout(tmp_path, sig):
    """--timeout runs a job in a forkserver child (not the driver's own child): stopping the
    driver, even outright, must kill it, or it trains on unclaimed while a rerun starts the same job."""
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, str(ROOT / "run_all.py"), "--tasks", "ou/paired", "--methods",
                             "harness.testing:Sleeps", "--set", "sleep=60", "--timeout", "100", "--out", str(out),
                             "--no-progress"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    logs = out / "logs"
    deadline = time.time() + 60
    pid = None
    while time.time() < deadline and pid is None:
        for log in logs.glob("*.log") if logs.exists() else []:
            m = re.search(r"test_sleeps: pid (\d+)", log.read_text())
            pid = int(m.group(1)) if m else None
        time.sleep(0.2)
    assert pid is not None and pid != proc.pid
    proc.send_signal(sig)
    err = proc.communicate(timeout=30)[1]
    if sig == signal.SIGTERM:
        assert "interrupted" in err and "Traceback" not in err
    deadline = time.time() + 10
    while time.time() < deadline and _alive(pid):
        time.sleep(0.1)
    assert not _alive(pid)


_GPU_PROBE = """
import os
import harness.runner as runner
from harness.runner import Job, SerialExecutor

os.environ.pop("CUDA_VISIBLE_DEVICES", None)
runner.local_gpus = lambda: 1  # a one-GPU machine
jobs = [Job("ou", "paired", "static", "smoke", 0),
        Job("ou", "paired", "harness.testing:GpuEnvProbe", "smoke", 0, {"sleep": 0.0}, num_gpus=1.0, framework="torch")]
got = []
SerialExecutor().run(jobs, lambda job, result: got.append(result["job"]))
print([r["device"] for r in got], repr(got[1]["learned"]["CUDA_VISIBLE_DEVICES"]))
"""


def test_in_process_serial_runs_a_gpu_job_on_the_gpu_after_a_cpu_job():
    """A CPU job run first must not hide the GPUs from the driver (CUDA_VISIBLE_DEVICES="") before
    the GPU job asks for them: the default command (static, ..., wlm) did exactly that. In a fresh
    interpreter: the old code hid them only while no framework was loaded."""
    r = subprocess.run([sys.executable, "-c", _GPU_PROBE], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["['cpu',", "'cuda']", "None"]  # not hidden by the CPU job before it


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return not Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z")  # a zombie is dead


@pytest.mark.parametrize(
    "args, sentence",
    [
        (("--methods", "statc"), "did you mean 'static'"),
        (("--tasks", "nosuch"), "unknown task family 'nosuch'"),
        (("--tasks", "ou/x*"), "no task variant matches"),
        (("--methods", ","), "selects no method"),
        (("--seeds", "a"), "--seeds expects integers"),
        (("--tasks", "ou", "--methods", "static", "--set", "wlm.lr=1"), "not selected"),
        (("--methods", "wlm", "--set", "wlm.iteratons=3"), "did you mean 'iterations'"),
        (("--methods", "wlm", "--set", "wlm.lr=abc"), "lr takes a number"),
        (("--methods", "wlm", "--set", "wlm.iterations=1.5"), "iterations takes an integer"),
        (("--methods", "wlm", "--set", "wlm.v0=dta"), "v0 must be 'zero' or 'data'"),
        (("--methods", "wlm", "--set", "wlm.max_minutes=0"), "max_minutes must be above 0"),
        (("--methods", "static,wlm", "--set", "lrr=1"), "no selected method has a setting 'lrr'"),
        (("--methods", "static", "--set", "static.x=1"), "declares no settings"),
        (("--workers", "0"), "--workers must be at least 1"),
        (("--timeout", "-1"), "--timeout must be above 0"),
        (("--executor", "serial", "--workers", "2"), "--workers 2 runs jobs in parallel"),
        (("--seeds=-1",), "--seeds must be 0 or more"),
        (("--methods", "static", "--out", "/dev/null/run"), "cannot write the run directory /dev/null/run"),
    ],
)
def test_bad_input_exits_2_with_one_sentence(tmp_path, args, sentence):
    r = run_cli("--out", str(tmp_path / "r"), "--tasks", "ou", *args)
    assert r.returncode == 2
    assert sentence in r.stderr
    assert "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_set_changes_only_declared_settings_with_their_types():
    from harness.sweep import plan_jobs

    plain = {j.method: j for j in plan_jobs("ou/paired", "static,wlm", "smoke", [0]).jobs}
    jobs = {j.method: j for j in plan_jobs("ou/paired", "static,wlm", "smoke", [0],
                                           {"*": {"iterations": 1e3, "lr": 1}, "wlm": {"max_minutes": None}}).jobs}
    assert jobs["static"].hparams == {} and jobs["static"].hparams_hash == plain["static"].hparams_hash
    hp = jobs["wlm"].hparams
    assert hp["iterations"] == 1000 and type(hp["iterations"]) is int  # 1e3 is JSON's float
    assert hp["lr"] == 1.0 and type(hp["lr"]) is float
    assert hp["max_minutes"] is None
    assert {k: v for k, v in hp.items() if k not in ("iterations", "lr")} == \
        {k: v for k, v in plain["wlm"].hparams.items() if k not in ("iterations", "lr")}


def test_a_method_asked_only_to_forecast_that_cannot_is_refused(monkeypatch):
    from harness import registry
    from harness.protocol import PopbenchError
    from harness.sweep import plan_jobs
    from tasks.ou import OU

    class ForecastOnly(OU):
        family = "ou_forecast_only"

        def queries(self):
            q = super().queries()[0]
            return [type(q)(q.name, q.kind, q.start, tuple(t for t in q.targets if t.group == "test"))]

    monkeypatch.setitem(registry.tasks._entries, "ou_forecast_only",
                        registry._Entry("ou_forecast_only", "tests:ForecastOnly", "runtime", obj=ForecastOnly))
    with pytest.raises(PopbenchError, match="cannot forecast"):
        plan_jobs("ou_forecast_only/paired", "harness.testing:InterpolationOnly", "smoke", [0])
    assert plan_jobs("ou_forecast_only/paired", "static", "smoke", [0]).jobs


def test_a_method_made_for_some_families_is_offered_them_and_tasks_resembling_them_only():
    from harness.protocol import PopbenchError
    from harness.sweep import plan_jobs

    plan = plan_jobs("ou/paired,vortex/interpolation", "snap_mmd,static", "smoke", [0])
    assert sorted((j.family, j.method) for j in plan.jobs) == \
        [("ou", "static"), ("vortex", "snap_mmd"), ("vortex", "static")]
    assert plan.skipped_pairs == ["snap_mmd on ou/paired: it is made for the vortex family only"]
    with pytest.raises(PopbenchError, match="nothing to run: sbirr on ou/paired: it is made for the vortex, eb, eb300 "
                                            "families only"):
        plan_jobs("ou/paired", "sbirr", "smoke", [0])
    # a plug-in task whose variants resemble the vortex's gets the vortex settings
    sys.path.insert(0, str(ROOT / "examples" / "plugin"))
    try:
        plan = plan_jobs("popbench_example.big_vortex:BigVortex/interpolation", "snap_mmd", "quick", [0])
    finally:
        sys.path.remove(str(ROOT / "examples" / "plugin"))
    assert [j.hparams for j in plan.jobs] == [plan_jobs("vortex/interpolation", "snap_mmd", "quick", [0]).jobs[0].hparams]


def test_dry_run_says_what_a_todo_job_left_behind(tmp_path):
    """A failed attempt and a checkpoint without a row (a killed fit) show in the state column."""
    from harness.store import RunStore
    from harness.sweep import plan_jobs

    out = tmp_path / "r"
    args = ("--tasks", "ou/paired", "--methods", "static", "--out", str(out), "--dry-run")
    line = next(x for x in run_cli(*args).stdout.splitlines() if x.startswith("| ou/paired"))
    assert line.rstrip(" |").endswith("todo")
    store = RunStore(out)
    (job,) = plan_jobs("ou/paired", "static", "quick", [0]).jobs
    store.append_rows([{"row_type": "job", "job_id": job.job_id, "attempt_id": "a", "task": "ou", "variant": "paired",
                        "method": "static", "profile": "quick", "seed": 0, "status": "timeout", "finished_at": 1.0}])
    ckpt = store.checkpoint_path(job.job_id)
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    ckpt.write_bytes(b"state")
    line = next(x for x in run_cli(*args).stdout.splitlines() if x.startswith("| ou/paired"))
    assert "todo (last attempt timeout), checkpoint saved 0 min ago" in line


def test_dry_run_prints_the_matrix_and_runs_nothing(tmp_path):
    out = tmp_path / "r"
    r = run_cli("--tasks", "ou", "--methods", "static", "--seeds", "0,1", "--out", str(out), "--dry-run")
    assert r.returncode == 0
    assert "4 jobs, 0 done, 4 to run" in r.stdout
    assert not (out / "rows.jsonl").exists()


def test_a_missing_data_file_exits_2_with_the_file_its_url_and_where_to_put_it(tmp_path):
    r = run_cli("--tasks", "eb", "--methods", "static", "--out", str(tmp_path / "r"),
                env={"POPBENCH_DATA_DIR": str(tmp_path / "empty"), "POPBENCH_CACHE_DIR": str(tmp_path / "cache"),
                     "POPBENCH_OFFLINE": "1"})
    assert r.returncode == 2
    msg = r.stderr.strip()
    assert len(msg.splitlines()) == 1 and "Traceback" not in msg
    assert "eb_velocity_v5.npz" in msg and "TrajectoryNet" in msg and "06b92296690840bb4c146085b6cd18ad89667c74" in msg


def test_publish_writes_tables_with_the_paper_column_and_jobs_csv(tmp_path):
    run, out = tmp_path / "run", tmp_path / "published"
    r = run_cli("--tasks", "ou/paired", "--methods", "static,oracle", "--out", str(run), "--no-progress")
    assert r.returncode == 0, r.stderr
    r = run_cli("publish", "--suite", "table1", "--run", str(run), "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert {"ou.md", "ou.tex", "ou_aggregate.csv", "jobs.csv", "environment.json"} <= {p.name for p in out.iterdir()}
    assert "static" in (out / "ou.md").read_text()
    # every job row names the code revision that ran it (a clone of this repository has one)
    from harness.store import git_revision

    with open(out / "jobs.csv", newline="") as fh:
        jobs = list(csv.DictReader(fh))
    assert {j["git_revision"] for j in jobs} == {git_revision()} != {None}
    wrong = run_cli("publish", "--suite", "table1", "--run", str(run), "--out", str(out), "--seeds", "1", "--seed", "0")
    assert wrong.returncode == 2 and "--seed 0 is not among --seeds 1" in wrong.stderr
    missing = run_cli("publish", "--suite", "table1", "--run", str(tmp_path / "nothing"))
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert "--suite table1" in missing.stderr


def test_a_publication_restores_into_a_new_run_that_skips_its_jobs_and_republishes_it_unchanged(tmp_path):
    """publish -> restore on a fresh machine -> the suite's command runs only new jobs -> publish:
    the same tables, plus the new jobs; the figures drawn from samples the bundle does not carry stay."""
    run, out, again = tmp_path / "run", tmp_path / "published", tmp_path / "fresh-run"
    sweep = ("--tasks", "ou/paired", "--methods", "static,jkonet_star", "--profile", "smoke", "--no-progress")
    assert run_cli(*sweep, "--out", str(run)).returncode == 0
    r = run_cli("publish", "--suite", "table1", "--profile", "smoke", "--run", str(run), "--out", str(out))
    assert r.returncode == 0, r.stderr
    figure = out / "figures" / "ou_paired_rollouts.png"
    drawn = figure.read_bytes()
    tables = {name: (out / name).read_text() for name in ("ou.md", "ou.tex", "rows_long.csv", "jobs.csv")}

    r = run_cli("restore", "--suite", "table1", "--profile", "smoke", "--from", str(out), "--run", str(again))
    assert r.returncode == 0 and "restored 2 job attempts" in r.stdout, r.stderr
    r = run_cli(*sweep, "--out", str(again), "--dry-run")
    assert r.returncode == 0 and "2 jobs, 2 done, 0 to run" in r.stdout, r.stdout
    r = run_cli("publish", "--suite", "table1", "--profile", "smoke", "--run", str(again), "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert {name: (out / name).read_text() for name in tables} == tables
    assert "carries no samples; the published figure stays as it is" in r.stderr and figure.read_bytes() == drawn

    # continued: a new seed runs, and the next publication tabulates the restored jobs with it
    assert run_cli(*sweep, "--out", str(again), "--seeds", "1").returncode == 0
    r = run_cli("publish", "--suite", "table1", "--profile", "smoke", "--run", str(again), "--out", str(out))
    assert r.returncode == 0, r.stderr
    with open(out / "jobs.csv", newline="") as fh:
        assert sorted((j["method"], j["seed"]) for j in csv.DictReader(fh)) == [
            ("jkonet_star", "0"), ("jkonet_star", "1"), ("static", "0"), ("static", "1")]
    bad = run_cli("restore", "--suite", "table1", "--profile", "smoke", "--from", str(tmp_path / "nowhere"), "--run", str(again))
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "no bundle at" in bad.stderr

    # a fresh run that never restored the publication may not publish over it: its tables would lose jobs
    lone = tmp_path / "lone-run"
    assert run_cli(*sweep, "--out", str(lone), "--seeds", "2", "--methods", "static").returncode == 0
    r = run_cli("publish", "--suite", "table1", "--profile", "smoke", "--run", str(lone), "--out", str(out))
    assert r.returncode == 2 and "publishes 4 jobs the run does not hold" in r.stderr and "restore" in r.stderr
    # nor is a run restored into while a sweep runs in it (the sweep would take restored attempts for its own)
    from harness.store import RunStore

    held = RunStore(lone).claim("ou/paired|static|smoke|seed=3|x")
    try:
        r = run_cli("restore", "--suite", "table1", "--profile", "smoke", "--from", str(out), "--run", str(lone))
        assert r.returncode == 2 and f"a sweep is running in {lone} (pid {os.getpid()}" in r.stderr
    finally:
        held.close()
    r = run_cli("restore", "--suite", "table1", "--profile", "quick", "--from", str(out), "--run", str(lone))
    assert r.returncode == 2 and "holds smoke rows, not quick ones" in r.stderr


def test_a_suite_sweep_says_when_it_would_rerun_published_jobs_its_run_lacks(tmp_path):
    suite = ("--suite", "table1", "--profile", "smoke", "--tasks", "gf_sde/quadratic-paired", "--methods", "static",
             "--seeds", "0", "--no-progress")
    assert run_cli(*suite, "--out", str(tmp_path / "first"), cwd=tmp_path).returncode == 0
    r = run_cli("publish", "--suite", "table1", "--profile", "smoke", "--run", str(tmp_path / "first"), cwd=tmp_path)
    assert r.returncode == 0 and (tmp_path / "results/smoke/table1/rows.jsonl.gz").exists(), r.stderr
    fresh = str(tmp_path / "fresh")
    r = run_cli(*suite, "--out", fresh, "--dry-run", cwd=tmp_path)
    assert "results/smoke/table1 already publishes 1 of these 1 jobs" in r.stderr and "restore" in r.stderr
    assert run_cli("restore", "--suite", "table1", "--profile", "smoke", "--run", fresh, cwd=tmp_path).returncode == 0
    r = run_cli(*suite, "--out", fresh, "--dry-run", cwd=tmp_path)
    assert "already publishes" not in r.stderr and "1 jobs, 1 done, 0 to run" in r.stdout


def test_a_suite_uses_its_own_seeds_unless_seeds_are_given(tmp_path):
    from harness import registry
    from harness.suites import SUITES

    rows = 2 * len(registry.methods.expand(SUITES["table4"].methods))  # 2 variants x the suite's rows
    out = str(tmp_path / "r")
    r = run_cli("--suite", "table4", "--dry-run", "--out", out)
    assert r.returncode == 0 and f"\n{3 * rows} jobs" in r.stdout  # seeds 0,1,2
    r = run_cli("--suite", "table4", "--seeds", "0", "--dry-run", "--out", out)
    assert r.returncode == 0 and f"\n{rows} jobs" in r.stdout


def test_table3_falls_back_to_eb300_only_when_the_eb_file_is_absent_not_when_it_is_corrupt(tmp_path):
    (tmp_path / "eb").mkdir()
    (tmp_path / "eb" / "eb_velocity_v5.npz").write_bytes(b"junk")
    r = run_cli("--suite", "table3", "--dry-run", "--data-dir", str(tmp_path), "--out", str(tmp_path / "r"),
                env={"POPBENCH_DATA_DIR": ""})
    assert r.returncode == 2 and "is corrupted or the wrong file" in r.stderr and "eb300" not in r.stdout
    r = run_cli("--suite", "table3", "--tasks", "eb", "--dry-run", "--out", str(tmp_path / "r"),
                env={"POPBENCH_DATA_DIR": str(tmp_path / "none"), "POPBENCH_CACHE_DIR": str(tmp_path / "none")})
    assert r.returncode == 2 and "fetch-data eb/eb_velocity_v5.npz" in r.stderr


def test_methods_or_tasks_with_a_suite_select_a_subset_of_it(tmp_path):
    out = str(tmp_path / "r")
    r = run_cli("--suite", "table4", "--seeds", "0", "--methods", "static,nn_appex", "--tasks", "boids/unseen-init",
                "--dry-run", "--out", out)
    assert r.returncode == 0 and "2 jobs" in r.stdout
    rows = [ln for ln in r.stdout.splitlines() if "| boids" in ln]
    assert {ln.split("|")[2].strip() for ln in rows} == {"static", "nn_appex"}
    # a method outside the suite is an error, not a silently different table
    bad = run_cli("--suite", "table4", "--methods", "am", "--dry-run", "--out", out)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "not in suite table4" in bad.stderr


def test_a_velocity_reading_method_is_marked_only_when_the_task_gave_it_velocities():
    from harness.runner import Job, run_job

    with_v = run_job(Job("ou", "paired", "velocity_extrapolation", "quick", 0))["job"]
    without_v = run_job(Job("eb300", "holdout-1", "velocity_extrapolation", "quick", 0))["job"]
    assert with_v["status"] == without_v["status"] == "ok"
    assert with_v["used_velocities"] and not without_v["used_velocities"]


def test_a_method_calling_sys_exit_fails_its_job_not_the_sweep():
    from harness.runner import Job, run_job

    row = run_job(Job("ou", "paired", "harness.testing:Exits", "smoke", 0))["job"]  # in this process
    assert row["status"] == "failed" and "SystemExit during fit" in row["error"]


def test_only_a_method_that_declares_velocities_is_given_the_training_velocities():
    """ou's t0 carries the privileged probability-flow velocity: a method that does not declare
    uses_velocities (and so is never marked (v)) must not see it in its training data."""
    from harness.runner import Job, run_job

    blind = run_job(Job("ou", "paired", "harness.testing:VelocityProbe", "quick", 0))["job"]
    reading = run_job(Job("ou", "paired", "harness.testing:VelocityReadingProbe", "quick", 0))["job"]
    assert blind["status"] == reading["status"] == "ok"
    assert blind["learned"]["saw_velocities"] is False and not blind["used_velocities"]
    assert reading["learned"]["saw_velocities"] is True and reading["used_velocities"]


def test_a_capped_fit_is_partial_and_the_same_command_without_the_cap_continues_it(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("geomloss")
    out = tmp_path / "run"
    args = ("--tasks", "ou/paired", "--methods", "wlm", "--profile", "smoke", "--out", str(out), "--no-progress")
    capped = run_cli(*args, "--set", "wlm.max_minutes=1e-9")  # stops after its first iteration
    assert capped.returncode == 1
    (job,) = _jobs(out).values()
    assert job["status"] == "partial" and "at iteration 1 of 8" in job["error"], job["error"]
    assert job["learned"]["training_complete"] is False
    assert "partial: wlm on ou/paired" in capped.stderr
    ckpt = RunStore(out).checkpoint_path(job["job_id"])
    assert ckpt.exists()
    table = capped.stdout.split("**ou**")[1]
    assert "| wlm " in table and "partial" in table  # the cell says why it has no number
    assert "partial (1/8 its)" in run_cli(*args, "--dry-run").stdout
    shown = run_cli("report", str(out), "--include-partial")
    assert shown.returncode == 0, shown.stderr
    assert "| wlm (partial) " in shown.stdout and "wlm on paired seed 0 at 1 of 8 iterations" in shown.stdout
    pub = tmp_path / "published"
    published = run_cli("publish", "--suite", "table1", "--profile", "smoke", "--run", str(out), "--out", str(pub),
                        "--include-partial")
    assert published.returncode == 0, published.stderr
    md = (pub / "ou.md").read_text()
    assert "| wlm (partial) " in md and "wlm on paired seed 0 at 1 of 8 iterations" in md
    assert (pub / "figures" / "ou_paired_rollouts.png").exists()
    assert (pub / "figures" / "ou_wlm_gamma_curve.png").exists()  # the learned friction so far
    assert (pub / "figures" / "ou_wlm_loss_curve.png").exists()
    with open(pub / "ou_wlm_curves.csv", newline="") as fh:  # the numbers behind both figures
        stored = list(csv.DictReader(fh))
    assert {(c["curve"], c["iteration"], c["status"]) for c in stored} == {
        ("loss_curve", "1", "partial"), ("gamma_curve", "1", "partial")}
    assert all(float(c["value"]) >= 0 for c in stored)  # a Sinkhorn divergence and a friction
    with open(pub / "jobs.csv", newline="") as fh:
        assert [j["status"] for j in csv.DictReader(fh) if j["method"] == "wlm (partial)"] == ["partial"]
    from harness.figures import rollout_panels
    from harness.protocol import PopbenchError

    _, _, drawn = rollout_panels(out, "ou", "paired", ["wlm"], include_partial=True)
    assert list(drawn) == ["wlm (partial)"]
    with pytest.raises(PopbenchError):  # by default figures show complete jobs only
        rollout_panels(out, "ou", "paired", ["wlm"])
    # the cap is a budget, not a setting: the same job, not done, continued from the checkpoint
    again = run_cli(*args)
    assert again.returncode == 0, again.stderr
    (done,) = _jobs(out).values()
    assert done["job_id"] == job["job_id"] and done["status"] == "ok"
    assert done["learned"]["iterations"] == 8 and done["learned"]["resumed_at"] == "1"
    assert not ckpt.exists()  # stored ok: the training state is gone
    figs = tmp_path / "figs"
    plotted = run_cli("plot", "--tasks", "ou", "--run", str(out), "--curve", "wlm.gamma_curve", "--out", str(figs))
    assert plotted.returncode == 0, plotted.stderr
    assert (figs / "ou_wlm_gamma_curve.png").exists()
    other = run_cli("plot", "--tasks", "boids/default", "--run", str(out), "--curve", "wlm.gamma_curve",
                    "--out", str(figs))  # --tasks selects the curves' family too: none stored for boids
    assert other.returncode == 2 and "no stored 'gamma_curve' curve of wlm on boids" in other.stderr


_FAULTS_PROBE = """
import resource, sys
import numpy as np
if sys.argv[1] == "keep":
    from harness.runner import keep_freed_memory
    assert keep_freed_memory()
def step():  # the shape of an attention step's temporaries: a few fresh 4-16 MB buffers, then freed
    a = np.ones((4, 1000, 1000), np.float32); b = np.ones((4, 1000, 1000), np.float32)
    c = np.ones((1000, 1000), np.float32)
    del a, b, c
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator settings")
def test_jobs_keep_freed_memory_so_fresh_large_buffers_do_not_page_fault_again():
    def faults(mode: str) -> int:
        r = subprocess.run([sys.executable, "-c", _FAULTS_PROBE, mode], capture_output=True, text=True, cwd=ROOT)
        assert r.returncode == 0, r.stderr
        return int(r.stdout)

    assert faults("default") > 2000  # glibc hands the buffers back and the kernel zeroes them anew
    assert faults("keep") < 100
    # and every job turns it on (in its own process here, so that nothing else did before)
    job = ("from harness.runner import Job, run_job, _MALLOC_TUNED; assert not _MALLOC_TUNED; "
           "run_job(Job('ou', 'paired', 'static', 'quick', 0)); print(_MALLOC_TUNED)")
    r = subprocess.run([sys.executable, "-c", job], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and r.stdout.strip() == "[True]", r.stderr


@pytest.mark.parametrize("method, key, value, sentence", [
    ("am", "pairing", "exact", "pairing must be 'independent' or 'ot'"),
    ("sam", "sigma", -0.1, "sigma must be at least 0"),
    ("am", "grad_clip", 0, "grad_clip must be above 0"),
    ("dice", "iterations", 0, "iterations must be at least 1"),
    ("nn_appex", "ipf_scheme", "sinkhorn", "ipf_scheme must be 'damped' or 'alternating'"),
    ("jkonet_star", "hidden", [], "hidden must be a non-empty list"),
    ("ijkonet", "lr_map", 0, "lr_map must be above 0"),
    ("wlm", "ema_decay", 1, "ema_decay must be in [0, 1)"),
])
def test_each_method_refuses_settings_it_cannot_run_with_before_any_job(method, key, value, sentence):
    from harness.protocol import PopbenchError
    from harness.sweep import plan_jobs

    assert plan_jobs("ou/paired", method, "smoke", [0]).jobs  # its defaults pass
    with pytest.raises(PopbenchError, match=re.escape(sentence)):
        plan_jobs("ou/paired", method, "smoke", [0], {method: {key: value}})


def test_parallel_jobs_without_ray_installed_exit_2_with_one_sentence(tmp_path):
    fake = tmp_path / "site" / "ray"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('ray is not installed (test stand-in)')\n")
    r = run_cli("--tasks", "ou/paired", "--methods", "static", "--workers", "2", "--out", str(tmp_path / "r"),
                "--no-progress", env={"PYTHONPATH": str(tmp_path / "site")})
    assert r.returncode == 2 and "need Ray: pip install" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_report_never_averages_a_method_run_with_two_settings(tmp_path):
    out = tmp_path / "run"
    base = ("--tasks", "ou/paired", "--methods", "harness.testing:Busy", "--seeds", "0,1", "--out", str(out),
            "--no-progress")
    assert run_cli(*base, "--set", "seconds=0.01").returncode == 0
    # another setting that only failed (an aborted experiment) splits nothing: one plain row
    job = next(iter(_jobs(out).values()))
    RunStore(out).append_rows([{**job, "job_id": job["job_id"] + "x", "attempt_id": "x", "hparams_hash": "deadbeef0000",
                                "status": "timeout", "cells": [], "finished_at": time.time()}])
    r = run_cli("report", str(out))
    assert "| harness.testing:Busy " in r.stdout and "[" not in r.stdout.split("**ou**")[1].split("\n\n")[1]
    assert run_cli(*base, "--set", "seconds=0.02").returncode == 0  # same method, other settings, same run
    r = run_cli("report", str(out))
    assert r.returncode == 0, r.stderr
    labels = [line.split("|")[1].strip() for line in r.stdout.splitlines()
              if line.startswith("|") and "harness.testing:Busy [" in line]
    hashes = {j["hparams_hash"] for j in _jobs(out).values() if j["status"] == "ok"}
    assert set(labels) >= {f"harness.testing:Busy [{h}]" for h in hashes} and len(hashes) == 2
    assert "on paired with 2 different settings" in r.stdout and "never averaged together" in r.stdout
    # a figure draws one configuration: with two it refuses, naming them
    from harness.figures import rollout_panels
    from harness.protocol import PopbenchError

    with pytest.raises(PopbenchError, match="with 2 settings"):
        rollout_panels(out, "ou", "paired", ["harness.testing:Busy"], seed=0)


def test_plot_says_what_a_stored_result_flag_needs_and_a_corrupt_prediction_file_is_named(tmp_path):
    from harness.figures import rollout_panels
    from harness.protocol import PopbenchError

    r = run_cli("plot", "--tasks", "ou/paired", "--curve", "wlm.gamma_curve", "--out", str(tmp_path / "f"))
    assert r.returncode == 2 and "name the run directory with --run" in r.stderr
    r = run_cli("plot", "--tasks", "ou/paired", "--run", str(tmp_path), "--out", str(tmp_path / "f"))
    assert r.returncode == 2 and "name --methods" in r.stderr
    out = tmp_path / "run"
    assert run_cli("--tasks", "ou/paired", "--methods", "static", "--out", str(out), "--no-progress").returncode == 0
    (npz,) = (out / "artifacts").glob("*.npz")
    npz.write_bytes(npz.read_bytes()[:100])  # a truncated copy
    with pytest.raises(PopbenchError, match="cannot read static's stored predictions"):
        rollout_panels(out, "ou", "paired", ["static"])


def test_progress_reads_the_same_in_a_log_file_and_a_rerun_says_everything_was_done(tmp_path):
    """Output piped (a log, CI, nohup): a line per finished job with the time left, in minutes."""
    args = ("--tasks", "ou", "--methods", "static,oracle", "--profile", "smoke", "--out", str(tmp_path / "r"))
    first = run_cli(*args)
    assert first.returncode == 0, first.stderr
    assert "4 jobs: 0 already done, 4 to run (serial)" in first.stderr
    lines = [x for x in first.stderr.splitlines() if x.startswith("[")]
    assert [x.split("]")[0] for x in lines] == ["[1/4", "[2/4", "[3/4", "[4/4"]
    assert lines[0].startswith("[1/4] ok: static on ou/paired (smoke, seed 0): train_w1=")
    assert all(x.endswith(" left") for x in lines[:3]) and not lines[3].endswith(" left")
    again = run_cli(*args)
    assert f"all 4 jobs already done in {tmp_path / 'r'}: nothing to run" in again.stderr


def test_a_long_job_gets_a_still_running_line(tmp_path, monkeypatch, capsys):
    from harness import sweep

    monkeypatch.setattr(sweep, "STILL_RUNNING_AT", (0.5,))
    monkeypatch.setattr(sweep, "STILL_RUNNING_EVERY", 1000.0)
    monkeypatch.setattr(sweep, "_TICK", 0.1)
    plan = sweep.plan_jobs("ou/paired", "harness.testing:Sleeps", "smoke", [0], overrides={"*": {"sleep": 2.0}})
    sweep.run_plan(plan, RunStore(tmp_path), progress=True)
    err = capsys.readouterr().err
    (line,) = [x for x in err.splitlines() if x.startswith("still running:")]
    assert line.startswith("still running: harness.testing:Sleeps on ou/paired (smoke, seed 0), 1 s so far")
    assert str(RunStore(tmp_path).log_path(plan.jobs[0].job_id)) in line


def test_time_left_is_in_minutes():
    from harness.sweep import time_left

    assert time_left(20) == "under a minute left"
    assert time_left(61) == "about 1 min left"
    assert time_left(600) == "about 10 min left"
    assert time_left(5400) == "about 90 min left"
    assert time_left(3 * 3600 + 300) == "about 3 h 05 min left"


def test_a_commands_table_shows_the_reference_rows_and_tables_hold_the_whole_run(tmp_path):
    out = tmp_path / "r"
    base = ("--tasks", "ou/paired", "--profile", "smoke", "--out", str(out), "--no-progress")
    assert run_cli(*base, "--methods", "static").returncode == 0
    r = run_cli(*base, "--methods", "harness.testing:Busy", "--set", "seconds=0.1")
    assert r.returncode == 0, r.stderr
    printed = [x.split("|")[1].strip() for x in r.stdout.splitlines() if x.startswith("| ")][1:]
    assert printed == ["harness.testing:Busy", "static"], r.stdout  # the learner, read against static
    assert "the reference rows (static) this run holds for the same tasks, profile and seeds" in r.stdout
    run_cli("--tasks", "ou/unpaired", "--methods", "static", "--profile", "smoke", "--out", str(out), "--no-progress")
    (md,) = (out / "tables").glob("ou.md")
    text = md.read_text()  # every job of the run, not only the last command's
    assert "harness.testing:Busy" in text and "unpaired" in text and "paired" in text


@pytest.mark.ray
def test_parallel_jobs_start_their_own_cluster_when_another_one_runs_on_the_machine(tmp_path):
    """`ray start` leaves its cluster's address in Ray's temporary directory, where ray.init would
    join it (and then refuse the CPU count we give it): without --address, a sweep starts its own.
    The address file here names a cluster that is not there: joining it would fail just the same."""
    pytest.importorskip("ray")
    import shutil
    import tempfile

    ray_tmp = Path(tempfile.mkdtemp(prefix="pbrt", dir="/tmp"))  # short: Ray's socket paths have a limit
    try:
        (ray_tmp / "ray").mkdir()
        (ray_tmp / "ray" / "ray_current_cluster").write_text("127.0.0.1:6399\n")
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env.update(RAY_TMPDIR=str(ray_tmp), RAY_USAGE_STATS_ENABLED="0")
        out = tmp_path / "run"
        r = subprocess.run([sys.executable, str(ROOT / "run_all.py"), "--tasks", "ou/paired", "--methods", "static",
                            "--profile", "smoke", "--workers", "2", "--out", str(out), "--no-progress"],
                           capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
        assert r.returncode == 0, r.stderr[-3000:]
        assert "Traceback" not in r.stderr
        assert [j["status"] for j in _jobs(out).values()] == ["ok"]
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
