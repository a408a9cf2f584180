"""Jobs and executors.

A :class:`Job` is (task variant, method, profile, seed) plus its resolved hyperparameters.
:func:`run_job` executes one job wherever it lands (the driver, a Ray worker): build the task and
its training data, hand the training data to the method, let it fit, and only then build the
queries' targets; ask the method for each query's predictions (it receives the start marginal and
the target times), score each target with exact W1 (plus W2 and energy MMD) on the CPU, and return
result rows. It never raises for a method's fault: a raising method gives a ``failed`` row,
non-finite or astronomically large samples a ``diverged`` row, each with the reason and the
traceback. :func:`run_jobs` does the same for jobs that train on the same data (a *unit*, e.g. the
two Boids variants of one method and seed): one fit, then every job's queries, each job's own rows.

The method runs in a process of its own (``isolate=True``, what both executors do): a fork-server
child that receives the training data and, after ``fit``, the start marginals and times, and
never a task, a query or a target. So a method cannot find a held-out marginal by inspecting its
process, and a method that crashes, calls ``os._exit`` or is killed by the kernel fails its own
job while the sweep goes on. ``isolate=False`` runs it in the calling process (a debugger's way):
it still fits before any target is built, but shares the process with the task.

Executors run a list of jobs (or units) and hand each finished job's rows to a callback (the store):

- :class:`SerialExecutor`: one job (unit) after the other; with a timeout, a method still running when
  its time is up is killed. ``isolate=False`` (``--executor inline``): everything in this process.
- :class:`RayExecutor`: jobs (units) as Ray tasks, at most ``workers`` in flight, one CPU each. Jobs whose
  method declares ``num_gpus`` ask Ray for GPUs when the cluster has them and fall back to the CPU
  with a warning when it has none (a GPU request on a GPU-less cluster would wait forever). CPU jobs
  get ``JAX_PLATFORMS=cpu`` and an empty ``CUDA_VISIBLE_DEVICES``; GPU jobs get
  ``XLA_PYTHON_CLIENT_PREALLOCATE=false``. A job past its timeout is cancelled with
  ``ray.cancel(force=True)``, which kills its worker process (and the method's with it). A cluster
  the executor starts itself is watched by a small reaper process (:func:`start_reaper`) that
  ends its processes if the driver is killed outright.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import pickle
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
    TrainData,
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


MAX_ABS = 1e30
"""Predicted coordinates beyond this magnitude make a job ``diverged``: finite, but the squared
distances of W2 overflow long before float64 does, and the stored float32 samples would not hold
them."""


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
    big = max((float(np.max(np.abs(s))) for s in pred.samples if s.size), default=0.0)
    if big > MAX_ABS:
        raise DivergedError(f"the method returned samples as large as {big:.3g} (beyond {MAX_ABS:g}, where no "
                            "distance between populations means anything)")
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
def _stderr_to_log(path: str | None, header: bool = True):
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
    if header:
        fh.write(f"--- attempt started {time.strftime('%Y-%m-%d %H:%M:%S')} on {os.uname().nodename}, "
                 f"pid {os.getpid()}\n")
        fh.flush()
    try:
        with contextlib.redirect_stderr(_Tee(sys.stderr, fh)):
            yield
    finally:
        fh.close()


class MethodFailure(Exception):
    """A method's exception, relayed from its process: type name, message, traceback text."""

    def __init__(self, kind: str, message: str, tb: str, diverged: bool = False):
        super().__init__(message)
        self.kind, self.message, self.tb, self.diverged = kind, message, tb, diverged


class MethodDied(Exception):
    """The method's process ended without answering (``os._exit``, a signal, the OOM killer)."""


class MethodTimeout(Exception):
    """The method was still running when the job's time was up (its process is killed)."""


def _failure_info(exc: BaseException, prefix: str = "") -> dict:
    return {"kind": type(exc).__name__, "message": prefix + str(exc), "tb": traceback.format_exc(),
            "diverged": isinstance(exc, DivergedError)}


def _read_only(obj: Any) -> Any:
    """Training data and start marginals as the method gets them in any process: read-only arrays
    (unpickling makes arrays writable again)."""
    if isinstance(obj, TrainData):
        for m in obj.marginals:
            _read_only(m)
    elif isinstance(obj, Marginal):
        for a in (obj.x, obj.v):
            if a is not None and a.flags.writeable:
                a.setflags(write=False)
    return obj


