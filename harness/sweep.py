"""Plan a sweep (the job matrix), run what is not done yet, store rows, say how it goes."""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import os
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness import registry
from harness.protocol import PROFILES, PopbenchError, target_within_training
from harness.runner import Job, RayExecutor, SerialExecutor, failure_result
from harness.store import RunStore, git_revision


def parse_overrides(items: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``--set wlm.iterations=200 --set lr=1e-3`` → ``{"wlm": {...}, "*": {"lr": 0.001}}``."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise PopbenchError(f"--set expects key=value or method.key=value, got {item!r}")
        method, dot, name = key.rpartition(".")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        out.setdefault(method if dot else "*", {})[name] = value
    return out


MAX_SEEDS = 10_000


def parse_seeds(spec: str) -> list[int]:
    """``0,1,2`` or ``0-4`` (or both, ``0-2,7``) as a list of distinct seeds, in order."""
    if not spec.strip():
        raise PopbenchError(f"--seeds {spec!r} selects nothing: give seeds like 0,1,2 or 0-4")
    seeds: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if "-" in part[1:]:
                a, b = (int(x) for x in part.split("-", 1))
                if len(seeds) + b - a + 1 > MAX_SEEDS:  # before building it: 0-100000000 must not take minutes
                    raise PopbenchError(f"--seeds {spec} selects {len(seeds) + b - a + 1:,} seeds: at most "
                                        f"{MAX_SEEDS:,} seeds run in one command")
                seeds.extend(range(a, b + 1))
            else:
                seeds.append(int(part))
        except ValueError as exc:
            raise PopbenchError(f"--seeds expects integers like 0,1,2 or 0-4, got {spec!r}") from exc
    if len(seeds) > MAX_SEEDS:
        raise PopbenchError(f"--seeds selects {len(seeds):,} seeds: at most {MAX_SEEDS:,} seeds run in one command")
    if any(s < 0 for s in seeds):
        raise PopbenchError(f"--seeds must be 0 or more (NumPy seeds), got {spec!r}")
    if not seeds:
        raise PopbenchError("--seeds selects no seed")
    return list(dict.fromkeys(seeds))


def _typed(method: str, key: str, value: Any, default: Any) -> Any:
    """``value`` for a setting whose default is ``default``, converted where lossless (``1`` for a
    float setting is ``1.0``, ``1e3`` for an int one ``1000``); a value of another type is an error."""
    if value is None or default is None:
        return value
    want, ok = type(default).__name__, True
    if isinstance(default, bool):
        want, ok = "true or false", isinstance(value, bool)
    elif isinstance(default, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        want, ok = "an integer", isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        want, ok = "a number", isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, str):
        want, ok = "a string", isinstance(value, str)
    elif isinstance(default, (list, tuple)):
        want, ok = "a JSON list", isinstance(value, list)
    elif isinstance(default, dict):
        want, ok = "a JSON object", isinstance(value, dict)
    if not ok:
        raise PopbenchError(f"--set {method}.{key}={json.dumps(value)}: {key} takes {want} "
                            f"(default {json.dumps(default)})")
    return value


def _settings(mname: str, mcls, task: str, profile: str, overrides: dict[str, dict[str, Any]]) -> dict:
    """The method's settings for a task and profile with the ``--set`` overrides applied: global
    ones where the method has the key, its own ones always (an unknown key is an error)."""
    hp = dict(mcls.default_hparams(task, profile))
    for key, value in overrides.get("*", {}).items():
        if key in hp:
            hp[key] = _typed(mname, key, value, hp[key])
    for key, value in overrides.get(mname, {}).items():
        if key not in hp:
            if not hp:
                raise PopbenchError(f"--set {mname}.{key}: {mname} declares no settings "
                                    "(its default_hparams() is empty), so there is nothing to set")
            near = difflib.get_close_matches(key, hp, n=1)
            raise PopbenchError(f"--set {mname}.{key}: {mname} has no setting {key!r}"
                                + (f"; did you mean {near[0]!r}?" if near else f"; it has {', '.join(sorted(hp))}"))
        hp[key] = _typed(mname, key, value, hp[key])
    try:
        mcls.check_hparams(hp)
    except ValueError as exc:
        raise PopbenchError(f"{mname} on {task} ({profile}): {exc}") from exc
    return hp


@dataclass
class Plan:
    jobs: list[Job]
    skipped_pairs: list[str] = field(default_factory=list)  # (method, task) pairs not offered, with why


def _answerable(method_cls, task) -> tuple[int, int]:
    """(answerable targets, all targets) for a method on a task instance."""
    data = task.train_data()
    caps = method_cls.capabilities
    n_ok = n_all = 0
    for q in task.queries():
        for tg in q.targets:
            n_all += 1
            n_ok += caps.interpolate if target_within_training(tg.t, data) else caps.forecast
    return n_ok, n_all


def plan_jobs(
    tasks_spec: str,
    methods_spec: str,
    profile: str,
    seeds: Sequence[int],
    overrides: dict[str, dict[str, Any]] | None = None,
    data_dir: str | None = None,
) -> Plan:
    if profile not in PROFILES:
        raise PopbenchError(f"unknown profile {profile!r}; choose one of {', '.join(PROFILES)}")
    pairs = registry.expand_tasks(tasks_spec)
    method_names = registry.methods.expand(methods_spec)
    if not pairs:
        raise PopbenchError("--tasks selects no task")
    if not method_names:
        raise PopbenchError("--methods selects no method")
    overrides = overrides or {}
    unknown = set(overrides) - {"*"} - set(method_names)
    if unknown:
        raise PopbenchError(f"--set names method(s) {', '.join(sorted(unknown))} that are not selected")
    jobs: list[Job] = []
    skipped: list[str] = []
    used_globals: set[str] = set()
    for family, variant in pairs:
        task_cls = registry.tasks.load(family)
        probe = None
        for mname in method_names:
            mcls = registry.methods.load(mname)
            caps = mcls.capabilities
            if caps.requires_simulator and not task_cls.has_simulator:
                skipped.append(f"{mname} on {family}/{variant}: the task has no true simulator (real data)")
                continue
            if not caps.accepts(task_cls, variant):
                skipped.append(f"{mname} on {family}/{variant}: it is made for the "
                               f"{', '.join(caps.families)} famil{'ies' if len(caps.families) > 1 else 'y'} only")
                continue
            if probe is None:
                probe = task_cls(variant, seed=seeds[0], data_dir=data_dir)  # raises on missing data
            if caps.requires_velocities and any(m.v is None for m in probe.train_data().marginals):
                skipped.append(f"{mname} on {family}/{variant}: it needs observed velocities and the task has none")
                continue
            n_ok, n_all = _answerable(mcls, probe)
            if n_ok == 0:
                what = "forecast" if caps.interpolate else "interpolate"
                raise PopbenchError(
                    f"{mname} cannot {what}, and every target of {family}/{variant} needs it; drop one of them"
                )
            hp = _settings(mname, mcls, f"{family}/{variant}", profile, overrides)
            used_globals.update(overrides.get("*", {}).keys() & hp.keys())
            for seed in seeds:
                jobs.append(Job(family, variant, mname, profile, int(seed), hp, data_dir,
                                num_gpus=float(caps.num_gpus), framework=caps.framework,
                                budget_keys=tuple(mcls.budget_keys)))
    if not jobs:
        raise PopbenchError("nothing to run: " + "; ".join(skipped) if skipped else "nothing to run")
    unused = sorted(set(overrides.get("*", {})) - used_globals)
    if unused:
        raise PopbenchError(f"--set {unused[0]}: no selected method has a setting {unused[0]!r} "
                            "(name the method, --set METHOD.KEY=VALUE, to see what it has)")
    return Plan(jobs, skipped)


def fit_key(job: Job) -> str | None:
    """The model a job fits, when its task says that other variants train on the same data
    (``Task.training_key``): jobs with one key (method, settings, seed, profile, data directory and
    training data) form one unit that fits once and answers all their queries. ``None``: the job's
    fit is its own."""
    training = registry.tasks.load(job.family).training_key(job.variant)
    if training is None:
        return None
    # budget keys left out (as in job ids): a capped fit is the same model as the uncapped one
    ident = [job.family, training, job.method, job.profile, job.seed, job.hparams_hash, job.data_dir]
    return hashlib.sha256(json.dumps(ident, default=str).encode()).hexdigest()[:16]


def units_of(jobs: Sequence[Job]) -> list[tuple[Job, ...]]:
    """Jobs grouped by :func:`fit_key` (a job without one alone), in the order of each unit's first job."""
    units: dict[str, list[Job]] = {}
    for job in jobs:
        units.setdefault(fit_key(job) or "job:" + job.job_id, []).append(job)
    return [tuple(u) for u in units.values()]


def _duration(seconds: float) -> str:
    """``45 s``, ``12 min``, ``3 h 05 min``: how long a job took or has run."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"


def time_left(seconds: float) -> str:
    """The sweep's time left, in minutes (hours and minutes past two hours)."""
    if seconds < 60:
        return "under a minute left"
    if seconds < 7200:
        return f"about {round(seconds / 60)} min left"
    return f"about {_duration(seconds)} left"


def _summary(result: dict) -> str:
    job = result["job"]
    head = f"{job['status']}: {job['method']} on {job['task']}/{job['variant']} ({job['profile']}, seed {job['seed']})"
    if job["status"] not in ("ok", "partial"):
        return head + f": {(job.get('error') or '')[:100]}"
    cells = job.get("cells") or []
    shown = ", ".join(f"{c['key']}={c['value']:.3f}" for c in cells[:2])
    return f"{head}: {shown} ({_duration(job.get('wall_s') or 0.0)})"


STILL_RUNNING_AT = (60.0, 120.0, 300.0)
"""Seconds into a job at which the sweep says it is still running; then every STILL_RUNNING_EVERY."""
STILL_RUNNING_EVERY = 300.0
_TICK = 5.0


class Progress:
    """A sweep's progress on stderr that reads the same in a terminal and in a log file (output piped
    to a file, CI, nohup): one line per finished job with the time left, and a line for each job
    still running after 1, 2 and 5 minutes, then every 5 minutes. In a terminal a bar counts jobs too."""

    def __init__(self, total: int, enabled: bool, stream, store: RunStore):
        self.total, self.enabled, self.stream, self.store = total, enabled, stream, store
        self.finished = 0
        self.t0 = time.monotonic()
        self.running: dict[str, list] = {}  # job id -> [job, started, lines said]
        self.lock = threading.Lock()
        self.bar = None
        self.stop = threading.Event()
        if not enabled:
            return
        if getattr(stream, "isatty", lambda: False)():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc="jobs", unit="job", file=stream, dynamic_ncols=True)
        threading.Thread(target=self._watch, daemon=True, name="sweep-progress").start()

    def say(self, text: str) -> None:
        with self.lock:
            if self.bar is not None:
                self.bar.write(text, file=self.stream)
            else:
                print(text, file=self.stream, flush=True)

    def started(self, job: Job) -> None:
        with self.lock:
            self.running[job.job_id] = [job, time.monotonic(), 0]

    def dropped(self, job: Job) -> None:
        """A job not run here after all (another process has it): one fewer to wait for."""
        with self.lock:
            self.running.pop(job.job_id, None)
            self.total -= 1
            if self.bar is not None:
                self.bar.total = self.total
                self.bar.refresh()

    def done(self, job: Job, result: dict) -> None:
        with self.lock:
            self.running.pop(job.job_id, None)
            self.finished += 1
            n, left = self.finished, self.total - self.finished
        if not self.enabled:
            return
        eta = ""
        if left > 0:
            eta = "; " + time_left((time.monotonic() - self.t0) / n * left)
        self.say(f"[{n}/{self.total}] {_summary(result)}{eta}")
        if self.bar is not None:
            self.bar.update(1)

    def _watch(self) -> None:
        while not self.stop.wait(_TICK):
            now = time.monotonic()
            with self.lock:
                due = []
                for entry in self.running.values():
                    job, started, said = entry
                    at = STILL_RUNNING_AT[said] if said < len(STILL_RUNNING_AT) else \
                        STILL_RUNNING_AT[-1] + STILL_RUNNING_EVERY * (said - len(STILL_RUNNING_AT) + 1)
                    if now - started >= at:
                        entry[2] += 1
                        due.append((job, now - started))
            for job, ran in due:
                self.say(f"still running: {job.describe()}, {_duration(ran)} so far "
                         f"(its output: {self.store.log_path(job.job_id)})")

    def close(self) -> None:
        self.stop.set()
        if self.bar is not None:
            self.bar.close()


