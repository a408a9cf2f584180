"""The fault suite: each fault that once cost a sweep or gave a wrong number, injected on purpose.

A plug-in per fault class (defined here, used by reference as ``tests.test_faults:Name``), a
killed driver, concurrent drivers, a row cut mid-write, bad command lines, a full disk, and a
plug-in that searches its own process for the held-out targets while it fits.
"""

from __future__ import annotations

import errno
import gc
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest

from harness.protocol import Capabilities, Marginal, Method, Prediction, TrainData
from harness.store import RunStore

from .conftest import ROOT, run_cli

HERE = "tests.test_faults"


class _Static(Method):
    """``static`` with declared settings: the base of every plug-in below."""

    capabilities = Capabilities(interpolate=True, forecast=True)
    settings: dict[str, Any] = {}

    @classmethod
    def default_hparams(cls, task: str, profile: str) -> dict[str, Any]:
        return dict(cls.settings)

    def fit(self, data: TrainData) -> None:
        pass

    def predict(self, start: Marginal, times: Sequence[float], *, seed: int) -> Prediction:
        return Prediction(tuple(start.x.copy() for _ in times))


class LearnsASet(_Static):
    """``learned()`` returns a value JSON cannot encode."""

    name = "test_learns_a_set"

    def learned(self) -> dict:
        return {"classes": {1, 2}}


class ExitsHard(_Static):
    """Ends its process with ``os._exit`` in ``fit`` (no exception, no cleanup)."""

    name = "test_exits_hard"

    def fit(self, data: TrainData) -> None:
        os._exit(7)


class Huge(_Static):
    """Predicts finite samples of about 1e200."""

    name = "test_huge"

    def predict(self, start: Marginal, times: Sequence[float], *, seed: int) -> Prediction:
        return Prediction(tuple(np.full_like(start.x, 1e200) for _ in times))


def fingerprint(x: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(x, dtype=np.float64).tobytes()).hexdigest()


class Peeks(_Static):
    """Searches its own process during ``fit`` for the held-out targets: Task, Query and Target
    objects anywhere in the heap or on any thread's stack, and any float array (or slice of one)
    equal to a held-out marginal, given as ``fingerprints`` (sha256 of its float64 bytes)."""

    name = "test_peeks"
    settings = {"fingerprints": [], "shape": [0, 0]}

    def fit(self, data: TrainData) -> None:
        from harness.protocol import Query, Target, Task

        want = set(self.hparams["fingerprints"])
        shape = tuple(self.hparams["shape"])
        gc.collect()
        objects, arrays, seen = [], 0, set()

        def look(o) -> None:
            nonlocal arrays
            kind = next((k.__name__ for k in (Query, Target, Task) if isinstance(o, k)), None)
            if kind:
                objects.append(kind)
            elif isinstance(o, np.ndarray) and id(o) not in seen:
                seen.add(id(o))
                for a in (o, o.base):
                    if isinstance(a, np.ndarray) and a.dtype.kind == "f" and a.ndim >= 2 \
                            and tuple(a.shape[-2:]) == shape:
                        arrays += sum(fingerprint(s) in want for s in a.reshape(-1, *shape))

        for o in gc.get_objects():
            look(o)
            for r in gc.get_referents(o):
                look(r)
        for frame in sys._current_frames().values():
            while frame is not None:
                for v in list(frame.f_locals.values()):
                    look(v)
                    for r in gc.get_referents(v):
                        look(r)
                frame = frame.f_back
        self._found = {"objects": len(objects), "kinds": ",".join(sorted(set(objects))), "arrays": arrays}

    def learned(self) -> dict:
        return dict(self._found)


def _jobs(out) -> dict[str, dict]:
    return {r["method"].rpartition(":")[2]: r for r in RunStore(out).latest_jobs().values()}


# --------------------------------------------------------------------------------------------
# Plug-ins that break the rules: each gets its row, and the sweep goes on


@pytest.fixture(scope="module")
def faulty_sweep(tmp_path_factory):
    """One serial sweep without --timeout (jobs in this order): a learned() value JSON cannot store,
    os._exit in fit, predictions of 1e200, then a well-behaved method."""
    out = tmp_path_factory.mktemp("faults") / "run"
    methods = ",".join(f"{HERE}:{m}" for m in ("LearnsASet", "ExitsHard", "Huge")) + ",static"
    args = ("--tasks", "ou/paired", "--methods", methods, "--profile", "smoke", "--out", str(out))
    return out, args, run_cli(*args, timeout=120)