class _MethodSide:
    """The method's half of a job, in whichever process hosts it. It is given the simulator (the
    oracle only), the training data, then start marginals and times: never a task or a target."""

    def __init__(self, job: Job, device: str, num_threads: int):
        self.job, self.device, self.num_threads = job, device, num_threads
        self.method: Any = None
        self.own_peak = False

    def setup(self, simulator: Any) -> None:
        from harness import registry

        _set_threads(self.num_threads)
        keep_freed_memory()
        self.own_peak = _reset_peak_mem()
        cls = registry.methods.load(self.job.method)
        self.method = cls(self.job.hparams, seed=self.job.seed, device=self.device)
        if self.job.checkpoint_path:
            self.method.checkpoint_path = Path(self.job.checkpoint_path)
        if simulator is not None:
            self.method.attach_simulator(simulator)

    def fit(self, data: TrainData) -> float:
        t0 = time.perf_counter()
        self.method.fit(data)
        _set_threads(self.num_threads)  # fit imported the framework: pin it for predict too
        return time.perf_counter() - t0

    def predict(self, start: Marginal, times: list[float], seed: int) -> tuple[Any, float]:
        t0 = time.perf_counter()
        pred = self.method.predict(start, times, seed=seed)
        return pred, time.perf_counter() - t0

    def learned(self) -> tuple[dict, bool]:
        return dict(self.method.learned() or {}), bool(self.method.used_velocities)

    def resources(self) -> dict:
        out: dict[str, Any] = {"peak_mem_mb": _peak_mem_mb(self.own_peak), "hardware": hardware(self.device)}
        if self.device.startswith("cuda") and "torch" in sys.modules:
            try:
                import torch

                out["peak_gpu_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
            except Exception:  # noqa: BLE001 - a number for the row, never a failure
                pass
        return out


class _InProcess:
    """The method in the calling process (``isolate=False``)."""

    def __init__(self, job: Job, device: str, num_threads: int, env: dict | None = None,
                 timeout: float | None = None):
        self.side = _MethodSide(job, device, num_threads)

    def call(self, name: str, *args: Any) -> Any:
        return getattr(self.side, name)(*args)

    def resources(self) -> dict:
        return self.side.resources()

    def close(self) -> None:
        pass


def _host_main(conn, job: Job, device: str, num_threads: int, env: dict, parent_pid: int) -> None:
    """A method's own process (a fork-server child): answer the job process's calls until told to stop."""
    import signal

    _exit_with_driver(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the job process, which ends this one
    os.environ.clear()
    os.environ.update(env)
    with _stderr_to_log(job.log_path, header=False):
        side = _MethodSide(job, device, num_threads)
        while True:
            try:
                name, args = conn.recv()
            except (EOFError, OSError):
                return
            if name == "exit":
                return
            try:
                reply = ("ok", getattr(side, name)(*(_read_only(a) for a in args)))
            except BaseException as exc:  # noqa: BLE001 - sys.exit in a method too: relayed as a failure
                reply = ("raise", _failure_info(exc))
            try:
                conn.send(reply)
            except Exception as exc:  # noqa: BLE001 - pickled before anything is written: the pipe is clean
                conn.send(("raise", _failure_info(exc, f"{name}() returned a value that cannot leave the "
                                                       "method's process: ")))


_PRELOAD: list[str] = []


def preload(frameworks: Sequence[str]) -> None:
    """Frameworks for the fork server of the methods' processes to import once, before it starts
    (later calls change nothing), so that each job's process starts with them loaded. Only torch:
    importing it starts no CUDA, so a forked child still gets its own device and threads; JAX reads
    ``JAX_PLATFORMS`` when it is imported, which must happen in the child, after its environment."""
    for f in frameworks:
        if f == "torch" and f not in _PRELOAD:
            _PRELOAD.append(f)


class _ChildProcess:
    """The method in a process of its own (``isolate=True``): it receives only what the method may
    see; its death fails the job, not the process running the job; ``timeout`` (seconds, from its
    start) kills it."""

    def __init__(self, job: Job, device: str, num_threads: int, env: dict | None = None,
                 timeout: float | None = None):
        import multiprocessing as mp

        # a clean server process, forked per job: fast and thread-safe. It imports the harness and
        # the frameworks of the jobs ahead (``preload``) once; a job's own imports come after.
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["harness.runner", *_PRELOAD])
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_host_main, args=(child, job, device, num_threads,
                                                          {**os.environ, **(env or {})}, os.getpid()))
        self.proc.start()
        child.close()
        self.timeout = timeout
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.dead = self.busy = False

    def call(self, name: str, *args: Any) -> Any:
        from multiprocessing.connection import wait

        if self.dead:
            raise MethodDied("it had already ended")
        self.busy = True  # until it answers: an interrupted call leaves it busy (and never asked again)
        try:
            self.conn.send((name, args))
        except (BrokenPipeError, ConnectionResetError, EOFError):
            self._died()
        while True:
            left = None if self.deadline is None else self.deadline - time.monotonic()
            if left is not None and left <= 0:
                self.close()
                raise MethodTimeout(f"stopped after the {self.timeout:g} s timeout")
            ready = wait([self.conn, self.proc.sentinel], timeout=left)
            if self.conn in ready:
                try:
                    kind, value = self.conn.recv()
                except (EOFError, OSError):
                    self._died()
                self.busy = False
                if kind == "ok":
                    return value
                raise MethodFailure(**value)
            if self.proc.sentinel in ready and not self.conn.poll(0.1):  # an answer may precede the exit
                self._died()

    def _died(self) -> None:
        self.proc.join(5)  # its exit status may lag behind its closed pipe
        self.dead = True
        code = self.proc.exitcode
        if code is not None and code < 0:
            import signal

            try:
                how = f"killed by {signal.Signals(-code).name}"
            except ValueError:
                how = f"killed by signal {-code}"
        else:
            how = f"exit code {code}"
        raise MethodDied(how)

    def resources(self) -> dict:
        if self.dead or self.busy:
            return {}
        try:
            return self.call("resources")
        except Exception:  # noqa: BLE001 - a number for the row, never a failure
            return {}

    def close(self) -> None:
        if not self.dead and not self.busy and self.proc.is_alive():  # idle: let it end by itself
            try:
                self.conn.send(("exit", ()))
                self.proc.join(1)
            except OSError:
                pass
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)
        self.dead = True
        self.conn.close()


