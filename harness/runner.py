"""Jobs and executors.

A :class:`Job` is (task variant, method, profile, seed) plus its resolved hyperparameters.
:func:`run_job` executes one job wherever it lands (this process, a child process, a Ray worker):
build the task, fit the method on the training data, answer every query the method can answer,
score each target with exact W1 (plus W2 and energy MMD) on the CPU, and return result rows. It
never raises for a method's fault: a raising method gives a ``failed`` row, non-finite samples a
``diverged`` row, each with the reason and the traceback.

Executors run a list of jobs and hand each finished job's rows to a callback (the store):

- :class:`SerialExecutor`: in this process, one job after the other (debuggable with pdb). With a
  timeout, each job runs in a fresh child process that is killed when its time is up.
- :class:`RayExecutor`: jobs as Ray tasks, at most ``workers`` in flight, one CPU each. Jobs whose
  method declares ``num_gpus`` ask Ray for GPUs when the cluster has them and fall back to the CPU
  with a warning when it has none (a GPU request on a GPU-less cluster would wait forever). CPU jobs
  get ``JAX_PLATFORMS=cpu`` and an empty ``CUDA_VISIBLE_DEVICES``; GPU jobs get
  ``XLA_PYTHON_CLIENT_PREALLOCATE=false``. A job past its timeout is cancelled with
  ``ray.cancel(force=True)``, which kills its worker process.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import resource
import sys
import time
import traceback
import uuid
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from harness.protocol import (
    DivergedError,
    Marginal,
    PopbenchError,
    Prediction,
    TableColumn,
    target_within_training,
)

CPU_ENV = {"JAX_PLATFORMS": "cpu", "CUDA_VISIBLE_DEVICES": ""}
GPU_ENV = {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"}


def hparams_hash(hp: dict, budget_keys: Sequence[str] = ()) -> str:
    """The job's settings fingerprint. Budget keys (``Method.budget_keys``: they only cap how long
    one fit may run) are hashed as ``None``, so a capped job is the same job as the uncapped one."""
    hp = {k: (None if k in budget_keys else v) for k, v in hp.items()}
    return hashlib.sha256(json.dumps(hp, sort_keys=True, default=str).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Job:
    family: str
    variant: str
    method: str
    profile: str
    seed: int
    hparams: dict = field(default_factory=dict, compare=False, hash=False)
    data_dir: str | None = field(default=None, compare=False, hash=False)
    num_gpus: float = field(default=0.0, compare=False, hash=False)
    framework: str = field(default="numpy", compare=False, hash=False)
    budget_keys: tuple[str, ...] = field(default=(), compare=False, hash=False)
    checkpoint_path: str | None = field(default=None, compare=False, hash=False)
    log_path: str | None = field(default=None, compare=False, hash=False)

    @property
    def task(self) -> str:
        return f"{self.family}/{self.variant}"

    @property
    def hparams_hash(self) -> str:
        return hparams_hash(self.hparams, self.budget_keys)

    @property
    def job_id(self) -> str:
        return f"{self.task}|{self.method}|{self.profile}|seed={self.seed}|{self.hparams_hash}"

    def describe(self) -> str:
        return f"{self.method} on {self.task} ({self.profile}, seed {self.seed})"


def _set_threads(num_threads: int) -> None:
    """Pin a job to ``num_threads`` CPU threads.

    Ray sets OMP_NUM_THREADS per task, but a reused worker keeps torch's first thread count, and
    methods import their framework lazily inside ``fit``: so set the environment for a framework
    not loaded yet, and torch's own setting for one that is.
    """
    n = str(max(1, num_threads))
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = n
    if "jax" not in sys.modules and n == "1":
        flags = os.environ.get("XLA_FLAGS", "")
        if "intra_op_parallelism_threads" not in flags:
            os.environ["XLA_FLAGS"] = (flags + " --xla_cpu_multi_thread_eigen=false "
                                       "intra_op_parallelism_threads=1").strip()
    if "torch" in sys.modules:
        import torch

        torch.set_num_threads(int(n))


_MALLOC_TUNED: list[bool] = []


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse instead of handing it back to the kernel.

    By default glibc serves blocks above a (dynamic, at most 32 MB) threshold with fresh mmaps and
    trims the heap top once more than twice that is free, so every fresh N x N tensor of an
    attention or Sinkhorn step (4-16 MB at N = 1000) is new memory the kernel must zero page by
    page: at N = 1000 a WLM training step spent ~0.035 of its ~0.65 CPU-s in page faults
    (``benchmarks/wlm_step.py --no-keep-freed-memory`` shows it). Blocks below 32 MB now come from
    the heap, which is trimmed only past 1 GB free: the process keeps its footprint instead of
    returning it (the peak is unchanged). Allocation addresses do not change any number (torch
    and NumPy align their buffers themselves). Every job calls this once; a no-op off glibc.
    Returns whether it applied."""
    if _MALLOC_TUNED:
        return _MALLOC_TUNED[0]
    ok = False
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            libc = ctypes.CDLL("libc.so.6")
            m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3  # <malloc.h>
            ok = bool(libc.mallopt(m_mmap_threshold, 32 * 1024 * 1024)
                      and libc.mallopt(m_trim_threshold, 1 << 30) and libc.mallopt(m_top_pad, 64 << 20))
        except (OSError, AttributeError):  # not glibc (musl): keep its defaults
            ok = False
    _MALLOC_TUNED.append(ok)
    return ok