def test_a_learned_value_json_cannot_store_fails_its_job_not_the_sweep(faulty_sweep):
    out, args, r = faulty_sweep
    assert "Traceback" not in r.stderr, r.stderr
    job = _jobs(out)["LearnsASet"]
    assert job["status"] == "failed" and "learned()" in job["error"] and "set" in job["error"]
    assert _jobs(out)["static"]["status"] == "ok"
    again = run_cli(*args, timeout=120)  # the rerun retries it and fails it again, no crash
    assert again.returncode == 1 and "Traceback" not in again.stderr, again.stderr


def test_a_method_that_ends_its_process_fails_its_job_and_the_later_jobs_run(faulty_sweep):
    out, _, r = faulty_sweep
    assert r.returncode == 1, r.stderr  # not the driver's own death (exit 7, or 1 with nothing said)
    job = _jobs(out)["ExitsHard"]
    assert job["status"] == "failed" and "exit code 7" in job["error"] and "during fit" in job["error"]
    assert "3 of 4 jobs did not finish ok" in r.stderr


def test_astronomical_predictions_are_diverged_not_a_solver_error(faulty_sweep):
    out, _, r = faulty_sweep
    job = _jobs(out)["Huge"]
    assert job["status"] == "diverged" and "1e+200" in job["error"], job["error"]
    assert "overflow" not in r.stderr  # nothing cast them to float32 on the way


def test_dry_run_names_the_failed_attempt(faulty_sweep):
    out, args, _ = faulty_sweep
    lines = run_cli(*args, "--dry-run").stdout.splitlines()
    (line,) = [x for x in lines if "ExitsHard" in x]
    assert "todo (last attempt failed)" in line


# --------------------------------------------------------------------------------------------
# No peeking: the process that fits never holds a held-out marginal


def _held_out(task: str) -> tuple[list[str], list[int]]:
    from harness import registry

    family, variant = task.split("/")
    t = registry.tasks.load(family)(variant, seed=0)
    held = [tg.x for q in t.queries() for tg in q.targets if tg.group == "test"]
    return [fingerprint(x) for x in held], list(held[0].shape)


@pytest.mark.parametrize("executor, finds", [("serial", False), ("inline", True)])
def test_a_method_that_searches_its_process_while_it_fits_finds_no_held_out_target(tmp_path, executor, finds):
    """Serial (the default) and Ray fit in a process that receives only the training marginals
    and, after fit, the start marginals; ``inline`` (for a debugger) fits in the process that
    scores, and the same search finds the task there: the control that shows the search works."""
    prints, shape = _held_out("ou/paired")
    out = tmp_path / "run"
    r = run_cli("--tasks", "ou/paired", "--methods", f"{HERE}:Peeks", "--profile", "smoke", "--executor", executor,
                "--set", f"fingerprints={json.dumps(prints)}", "--set", f"shape={json.dumps(shape)}",
                "--out", str(out), "--no-progress", timeout=120)
    assert r.returncode == 0, r.stderr
    found = _jobs(out)["Peeks"]["learned"]
    if finds:
        assert found["objects"] > 0 and "Task" in found["kinds"] and found["arrays"] > 0, found
    else:
        assert found == {"objects": 0, "kinds": "", "arrays": 0}


@pytest.mark.ray
def test_under_ray_too_the_method_finds_no_held_out_target(tmp_path, ray_cluster):
    from harness.sweep import plan_jobs, run_plan

    prints, shape = _held_out("ou/paired")
    plan = plan_jobs("ou/paired", f"{HERE}:Peeks", "smoke", [0], overrides={"*": {"fingerprints": prints,
                                                                                  "shape": shape}})
    (row,) = run_plan(plan, RunStore(tmp_path), executor="ray", workers=2, progress=False).values()
    assert row["status"] == "ok", row["error"]
    assert row["learned"] == {"objects": 0, "kinds": "", "arrays": 0}


# --------------------------------------------------------------------------------------------
# The store: a row cut mid-write, a full disk