def _storable(scalars: dict, curves: dict) -> None:
    """Raise a one-sentence TypeError unless every learned value can go into a JSON row."""
    from harness.store import dumps

    for key, value in {**scalars, **curves}.items():
        try:
            dumps(value)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"learned() returned {key!r} as a {type(value).__name__}, which a result row cannot "
                            f"store as JSON ({exc}); return numbers, strings, or lists and dicts of them") from None


def run_job(job: Job, num_threads: int = 1, device: str = "cpu", *, isolate: bool = False,
            timeout: float | None = None, env: dict | None = None) -> dict:
    """Run one job and return ``{"job": job_row, "targets": [target rows], "curves": {...},
    "predictions": {"<query>/times": ..., "<query>/samples": (T, n, d) float32, ...}}``.

    ``isolate``: the method runs in a process of its own that never receives a target (see the
    module docstring), with ``env`` added to its environment and killed after ``timeout`` seconds;
    otherwise in this process (no timeout). Never raises for a failure of the task or the method:
    it returns a row with the status. What the job writes to stderr is also appended to
    ``job.log_path`` when it is set.
    """
    (result,) = run_jobs([job], num_threads, device, isolate=isolate, timeout=timeout, env=env)
    return result


def run_jobs(jobs: Sequence[Job], num_threads: int = 1, device: str = "cpu", *, isolate: bool = False,
             timeout: float | None = None, env: dict | None = None,
             on_result: Callable[[Job, dict], None] | None = None) -> list[dict]:
    """Run jobs that may share a fit (a *unit*, see :func:`harness.sweep.fit_key`); return one
    result per job, as :func:`run_job` does, in order, and hand each to ``on_result`` as soon as
    it is complete.

    Jobs of one method, settings and seed whose training data are equal (as the method sees them:
    times, arrays, pairing; and the simulator for a method given one) are fitted once: one method,
    one ``fit``, then each job's queries answered by that fitted method, each job with its own rows
    and timings. Its ``fit_s`` counts the fit on the job that ran it and is 0 on the others; every
    such row lists the other jobs in ``fit_shared_with``. The fit continues the checkpoint of the
    first job that has one (else writes the first job's); a failed fit fails every job sharing it
    with the same reason. ``timeout`` is per job: a fit shared by k jobs may run k times it. The
    method still receives only the training data, then start marginals and times."""
    if timeout is not None and not isolate:
        raise ValueError("a timeout needs the method in a process of its own (isolate=True)")
    results: dict[int, dict] = {}

    def finish(member: _Member, used: dict) -> None:
        results[member.i] = member.result(used)
        if on_result is not None:
            on_result(member.job, results[member.i])

    ready: list[_Member] = []
    for i, job in enumerate(jobs):
        member = _Member(i, job, device)
        with member.logged():
            member.prepare()
        if member.failed:
            finish(member, {})
        else:
            ready.append(member)
    fits: dict[str, list[_Member]] = {}
    for member in ready:
        fits.setdefault(member.fit_identity() if len(ready) > 1 else "", []).append(member)
    for group in fits.values():
        _fit_and_answer(group, num_threads, device, isolate, timeout, env, finish)
    return [results[i] for i in range(len(jobs))]


