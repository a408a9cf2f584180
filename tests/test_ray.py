"""The Ray executor on one shared local cluster (2 CPUs, 2 declared fake GPUs)."""

import warnings

import pytest

from harness.store import RunStore
from harness.sweep import plan_jobs, run_plan

pytestmark = pytest.mark.ray


def _cells(latest):
    return {jid: sorted((c["key"], round(c["value"], 12)) for c in r["cells"]) for jid, r in latest.items()}


def test_ray_gives_the_same_numbers_as_serial(tmp_path, ray_cluster):
    plan = plan_jobs("ou", "static,oracle,velocity_extrapolation", "smoke", [0, 1])
    serial = run_plan(plan, RunStore(tmp_path / "serial"), executor="serial", progress=False)
    par = run_plan(plan, RunStore(tmp_path / "ray"), executor="ray", workers=2, progress=False)
    assert all(r["status"] == "ok" for r in par.values())
    assert _cells(serial) == _cells(par)


def test_faults_under_ray(tmp_path, ray_cluster):
    plan = plan_jobs("ou/paired", "harness.testing:Raises,harness.testing:KillsWorker,harness.testing:Sleeps,static",
                     "smoke", [0], overrides={"harness.testing:Sleeps": {"sleep": 120}})
    latest = run_plan(plan, RunStore(tmp_path), executor="ray", workers=2, timeout=10, progress=False)
    status = {r["method"]: r["status"] for r in latest.values()}
    assert status == {"harness.testing:Raises": "failed", "harness.testing:KillsWorker": "failed",
                      "harness.testing:Sleeps": "timeout", "static": "ok"}
    # workers' stderr never reaches the driver; each job's log keeps it, last words included
    logs = {r["method"]: RunStore(tmp_path).log_path(r["job_id"]).read_text() for r in latest.values()}
    assert "test_raises: about to fail" in logs["harness.testing:Raises"]
    assert "test_kills_worker: about to die" in logs["harness.testing:KillsWorker"]
    assert logs["static"].startswith("--- attempt started")


def test_gpu_jobs_spread_one_per_gpu_and_cpu_jobs_pin_jax_to_cpu(tmp_path, ray_cluster):
    # two GPU jobs in flight at once (the cluster's 2 CPUs hold exactly two jobs): one per GPU
    plan = plan_jobs("ou/paired", "harness.testing:GpuEnvProbe", "smoke", [0, 1], overrides={"*": {"sleep": 4}})
    latest = run_plan(plan, RunStore(tmp_path / "gpu"), executor="ray", workers=2, progress=False)
    gpu = [r["learned"] for r in latest.values()]
    assert {g["device"] for g in gpu} == {"cuda"}
    assert sorted(g["CUDA_VISIBLE_DEVICES"] for g in gpu) == ["0", "1"]
    assert {g["XLA_PYTHON_CLIENT_PREALLOCATE"] for g in gpu} == {"false"}
    plan = plan_jobs("ou/paired", "harness.testing:EnvProbe", "smoke", [0, 1])
    latest = run_plan(plan, RunStore(tmp_path / "cpu"), executor="ray", workers=2, progress=False)
    cpu = [r["learned"] for r in latest.values()]
    assert all(c["device"] == "cpu" and c["JAX_PLATFORMS"] == "cpu" and c["CUDA_VISIBLE_DEVICES"] == "" for c in cpu)


def test_a_job_waiting_for_a_gpu_is_not_timed_out_for_its_wait(tmp_path, ray_cluster):
    # each job takes both GPUs for 10 s: the second one can only start when the first ends; a timeout
    # of 18 s per job must not count its wait (it did: the second job was stopped as `timeout`). A
    # first job warms a worker (its imports, its methods' fork server), so that 18 s is not spent starting up
    warm = plan_jobs("ou/paired", "harness.testing:TwoGpuEnvProbe", "smoke", [2], overrides={"*": {"sleep": 0}})
    run_plan(warm, RunStore(tmp_path / "warm"), executor="ray", workers=2, progress=False)
    plan = plan_jobs("ou/paired", "harness.testing:TwoGpuEnvProbe", "smoke", [0, 1],
                     overrides={"*": {"sleep": 10}})
    latest = run_plan(plan, RunStore(tmp_path), executor="ray", workers=2, timeout=18, progress=False)
    assert sorted(r["status"] for r in latest.values()) == ["ok", "ok"]
    assert {r["learned"]["CUDA_VISIBLE_DEVICES"] for r in latest.values()} == {"0,1"}