def run_plan(
    plan: Plan,
    store: RunStore,
    *,
    executor: str = "serial",
    workers: int = 1,
    address: str | None = None,
    timeout: float | None = None,
    force: bool = False,
    progress: bool = True,
    ray_init: dict | None = None,
    threads: int = 1,
) -> dict[str, dict]:
    """Run the plan's jobs that are not done; return the latest job row per selected job id.

    ``executor``: ``serial`` (each method in a process of its own), ``inline`` (everything in this
    process, for a debugger) or ``ray``. A job another live process is running in the same run
    directory (``RunStore.claim``) when its turn comes is skipped with a note on stderr: it has no
    row here unless an earlier attempt left one. Several processes running one plan thus share its
    jobs. ``progress``: a line per finished job and for long fits (:class:`Progress`).
    """
    claims: dict[str, Any] = {}
    try:
        _run_claimed(plan, store, claims, executor=executor, workers=workers, address=address,
                     timeout=timeout, force=force, progress=progress, ray_init=ray_init, threads=threads)
    finally:
        for fh in claims.values():
            fh.close()
    latest = store.latest_jobs()
    return {j.job_id: latest[j.job_id] for j in plan.jobs if j.job_id in latest}


def sweep_outcome(plan: Plan, store: RunStore) -> tuple[dict[str, dict], set[str], list[Job]]:
    """After a sweep: the latest stored job row per job of the plan, the jobs another live process
    is running now, and the jobs with neither (held by a process that stopped without a result).

    Claims are looked at before the rows, and the rows read again when a claim was released
    meanwhile: a process stores a job's rows before it releases its claim, so a job that another
    process finishes during this look is found stored, never reported lost. A job whose shared fit
    another process holds (:meth:`RunStore.claim_fit`) counts as running there."""
    keys = {j.job_id: fit_key(j) for j in plan.jobs}

    def busy(jid: str) -> bool:
        key = keys[jid]
        return store.claimed_by(jid) is not None or (key is not None and store.fit_claimed_by(key) is not None)

    held = {j.job_id for j in plan.jobs if busy(j.job_id)}
    latest = store.latest_jobs()
    running = {jid for jid in held if busy(jid)}
    if held - running:
        latest = store.latest_jobs()
    latest = {j.job_id: latest[j.job_id] for j in plan.jobs if j.job_id in latest}
    vanished = [j for j in plan.jobs if j.job_id not in latest and j.job_id not in running]
    return latest, running, vanished