def _reset_peak_mem() -> bool:
    """Start this job's memory peak from now (Linux: ``clear_refs`` 5 resets VmHWM), so that a
    process that ran earlier jobs (in-process serial, a reused Ray worker) does not report their
    peak as this job's. Returns whether it could."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _peak_mem_mb(since_reset: bool = False) -> float:
    """Peak resident memory in MiB: since :func:`_reset_peak_mem` when it worked, else the
    process's lifetime peak (``ru_maxrss``)."""
    if since_reset:
        try:
            with open("/proc/self/status") as fh:
                for line in fh:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) / 1024.0  # kB
        except OSError:
            pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _check_prediction(pred: Any, start: Marginal, times: Sequence[float]) -> Prediction:
    if not isinstance(pred, Prediction):
        raise TypeError(f"predict returned {type(pred).__name__}, expected harness.protocol.Prediction")
    if len(pred.samples) != len(times):
        raise ValueError(f"predict returned {len(pred.samples)} sample arrays for {len(times)} times")
    for t, s in zip(times, pred.samples):
        if s.shape != start.x.shape:
            raise ValueError(f"predict at t={t}: shape {s.shape}, expected {start.x.shape}")
    finite = all(np.all(np.isfinite(s)) for s in pred.samples)
    if pred.weights is not None:
        if len(pred.weights) != len(times) or any(w.shape != (start.n,) for w in pred.weights):
            raise ValueError("predict returned weights of the wrong shape")
        finite = finite and all(np.all(np.isfinite(w)) for w in pred.weights)
        if finite and any(np.any(w < 0) or w.sum() <= 0 for w in pred.weights):
            raise ValueError("predict returned negative or all-zero weights")
    if not finite:
        raise DivergedError("the method returned non-finite samples")
    return pred


def _split_learned(learned: dict) -> tuple[dict, dict]:
    """Scalars go into the row; lists (curves) go into the job's artifact file."""
    scalars, curves = {}, {}
    for k, v in (learned or {}).items():
        if isinstance(v, (list, tuple, np.ndarray)):
            curves[k] = v
        else:
            scalars[k] = v
    return scalars, curves


class _Tee(io.TextIOBase):
    """A text stream that writes through to several (the job's stderr and its log file)."""

    def __init__(self, *streams):
        self.streams = streams

    def write(self, s: str) -> int:
        for st in self.streams:
            try:
                st.write(s)
                st.flush()  # a worker killed a moment later must not lose the line
            except (OSError, ValueError):
                pass
        return len(s)


