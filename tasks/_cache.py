"""Disk cache of generated task data (synthetic marginals), keyed by parameters and seed.

    arrays = cached_arrays("boids", {"variant": "default", "seed": 0, ...}, build)

``build()`` returns a dict of NumPy arrays; the first call writes them to
``<cache root>/generated/<family>-<hash>.npz`` and later calls (any process) read them back.
The cache root is ``$POPBENCH_CACHE_DIR`` or ``~/.cache/popbench``. The key is a hash of the
parameters (JSON, sorted keys) plus NumPy's version (random streams may change between releases);
a task puts its generator's version number in the parameters, so changing the generator
invalidates old files. Writes are atomic (temporary file in the same directory, then rename), so
parallel workers never read half a file. An unreadable cache file is regenerated; an unwritable
cache directory only costs the regeneration. ``POPBENCH_NO_CACHE=1`` turns the cache off.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

_PARAMS_KEY = "__params__"


def cache_dir() -> Path:
    env = os.environ.get("POPBENCH_CACHE_DIR")
    root = Path(env).expanduser() if env else Path.home() / ".cache" / "popbench"
    return root / "generated"


def cache_key(params: Mapping[str, Any]) -> tuple[str, str]:
    """``(json text, short hash)`` of the parameters (NumPy's version included)."""
    text = json.dumps({**params, "_numpy": np.__version__}, sort_keys=True, default=str)
    return text, hashlib.sha256(text.encode()).hexdigest()[:20]


def cache_path(family: str, params: Mapping[str, Any]) -> Path:
    return cache_dir() / f"{family}-{cache_key(params)[1]}.npz"


def _read(path: Path, text: str) -> dict[str, np.ndarray] | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z[_PARAMS_KEY]) != text:  # a hash collision or a stale format: regenerate
                return None
            return {k: z[k] for k in z.files if k != _PARAMS_KEY}
    except FileNotFoundError:
        return None
    except Exception:  # noqa: BLE001 - a damaged cache file is regenerated, never trusted
        return None


def _write(path: Path, arrays: Mapping[str, np.ndarray], text: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        np.savez(buf, **{_PARAMS_KEY: np.array(text)}, **arrays)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(buf.getvalue())
            os.chmod(tmp, 0o644)  # mkstemp creates 0600; the cache may be shared
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except OSError:
        pass  # read-only or full cache directory: the data are simply regenerated next time


def cached_arrays(
    family: str, params: Mapping[str, Any], build: Callable[[], Mapping[str, np.ndarray]]
) -> dict[str, np.ndarray]:
    """The arrays ``build()`` returns for these parameters, read from disk when cached."""
    if os.environ.get("POPBENCH_NO_CACHE", "").strip() not in ("", "0"):
        return {k: np.asarray(v) for k, v in build().items()}
    text, _ = cache_key(params)
    path = cache_path(family, params)
    hit = _read(path, text)
    if hit is not None:
        return hit
    arrays = {k: np.asarray(v) for k, v in build().items()}
    _write(path, arrays, text)
    return arrays