class _Member:
    """One job of a unit on the job's side: its task, the training data its method sees, its rows."""

    def __init__(self, i: int, job: Job, device: str):
        self.i, self.job, self.device = i, job, device
        self.base = _row_base(job, device)
        self.row: dict[str, Any] = {**self.base, "row_type": "job", "status": "ok", "error": None, "traceback": None}
        self.targets: list[dict] = []
        self.curves: dict = {}
        self.predictions: dict[str, np.ndarray] = {}
        self.phase = "setup"
        self.fit_s = self.predict_s = self.wall_s = 0.0
        self.failed = False
        self.opened = False
        self.task = self.method_cls = self.caps = self.data = self.sim = None

    @contextlib.contextmanager
    def logged(self):
        """This job's stderr copied into its log (the header once per attempt); its wall time counted."""
        t0 = time.time()
        try:
            with _stderr_to_log(self.job.log_path, header=not self.opened):
                self.opened = True
                yield
        finally:
            self.wall_s += time.time() - t0

    def fail(self, info: dict) -> None:
        self.failed = True
        self.targets, self.predictions, self.curves = [], {}, {}
        self.row.update(info)

    def prepare(self) -> None:
        """The task and the training data (built before anything else of the job)."""
        from harness import registry

        job = self.job
        try:
            task_cls = registry.tasks.load(job.family)
            self.method_cls = registry.methods.load(job.method)
            self.caps = self.method_cls.capabilities
            self.task = task_cls(job.variant, seed=job.seed, data_dir=job.data_dir)
            self.phase = "data"
            self.data = self.caps.shown(self.task.train_data())  # only a method marked (v) may see velocities
            if self.caps.requires_simulator:
                self.sim = self.task.simulator()
                if self.sim is None:
                    raise PopbenchError(f"{job.method} needs a simulator and {job.task} has none")
        except (Exception, SystemExit) as exc:  # noqa: BLE001 - every failure becomes a row
            self.fail(_failed(exc, self.phase))

    def fit_identity(self) -> str:
        """What a fit depends on: method, settings (budgets too), seed, and the training data and
        simulator as the method gets them (not the variant's name)."""
        h = hashlib.sha256()
        d = self.data
        h.update(json.dumps([self.job.method, self.job.profile, self.job.seed, self.job.hparams, d.family, d.paired],
                            sort_keys=True, default=str).encode())
        for m in d.marginals:
            h.update(json.dumps([m.t, m.index, m.x.shape, m.v is not None]).encode())
            h.update(np.ascontiguousarray(m.x).tobytes())
            if m.v is not None:
                h.update(np.ascontiguousarray(m.v).tobytes())
        if self.sim is not None:
            h.update(pickle.dumps(self.sim))
        return h.hexdigest()

    def answer(self, host: Any) -> None:
        """Ask the fitted method for this job's queries and score them (raises on a failure)."""
        from harness import metrics

        job, task, data, caps, base = self.job, self.task, self.data, self.caps, self.base
        self.phase = "data"
        queries = task.queries()  # the targets exist from here on: the method has fitted
        cells: dict[TableColumn, float] = {}
        starts_had_velocities = False
        for qi, q in enumerate(queries):
            self.phase = "predict"
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
                raw, seconds = host.call("predict", start, asked_times, qseed)
                self.predict_s += seconds
                pred = _check_prediction(raw, start, asked_times)
                self.predictions[f"{q.name}/times"] = np.asarray(asked_times)
                self.predictions[f"{q.name}/samples"] = np.stack(pred.samples).astype(np.float32)
                if pred.weights is not None:
                    self.predictions[f"{q.name}/weights"] = np.stack(pred.weights).astype(np.float32)
            w1s: list[float] = []
            k = 0
            self.phase = "score"
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
                self.targets.append(row)
            cells.update(task.summarize(q, w1s))
        cells.update(task.extra_columns(cells))
        self.row["cells"] = [
            {"group": c.group, "key": c.key, "paper_variant": c.paper_variant, "value": v}
            for c, v in cells.items()
            if v is not None and math.isfinite(v)
        ]
        self.phase = "learned"
        learned, used_velocities = host.call("learned")
        scalars, self.curves = _split_learned(learned)
        _storable(scalars, self.curves)
        self.row["learned"] = scalars
        if scalars.get("training_complete") is False:  # scored, but not the configured run
            budget_keys = self.method_cls.budget_keys
            done, target = scalars.get("iterations"), scalars.get("iterations_target")
            self.row.update(status="partial", error=(
                f"training stopped early by {', '.join(budget_keys) or 'a budget'}"
                + (f" at iteration {done:,} of {target:,}" if isinstance(done, int) and isinstance(target, int) else "")
                + "; rerun the same command to continue it"))
        # (v) only when velocities reached the method: a velocity-reading method on a task without
        # them (eb300) used none
        self.row["used_velocities"] = used_velocities and starts_had_velocities

    def result(self, used: dict) -> dict:
        self.row.update(
            fit_s=self.fit_s,
            predict_s=self.predict_s,
            wall_s=self.wall_s,
            peak_mem_mb=used.get("peak_mem_mb"),
            finished_at=time.time(),
        )
        if "peak_gpu_mem_mb" in used:
            self.row["peak_gpu_mem_mb"] = used["peak_gpu_mem_mb"]
        self.row["hardware"] = used.get("hardware") or hardware(self.device)
        return {"job": self.row, "targets": self.targets, "curves": self.curves, "predictions": self.predictions}


