"""Distances between a predicted and a true population (protocol.md section 3).

- :func:`w1`: exact 1-Wasserstein distance, Euclidean ground cost, uniform weights over all
  particles (or the prediction's own weights), solved by POT's network simplex. A solve that stops
  on its iteration cap raises :class:`SolverError`: it is never reported as a number.
- :func:`w2`: exact 2-Wasserstein distance (squared-Euclidean cost, square root taken).
- :func:`energy_mmd`: the energy distance (an MMD with the distance kernel), cheap and unbiased
  enough to catch a method that games W1.

POT is imported lazily with its torch/JAX backends disabled, so scoring never drags a deep
learning framework into a process that does not need one.
"""

from __future__ import annotations

import os
import sys
import warnings

import numpy as np

NUM_ITER_MAX = 10_000_000


class SolverError(RuntimeError):
    """The exact OT solver did not converge (e.g. it hit its iteration cap)."""


def _ot():
    """Import POT without its optional torch/JAX/geomloss integrations (we score NumPy arrays).

    POT imports geomloss (hence torch) at import time when it is installed; hiding geomloss for
    the duration of the import keeps a scoring-only process free of torch. Nothing is hidden when
    torch or geomloss are already loaded, so methods that use them are unaffected.
    """
    if "ot" in sys.modules:
        return sys.modules["ot"]
    for key in ("PYTORCH", "JAX", "CUPY", "TENSORFLOW"):
        os.environ.setdefault(f"POT_BACKEND_DISABLE_{key}", "1")
    hide = "geomloss" not in sys.modules and "torch" not in sys.modules
    if hide:
        sys.modules["geomloss"] = None  # type: ignore[assignment]  # makes `import geomloss` fail
    try:
        import ot
    finally:
        if hide:
            del sys.modules["geomloss"]
    return ot


def _weights(n: int, w: np.ndarray | None, name: str) -> np.ndarray:
    if w is None:
        return np.full(n, 1.0 / n)
    w = np.asarray(w, dtype=np.float64).reshape(-1)
    if w.shape[0] != n:
        raise ValueError(f"{name} has {w.shape[0]} weights for {n} points")
    if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"{name} must be finite, non-negative and not all zero")
    return w / w.sum()


def _check(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"point sets must be (n, d) and (m, d), got {x.shape} and {y.shape}")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise ValueError("point sets must be finite")
    return x, y


def _exact_ot(cost: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    ot = _ot()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        value, log = ot.emd2(a, b, cost, numItermax=NUM_ITER_MAX, log=True)
    msgs = [str(w.message) for w in caught]
    if log.get("warning"):
        msgs.append(str(log["warning"]))
    bad = [m for m in msgs if "numItermax" in m or "not converge" in m.lower() or "infeasible" in m.lower()]
    if bad or log.get("result_code", 1) != 1:
        raise SolverError(f"exact OT solve failed ({'; '.join(bad) or log.get('result_code')})")
    return float(value)


def w1(x: np.ndarray, y: np.ndarray, a: np.ndarray | None = None, b: np.ndarray | None = None) -> float:
    """Exact W1 between ``x`` (weights ``a``, default uniform) and ``y`` (weights ``b``)."""
    x, y = _check(x, y)
    ot = _ot()
    cost = ot.dist(x, y, metric="euclidean")
    return _exact_ot(cost, _weights(len(x), a, "a"), _weights(len(y), b, "b"))


def w2(x: np.ndarray, y: np.ndarray, a: np.ndarray | None = None, b: np.ndarray | None = None) -> float:
    """Exact W2 (square root of the optimal squared-Euclidean cost)."""
    x, y = _check(x, y)
    ot = _ot()
    cost = ot.dist(x, y, metric="sqeuclidean")
    return float(np.sqrt(max(_exact_ot(cost, _weights(len(x), a, "a"), _weights(len(y), b, "b")), 0.0)))


def _mean_dist(x: np.ndarray, y: np.ndarray, a: np.ndarray, b: np.ndarray, block: int = 2048) -> float:
    total = 0.0
    for i in range(0, len(x), block):
        d = np.sqrt(np.maximum(((x[i : i + block, None, :] - y[None, :, :]) ** 2).sum(-1), 0.0))
        total += float(a[i : i + block] @ d @ b)
    return total


def energy_mmd(x: np.ndarray, y: np.ndarray, a: np.ndarray | None = None, b: np.ndarray | None = None) -> float:
    """Energy distance ``2 E|X-Y| - E|X-X'| - E|Y-Y'|`` (V-statistic), clipped at 0."""
    x, y = _check(x, y)
    a = _weights(len(x), a, "a")
    b = _weights(len(y), b, "b")
    val = 2 * _mean_dist(x, y, a, b) - _mean_dist(x, x, a, a) - _mean_dist(y, y, b, b)
    return float(max(val, 0.0))


def all_metrics(pred: np.ndarray, true: np.ndarray, weights: np.ndarray | None = None) -> dict[str, float]:
    """The three numbers a result row carries for one target."""
    return {
        "w1": w1(pred, true, weights),
        "w2": w2(pred, true, weights),
        "mmd": energy_mmd(pred, true, weights),
    }
