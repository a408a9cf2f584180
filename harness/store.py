"""The result store: one run directory per named run (``results/runs/<name>/`` by default).

Layout of a run directory:

- ``rows.jsonl``: append-only result rows. Each finished job appends all its rows (one
  ``"row_type": "job"`` row, which counts its targets in ``n_targets``, then one
  ``"row_type": "target"`` row per target) in a single locked ``write`` followed by ``fsync``, so
  a driver killed mid-sweep loses only the jobs that had not finished. A write cut short (a crash,
  power loss) leaves a torn last line, which is ignored on read and fenced off with a newline on
  the next append; the attempt it belonged to then has fewer target rows than its job row counts,
  and counts as never stored (its job runs again).
- ``invocations.jsonl``: every command that wrote to the run, with its resolved settings.
- ``environment.json``: package versions, git revision, platform, CPU/GPU of the latest invocation
  (``invocations.jsonl`` keeps every invocation's revision and versions).
- ``artifacts/<attempt>_<job_id>.json``: a job's curves (loss, friction, σ² per iteration, ...);
  ``artifacts/<attempt>_<job_id>.npz``: its predicted samples per query (float32), for figures.
- ``logs/<job_id>.log``: what the job wrote to stderr (long fits' progress lines, warnings, the
  last words of a job that died), every attempt appended under a header line.
- ``checkpoints/<job_id>.ckpt``: the training state of a job that has not finished ``ok`` (a
  method that checkpoints writes it; the sweep deletes it once the job's rows are stored ``ok``).
- ``locks/<job_id>.lock``: the claim of the process running a job (``RunStore.claim``), taken
  just before the job starts. A sweep skips a job another live process holds, so two commands
  never train one job into one checkpoint (and two runs of one command split its jobs); the
  kernel drops a claim when its process dies. ``locks/fits/<key>.lock``: the claim of a fit that
  several jobs share (``RunStore.claim_fit``), taken before its jobs' claims.

A run travels between machines as a *bundle* (:func:`write_bundle`): ``publish`` writes one beside
the tables it makes (``rows.jsonl.gz``), and ``restore`` (:meth:`RunStore.restore_bundle`) appends
its attempts to a run directory, so that a later sweep skips those jobs and ``publish`` tabulates
them with the new ones. A bundle carries every row and each job's curves, not predicted samples
(the figures drawn from them are published as images).

Rerunning skips jobs whose latest attempt is ``ok``; ``--force`` reruns them (the new rows are
appended; readers keep the latest attempt per job). A ``partial`` job (a fit stopped early by a
budget such as WLM's ``max_minutes``) is scored but not done: rerunning continues it from its
checkpoint.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import json
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Any

import numpy as np

from harness.protocol import PopbenchError

ROWS = "rows.jsonl"
BUNDLE = "rows.jsonl.gz"
STATUSES = ("ok", "partial", "failed", "diverged", "timeout", "skipped")


def partial_label(method: str) -> str:
    """How tables and figures name a ``partial`` job's method, so it never passes for a complete run."""
    return f"{method} (partial)"


def _file_name(job_id: str) -> str:
    """A job id (or stem) made safe as a file name."""
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", job_id)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, (np.floating, float)):
        f = float(obj)
        return f if np.isfinite(f) else None
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.bool_,)):
        return bool(obj)
    return obj


def dumps(obj: Any) -> str:
    return json.dumps(_jsonable(obj), sort_keys=True, allow_nan=False)


@contextlib.contextmanager
def naming(path: str | os.PathLike):
    """Re-raise an ``OSError`` that names no file (a full disk fails a ``write``, not an ``open``)
    as one that names ``path``, so the user learns which file could not be written."""
    try:
        yield
    except OSError as exc:
        if exc.filename is None:
            raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc
        raise