def _note_in_log(path: str | None, text: str) -> None:
    """A line in a job's log only (not on the terminal the job's stderr also reaches)."""
    if path:
        try:
            with open(path, "a", encoding="utf-8") as fh:
                fh.write(text + "\n")
        except OSError:
            pass


def _fit_and_answer(group: list[_Member], num_threads: int, device: str, isolate: bool, timeout: float | None,
                    env: dict | None, finish: Callable[[_Member, dict], None]) -> None:
    """One fit for the jobs of ``group`` (equal fit identities), then each job's queries."""
    # the fit continues a checkpoint one of its jobs left (an attempt before they shared), else
    # writes the first job's: that job's row counts the fit, its log holds the fit's output
    fitter = next((m for m in group if m.job.checkpoint_path and Path(m.job.checkpoint_path).exists()), group[0])
    order = [fitter, *(m for m in group if m is not fitter)]
    if len(order) > 1:
        for m in order:
            m.row["fit_shared_with"] = [o.job.job_id for o in order if o is not m]
    host: Any = None
    used: dict = {}
    try:
        with fitter.logged():
            try:
                fitter.phase = "setup"
                host = (_ChildProcess if isolate else _InProcess)(
                    fitter.job, device, num_threads, env=env, timeout=None if timeout is None else timeout * len(order))
                host.call("setup", fitter.sim)
                fitter.phase = "fit"
                fitter.fit_s = host.call("fit", fitter.data)
            except (Exception, SystemExit) as exc:  # noqa: BLE001 - every failure becomes a row
                failure = _failed(exc, fitter.phase)
                for m in order:  # the same reason for every job of the fit
                    m.fail(failure)
        if fitter.failed:
            used = host.resources() if host is not None else {}
            for m in order:
                finish(m, used)
            return
        ended: dict | None = None  # the failure that ended the method's process, for the jobs after it
        for m in order:
            if m is not fitter:
                _note_in_log(m.job.log_path, f"the fit is shared with {fitter.job.describe()}; its output is in "
                                             f"{fitter.job.log_path}")
            with m.logged():
                if ended is not None:
                    m.fail(ended)
                else:
                    try:
                        m.answer(host)
                    except (Exception, SystemExit) as exc:  # noqa: BLE001 - every failure becomes a row
                        failure = _failed(exc, m.phase)
                        m.fail(failure)
                        if isinstance(exc, (MethodDied, MethodTimeout)):
                            ended = failure
            used = host.resources() or used
            finish(m, used)
    finally:
        if host is not None:
            host.close()


