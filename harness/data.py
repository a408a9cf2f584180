"""Remote data files: where they come from, how the harness finds them, how it checks them.

The real-data tasks read files that are never part of this repository. Each file has a registry
entry: its name (the path under a data directory, e.g. ``ocean/oceans_with_v0.npz``), where to
download it, its size and its checksum (sha256 and/or the git blob id, i.e. ``git hash-object
<file>``), and a licence note. The shipped files are registered below with :func:`register`; a task
plugin registers its own files the same way, at import, next to its task class::

    from harness.data import DataFile, register
    register(DataFile("mylab/cells.npz", "https://example.org/cells.npz", sha256="..."))

:func:`resolve` finds a file, in this order:

1. an explicit ``data_dir`` (the CLI's ``--data-dir``);
2. the environment variable ``POPBENCH_DATA_DIR``;
3. the per-user cache, ``~/.cache/popbench`` (``POPBENCH_CACHE_DIR`` overrides that root).

The first copy found is verified; a checksum mismatch is an error, never silently used. When no
copy exists, the file is downloaded (progress bar on stderr, verified, written atomically) into the
first of those directories, unless downloads are off: ``POPBENCH_OFFLINE=1``, or ``CI`` set in the
environment, or ``download=False``. Anything that fails stops with a :class:`PopbenchError` whose
message is one sentence naming the file, its URL, its checksum and the directory to put it in.

:func:`fetch` (``python run_all.py fetch-data [names]``) downloads and verifies ahead of time.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from harness.protocol import PopbenchError

_WLM = "https://raw.githubusercontent.com/guanton/WLM/6cd32992b67dc2b147426d4b2caccb572da34d6e/datasets"
_OCEAN_LICENCE = (
    "guanton/WLM states no licence; the underlying data are HYCOM reanalysis output, distributed "
    "publicly by the HYCOM consortium. Ask the authors before redistributing."
)


@dataclass(frozen=True)
class DataFile:
    """One remote file the harness may need."""

    name: str
    """Path under a data directory, e.g. ``ocean/oceans_with_v0.npz``."""
    url: str
    size: int | None = None
    sha256: str | None = None
    git_blob: str | None = None
    licence: str = ""
    mirrors: tuple[str, ...] = ()
    """Further URLs tried in order when ``url`` fails (same bytes, same checksum)."""
    note: str = ""

    @property
    def checksum_text(self) -> str:
        parts = []
        if self.sha256:
            parts.append(f"sha256 {self.sha256}")
        if self.git_blob:
            parts.append(f"git blob id {self.git_blob}")
        return " / ".join(parts) or "no checksum"


REGISTRY: dict[str, DataFile] = {}
"""Every registered data file by name (fill it with :func:`register`)."""


def register(f: DataFile) -> DataFile:
    """Add ``f`` to the registry, so that tasks can name it in ``data_files``, :func:`resolve` finds,
    downloads and verifies it, and ``fetch-data`` fetches it. Registering the same entry again is a
    no-op; another entry under a registered name, or one without a checksum, is an error."""
    if not (f.sha256 or f.git_blob):
        raise PopbenchError(f"data file {f.name!r} needs a checksum (sha256 or git blob id) to be registered")
    known = REGISTRY.get(f.name)
    if known is not None and known != f:
        raise PopbenchError(f"data file {f.name!r} is already registered, from {known.url} ({known.checksum_text})")
    REGISTRY[f.name] = f
    return f


for _f in (
    DataFile(
        name="ocean/oceans_with_v0.npz",
        url=f"{_WLM}/oceans_with_v0.npz",
        size=32492,
        sha256="30168f54f8eb2ea59f23f28adf01e71917491dceffd61106801a493a2c23e0ce",
        git_blob="d26e87b2b79bf20ebbd66cd684f2dec048bf1d93",
        licence=_OCEAN_LICENCE,
        note="small Gulf of Mexico vortex, (9, 111, 2) positions and velocities (vortex/interpolation)",
    ),
    DataFile(
        name="ocean/big_oceans_forecast.npz",
        url=f"{_WLM}/big_oceans_forecast.npz",
        size=141324,
        sha256="70d76e62cc2b32bdd4d8a4f78f7f8400aec60443d05fabd915f02626685bdac3",
        git_blob="cd3b60a394b854c65f9c6f3b9739084798143987",
        licence=_OCEAN_LICENCE,
        note="big Gulf of Mexico vortex, (11, 400, 2) positions and velocities (vortex/forecast)",
    ),
    DataFile(
        name="eb/eb_velocity_v5.npz",
        url="https://github.com/KrishnaswamyLab/TrajectoryNet/raw/master/data/eb_velocity_v5.npz",
        size=None,  # unknown: the blob could not be obtained where this registry was written
        sha256=None,
        git_blob="06b92296690840bb4c146085b6cd18ad89667c74",
        licence=(
            "Yale non-commercial licence (TrajectoryNet): download it on your own machine for "
            "research use; never redistribute it."
        ),
        mirrors=(
            "https://raw.githubusercontent.com/KrishnaswamyLab/TrajectoryNet/"
            "810c89b081f95405bc0ad42bfb3cb41038e13700/data/eb_velocity_v5.npz",
        ),
        note="embryoid-body scRNA-seq, TrajectoryNet preprocessing with RNA velocity (eb/holdout-*)",
    ),
    DataFile(
        name="eb/sbirr_eb_data_300per_marginal.npy",
        url=(
            "https://raw.githubusercontent.com/YunyiShen/SBIRR/"
            "77f2f661afae39553dad626960d8d185567ddfe5/Notebooks/data/eb_data.npy"
        ),
        size=60128,
        sha256="d15fc2070bde4dd2ae41d846fe765426457826dbb85607edfba93324779ea242",
        git_blob="f7d236183fc2a4c05b27b2dc9742056994a0e62d",
        licence="YunyiShen/SBIRR states no licence.",
        note="stand-in: 300 whitened EB cells per day, no velocities (eb300/holdout-*; not comparable)",
    ),
):
    register(_f)


# --------------------------------------------------------------------------------------------
# Where files live


def cache_root() -> Path:
    """The per-user cache root: ``$POPBENCH_CACHE_DIR`` or ``~/.cache/popbench``."""
    env = os.environ.get("POPBENCH_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "popbench"


def search_dirs(data_dir: str | os.PathLike | None = None) -> list[Path]:
    """Data directories in resolution order (explicit, ``$POPBENCH_DATA_DIR``, cache root)."""
    dirs: list[Path] = []
    if data_dir:
        dirs.append(Path(data_dir).expanduser())
    env = os.environ.get("POPBENCH_DATA_DIR")
    if env:
        dirs.append(Path(env).expanduser())
    dirs.append(cache_root())
    out: list[Path] = []
    for d in dirs:
        if d not in out:
            out.append(d)
    return out


def downloads_allowed() -> bool:
    """Downloads are on unless ``POPBENCH_OFFLINE`` is set to a true value or ``CI`` is set."""
    offline = os.environ.get("POPBENCH_OFFLINE", "").strip().lower()
    if offline not in ("", "0", "false", "no"):
        return False
    return not os.environ.get("CI")


def entry(name: str) -> DataFile:
    """The registry entry for ``name`` (also accepts the bare file name)."""
    if name in REGISTRY:
        return REGISTRY[name]
    hits = [f for f in REGISTRY.values() if Path(f.name).name == name]
    if len(hits) == 1:
        return hits[0]
    raise PopbenchError(f"unknown data file {name!r}; known files are {', '.join(REGISTRY)}")


# --------------------------------------------------------------------------------------------
# Checksums


def file_digests(path: str | os.PathLike) -> tuple[str, str]:
    """``(sha256, git blob id)`` of a file, in one pass."""
    path = Path(path)
    size = path.stat().st_size
    sha = hashlib.sha256()
    blob = hashlib.sha1(f"blob {size}\0".encode())
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            sha.update(chunk)
            blob.update(chunk)
    return sha.hexdigest(), blob.hexdigest()


_VERIFIED: dict[tuple[str, int, int, str], str | None] = {}


def check_file(path: str | os.PathLike, f: DataFile) -> str | None:
    """None when ``path`` matches ``f``'s size and checksums, else the reason it does not.

    Results are memoised per (path, mtime, size, entry) so a file is hashed once per process.
    """
    path = Path(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_mtime_ns, st.st_size, f"{f.size}|{f.sha256}|{f.git_blob}")
    if key in _VERIFIED:
        return _VERIFIED[key]
    reason: str | None = None
    if f.size is not None and st.st_size != f.size:
        reason = f"it has {st.st_size} bytes, expected {f.size}"
    else:
        sha, blob = file_digests(path)
        if f.sha256 and sha != f.sha256:
            reason = f"its sha256 is {sha}, expected {f.sha256}"
        elif f.git_blob and blob != f.git_blob:
            reason = f"its git blob id is {blob}, expected {f.git_blob}"
        elif not (f.sha256 or f.git_blob):
            reason = "the registry has no checksum for it"
    _VERIFIED[key] = reason
    return reason


# --------------------------------------------------------------------------------------------
# Resolution and download


def _first_writable(dirs: Sequence[Path]) -> Path:
    """The first of ``dirs`` where files can be created (judged by the nearest existing parent
    where it does not exist yet); the first one if none is."""
    for d in dirs:
        p = d
        while not p.exists() and p != p.parent:
            p = p.parent
        if os.access(p, os.W_OK):
            return d
    return dirs[0]


def _missing_message(f: DataFile, dirs: Sequence[Path], why: str) -> str:
    where = _first_writable(dirs) / Path(f.name).parent
    return (
        f"data file {f.name!r} is missing ({why}): get it from {f.url} ({f.checksum_text}) and put it "
        f"in {where}/, or point --data-dir or POPBENCH_DATA_DIR at a directory that holds {f.name} "
        f"(looked in {', '.join(str(d) for d in dirs)})."
    )


def _download(f: DataFile, dest: Path) -> None:
    """Download ``f`` to ``dest`` atomically (temp file in the same directory, verify, rename)."""
    from tqdm import tqdm

    made = [d for d in (dest.parent, *dest.parent.parents) if not d.exists()]  # deepest first
    dest.parent.mkdir(parents=True, exist_ok=True)
    errors = []
    for url in (f.url, *f.mirrors):
        fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
        tmp = Path(tmp_name)
        try:
            req = urllib.request.Request(url, headers={"User-Agent": "popbench"})
            with urllib.request.urlopen(req, timeout=60) as resp, os.fdopen(fd, "wb") as out:
                total = f.size or int(resp.headers.get("Content-Length") or 0) or None
                with tqdm(total=total, unit="B", unit_scale=True, desc=f.name, leave=False) as bar:
                    for chunk in iter(lambda: resp.read(1 << 16), b""):
                        out.write(chunk)
                        bar.update(len(chunk))
            reason = check_file(tmp, f)
            if reason:
                raise OSError(f"the downloaded file fails verification: {reason}")
            os.chmod(tmp, 0o644)  # mkstemp creates 0600
            os.replace(tmp, dest)
            return
        except Exception as exc:  # noqa: BLE001 - try the next URL, report all
            msg = str(getattr(exc, "reason", "") or exc)
            if msg not in errors:
                errors.append(msg)
        finally:
            if tmp.exists():
                tmp.unlink()
    for d in made:  # leave no empty folder behind: only those this call created, while empty
        try:
            d.rmdir()
        except OSError:
            break
    raise OSError("; ".join(errors))


def resolve(name: str, data_dir: str | os.PathLike | None = None, download: bool | None = None) -> Path:
    """The verified local path of data file ``name`` (see the module docstring for the order).

    ``download``: None follows the environment (:func:`downloads_allowed`); True/False force it.
    """
    f = entry(name)
    dirs = search_dirs(data_dir)
    for d in dirs:
        path = d / f.name
        if path.exists() and not path.is_file():
            raise PopbenchError(f"data file {f.name!r} at {path} is not a file (a directory?): remove it and get the "
                                f"file again from {f.url} ({f.checksum_text}) into {path.parent}/.")
        if path.is_file():
            reason = check_file(path, f)
            if reason:
                raise PopbenchError(
                    f"data file {f.name!r} at {path} is corrupted or the wrong file ({reason}): delete it "
                    f"and get it again from {f.url} ({f.checksum_text}) into {path.parent}/."
                )
            return path
    by_env = download is None
    if by_env:
        download = downloads_allowed()
    if not download:
        why = "downloads are off: POPBENCH_OFFLINE or CI is set" if by_env else "downloads are off"
        raise PopbenchError(_missing_message(f, dirs, why))
    dest = _first_writable(dirs) / f.name  # e.g. past a read-only shared data directory
    try:
        _download(f, dest)
    except OSError as exc:
        raise PopbenchError(_missing_message(f, dirs, f"download failed: {exc}")) from exc
    return dest


def _names_for(name: str) -> list[str]:
    """Registry names for a file name, or for a task family / ``family/variant``."""
    try:
        return [entry(name).name]
    except PopbenchError:
        from harness import registry

        family, _, variant = name.partition("/")
        try:
            cls = registry.tasks.load(family)
        except PopbenchError:
            raise PopbenchError(
                f"{name!r} is neither a data file ({', '.join(REGISTRY)}) nor a task family"
            ) from None
        if variant and variant not in cls.variants:
            raise PopbenchError(f"{family} has no variant {variant!r}; it has {', '.join(cls.variants)}")
        return list(cls.variant_data_files(variant) if variant else cls.data_files)


def fetch(
    names: Iterable[str] | None = None, data_dir: str | os.PathLike | None = None, download: bool = True
) -> list[Path]:
    """Download (when missing) and verify data files ahead of time; all of them by default.

    ``names`` are registry names (``ocean/oceans_with_v0.npz``), bare file names, or task families
    and ``family/variant`` names (their data files). Every file is tried; if any fails, one
    :class:`PopbenchError` lists all failures.
    """
    wanted: list[str] = []
    for n in names or REGISTRY:
        for f in _names_for(n):
            if f not in wanted:
                wanted.append(f)
    paths: list[Path] = []
    errors: list[str] = []
    for n in wanted:
        try:
            paths.append(resolve(n, data_dir=data_dir, download=download))
        except PopbenchError as exc:
            errors.append(str(exc))
    if errors:
        raise PopbenchError("; ".join(errors))
    return paths


__all__ = [
    "REGISTRY",
    "DataFile",
    "cache_root",
    "check_file",
    "downloads_allowed",
    "entry",
    "fetch",
    "file_digests",
    "register",
    "resolve",
    "search_dirs",
]