def test_a_job_whose_last_row_was_cut_mid_write_is_not_finished_and_runs_again(tmp_path, capsys):
    from harness.sweep import plan_jobs, run_plan

    plan = plan_jobs("ou/paired", "static", "smoke", [0, 1])
    store = RunStore(tmp_path)
    run_plan(plan, store, progress=False)
    rows = store.rows_path.read_bytes()
    store.rows_path.write_bytes(rows[: rows.rstrip(b"\n").rfind(b"\n") + 40])  # a crash in the last target row
    assert len(store.done_job_ids()) == 1  # seed 1's job row is whole, one of its targets is not
    latest = run_plan(plan, store, progress=False)
    assert "1 stored attempt(s)" in capsys.readouterr().err  # said once, when it is found
    assert sorted(r["seed"] for r in latest.values() if r["status"] == "ok") == [0, 1]
    complete = [r for r in store.rows_of_latest_attempts() if r["row_type"] == "target"]
    assert len(complete) == 2 * 11  # every target of both jobs, none from the cut attempt
    assert not store.cut  # replaced: no longer worth a note


def test_a_full_disk_names_the_file_says_how_to_resume_and_exits_3(tmp_path, monkeypatch, capsys):
    from harness import cli
    from harness import store as store_mod

    real = os.fsync

    def fsync(fd):
        if os.readlink(f"/proc/self/fd/{fd}").endswith("rows.jsonl"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd)

    monkeypatch.setattr(store_mod.os, "fsync", fsync)
    out = tmp_path / "run"
    code = cli.main(["--tasks", "ou/paired", "--methods", "static", "--profile", "smoke", "--out", str(out),
                     "--no-progress"])
    err = capsys.readouterr().err
    assert code == 3, err
    (line,) = [x for x in err.splitlines() if x.startswith("error:")]
    assert "No space left on device" in line and str(out / "rows.jsonl") in line and "rerun" in line


def test_a_data_file_replaced_by_a_directory_is_named_as_such_not_missing(tmp_path):
    from harness import data
    from harness.protocol import PopbenchError

    (tmp_path / "ocean" / "oceans_with_v0.npz").mkdir(parents=True)
    with pytest.raises(PopbenchError, match="is not a file"):
        data.resolve("ocean/oceans_with_v0.npz", data_dir=tmp_path, download=False)


def test_a_dead_ray_worker_s_message_says_where_its_logs_are():
    """Ray's own text names python-core-worker-*.log without saying where: the row says where."""
    from types import SimpleNamespace

    from harness.runner import Job, _worker_died

    node = SimpleNamespace(get_logs_dir_path=lambda: "/tmp/ray/session_x/logs")
    ray = SimpleNamespace(_private=SimpleNamespace(worker=SimpleNamespace(_global_node=node)))
    job = Job("ou", "paired", "static", "smoke", 0, log_path="/runs/r/logs/job.log")
    text = _worker_died(RuntimeError("Check python-core-worker-*.log files for more information"), job, ray)
    assert "/runs/r/logs/job.log" in text and "python-core-worker-*.log) are in /tmp/ray/session_x/logs" in text


# --------------------------------------------------------------------------------------------
# Bad command lines: exit 2, one sentence, fast


@pytest.mark.parametrize("args, sentence", [
    (("--tasks", ""), "--tasks '' selects nothing"),
    (("--methods", ""), "--methods '' selects nothing"),
    (("--seeds", ""), "--seeds '' selects nothing"),
    (("--seeds", "0-100000000", "--dry-run"), "at most 10,000 seeds"),
    (("--profile", "fast"), "invalid choice: 'fast'"),
    (("--workers", "two"), "invalid int value: 'two'"),
    (("--bogus",), "unrecognized arguments: --bogus"),
])
def test_a_bad_command_line_exits_2_with_one_sentence(tmp_path, args, sentence):
    t0 = time.monotonic()
    r = run_cli("--out", str(tmp_path / "r"), *args, timeout=60)
    assert r.returncode == 2 and time.monotonic() - t0 < 30
    assert r.stdout == "" and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert sentence in r.stderr and "usage:" not in r.stderr


def test_help_shows_no_default_of_none_and_list_fits_100_columns():
    r = run_cli("--help")
    assert r.returncode == 0 and "(default: None)" not in r.stdout and "(default: False)" not in r.stdout
    listing = run_cli("--list").stdout
    assert "vortex" in listing and "wlm" in listing
    assert max(len(line) for line in listing.splitlines()) <= 100


# --------------------------------------------------------------------------------------------
# Concurrent drivers on one run directory