def _failed(exc: BaseException, phase: str) -> dict:
    """A job row's status, error and traceback for an exception out of a job's ``phase``."""
    if isinstance(exc, MethodFailure):
        if exc.diverged:
            return {"status": "diverged", "error": exc.message, "traceback": exc.tb}
        return {"status": "failed", "error": f"{exc.kind} during {phase}: {exc.message}", "traceback": exc.tb}
    if isinstance(exc, MethodTimeout):
        return {"status": "timeout", "error": str(exc), "traceback": None}
    if isinstance(exc, MethodDied):
        return {"status": "failed", "error": f"the method's process died during {phase} ({exc})", "traceback": None}
    if isinstance(exc, DivergedError):
        return {"status": "diverged", "error": str(exc), "traceback": traceback.format_exc()}
    return {"status": "failed", "error": f"{type(exc).__name__} during {phase}: {exc}",
            "traceback": traceback.format_exc()}


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


Unit = tuple[Job, ...]
"""Jobs run together, sharing a fit where their training data are equal (:func:`run_jobs`)."""
OnResult = Callable[[Job, dict], None]
Admit = Callable[[Unit], Unit]
"""Asked just before a unit starts: the jobs of it to run now (another process may run, or have run,
the others; none: the unit is skipped)."""


def _admit_all(unit: Unit) -> Unit:
    return unit


def as_units(items: Sequence[Job | Sequence[Job]]) -> list[Unit]:
    """Executors' input: jobs (each a unit of its own) or units."""
    return [tuple(item) if isinstance(item, (list, tuple)) else (item,) for item in items]


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
    """End a method's process when the process running its job (the driver, a Ray worker) ends,
    even when that is killed outright (SIGKILL, the OOM killer, ``ray.cancel``): the method runs in
    a forkserver child, which that death does not reach, and it would train on with its claim
    released while a rerun starts the same job into the same checkpoint. A daemon thread waits on
    it (a pidfd on Linux, else a 1 s poll)."""
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