@contextlib.contextmanager
def _stderr_to_log(path: str | None):
    """Copy everything the job writes to ``sys.stderr`` into its log file (appended per attempt).
    Under Ray, workers' output does not reach the driver's terminal: the log is where a long
    fit's progress can be followed (``tail -f``). A log that cannot be opened is skipped."""
    fh = None
    if path:
        try:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            fh = open(path, "a", encoding="utf-8")
        except OSError:
            fh = None
    if fh is None:
        yield
        return
    fh.write(f"--- attempt started {time.strftime('%Y-%m-%d %H:%M:%S')} on {os.uname().nodename}, "
             f"pid {os.getpid()}\n")
    fh.flush()
    try:
        with contextlib.redirect_stderr(_Tee(sys.stderr, fh)):
            yield
    finally:
        fh.close()


def run_job(job: Job, num_threads: int = 1, device: str = "cpu") -> dict:
    """Run one job and return ``{"job": job_row, "targets": [target rows], "curves": {...},
    "predictions": {"<query>/times": ..., "<query>/samples": (T, n, d) float32, ...}}``.

    Never raises for a failure of the task or the method: it returns a row with the status.
    What the job writes to stderr is also appended to ``job.log_path`` when it is set.
    """
    with _stderr_to_log(job.log_path):
        return _run_job(job, num_threads, device)