def test_a_job_another_driver_stores_while_this_one_checks_is_neither_lost_nor_running(tmp_path, monkeypatch):
    """The other driver stores a job and releases its claim between this driver's look at the
    claims and its read of the rows: the job is stored, not 'held and stopped without a result'."""
    from harness.sweep import plan_jobs, sweep_outcome

    plan = plan_jobs("ou/paired", "static", "smoke", [0])
    (job,) = plan.jobs
    store = RunStore(tmp_path)
    other = store.claim(job.job_id)  # this test plays the other driver, running the job
    real = RunStore.latest_jobs
    calls = []

    def latest_jobs(self):
        if not calls:  # the other driver finishes right now: rows first, then the claim
            self.append_rows([{"row_type": "job", "job_id": job.job_id, "attempt_id": "b", "status": "ok",
                               "task": "ou", "variant": "paired", "method": "static", "profile": "smoke",
                               "seed": 0, "finished_at": time.time(), "n_targets": 0}])
            other.close()
        calls.append(1)
        return real(self)

    monkeypatch.setattr(RunStore, "latest_jobs", latest_jobs)
    latest, elsewhere, vanished = sweep_outcome(plan, store)
    assert set(latest) == {job.job_id} and not elsewhere and not vanished


def test_two_drivers_started_on_one_run_split_the_jobs_and_neither_reports_a_lost_one(tmp_path):
    out = tmp_path / "run"
    args = ["--tasks", "ou/paired", "--methods", "harness.testing:Busy", "--set", "seconds=0.2", "--seeds", "0-5",
            "--profile", "smoke", "--out", str(out), "--no-progress"]
    first = subprocess.Popen([sys.executable, str(ROOT / "run_all.py"), *args], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)
    second = run_cli(*args, timeout=120)
    err = first.communicate(timeout=120)[1]
    for e in (err, second.stderr):
        assert "have no result" not in e and "Traceback" not in e, e
    jobs = [r for r in RunStore(out).read_rows() if r["row_type"] == "job"]
    assert len(jobs) == len({j["job_id"] for j in jobs}) == 6 and {j["status"] for j in jobs} == {"ok"}
    assert run_cli(*args).returncode == 0


# --------------------------------------------------------------------------------------------
# A killed Ray driver leaves nothing running


_DRIVER = """
import subprocess, sys, time
kids = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
        for _ in range(2)]
print(*(k.pid for k in kids), flush=True)
time.sleep(120)
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _descendants(root: int) -> set[int]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as fh:
                    kids.setdefault(int(fh.read().rsplit(")", 1)[1].split()[1]), []).append(int(d))
            except OSError:
                pass
    out, todo = set(), [root]
    while todo:
        for c in kids.get(todo.pop(), []):
            out.add(c)
            todo.append(c)
    return out


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="the reaper reads /proc")
def test_the_reaper_kills_a_killed_drivers_processes_and_nothing_else():
    """What a SIGKILLed driver cannot do itself: the watcher notes the driver's descendants while it
    lives (here two, in sessions of their own, as Ray's agents outlive their parents) and kills
    them once it is gone; an unrelated process is spared."""
    from harness.runner import start_reaper

    driver = subprocess.Popen([sys.executable, "-c", _DRIVER], stdout=subprocess.PIPE, text=True)
    kids = [int(p) for p in driver.stdout.readline().split()]
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    reaper = start_reaper(driver.pid)
    try:
        time.sleep(2.5)  # the watcher has seen the driver's processes
        assert all(_alive(p) for p in kids) and other.poll() is None  # the driver lives: nothing happens
        driver.kill()
        driver.wait()
        reaper.wait(timeout=20)  # it kills, then ends
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(_alive(p) for p in kids):
            time.sleep(0.1)
        assert not any(_alive(p) for p in kids) and other.poll() is None
    finally:
        for p in (other, driver, reaper):
            if p.poll() is None:
                p.kill()
                p.wait()
        for pid in kids:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
@pytest.mark.ray
def test_a_sigkilled_ray_driver_leaves_no_ray_process_behind(tmp_path):
    """A driver that starts its own Ray cluster (a second one, ~10 s) and is killed outright."""
    pytest.importorskip("ray")
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, str(ROOT / "run_all.py"), "--tasks", "ou/paired", "--methods",
                             "harness.testing:Sleeps,static", "--set", "sleep=120", "--workers", "2", "--profile",
                             "smoke", "--out", str(out), "--no-progress"], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / "rows.jsonl").exists():  # static stored: the cluster is up, Sleeps runs
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.5)
    time.sleep(2)
    ray_procs = {p for p in _descendants(proc.pid) if b"ray" in open(f"/proc/{p}/cmdline", "rb").read()}
    assert len(ray_procs) >= 4  # GCS, raylet, agents, workers
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(_alive(p) for p in ray_procs):
        time.sleep(0.5)
    assert [p for p in ray_procs if _alive(p)] == []
