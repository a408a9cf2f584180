"""DICE: discrete inverse continuity equation (Blickhan et al. 2025), methods.md section 6.

The same scalar network ``s(x, t)`` and velocity ``∇_x s`` as action matching
(``methods/action_matching.py``), trained on the training snapshots themselves (no interpolant).
With training times ``t_0 < … < t_K``, ``Δ_k = t_{k+1} - t_k`` and trapezoid weights
``ω_0 = Δ_0/2``, ``ω_k = (Δ_{k-1} + Δ_k)/2``, ``ω_K = Δ_{K-1}/2``:

    L = Σ_{k<K} ½ (E_{μ_k} - E_{μ_{k+1}}) [s(·, t_k) + s(·, t_{k+1})]
        + ½ Σ_k ω_k E_{μ_k} ‖∇_x s(·, t_k)‖²

(expectations over a minibatch of ``batch_size`` rows of every marginal). Prediction as AM: RK4 on
``ẋ = ∇s``.

The loss is unbounded below when consecutive snapshots barely overlap (the vortex: the cloud moves
about 1.0 between training snapshots while its spread is about 0.03), so training diverges. The
paper reports DICE "at its best checkpoint" chosen on test data; here the checkpoint is chosen on a
signal from the TRAINING marginals only: every ``eval_every`` iterations, the mean over consecutive
training pairs of the exact W1 between marginal k pushed by the learned flow to ``t_{k+1}`` and
marginal k+1 (``action_matching.one_step_w1``). ``learned()`` carries the loss curve, the validation
curve, the selected iteration and the signal's description.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from harness.protocol import Capabilities, resolve_hparams
from methods.action_matching import _FAMILIES, _PAPER, _SMOKE, _ScalarFlowMethod, _rows, _torch

# --------------------------------------------------------------------------------------------------
# Hyperparameters (HPARAMS[profile][task_key]). `paper`: Appendix C.2 of the WLM paper (5000
# iterations; the paper's chosen checkpoints are multiples of 500; we validate every 250, with a
# 20-steps-per-unit RK4 flow). `quick` = `paper` except on boids (see below).
# `smoke`: seconds, proves the code path including one checkpoint evaluation.
# --------------------------------------------------------------------------------------------------

_DICE_PAPER: dict[str, Any] = dict(
    _PAPER,
    iterations=5000,
    eval_every=250,  # checkpoint selection on one-step W1 between training marginals
)
_DICE_SMOKE: dict[str, Any] = dict(_SMOKE, iterations=40, eval_every=20, val_max_points=200)

HPARAMS: dict[str, dict[str, dict[str, Any]]] = {
    "paper": {key: dict(_DICE_PAPER) for key in _FAMILIES},
    # quick = paper except boids (below): one paper job fits in 80-95 s on 1 CPU thread (vortex,
    # eb300), ~2 min on the shared 2-core box.
    "quick": {key: dict(_DICE_PAPER) for key in _FAMILIES},
    "smoke": {key: dict(_DICE_SMOKE) for key in _FAMILIES},
}
# boids has 50 training marginals: the DICE loss touches every marginal each iteration (50 x 256
# rows; ~0.12 s per iteration on 1 CPU thread), and its validation flows through 49 intervals. quick
# uses 64 rows per marginal, 1000 iterations and a 200-row validation subsample (~3 CPU-minutes).
HPARAMS["quick"]["boids"].update(batch_size=64, iterations=1000, val_max_points=200)


def trapezoid_weights(times: np.ndarray) -> np.ndarray:
    """``ω_k``: half of the adjacent gaps (trapezoid rule on the training grid)."""
    gaps = np.diff(np.asarray(times, dtype=float))
    w = np.zeros(len(times))
    w[:-1] += gaps / 2
    w[1:] += gaps / 2
    return w


def dice_loss(model, xs, times, rng, hp):
    """The DICE objective on one minibatch (``batch_size`` rows of every training marginal).

    Vectorised over marginals: the rows of all marginals go through the network together, each
    row j-weighted so that every marginal's rows form an exact mean. Per marginal j the loss has
    ``+½ E_{μ_j}[s(t_j) + s(t_{j+1})]`` (pair j, j+1; j < K), ``-½ E_{μ_j}[s(t_{j-1}) + s(t_j)]``
    (pair j-1, j; j > 0) and ``½ ω_j E_{μ_j}‖∇s(t_j)‖²``.
    """
    torch = _torch()
    dev = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    b = int(hp["batch_size"])
    omega = trapezoid_weights(times)
    K = len(times) - 1
    idx = [_rows(len(x), b, rng) for x in xs]
    x = torch.as_tensor(np.concatenate([xj[i] for xj, i in zip(xs, idx)]), dtype=dtype, device=dev)
    j = np.concatenate([np.full(len(i), k) for k, i in enumerate(idx)])
    inv_n = 1.0 / np.concatenate([np.full(len(i), len(i), dtype=float) for i in idx])
    has_next, has_prev = (j < K).astype(float), (j > 0).astype(float)

    def col(a):
        return torch.as_tensor(a, dtype=dtype, device=dev)

    x.requires_grad_(True)
    s_self = model(x, col(times[j]))
    (g,) = torch.autograd.grad(s_self.sum(), x, create_graph=True)
    s_next = model(x, col(times[np.minimum(j + 1, K)]))
    s_prev = model(x, col(times[np.maximum(j - 1, 0)]))
    per_row = (
        0.5 * col(omega[j]) * (g**2).sum(1)
        + 0.5 * col(has_next - has_prev) * s_self
        + 0.5 * col(has_next) * s_next
        - 0.5 * col(has_prev) * s_prev
    )
    return (col(inv_n) * per_row).sum()


class DICE(_ScalarFlowMethod):
    """DICE with checkpoint selection on training marginals (see the module docstring)."""

    name = "dice"
    capabilities = Capabilities(interpolate=True, forecast=False, framework="torch", num_gpus=0.0)

    @classmethod
    def default_hparams(cls, task: str, profile: str) -> dict[str, Any]:
        return resolve_hparams(HPARAMS, task, profile)

    def _loss(self, model, xs, times, rng, hp):
        return dice_loss(model, xs, times, rng, hp)