class SerialExecutor:
    """One job at a time, each method in a process of its own (``isolate``, the default): a method
    that crashes or ends its process fails its own job, ``timeout`` kills a method still running,
    and the method never holds a held-out target. ``isolate=False`` (``--executor inline``) runs
    everything in this process, for a debugger: no timeout, and a method that ends the process
    ends the sweep.

    A job whose method declares ``num_gpus`` runs on ``cuda`` when this machine has a GPU (checked
    once, lazily); every other job runs on the CPU with ``JAX_PLATFORMS=cpu``.
    """

    name = "serial"

    def __init__(self, timeout: float | None = None, num_threads: int = 1, isolate: bool = True):
        if timeout is not None and not isolate:
            raise PopbenchError("--timeout kills a method in its own process: it cannot with --executor inline")
        self.timeout = timeout
        self.isolate = isolate
        self.num_threads = max(1, int(num_threads))  # 1 = what a Ray job gets: serial and Ray agree
        self._gpus: int | None = None

    def placement(self, job: Job) -> tuple[str, dict]:
        if job.num_gpus > 0:
            if self._gpus is None:
                self._gpus = local_gpus()
            if self._gpus > 0:
                return "cuda", dict(GPU_ENV)
        return "cpu", dict(CPU_ENV)

    def run(self, jobs: Sequence[Job | Sequence[Job]], on_result: OnResult, admit: Admit = _admit_all) -> None:
        """Run ``jobs`` (jobs, or units of jobs that may share a fit), handing each job's result to
        ``on_result`` as soon as it is complete."""
        units = as_units(jobs)
        if self._gpus is None and any(j.num_gpus > 0 for u in units for j in u):
            self._gpus = local_gpus()  # before a CPU job's environment could hide the GPUs
        if self.isolate:
            preload([j.framework for u in units for j in u])
        restore = _sigterm_as_interrupt()  # a stopped driver must not leave a method's process behind
        try:
            for unit in units:
                unit = admit(unit)
                if not unit:
                    continue
                device, env = self.placement(unit[0])  # one method: one placement
                if self.isolate:  # the method's process gets the job's environment, this one keeps its own
                    run_jobs(unit, num_threads=self.num_threads, device=device, isolate=True, timeout=self.timeout,
                             env=env, on_result=on_result)
                    continue
                # in this process: hide the GPUs from a CPU job only when no job will use one (once
                # hidden, this process's torch never sees them again), and only before a framework
                # is loaded (it would not see the change after)
                if device != "cpu" or (not self._gpus and "torch" not in sys.modules and "jax" not in sys.modules):
                    os.environ.update(env)
                run_jobs(unit, num_threads=self.num_threads, device=device, on_result=on_result)
        finally:
            restore()


# --------------------------------------------------------------------------------------------
# Ray executor


def _ray_unit(unit: Unit, device: str) -> list[dict]:
    return run_jobs(unit, num_threads=1, device=device, isolate=True)


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


_REAPER = r"""
import os, select, signal, sys, time

driver, me = int(sys.argv[1]), os.getpid()


def table():
    out = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as fh:
                    f = fh.read().rsplit(")", 1)[1].split()
                out[int(d)] = (int(f[1]), f[19])  # parent pid, start time
            except (OSError, IndexError, ValueError):
                pass
    return out


def below(t, root):
    kids = {}
    for p, (pp, _) in t.items():
        kids.setdefault(pp, []).append(p)
    out, todo = {}, [root]
    while todo:
        for c in kids.get(todo.pop(), []):
            if c != me and c not in out:
                out[c] = t[c][1]
                todo.append(c)
    return out


try:
    fd = os.pidfd_open(driver)
except (AttributeError, OSError):
    fd = None
known = {}
while True:
    t = table()
    if driver not in t:
        break
    known.update(below(t, driver))
    if fd is not None:
        if select.select([fd], [], [], 1.0)[0]:
            break
    else:
        time.sleep(1.0)
t = table()
for p, start in known.items():
    if p in t and t[p][1] == start:  # the same process, not a new one that took its pid
        try:
            os.kill(p, signal.SIGKILL)
        except OSError:
            pass
"""


def start_reaper(driver_pid: int | None = None):
    """Start a small watcher process (its own session, so that a signal to the driver's process
    group spares it) that notes every descendant of ``driver_pid`` (default: this process) once a
    second while it lives, and kills those still running once it is gone. A Ray cluster started by
    ``ray.init`` is such a descendant; when its driver is killed outright (SIGKILL, the OOM killer)
    Ray's own fate-sharing ends the GCS and the raylet but not the agents they started
    (``ray::DashboardAgent``, ``ray::RuntimeEnvAgent``), which would run on. Linux only (``/proc``);
    returns the watcher's ``Popen``, or None where there is no ``/proc``."""
    import subprocess

    if not os.path.isdir("/proc/self"):
        return None
    return subprocess.Popen([sys.executable, "-c", _REAPER, str(driver_pid or os.getpid())],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, close_fds=True)