def atomic_write_text(path: Path, text: str) -> None:
    with naming(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(tmp, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)


def complete_attempts(rows: Iterable[dict]) -> tuple[set[str], set[str]]:
    """(attempt ids whose rows are all stored, attempt ids cut short): an attempt's job row counts
    its targets (``n_targets``; rows written before that count are taken as whole)."""
    counts: dict[str, int] = {}
    wants: dict[str, int | None] = {}
    for r in rows:
        if r.get("row_type") == "target":
            counts[r.get("attempt_id")] = counts.get(r.get("attempt_id"), 0) + 1
        elif r.get("row_type") == "job":
            wants[r.get("attempt_id")] = r.get("n_targets")
    cut = {a for a, n in wants.items() if n is not None and counts.get(a, 0) != n}
    return set(wants) - cut, cut


class RunStore:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.rows_path = self.root / ROWS
        self.cut: set[str] = set()  # attempts cut short, not replaced since (see latest_jobs)

    def ensure(self) -> None:
        (self.root / "artifacts").mkdir(parents=True, exist_ok=True)

    def append_rows(self, rows: Iterable[dict], count_targets: bool = True) -> None:
        """Append one job's rows atomically (one locked write, then fsync); a job row among them
        gets ``n_targets``, the number of target rows of its attempt that come with it (not with
        ``count_targets=False``: rows restored as they were published)."""
        rows = list(rows)
        for job in (r for r in rows if count_targets and r.get("row_type") == "job"):
            job["n_targets"] = sum(r.get("row_type") == "target" and r.get("attempt_id") == job.get("attempt_id")
                                   for r in rows)
        payload = "".join(dumps(r) + "\n" for r in rows)  # before anything is written: a bad value writes nothing
        if not payload:
            return
        with naming(self.rows_path):
            self.ensure()
            self._append(payload)

    def _append(self, payload: str) -> None:
        with open(self.rows_path, "a+b") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                fh.seek(0, os.SEEK_END)
                if fh.tell() > 0:
                    fh.seek(-1, os.SEEK_END)
                    if fh.read(1) != b"\n":
                        payload = "\n" + payload  # fence off a torn line from an earlier crash
                fh.seek(0, os.SEEK_END)
                fh.write(payload.encode())
                fh.flush()
                os.fsync(fh.fileno())
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def read_rows(self) -> list[dict]:
        if not self.rows_path.exists():
            return []
        rows = []
        with open(self.rows_path) as fh:
            for line in fh:
                line = line.strip()
                if not line:
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    continue  # a torn line: that job is simply not finished
        return rows

    def latest_jobs(self) -> dict[str, dict]:
        """The latest job row per job id (attempts are ordered by ``finished_at``), among the
        attempts stored whole (:func:`complete_attempts`; ``self.cut`` keeps the ids of the others
        that no whole attempt of their job has replaced since)."""
        latest: dict[str, dict] = {}
        rows = self.read_rows()
        whole, cut = complete_attempts(rows)
        cut_rows = []
        for r in rows:
            if r.get("row_type") == "job" and r.get("attempt_id") in cut:
                cut_rows.append(r)
            if r.get("row_type") != "job" or r.get("attempt_id") not in whole:
                continue
            prev = latest.get(r["job_id"])
            if prev is None or (r.get("finished_at", 0), r.get("attempt_id", "")) >= (
                prev.get("finished_at", 0),
                prev.get("attempt_id", ""),
            ):
                latest[r["job_id"]] = r
        # the cut attempts no whole attempt of their job has replaced since
        self.cut = {r["attempt_id"] for r in cut_rows if r["job_id"] not in latest
                    or r.get("finished_at", 0) > latest[r["job_id"]].get("finished_at", 0)}
        return latest

    def rows_end(self) -> int:
        """The end of the rows file now (for :meth:`job_ids_since`), read under the appends' lock,
        so never inside another process's row (a torn line from a crash is fenced off by the next
        append, and then skipped as unparseable)."""
        try:
            with open(self.rows_path, "rb") as fh:
                fcntl.flock(fh, fcntl.LOCK_SH)
                try:
                    return os.fstat(fh.fileno()).st_size
                finally:
                    fcntl.flock(fh, fcntl.LOCK_UN)
        except FileNotFoundError:
            return 0

    def job_ids_since(self, offset: int) -> tuple[set[str], int]:
        """Job ids with a job row stored after ``offset`` (any status), and the new end offset:
        reads only what was appended since."""
        try:
            with open(self.rows_path, "rb") as fh:
                fh.seek(offset)
                data = fh.read()
        except FileNotFoundError:
            return set(), offset
        end = data.rfind(b"\n") + 1  # a torn last line is read once it is complete
        ids = set()
        for line in data[:end].splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            if r.get("row_type") == "job":
                ids.add(r.get("job_id"))
        return ids, offset + end

    def done_job_ids(self) -> set[str]:
        return {jid for jid, r in self.latest_jobs().items() if r.get("status") == "ok"}

    def rows_of_latest_attempts(self) -> list[dict]:
        latest = {jid: r.get("attempt_id") for jid, r in self.latest_jobs().items()}
        return [r for r in self.read_rows() if latest.get(r.get("job_id")) == r.get("attempt_id")]

    def restore_bundle(self, path: str | os.PathLike, profile: str | None = None) -> tuple[int, int]:
        """Append the attempts of a bundle (:func:`write_bundle`) that this run does not hold yet:
        each attempt's rows in one atomic append, after its curves file; its job row gains
        ``restored_from``. Returns (attempts added, attempts already here). An attempt is known by
        its ``attempt_id``, so restoring twice adds nothing, and where the run holds another
        attempt of a job the latest one counts, as always. The whole bundle is checked before
        anything is written (``profile``: every row must be of it), and a restored attempt's files
        get the names a sweep gives them, whatever the bundle says. A restored ``partial`` job has
        no checkpoint: rerunning it trains from the start."""
        path = Path(path)
        attempts: dict[str, list[dict]] = {}
        for r in read_bundle(path):
            attempts.setdefault(r["attempt_id"], []).append(r)
        for attempt_id, rows in attempts.items():
            jobs = [r for r in rows if r["row_type"] == "job"]
            if len(jobs) != 1 or any(r["job_id"] != jobs[0]["job_id"] for r in rows):
                raise PopbenchError(f"{path} is not a popbench bundle: attempt {attempt_id} has {len(jobs)} job "
                                    "rows, or rows of several jobs")
        if profile is not None:
            others = sorted({str(r.get("profile")) for rows in attempts.values() for r in rows} - {profile})
            if others:
                raise PopbenchError(f"{path} holds {', '.join(others)} rows, not {profile} ones: name its profile "
                                    f"(--profile {others[0]})")
        self.ensure()
        with open(self.root / ".restore.lock", "a") as lock:  # two restores never interleave
            fcntl.flock(lock, fcntl.LOCK_EX)
            have = {r.get("attempt_id") for r in self.read_rows() if r.get("row_type") == "job"}
            added = 0
            for attempt_id, rows in attempts.items():
                if attempt_id in have:
                    continue
                job = dict(next(r for r in rows if r["row_type"] == "job"))
                stem = f"{attempt_id}_{job['job_id']}"
                payload = job.pop("artifact_payload", None)
                job.pop("artifact", None)
                if payload is not None:
                    job["artifact"] = self.write_artifact(stem, payload)
                if job.get("predictions"):  # not carried: the name says where they would be, never elsewhere
                    job["predictions"] = f"artifacts/{_file_name(stem)}.npz"
                job["restored_from"] = str(path)
                self.append_rows([job, *(r for r in rows if r["row_type"] != "job")], count_targets=False)
                added += 1
        return added, len(attempts) - added

    def live_claims(self) -> list[dict]:
        """The claims held now by live processes (see :meth:`claim`): ``{"pid", "host", "since"}`` each."""
        return [h for h in (self._holder(p) for p in sorted((self.root / "locks").glob("*.lock"))) if h is not None]

    def write_artifact(self, job_id: str, payload: dict) -> str:
        name = _file_name(job_id) + ".json"
        text = dumps(payload)
        atomic_write_text(self.root / "artifacts" / name, text)
        return f"artifacts/{name}"

    def log_path(self, job_id: str) -> Path:
        """A job's stderr, every attempt appended (progress lines, warnings, last words)."""
        return self.root / "logs" / (_file_name(job_id) + ".log")

    def checkpoint_path(self, job_id: str) -> Path:
        """Where a job may keep its training state between attempts (``Method.checkpoint_path``)."""
        return self.root / "checkpoints" / (_file_name(job_id) + ".ckpt")

    def claim(self, job_id: str) -> IO[str] | None:
        """Claim a job for this process: an open lock file to hold while the job runs (closing it,
        or the death of this process, releases the claim), or ``None`` when a live process holds it.

        A non-blocking ``flock``: released by the kernel, never left stale by a killed driver. The
        file keeps the holder's pid, host and start time for ``claimed_by``; it is not deleted
        (unlinking a lock file races with a process about to lock it).
        """
        return self._claim(self._lock_path(job_id))

    def claim_fit(self, key: str) -> IO[str] | None:
        """Claim a fit that several jobs share (``harness.sweep.fit_key``), as :meth:`claim` claims a
        job (``locks/fits/<key>.lock``): held while the fit's jobs run, so that no two processes
        fit one model at once, whichever of its jobs each has."""
        return self._claim(self._fit_lock_path(key))

    def fit_claimed_by(self, key: str) -> dict | None:
        """Who fits the shared model ``key`` now (as :meth:`claimed_by` answers for a job)."""
        return self._holder(self._fit_lock_path(key))

    @staticmethod
    def _claim(path: Path) -> IO[str] | None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(path, "a+")
        for attempt in range(5):  # a claimed_by() probe holds a shared lock for an instant: try again
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if attempt == 4:
                    fh.close()
                    return None
                time.sleep(0.02)
        fh.truncate(0)
        fh.write(json.dumps({"pid": os.getpid(), "host": os.uname().nodename, "since": time.time()}))
        fh.flush()
        return fh

    def claimed_by(self, job_id: str) -> dict | None:
        """Who runs a job now: ``{"pid", "host", "since"}`` of the live process that claimed it
        (``{}`` when it has not written them yet), or ``None`` when no process holds it."""
        return self._holder(self._lock_path(job_id))

    @staticmethod
    def _holder(path: Path) -> dict | None:
        if not path.exists():
            return None
        with open(path) as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                try:
                    return json.loads(fh.read() or "{}")
                except json.JSONDecodeError:
                    return {}
        return None

    def _lock_path(self, job_id: str) -> Path:
        return self.root / "locks" / (_file_name(job_id) + ".lock")

    def _fit_lock_path(self, key: str) -> Path:
        return self.root / "locks" / "fits" / (_file_name(key) + ".lock")

    def write_predictions(self, stem: str, arrays: dict) -> str:
        """A job's predicted samples per query (float32, compressed), for figures."""
        name = _file_name(stem) + ".npz"
        path = self.root / "artifacts" / name
        tmp = path.with_name(f".{name}.{os.getpid()}.tmp.npz")
        with naming(path):
            self.ensure()
            with open(tmp, "wb") as fh:  # on disk before the row that names it (as the rows are)
                np.savez_compressed(fh, **arrays)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        return f"artifacts/{name}"

    def record_invocation(self, config: dict, ran_jobs: bool = True) -> None:
        """Append a command to ``invocations.jsonl``; one that runs jobs (``ran_jobs``) also
        rewrites ``environment.json``, which describes what ran the latest jobs."""
        self.ensure()
        env = environment()
        with naming(self.root / "invocations.jsonl"), open(self.root / "invocations.jsonl", "a") as fh:
            fh.write(dumps({"time": time.time(), **config, "git_revision": env["git_revision"],  # its own revision
                            "versions": env["versions"]}) + "\n")
        if ran_jobs:
            atomic_write_text(self.root / "environment.json", dumps(env) + "\n")

    def merge_invocations(self, path: str | os.PathLike) -> None:
        """Add another run's invocations (e.g. a publication's) to this run's, in time order."""
        mine = self.root / "invocations.jsonl"
        lines = set(mine.read_text().splitlines()) if mine.exists() else set()
        lines |= set(Path(path).read_text().splitlines())

        def when(line: str) -> float:
            try:
                return float(json.loads(line).get("time") or 0)
            except (ValueError, AttributeError):
                return 0.0

        atomic_write_text(mine, "".join(line + "\n" for line in sorted((ln for ln in lines if ln.strip()), key=when)))


def write_bundle(run_dir: str | os.PathLike, rows: Iterable[dict], path: str | os.PathLike) -> Path:
    """Write ``rows`` of the run in ``run_dir`` as a bundle: gzipped JSON lines, each job row with
    the contents of its curves file inline (``artifact_payload``). Byte-identical for the same rows
    (no time stamp in the gzip header, no ``restored_from``), so republishing a restored
    publication leaves it unchanged."""
    root, path = Path(run_dir), Path(path)
    lines = []
    for r in rows:
        r = {k: v for k, v in r.items() if k != "restored_from"}  # a local path, and not what the rows say
        if r.get("row_type") == "job" and r.get("artifact"):
            try:
                r = {**r, "artifact_payload": json.loads((root / r["artifact"]).read_text())}
            except (OSError, ValueError) as exc:
                raise PopbenchError(f"cannot read the curves file {root / r['artifact']} of {r.get('job_id')}: "
                                    f"{exc}") from exc
        lines.append(dumps(r) + "\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as fh:
        fh.write("".join(lines).encode())
    os.replace(tmp, path)
    return path


def read_bundle(path: str | os.PathLike) -> list[dict]:
    """The rows of a bundle, checked to be popbench rows (a clear error for anything else)."""
    path = Path(path)
    try:
        with gzip.open(path, "rt") as fh:
            rows = [json.loads(line) for line in fh if line.strip()]
    except FileNotFoundError:
        raise PopbenchError(f"no bundle at {path}: `run_all.py publish` writes one beside the tables") from None
    except (OSError, EOFError, ValueError) as exc:  # not gzip, truncated, or not JSON
        raise PopbenchError(f"{path} is not a readable popbench bundle: {exc}") from exc
    for i, r in enumerate(rows, 1):
        if not isinstance(r, dict) or r.get("row_type") not in ("job", "target") or not r.get("attempt_id") \
                or not r.get("job_id"):
            raise PopbenchError(f"{path} is not a popbench bundle: line {i} is not a job or target row")
    return rows


def bundle_job_ids(path: str | os.PathLike, ok_only: bool = False) -> set[str]:
    """The job ids a bundle publishes (with ``ok_only``, only those with an ok attempt)."""
    return {r["job_id"] for r in read_bundle(path)
            if r["row_type"] == "job" and (not ok_only or r.get("status") == "ok")}


def git_revision() -> str | None:
    here = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=here, capture_output=True, text=True, timeout=5
        ).stdout.strip()
        return (rev + ("+dirty" if dirty else "")) or None
    except Exception:
        return None


def package_versions(names: Iterable[str] = ("numpy", "pot", "torch", "jax", "geomloss", "ray", "pandas")) -> dict:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for n in names:
        try:
            out[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            pass
    try:
        out["popbench"] = metadata.version("popbench")
    except metadata.PackageNotFoundError:
        pass
    return out


def cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else whatever the platform reports ("" if nothing)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor()


def environment() -> dict:
    return {
        "versions": package_versions(),
        "git_revision": git_revision(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(),
        "executable": sys.executable,
    }