def held_by(holder: dict) -> str:
    """``pid 123 on vm, for 5 min`` from ``RunStore.claimed_by``'s answer."""
    if not holder:
        return "another process"
    mins = max(time.time() - float(holder.get("since", time.time())), 0.0) / 60
    return f"pid {holder.get('pid')} on {holder.get('host')}, for {mins:.0f} min"


def _run_claimed(plan: Plan, store: RunStore, claims: dict[str, Any], *, executor: str, workers: int,
                 address: str | None, timeout: float | None, force: bool, progress: bool,
                 ray_init: dict | None, threads: int) -> None:
    """Run the plan's jobs not done yet, each claimed (``RunStore.claim``) just before it starts and
    released once its rows are stored: processes sharing a run directory split its jobs between
    them and never train one job twice. Jobs that share a fit (:func:`fit_key`) run as one unit:
    its fit is claimed first (``RunStore.claim_fit``), then its jobs, so that no two processes fit
    one model at once; the fit's claim is released once every job of the unit is stored."""
    stream = sys.stderr  # the real one: a job in this process copies sys.stderr into its log meanwhile
    start = store.rows_end()  # before reading them: a row stored in between is seen by admit
    done = set() if force else store.done_job_ids()
    if store.cut:
        print(f"note: {len(store.cut)} stored attempt(s) in {store.rows_path} were cut short mid-write (a crash); "
              "their jobs count as not stored", file=stream)
    todo = [dataclasses.replace(j, checkpoint_path=str(store.checkpoint_path(j.job_id)),
                                log_path=str(store.log_path(j.job_id)))
            for j in plan.jobs if j.job_id not in done]
    n_done = len(plan.jobs) - len(todo)
    if progress:
        if not todo:
            print(f"all {len(plan.jobs)} jobs already done in {store.root}: nothing to run (--force reruns them)",
                  file=stream)
        else:
            print(f"{len(plan.jobs)} jobs: {n_done} already done, {len(todo)} to run ({executor}"
                  + (f", {workers} at a time" if executor == "ray" and workers else "") + ")", file=stream)
    if not todo:
        return
    if executor == "ray":
        ex: Any = RayExecutor(workers=workers, address=address, timeout=timeout, ray_init=ray_init)
        if progress:  # workers' stderr does not reach this terminal
            print(f"jobs' output (progress of long fits): {store.root / 'logs'}/", file=stream)
    elif executor in ("serial", "inline"):
        ex = SerialExecutor(timeout=timeout, num_threads=threads, isolate=executor == "serial")
    else:
        raise PopbenchError(f"unknown executor {executor!r}; choose serial, inline or ray")
    bar = Progress(len(todo), progress, stream, store)
    seen: dict[str, Any] = {"offset": start, "ids": set()}
    units = units_of(todo)
    keys = {job.job_id: fit_key(job) for job in todo}
    waiting: dict[str, set[str]] = {}  # a claimed shared fit -> its jobs not stored yet

    def ran_elsewhere(job: Job) -> bool:
        """Another process stored an attempt of ``job`` (any status) since this sweep began: it
        is not run again here, even with --force (rows appended since are read once each)."""
        ids, seen["offset"] = store.job_ids_since(seen["offset"])
        seen["ids"] |= ids
        return job.job_id in seen["ids"]

    def admit(unit: tuple[Job, ...]) -> tuple[Job, ...]:
        key = keys[unit[0].job_id]
        if key is None:
            return tuple(j for j in unit if admit_job(j))
        fh = store.claim_fit(key)
        if fh is None:
            holder = held_by(store.fit_claimed_by(key) or {})
            for job in unit:
                bar.say(f"note: skipped {job.describe()}: another process is fitting its model (shared with another "
                        f"variant) in {store.root} ({holder}); rerun this command once it finishes")
                bar.dropped(job)
            return ()
        admitted = tuple(j for j in unit if admit_job(j))
        if admitted:
            claims["fit:" + key] = fh
            waiting[key] = {j.job_id for j in admitted}
        else:
            fh.close()
        return admitted

    def release_fit(job: Job) -> None:
        key = keys[job.job_id]
        if key is None or key not in waiting:
            return
        waiting[key].discard(job.job_id)
        if not waiting[key]:  # every job of the fit stored: another process may fit it now
            del waiting[key]
            claims.pop("fit:" + key).close()

    def admit_job(job: Job) -> bool:
        fh = store.claim(job.job_id)
        if fh is None:
            bar.say(f"note: skipped {job.describe()}: another process is running it in {store.root} "
                    f"({held_by(store.claimed_by(job.job_id) or {})}); rerun this command once it finishes")
        elif ran_elsewhere(job):
            fh.close()
            bar.say(f"note: skipped {job.describe()}: another process ran it meanwhile (see its row)")
            fh = None
        if fh is None:
            bar.dropped(job)
            return False
        claims[job.job_id] = fh
        if force:  # a forced rerun starts from scratch, not from an earlier attempt's training state
            Path(job.checkpoint_path).unlink(missing_ok=True)
        bar.started(job)
        return True

    revision = git_revision()  # the code that ran the jobs, on every job row

    def store_result(job: Job, result: dict) -> None:
        result["job"]["git_revision"] = revision
        stem = result["job"]["attempt_id"] + "_" + job.job_id
        if result.get("curves"):
            result["job"]["artifact"] = store.write_artifact(stem, {"job_id": job.job_id, **result["curves"]})
        if result.get("predictions"):
            result["job"]["predictions"] = store.write_predictions(stem, result["predictions"])
        store.append_rows([result["job"], *result["targets"]])

    def on_result(job: Job, result: dict) -> None:
        try:
            store_result(job, result)
        except (TypeError, ValueError) as exc:  # a value JSON cannot hold: the job fails, the sweep goes on
            result = failure_result(job, "failed", f"its result could not be stored: {exc}",
                                    device=result["job"].get("device", "cpu"))
            store_result(job, result)
        if result["job"].get("status") == "ok" and job.checkpoint_path:
            Path(job.checkpoint_path).unlink(missing_ok=True)  # stored: the state is no longer needed
        fh = claims.pop(job.job_id, None)
        if fh is not None:  # stored: another process may take the job now
            fh.close()
        release_fit(job)
        bar.done(job, result)

    try:
        ex.run(units, on_result, admit)
    finally:
        bar.close()


def default_run_dir(name: str | None, profile: str) -> Path:
    root = Path(os.environ.get("POPBENCH_RESULTS_DIR", "results/runs"))
    return root / (name or profile)


def now() -> float:
    return time.time()