def _worker_died(exc: Exception, job: Job, ray) -> str:
    """A job whose Ray worker died or raised outside ``run_job``: what happened and where to look."""
    try:
        logs = ray._private.worker._global_node.get_logs_dir_path()  # this driver's cluster
    except Exception:  # noqa: BLE001 - a private API: fall back to where Ray puts them by default
        logs = "the Ray session's logs directory (/tmp/ray/session_latest/logs by default)"
    where = f"; the job's own output: {job.log_path}" if job.log_path else ""
    return (f"{type(exc).__name__}: the job's worker died or raised ({str(exc)[:1200]}){where}; Ray's worker logs "
            f"(python-core-worker-*.log) are in {logs} on the node that ran it")


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
                # a cluster of our own even when one runs on this machine (`ray start` leaves its
                # address where ray.init would otherwise join it, and then refuses num_cpus)
                kwargs["address"] = "local"
                kwargs["num_cpus"] = self.workers or 1
                # Ray nices its workers (15) by default; here they are the benchmark itself, and
                # niced jobs starve behind any foreground process (fit times, max_minutes budgets)
                kwargs["_system_config"] = {"worker_niceness": 0}
            kwargs.update(self.ray_init)
            if not self.address:  # a cluster of our own: ended with us, even when we are killed outright
                start_reaper()
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

    def _run(self, ray, jobs: Sequence[Job | Sequence[Job]], on_result: OnResult, admit: Admit) -> None:
        resources = ray.cluster_resources()
        cluster_gpus = float(resources.get("GPU", 0))
        remote = ray.remote(_ray_unit)
        # a unit (jobs sharing a fit) is one Ray task, placed as its first job (one method)
        pending = [(unit, *self.placement(unit[0], cluster_gpus)) for unit in as_units(jobs)]
        inflight: dict[Any, tuple[Unit, float, str, float]] = {}
        # Submit only what the cluster can start at once (CPU slots, and GPUs for GPU jobs), so that
        # a submitted job is a running job and --timeout never counts time spent in Ray's queue
        # (on a cluster shared with other drivers it still may: their jobs hold resources too).
        cpus = int(resources.get("CPU", self.workers or 1))
        slots = max(1, cpus if self.workers is None else min(self.workers, cpus))
        free_gpus = cluster_gpus

        def finish(ref) -> None:
            nonlocal free_gpus
            unit, _, device, gpus = inflight.pop(ref)
            try:
                results = ray.get(ref)
            except Exception as exc:  # worker died, or the task raised outside run_jobs
                why, tb = _worker_died(exc, unit[0], ray), traceback.format_exc()
                results = [failure_result(job, "failed", why, tb, device) for job in unit]
            free_gpus += gpus
            for job, result in zip(unit, results):
                on_result(job, result)

        while pending or inflight:
            i = 0
            while i < len(pending) and len(inflight) < slots:
                unit, opts, device = pending[i]
                if opts["num_gpus"] > free_gpus + 1e-9:
                    i += 1  # waits for a GPU; CPU jobs behind it may start
                    continue
                pending.pop(i)
                unit = admit(unit)
                if not unit:
                    continue
                free_gpus -= opts["num_gpus"]
                ref = remote.options(**opts).remote(unit, device)
                inflight[ref] = (unit, time.monotonic(), device, opts["num_gpus"])
            if not inflight and not pending:  # the rest were not admitted
                break
            if not inflight:  # cannot happen: placement caps a job's GPUs at the cluster's
                raise RuntimeError(f"no job of {len(pending)} fits the Ray cluster ({resources})")
            ready, _ = ray.wait(list(inflight), num_returns=len(inflight), timeout=0.5)
            for ref in ready:  # every job that finished, not one per pass
                finish(ref)
            if self.timeout is not None:
                now = time.monotonic()
                for ref, (unit, t_start, device, gpus) in list(inflight.items()):
                    if now - t_start <= self.timeout * len(unit):  # a shared fit: the timeout per job
                        continue
                    if ray.wait([ref], timeout=0)[0]:  # finished since the wait above: keep its result
                        finish(ref)
                        continue
                    ray.cancel(ref, force=True)
                    inflight.pop(ref)
                    free_gpus += gpus
                    why = f"stopped after the {self.timeout:g} s timeout"
                    if len(unit) > 1:
                        why += f" per job ({len(unit)} jobs sharing a fit)"
                    for job in unit:
                        on_result(job, failure_result(job, "timeout", why, device=device))


def job_to_dict(job: Job) -> dict:
    return asdict(job)