def _run_job(job: Job, num_threads: int, device: str) -> dict:
    from harness import metrics, registry

    _set_threads(num_threads)
    keep_freed_memory()
    own_peak = _reset_peak_mem()
    started = time.time()
    base = _row_base(job, device)
    job_row: dict[str, Any] = {**base, "row_type": "job", "status": "ok", "error": None, "traceback": None}
    target_rows: list[dict] = []
    curves: dict = {}
    predictions: dict[str, np.ndarray] = {}
    phase = "setup"
    fit_s = predict_s = 0.0
    try:
        task_cls = registry.tasks.load(job.family)
        method_cls = registry.methods.load(job.method)
        task = task_cls(job.variant, seed=job.seed, data_dir=job.data_dir)
        phase = "data"
        data = task.train_data()
        queries = task.queries()
        data = method_cls.capabilities.shown(data)  # only a method marked (v) may see velocities
        method = method_cls(job.hparams, seed=job.seed, device=device)
        if job.checkpoint_path:
            method.checkpoint_path = Path(job.checkpoint_path)
        caps = method_cls.capabilities
        if caps.requires_simulator:
            sim = task.simulator()
            if sim is None:
                raise PopbenchError(f"{job.method} needs a simulator and {job.task} has none")
            method.attach_simulator(sim)
        phase = "fit"
        t0 = time.perf_counter()
        method.fit(data)
        fit_s = time.perf_counter() - t0
        _set_threads(num_threads)  # fit imported the framework: pin it for predict too
        cells: dict[TableColumn, float] = {}
        phase = "predict"
        starts_had_velocities = False
        for qi, q in enumerate(queries):
            start, times = q.request()
            start = caps.shown(start)
            starts_had_velocities |= start.v is not None
            ask = [
                (caps.interpolate if target_within_training(t, data) else caps.forecast) for t in times
            ]
            asked_times = [t for t, a in zip(times, ask) if a]
            qseed = int(np.random.SeedSequence([job.seed, qi]).generate_state(1)[0])
            pred = None
            if asked_times:
                t0 = time.perf_counter()
                pred = _check_prediction(method.predict(start, asked_times, seed=qseed), start, asked_times)
                predict_s += time.perf_counter() - t0
                predictions[f"{q.name}/times"] = np.asarray(asked_times)
                predictions[f"{q.name}/samples"] = np.stack(pred.samples).astype(np.float32)
                if pred.weights is not None:
                    predictions[f"{q.name}/weights"] = np.stack(pred.weights).astype(np.float32)
            w1s: list[float] = []
            k = 0
            phase = "score"
            for tg, a in zip(q.targets, ask):
                row = {
                    **base,
                    "row_type": "target",
                    "query": q.name,
                    "query_kind": q.kind,
                    "group": tg.group,
                    "t": tg.t,
                    "index": tg.index,
                    "status": "ok",
                }
                if a:
                    weights = pred.weights[k] if pred.weights is not None else None
                    row.update(metrics.all_metrics(pred.samples[k], tg.x, weights))
                    row["weighted"] = weights is not None
                    k += 1
                    w1s.append(row["w1"])
                else:
                    row.update({"w1": None, "w2": None, "mmd": None, "status": "skipped",
                                "error": "the method cannot " + ("interpolate" if target_within_training(tg.t, data) else "forecast")})
                    w1s.append(math.nan)
                target_rows.append(row)
            phase = "predict"
            cells.update(task.summarize(q, w1s))
        cells.update(task.extra_columns(cells))
        job_row["cells"] = [
            {"group": c.group, "key": c.key, "paper_variant": c.paper_variant, "value": v}
            for c, v in cells.items()
            if v is not None and math.isfinite(v)
        ]
        scalars, curves = _split_learned(method.learned())
        job_row["learned"] = scalars
        if scalars.get("training_complete") is False:  # scored, but not the configured run
            done, target = scalars.get("iterations"), scalars.get("iterations_target")
            job_row.update(status="partial", error=(
                f"training stopped early by {', '.join(method_cls.budget_keys) or 'a budget'}"
                + (f" at iteration {done:,} of {target:,}" if isinstance(done, int) and isinstance(target, int) else "")
                + "; rerun the same command to continue it"))
        # (v) only when velocities reached the method: a velocity-reading method on a task without
        # them (eb300) used none
        job_row["used_velocities"] = bool(method.used_velocities) and starts_had_velocities
    except DivergedError as exc:
        job_row.update(status="diverged", error=str(exc), traceback=traceback.format_exc())
        target_rows, predictions = [], {}
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - every failure becomes a row (sys.exit in a method too)
        msg = f"{type(exc).__name__} during {phase}: {exc}"
        job_row.update(status="failed", error=msg, traceback=traceback.format_exc())
        target_rows, predictions = [], {}
    job_row.update(
        fit_s=fit_s,
        predict_s=predict_s,
        wall_s=time.time() - started,
        peak_mem_mb=_peak_mem_mb(own_peak),
        finished_at=time.time(),
    )
    if device.startswith("cuda") and "torch" in sys.modules:
        try:
            import torch

            job_row["peak_gpu_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
        except Exception:
            pass
    job_row["hardware"] = hardware(device)
    return {"job": job_row, "targets": target_rows, "curves": curves, "predictions": predictions}


def hardware(device: str) -> str:
    """What ran the job, for the tables' captions: ``"2-core CPU"``, or the GPU's name (asked of
    the framework the job loaded, after the job, so that nothing is imported for it)."""
    if not device.startswith("cuda"):
        return f"{os.cpu_count() or 0}-core CPU"
    index = int(device.partition(":")[2] or 0)
    try:
        if "torch" in sys.modules:
            import torch

            return torch.cuda.get_device_name(index)
        if "jax" in sys.modules:
            import jax

            return jax.devices("gpu")[index].device_kind
    except Exception:  # noqa: BLE001 - a caption must not fail a job
        pass
    return "GPU"


def _row_base(job: Job, device: str) -> dict:
    """The fields every row of one attempt of a job carries."""
    return {
        "job_id": job.job_id,
        "attempt_id": uuid.uuid4().hex[:12],
        "task": job.family,
        "variant": job.variant,
        "method": job.method,
        "profile": job.profile,
        "seed": job.seed,
        "hparams": job.hparams,
        "hparams_hash": job.hparams_hash,
        "device": device,
        "host": os.uname().nodename,
        "pid": os.getpid(),
    }


def failure_result(job: Job, status: str, error: str, tb: str | None = None, device: str = "cpu") -> dict:
    """A result for a job that never returned (timeout, dead worker)."""
    row = {**_row_base(job, device), "row_type": "job", "status": status, "error": error, "traceback": tb,
           # the driver writes this row: it can count a CPU's cores but not name a worker's GPU
           "finished_at": time.time(), "hardware": hardware(device) if device == "cpu" else "GPU"}
    return {"job": row, "targets": [], "curves": {}}


OnResult = Callable[[Job, dict], None]
Admit = Callable[[Job], bool]
"""Asked just before a job starts; False skips it (another process runs it, or ran it meanwhile)."""


def _admit_all(job: Job) -> bool:
    return True


# --------------------------------------------------------------------------------------------
# Serial executor


def local_gpus() -> int:
    """GPUs visible to this process (asks torch only when it is installed; 0 otherwise)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) == "":
        return 0
    try:
        import importlib.util

        if importlib.util.find_spec("torch") is None:
            return 0
        import torch

        return int(torch.cuda.device_count())
    except Exception:
        return 0


def _exit_with_driver(driver_pid: int) -> None:
    """End this job's process when the driver does, even when it is killed outright (SIGKILL, the
    OOM killer): the job runs in a forkserver child, which the driver's death does not reach, and
    it would train on with its claim released while a rerun starts the same job into the same
    checkpoint. A daemon thread waits on the driver (a pidfd on Linux, else a 1 s poll)."""
    import threading

    def wait_pidfd(fd: int) -> None:
        import select

        select.select([fd], [], [])
        os._exit(1)

    def poll() -> None:
        while True:
            time.sleep(1.0)
            try:
                os.kill(driver_pid, 0)
            except ProcessLookupError:
                os._exit(1)
            except PermissionError:
                pass

    try:
        target, args = wait_pidfd, (os.pidfd_open(driver_pid),)
    except (AttributeError, OSError):  # no pidfd here, or the driver is already gone
        target, args = poll, ()
    threading.Thread(target=target, args=args, daemon=True, name="exit-with-driver").start()


def _child_main(job: Job, device: str, env: dict, conn, driver_pid: int) -> None:  # a forkserver child
    _exit_with_driver(driver_pid)
    os.environ.update(env)
    try:
        conn.send(run_job(job, num_threads=int(os.environ.get("POPBENCH_THREADS", "1")), device=device))
    except BaseException as exc:  # noqa: BLE001
        conn.send(failure_result(job, "failed", f"{type(exc).__name__}: {exc}", traceback.format_exc(), device))
    finally:
        conn.close()


class SerialExecutor:
    """One job at a time. In this process, or in a killable child process when ``timeout`` is set.

    A job whose method declares ``num_gpus`` runs on ``cuda`` when this machine has a GPU (checked
    once, lazily); every other job runs on the CPU with ``JAX_PLATFORMS=cpu``.
    """

    name = "serial"

    def __init__(self, timeout: float | None = None, num_threads: int = 1):
        self.timeout = timeout
        self.num_threads = max(1, int(num_threads))  # 1 = what a Ray job gets: serial and Ray agree
        self._gpus: int | None = None

    def placement(self, job: Job) -> tuple[str, dict]:
        if job.num_gpus > 0:
            if self._gpus is None:
                self._gpus = local_gpus()
            if self._gpus > 0:
                return "cuda", dict(GPU_ENV)
        return "cpu", dict(CPU_ENV)

    def run(self, jobs: Sequence[Job], on_result: OnResult, admit: Admit = _admit_all) -> None:
        if self._gpus is None and any(j.num_gpus > 0 for j in jobs):
            self._gpus = local_gpus()  # before a CPU job's environment could hide the GPUs
        restore = _sigterm_as_interrupt()  # a stopped driver must not leave a job process behind
        try:
            for job in jobs:
                if not admit(job):
                    continue
                device, env = self.placement(job)
                if self.timeout is None:
                    # in this process: hide the GPUs from a CPU job only when no job will use one
                    # (once hidden, this process's torch never sees them again), and only before a
                    # framework is loaded (it would not see the change after)
                    if device != "cpu" or (not self._gpus and "torch" not in sys.modules
                                           and "jax" not in sys.modules):
                        os.environ.update(env)
                    on_result(job, run_job(job, num_threads=self.num_threads, device=device))
                else:
                    on_result(job, self._run_in_child(job, device, env))
        finally:
            restore()

    def _run_in_child(self, job: Job, device: str, env: dict) -> dict:
        import multiprocessing as mp

        ctx = mp.get_context("forkserver")  # a clean server process, forked per job: fast and thread-safe
        ctx.set_forkserver_preload(["harness._preload"])
        parent, child = ctx.Pipe(duplex=False)
        os.environ["POPBENCH_THREADS"] = str(self.num_threads)
        proc = ctx.Process(target=_child_main, args=(job, device, env, child, os.getpid()), daemon=True)
        proc.start()
        child.close()
        from multiprocessing.connection import wait

        deadline = time.monotonic() + self.timeout
        result = None
        try:
            while result is None and time.monotonic() < deadline:
                ready = wait([parent, proc.sentinel], timeout=max(0.0, deadline - time.monotonic()))
                if parent in ready:
                    try:
                        result = parent.recv()
                    except EOFError:
                        break
                elif proc.sentinel in ready:
                    if parent.poll(0.1):  # the result may have arrived just before the exit
                        continue
                    break
            timed_out = result is None and time.monotonic() >= deadline
            proc.join(0 if timed_out else 5)  # a dead child's exit status may lag behind its closed pipe
        finally:  # also when the driver is interrupted: the job's process (a forkserver child) dies with it
            if proc.is_alive():
                proc.kill()
                proc.join(5)
        if timed_out:
            return failure_result(job, "timeout", f"stopped after the {self.timeout:g} s timeout", device=device)
        if result is None:
            return failure_result(job, "failed", f"the job's process died (exit code {proc.exitcode})", device=device)
        return result


# --------------------------------------------------------------------------------------------
# Ray executor


def _ray_job(job: Job, device: str) -> dict:
    return run_job(job, num_threads=1, device=device)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def _sigterm_as_interrupt() -> Callable[[], None]:
    """Make SIGTERM stop this driver the way Ctrl-C does; returns a function that undoes it.

    ``ray.init`` installs Abseil's C-level failure handler for SIGTERM, which dumps a crash report
    ("*** SIGTERM received ... PC: @ ...") over the terminal when a batch system or ``timeout``
    stops a sweep. Raised as KeyboardInterrupt instead, the sweep stops like an interrupted one:
    finished jobs are already stored, the CLI says how to resume, Ray shuts down at exit. Only the
    main thread can own signal handlers; elsewhere this does nothing.
    """
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    # a handler installed from C (Ray's) reads back as None and cannot be reinstalled from Python:
    # the default (terminate quietly) replaces it then
    return lambda: signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


NEEDS_RAY = ("parallel jobs (--workers > 1, --executor ray, --address) need Ray: pip install -e '.[ray]', "
             "or use --workers 1")


class RayExecutor:
    """Jobs as Ray tasks (``--executor ray``); ``address`` joins an existing cluster. At most
    ``workers`` jobs run at once (``None``: as many as the cluster has CPUs)."""

    name = "ray"

    def __init__(self, workers: int | None = 2, address: str | None = None, timeout: float | None = None, ray_init: dict | None = None):
        self.workers = workers
        self.address = address
        self.timeout = timeout
        self.ray_init = ray_init or {}
        self.warnings: list[str] = []

    def _init(self):
        try:
            import ray
        except ImportError as exc:
            raise PopbenchError(NEEDS_RAY) from exc

        if not ray.is_initialized():
            kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "logging_level": "ERROR"}
            if self.address:
                kwargs["address"] = self.address
            else:
                kwargs["num_cpus"] = self.workers or 1
                # Ray nices its workers (15) by default; here they are the benchmark itself, and
                # niced jobs starve behind any foreground process (fit times, max_minutes budgets)
                kwargs["_system_config"] = {"worker_niceness": 0}
            kwargs.update(self.ray_init)
            # the harness's own modules must be importable by workers (editable or installed)
            ray.init(**kwargs)
        return ray

    def placement(self, job: Job, cluster_gpus: float) -> tuple[dict, str]:
        """Ray options and device for one job (GPU if declared and present, else CPU)."""
        wants = float(job.num_gpus or 0.0)
        if wants > 0 and cluster_gpus > 0:
            env = dict(GPU_ENV)
            return {"num_cpus": 1, "num_gpus": min(wants, cluster_gpus), "runtime_env": {"env_vars": env}, "max_retries": 0}, "cuda"
        if wants > 0:
            msg = (
                f"{job.method} declares num_gpus={wants:g} but the Ray cluster has no GPU: "
                f"running it on the CPU"
            )
            if msg not in self.warnings:
                self.warnings.append(msg)
                warnings.warn(msg, stacklevel=2)
        return {"num_cpus": 1, "num_gpus": 0, "runtime_env": {"env_vars": dict(CPU_ENV)}, "max_retries": 0}, "cpu"

    def run(self, jobs: Sequence[Job], on_result: OnResult, admit: Admit = _admit_all) -> None:
        ray = self._init()
        restore = _sigterm_as_interrupt()
        try:
            self._run(ray, jobs, on_result, admit)
        finally:
            restore()

    def _run(self, ray, jobs: Sequence[Job], on_result: OnResult, admit: Admit) -> None:
        resources = ray.cluster_resources()
        cluster_gpus = float(resources.get("GPU", 0))
        remote = ray.remote(_ray_job)
        pending = [(job, *self.placement(job, cluster_gpus)) for job in jobs]
        inflight: dict[Any, tuple[Job, float, str, float]] = {}
        # Submit only what the cluster can start at once (CPU slots, and GPUs for GPU jobs), so that
        # a submitted job is a running job and --timeout never counts time spent in Ray's queue
        # (on a cluster shared with other drivers it still may: their jobs hold resources too).
        cpus = int(resources.get("CPU", self.workers or 1))
        slots = max(1, cpus if self.workers is None else min(self.workers, cpus))
        free_gpus = cluster_gpus

        def finish(ref) -> None:
            nonlocal free_gpus
            job, _, device, gpus = inflight.pop(ref)
            try:
                result = ray.get(ref)
            except Exception as exc:  # worker died, or the task raised outside run_job
                kind = type(exc).__name__
                result = failure_result(job, "failed", f"{kind}: the job's worker died or raised ({exc})"[:2000],
                                        traceback.format_exc(), device)
            free_gpus += gpus
            on_result(job, result)

        while pending or inflight:
            i = 0
            while i < len(pending) and len(inflight) < slots:
                job, opts, device = pending[i]
                if opts["num_gpus"] > free_gpus + 1e-9:
                    i += 1  # waits for a GPU; CPU jobs behind it may start
                    continue
                pending.pop(i)
                if not admit(job):
                    continue
                free_gpus -= opts["num_gpus"]
                ref = remote.options(**opts).remote(job, device)
                inflight[ref] = (job, time.monotonic(), device, opts["num_gpus"])
            if not inflight and not pending:  # the rest were not admitted
                break
            if not inflight:  # cannot happen: placement caps a job's GPUs at the cluster's
                raise RuntimeError(f"no job of {len(pending)} fits the Ray cluster ({resources})")
            ready, _ = ray.wait(list(inflight), num_returns=len(inflight), timeout=0.5)
            for ref in ready:  # every job that finished, not one per pass
                finish(ref)
            if self.timeout is not None:
                now = time.monotonic()
                for ref, (job, t_start, device, gpus) in list(inflight.items()):
                    if now - t_start <= self.timeout:
                        continue
                    if ray.wait([ref], timeout=0)[0]:  # finished since the wait above: keep its result
                        finish(ref)
                        continue
                    ray.cancel(ref, force=True)
                    inflight.pop(ref)
                    free_gpus += gpus
                    on_result(job, failure_result(job, "timeout", f"stopped after the {self.timeout:g} s timeout",
                                                  device=device))


def job_to_dict(job: Job) -> dict:
    return asdict(job)