def test_gpu_jobs_fall_back_to_cpu_with_a_warning_on_a_gpu_less_cluster(tmp_path, ray_cluster, monkeypatch):
    real = ray_cluster.cluster_resources
    monkeypatch.setattr(ray_cluster, "cluster_resources", lambda: {k: v for k, v in real().items() if k != "GPU"})
    plan = plan_jobs("ou/paired", "harness.testing:GpuEnvProbe", "smoke", [0])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        latest = run_plan(plan, RunStore(tmp_path), executor="ray", workers=2, timeout=60, progress=False)
    (row,) = latest.values()
    assert row["status"] == "ok"
    assert row["learned"]["device"] == "cpu" and row["learned"]["JAX_PLATFORMS"] == "cpu"
    assert any("has no GPU" in str(w.message) for w in caught)


def test_sigterm_stops_a_ray_sweep_like_ctrl_c_and_the_rerun_resumes(tmp_path, ray_cluster):
    """`timeout` or a batch system sends SIGTERM: the driver says how to resume (no crash dump from
    Ray's C++ signal handler), keeps the finished jobs, and the same command resumes."""
    import json
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import ROOT, run_cli

    out = tmp_path / "run"
    args = ["--tasks", "ou/paired", "--methods", "static,harness.testing:Sleeps", "--profile", "smoke",
            "--seeds", "0", "--set", "harness.testing:Sleeps.sleep=600", "--workers", "2",
            "--address", ray_cluster.get_runtime_context().gcs_address, "--out", str(out), "--no-progress"]
    proc = subprocess.Popen([sys.executable, str(ROOT / "run_all.py"), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT)
    rows = out / "rows.jsonl"
    deadline = time.monotonic() + 120
    while not (rows.exists() and '"static"' in rows.read_text()):  # static done, Sleeps running
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "rerun the same command to resume" in stderr
    assert "SIGTERM received" not in stderr + stdout and "PC: @" not in stderr + stdout
    done = [json.loads(line) for line in rows.read_text().splitlines()]
    assert [r["method"] for r in done if r.get("row_type") == "job"] == ["static"]
    plan = run_cli(*args, "--dry-run")
    assert "1 done, 1 to run" in plan.stdout, plan.stdout + plan.stderr


def test_a_cluster_the_harness_starts_does_not_nice_its_workers(monkeypatch):
    """Ray nices workers by default; the executor's own local cluster runs them at the driver's
    priority (checked by asking a real worker once: os.nice(0) == 0 with this setting)."""
    ray = pytest.importorskip("ray")
    from harness.runner import RayExecutor

    seen = {}
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: seen.update(kw))
    RayExecutor(workers=2)._init()
    assert seen["num_cpus"] == 2 and seen["_system_config"] == {"worker_niceness": 0}
    seen.clear()
    RayExecutor(workers=2, address="auto")._init()  # joining a cluster: its own settings stand
    assert seen["address"] == "auto" and "_system_config" not in seen


def test_ray_skips_a_job_another_process_holds_and_runs_the_rest(tmp_path, ray_cluster, capsys):
    plan = plan_jobs("ou/paired", "static", "smoke", [0, 1, 2])
    store = RunStore(tmp_path)
    held = plan.jobs[1]
    fh = store.claim(held.job_id)  # this test process plays the other process
    try:
        latest = run_plan(plan, store, executor="ray", workers=2, progress=False)
    finally:
        fh.close()
    assert sorted(r["seed"] for r in latest.values()) == [0, 2]
    assert "skipped static on ou/paired (smoke, seed 1): another process is running it" in capsys.readouterr().err
    assert store.claim(plan.jobs[0].job_id) is not None  # released once stored


def test_joining_a_cluster_without_workers_runs_as_many_jobs_as_it_has_cpus(tmp_path, ray_cluster):
    """--address without --workers: every CPU of the cluster (2 here), not one job at a time."""
    from harness.runner import RayExecutor

    plan = plan_jobs("ou/paired", "harness.testing:EnvProbe", "smoke", [0, 1], overrides={"*": {"sleep": 8}})
    got = []
    RayExecutor(workers=None, address="auto").run(plan.jobs, lambda job, result: got.append(result["job"]))
    (a, b) = sorted((r["learned"]["started"], r["learned"]["ended"]) for r in got)
    assert b[0] < a[1]  # the second started before the first ended: both in flight at once
