"""Flow matching between snapshots: ``i_cfm``, ``ot_cfm``, ``sb_cfm``, ``sf2m_exact``, ``sf2m_sink``,
``i_mfm``, ``ot_mfm``, ``curly_fm`` (docs/flow_matching.md has the protocol and every setting's
source).

One trainer. The eight methods differ only in four choices (their :class:`Recipe`):

================  ============  =====================================  =========  ==================
method            coupling      conditional path                       σ_s        extra
================  ============  =====================================  =========  ==================
``i_cfm``         independent   linear                                 σ          —
``ot_cfm``        exact OT      linear                                 σ          —
``sb_cfm``        Sinkhorn      linear, Brownian-bridge velocity       σ√(s(1-s)) —
``sf2m_exact``    exact OT      linear, Brownian-bridge velocity       σ√(s(1-s)) score head, SDE
``sf2m_sink``     Sinkhorn      linear, Brownian-bridge velocity       σ√(s(1-s)) score head, SDE
``i_mfm``         independent   linear + 2s(1-s)·φ (LAND geodesic)     σ          φ trained first
``ot_mfm``        exact OT      linear + 2s(1-s)·φ (LAND geodesic)     σ          φ trained first
``curly_fm``      Hungarian on  linear + s(1-s)·φ (matches the kNN     σ√(s(1-s)) φ trained first;
                  ‖dμ/dt-u_ref‖²  reference of observed velocities)                 needs velocities
================  ============  =====================================  =========  ==================

Exact OT is POT's network simplex (``ot.emd``) and Sinkhorn POT's ``ot.sinkhorn`` (regularisation
2σ², the Schrödinger-bridge choice), both on the squared Euclidean cost of one minibatch; training
pairs are then drawn from the plan with replacement. A Sinkhorn plan that comes back non-finite or
empty is replaced by the uniform plan (as the reference library does), and counted in ``learned()``.

Protocol (the same for every method):

- Training pairs are consecutive *training* marginals. A pair that spans a held-out time keeps its
  true time span (leave-out day 2 of 0..4: the pair (1, 3) spans two units).
- Time: the networks see *model time* τ = (t - t_first) / ``time_scale``. ``time_scale`` picks the
  reference code's convention: 2 on the vortex (one model unit per training interval, the held-out
  snapshot at its midpoint, as the Curly-FM notebooks), 1 for the torchcfm runner on EB (index
  time), 4 for metric flow matching on EB (the five days on [0, 1]). In a pair (τ_a, τ_b),
  s = (τ - τ_a)/(τ_b - τ_a); conditional velocities are d/dτ.
- Every step draws ``batch_size`` rows from each end of every pair, couples them, draws
  s ~ U(0, 1) per pair of rows, and regresses the network on the conditional velocity (MSE).
- A validation split, when a method monitors one (``val_every`` > 0), is ``val_fraction`` (10 %) of
  each *training* marginal, fixed per seed; the held-out marginal is never read. It drives early
  stopping (``patience`` checks without improvement) and the checkpoint choice (``select``:
  ``best`` = the torchcfm runner's best-validation weights, ``last`` = the weights training
  stopped with, as the metric-flow-matching code tests). Without validation every row trains.
- Prediction: ``euler_steps`` fixed Euler steps per requested interval from the given start
  marginal (99 over the vortex's half interval, 100 on EB, as the reference code); SF2M integrates
  the SDE ``dx = (v + s·g²/σ²) dτ + g dW`` (g² = σ²/pair span) with as many Euler-Maruyama steps.

Score head (SF2M): ``s(x, τ)`` is trained with ``‖λ(s)·s(x_s, τ) + ε‖²``, λ = 2σ_s/σ², so that it
learns (σ²/2)·∇log p; the SDE drift adds it to the probability-flow velocity.

Geodesic interpolants (trained before the flow, then frozen):

- MFM: φ(x0, x1, τ) minimises the kinetic energy in the LAND metric of the pair's two training
  marginals, mean_d u_d² G_d(x_s) with G_d(x) = (Σ_n w_n (x_{n,d} - x_d)² + ρ)^(-α),
  w_n = exp(-‖x - x_n‖²/(2γ²)), divided by the same energy of the straight path.
- Curly-FM: φ matches the reference velocity u_ref(x) = Σ_j w_j v_j over the k nearest of the
  minibatch's endpoint rows (w_j ∝ exp(-d_j²/(2h²)), h = the k-th distance) scaled by
  ``ref_scale``: ‖ref_scale·u_ref - dμ/dτ‖² + (1 - cos(u_ref, dμ/dτ)).

Profiles: ``paper`` is the reference code's settings per task (module-level ``HPARAMS``, sources in
the comments). Every job here takes at most a few CPU-minutes, so ``quick`` equals ``paper``;
``smoke`` proves the code path in seconds.

The module imports neither torch nor POT at import time.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from harness.protocol import (
    Capabilities, DivergedError, Marginal, Method, PopbenchError, Prediction, TrainData, curve, require,
    require_at_least, require_choice, require_positive, require_widths, resolve_hparams,
)

# --------------------------------------------------------------------------------------------------
# Settings. HPARAMS[method][profile][task_key]; task_key is "family/variant", "family" or "default".
# --------------------------------------------------------------------------------------------------

# Vortex: the Curly-FM ocean notebook's OT-CFM cell: torchcfm MLP (3 hidden layers of 64, SELU, time
# as an input column), σ = 0.01, Adam lr 1e-4, 10,000 steps of 64 rows per end of each of the 4
# training pairs, no validation; 99 Euler steps over the half interval to the held-out snapshot.
_VORTEX: dict[str, Any] = {
    "hidden": [64, 64, 64],
    "sigma": 0.01,
    "optimizer": "adam",
    "lr": 1e-4,
    "weight_decay": 0.0,
    "batch_size": 64,  # rows per end of every training pair, every step
    "iterations": 10_000,  # step cap of the flow stage
    "val_fraction": 0.1,  # of each training marginal, when val_every > 0
    "val_every": 0,  # steps between validation checks (0: no validation, every row trains)
    "patience": 0,  # checks without improvement before stopping (0: never stop early)
    "select": "last",  # which weights predict: "last" or "best" (lowest validation loss)
    "time_scale": 2.0,  # task time units per model unit (null: the mean training-pair spacing)
    "euler_steps": 99,  # per requested interval
    "log_points": 100,
}
# EB, torchcfm runner (I-CFM, OT-CFM, SB-CFM, SF2M): VelocityNet [64, 64, 64] SELU, AdamW lr 1e-3
# wd 1e-5, batch 128, index time, 1000 epochs with validation every 10 epochs and the best
# checkpoint tested (its early-stopping patience of 100 checks never fires within 1000 epochs).
# An epoch is the smallest training day's training rows / 128: 2142 / 128 = 16 steps on EB, 270 /
# 128 = 2 steps on eb300. 100 Euler steps per unit of time.
_EB_RUNNER: dict[str, Any] = dict(
    _VORTEX, sigma=0.1, optimizer="adamw", lr=1e-3, weight_decay=1e-5, batch_size=128, iterations=16_000,
    val_every=160, patience=0, select="best", time_scale=1.0, euler_steps=100,
)
_EB300_RUNNER: dict[str, Any] = dict(_EB_RUNNER, iterations=2_000, val_every=20)

# Metric flow matching, EB configs (configs/single_cell/5dims/{ot,i}-mfm_eb.yaml and the parser's
# defaults): σ = 0.1 constant, the five days on [0, 1] (time_scale 4), flow AdamW lr 1e-3 wd 1e-5
# checked every 10 epochs with patience 5 and tested with its last weights; geopath Adam lr 1e-4
# checked every epoch with patience 5, best weights reloaded; caps of 1000 epochs each.
_MFM_EB: dict[str, Any] = dict(
    _EB_RUNNER, time_scale=4.0, patience=5, select="last",
    geo_hidden=[64, 64, 64], geo_optimizer="adam", geo_lr=1e-4, geo_weight_decay=0.0,
    geo_iterations=16_000, geo_val_every=16, geo_patience=5, geo_select="best",
)
_LAND_OT = {"land_gamma": 0.125, "land_rho": 0.001, "land_alpha": 2.0}  # ot-mfm_eb.yaml
_LAND_I = {"land_gamma": 0.175, "land_rho": 0.2, "land_alpha": 1.0}  # i-mfm_eb.yaml
_I_MFM_WIDTHS = {"hidden": [32, 32, 32], "geo_hidden": [32, 32, 32]}  # i-mfm_eb.yaml
# MFM on the vortex has no public code or settings. Ours: the vortex OT-CFM flow settings above, a
# geopath of 5,000 Adam steps at lr 1e-4 (the Curly notebook's geodesic stage length, MFM's
# optimiser) without validation, and the EB LAND settings unchanged (no tuning: picking γ by the
# held-out snapshots would peek).
_MFM_VORTEX: dict[str, Any] = dict(
    _VORTEX, geo_hidden=[64, 64, 64], geo_optimizer="adam", geo_lr=1e-4, geo_weight_decay=0.0,
    geo_iterations=5_000, geo_val_every=0, geo_patience=0, geo_select="last",
)
# Curly-FM, ocean notebook (ODE version): geodesic stage AdamW lr 1e-4 (torch's default weight decay
# 0.01) for 5,000 steps, then the vector field with Adam lr 1e-4 for 3,000 steps; σ = 0.01; k = 20
# neighbours; observed velocities used raw (ref_scale 1: read as displacement per model unit).
_CURLY: dict[str, Any] = dict(
    _VORTEX, iterations=3_000, geo_hidden=[64, 64, 64], geo_optimizer="adamw", geo_lr=1e-4,
    geo_weight_decay=0.01, geo_iterations=5_000, geo_val_every=0, geo_patience=0, geo_select="last",
    knn=20, ref_scale=1.0,
)
# SB-CFM: sbcfm.yaml (σ = 1 on EB, Sinkhorn reg 2σ²). On the vortex σ = 0.1, the Curly SDE notebook's.
# SF2M: the runner's SF2MLitModule default σ = 0.1 on EB (no SF2M config is public), score weight 1.
# (sf2m_sink's Sinkhorn at reg 0.02 on whitened 5-D rows can underflow; see learned()'s counter.)
_SB = {"vortex": {"sigma": 0.1}, "eb": {"sigma": 1.0}}
_SF2M = {"vortex": {"sigma": 0.1, "score_weight": 1.0}, "eb": {"sigma": 0.1, "score_weight": 1.0}}


def _smoke(hp: dict[str, Any]) -> dict[str, Any]:
    out = dict(hp, iterations=30, batch_size=32, euler_steps=10, log_points=10)
    if out["val_every"]:
        out["val_every"] = 10
    if "geo_iterations" in out:
        out.update(geo_iterations=20, geo_val_every=5 if out["geo_val_every"] else 0)
    return out


def _table(vortex: dict, eb: dict, eb300: dict, default: dict) -> dict[str, dict[str, dict[str, Any]]]:
    paper = {"vortex": vortex, "eb": eb, "eb300": eb300, "default": dict(default, time_scale=None)}
    return {
        "paper": paper,
        # quick = paper: a vortex job is 1-5 CPU-minutes, an eb300 job seconds to a minute.
        "quick": {k: dict(v) for k, v in paper.items()},
        "smoke": {k: _smoke(v) for k, v in paper.items()},
    }


def _eb300_of(eb: dict) -> dict:
    """eb300's settings from EB's: 2 steps per epoch instead of 16 (the epoch arithmetic above)."""
    out = dict(eb, iterations=eb["iterations"] // 8, val_every=eb["val_every"] // 8)
    if "geo_iterations" in eb:
        out.update(geo_iterations=eb["geo_iterations"] // 8, geo_val_every=eb["geo_val_every"] // 8)
    return out


_MFM_EB_OT = dict(_MFM_EB, **_LAND_OT)
_MFM_EB_I = dict(_MFM_EB, **_LAND_I, **_I_MFM_WIDTHS)
HPARAMS: dict[str, dict[str, dict[str, dict[str, Any]]]] = {
    "i_cfm": _table(_VORTEX, _EB_RUNNER, _EB300_RUNNER, _EB_RUNNER),
    "ot_cfm": _table(_VORTEX, _EB_RUNNER, _EB300_RUNNER, _EB_RUNNER),
    "sb_cfm": _table(dict(_VORTEX, **_SB["vortex"]), dict(_EB_RUNNER, **_SB["eb"]),
                     dict(_EB300_RUNNER, **_SB["eb"]), dict(_EB_RUNNER, **_SB["eb"])),
    **{name: _table(dict(_VORTEX, **_SF2M["vortex"]), dict(_EB_RUNNER, **_SF2M["eb"]),
                    dict(_EB300_RUNNER, **_SF2M["eb"]), dict(_EB_RUNNER, **_SF2M["eb"]))
       for name in ("sf2m_exact", "sf2m_sink")},
    "i_mfm": _table(dict(_MFM_VORTEX, **_LAND_I, **_I_MFM_WIDTHS), _MFM_EB_I, _eb300_of(_MFM_EB_I), _MFM_EB_I),
    "ot_mfm": _table(dict(_MFM_VORTEX, **_LAND_OT), _MFM_EB_OT, _eb300_of(_MFM_EB_OT), _MFM_EB_OT),
    # Curly-FM is a vortex method (Table 2); elsewhere it keeps the notebook's settings.
    "curly_fm": _table(_CURLY, _CURLY, _CURLY, _CURLY),
}


@dataclass(frozen=True)
class Recipe:
    """What makes one method: the four choices of the table in the module docstring."""

    coupling: str  # "independent", "exact", "sinkhorn" or "curly"
    schedule: str  # σ_s: "constant" (σ) or "brownian" (σ√(s(1-s)))
    bridge_velocity: bool = False  # add the Brownian bridge's (1-2s)/(2s(1-s))·(x - μ) to the target
    geodesic: str | None = None  # None, "land" (MFM) or "curly"
    bend: float = 0.0  # μ = (1-s)x0 + s x1 + bend·s(1-s)·φ
    score: bool = False  # SF2M's score head and SDE prediction


# --------------------------------------------------------------------------------------------------
# Networks: MLPs with SELU on [inputs, τ] (torchcfm's MLP, the runner's VelocityNet, MFM's GeoPathMLP)
# --------------------------------------------------------------------------------------------------


def _torch():
    import torch

    return torch


def mlp(in_dim: int, widths: Sequence[int], out_dim: int):
    nn = _torch().nn
    layers: list = []
    width = in_dim
    for w in widths:
        layers += [nn.Linear(width, int(w)), nn.SELU()]
        width = int(w)
    layers.append(nn.Linear(width, out_dim))
    return nn.Sequential(*layers)


def field(net, x, tau):
    """A velocity (or score) network at rows ``x`` and model times ``tau`` (shape (n,))."""
    torch = _torch()
    return net(torch.cat([x, tau.reshape(-1, 1).to(x.dtype)], dim=1))


def geodesic_offset(net, x0, x1, tau):
    """φ(x0, x1, τ) and ∂φ/∂τ (forward-mode, differentiable in the weights)."""
    torch = _torch()
    return torch.func.jvp(lambda tt: net(torch.cat([x0, x1, tt.reshape(-1, 1)], dim=1)), (tau,),
                          (torch.ones_like(tau),))


# --------------------------------------------------------------------------------------------------
# Couplings (POT) and the two geodesic objectives
# --------------------------------------------------------------------------------------------------


def sq_cost(x0: np.ndarray, x1: np.ndarray) -> np.ndarray:
    return ((x0[:, None, :] - x1[None, :, :]) ** 2).sum(-1)


def exact_plan(x0: np.ndarray, x1: np.ndarray) -> np.ndarray:
    """POT's exact OT plan between two uniform minibatches, squared Euclidean cost."""
    import ot

    from harness.metrics import NUM_ITER_MAX, SolverError

    a, b = np.full(len(x0), 1.0 / len(x0)), np.full(len(x1), 1.0 / len(x1))
    plan, log = ot.emd(a, b, sq_cost(x0, x1), numItermax=NUM_ITER_MAX, log=True)
    if log.get("result_code", 1) != 1 or log.get("warning"):
        raise SolverError(f"exact OT coupling failed ({log.get('warning') or log.get('result_code')})")
    return plan


def sinkhorn_plan(x0: np.ndarray, x1: np.ndarray, reg: float) -> np.ndarray | None:
    """POT's Sinkhorn plan (regularisation ``reg``), or None when it underflows (non-finite or
    empty), where the caller falls back to the uniform plan as the reference library does."""
    import warnings

    import ot

    a, b = np.full(len(x0), 1.0 / len(x0)), np.full(len(x1), 1.0 / len(x1))
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")  # non-convergence / division warnings: judged below
        plan = ot.sinkhorn(a, b, sq_cost(x0, x1), reg)
    if not np.all(np.isfinite(plan)) or abs(plan.sum()) < 1e-8:
        return None
    return plan


def draw_from_plan(plan: np.ndarray, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``n`` index pairs (i, j) drawn with replacement with probability ∝ plan[i, j]."""
    p = plan.ravel() / plan.sum()
    return np.divmod(rng.choice(plan.size, size=n, p=p), plan.shape[1])


def knn_reference(x, pts, vel, k: int):
    """Curly-FM's reference velocity at rows ``x``: Σ_j w_j v_j over the ``k`` nearest rows of
    ``pts`` (velocities ``vel``), w_j ∝ exp(-d_j²/(2h²)), h = the distance to the k-th neighbour."""
    torch = _torch()
    k = min(int(k), pts.shape[0])
    d, idx = torch.cdist(x, pts).topk(k, dim=1, largest=False)
    h = d[:, -1:].clamp_min(1e-12)
    w = torch.softmax(-(d**2) / (2 * h**2), dim=1)
    return (w[..., None] * vel[idx]).sum(1)


def land_metric(x, samples, gamma: float, rho: float, alpha: float):
    """Diagonal LAND metric G(x) (one row per row of ``x``): (Σ_n w_n (x_n - x)² + ρ)^(-α),
    w_n = exp(-‖x - x_n‖²/(2γ²)), over the metric ``samples``."""
    torch = _torch()
    diff2 = (samples[None, :, :] - x[:, None, :]) ** 2  # (n, m, d)
    w = torch.exp(-diff2.sum(-1) / (2 * gamma**2))
    return ((w[..., None] * diff2).sum(1) + rho) ** (-alpha)


# --------------------------------------------------------------------------------------------------
# The conditional path
# --------------------------------------------------------------------------------------------------


def conditional_path(recipe: Recipe, x0, x1, s, tau_a: float, span: float, eps, sigma: float, geo=None):
    """Sample the conditional path between coupled rows at fractions ``s`` of a pair that starts at
    model time ``tau_a`` and lasts ``span``. Returns ``(x, u, sigma_s, dmu)``: the point, the
    regression target d/dτ, the noise scale, and the mean's velocity."""
    torch = _torch()
    s2 = s.reshape(-1, 1)
    mu = (1 - s2) * x0 + s2 * x1
    dmu = (x1 - x0) / span
    if geo is not None:
        phi, dphi = geodesic_offset(geo, x0, x1, tau_a + span * s)
        gamma, dgamma = recipe.bend * s2 * (1 - s2), recipe.bend * (1 - 2 * s2)
        mu = mu + gamma * phi
        dmu = dmu + dgamma * phi / span + gamma * dphi
    sd = sigma * (torch.sqrt(s2 * (1 - s2)) if recipe.schedule == "brownian" else torch.ones_like(s2))
    x = mu + sd * eps
    u = dmu
    if recipe.bridge_velocity:
        u = u + (1 - 2 * s2) / (2 * s2 * (1 - s2)) * (x - mu) / span
    return x, u, sd, dmu


# --------------------------------------------------------------------------------------------------
# Training data: pairs of consecutive training marginals, a validation split of each
# --------------------------------------------------------------------------------------------------


@dataclass
class _Pair:
    tau_a: float
    span: float
    x0: np.ndarray  # training rows of the earlier marginal
    x1: np.ndarray
    v0: np.ndarray | None
    v1: np.ndarray | None
    x0_val: np.ndarray
    x1_val: np.ndarray
    v0_val: np.ndarray | None
    v1_val: np.ndarray | None


def model_times(data: TrainData, time_scale: float | None) -> tuple[float, float]:
    """(t_first, scale): τ = (t - t_first) / scale."""
    t = data.times
    scale = float(np.mean(np.diff(t))) if time_scale is None else float(time_scale)
    return float(t[0]), scale


def split_pairs(data: TrainData, hp: dict, seed: int) -> list[_Pair]:
    """Consecutive training marginals as pairs; ``val_fraction`` of each marginal held back (fixed
    per seed) when any stage validates."""
    t0, scale = model_times(data, hp.get("time_scale"))
    validates = bool(hp.get("val_every")) or bool(hp.get("geo_val_every"))
    train, val, vel, vel_val = [], [], [], []
    for i, m in enumerate(data.marginals):
        perm = np.random.default_rng([seed, 11, i]).permutation(m.n)
        n_val = int(math.ceil(float(hp["val_fraction"]) * m.n)) if validates else 0
        n_val = min(n_val, m.n - 1)
        train.append(m.x[perm[n_val:]])
        val.append(m.x[perm[:n_val]])
        vel.append(None if m.v is None else m.v[perm[n_val:]])
        vel_val.append(None if m.v is None else m.v[perm[:n_val]])
    pairs = []
    for k in range(len(data.marginals) - 1):
        ta, tb = (data.marginals[k].t - t0) / scale, (data.marginals[k + 1].t - t0) / scale
        pairs.append(_Pair(ta, tb - ta, train[k], train[k + 1], vel[k], vel[k + 1], val[k], val[k + 1],
                           vel_val[k], vel_val[k + 1]))
    return pairs


def _rows(n: int, b: int, rng: np.random.Generator) -> np.ndarray:
    return rng.choice(n, size=b, replace=b > n)


# --------------------------------------------------------------------------------------------------
# One optimisation stage (the geodesic and the flow use the same loop)
# --------------------------------------------------------------------------------------------------


def optimise(modules: list, step_loss: Callable, val_loss: Callable | None, *, optimizer: str, lr: float,
             weight_decay: float, iterations: int, val_every: int, patience: int, select: str,
             log_points: int) -> dict[str, Any]:
    """Adam/AdamW on ``step_loss()`` for up to ``iterations`` steps; every ``val_every`` steps
    ``val_loss()`` (no gradient) is checked, training stops after ``patience`` checks without a new
    best (0: never), and ``select`` = "best" reloads the best-checked weights."""
    torch = _torch()
    params = [p for m in modules for p in m.parameters()]
    opt_cls = torch.optim.AdamW if optimizer == "adamw" else torch.optim.Adam
    opt = opt_cls(params, lr=lr, weight_decay=weight_decay)
    window = max(1, iterations // max(1, log_points))
    losses: list[float] = []
    val_curve: list[list[float]] = []
    best, best_it, best_state, bad = float("inf"), 0, None, 0
    it = 0
    for it in range(1, iterations + 1):
        loss = step_loss()
        if not torch.isfinite(loss):
            raise DivergedError(f"non-finite training loss at step {it}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if val_loss is not None and val_every and (it % val_every == 0 or it == iterations):
            with torch.no_grad():
                v = float(val_loss())
            val_curve.append([it, v])
            if v < best:
                best, best_it, bad = v, it, 0
                best_state = [copy.deepcopy(m.state_dict()) for m in modules]
            else:
                bad += 1
                if patience and bad >= patience:
                    break
    if select == "best" and best_state is not None:
        for m, st in zip(modules, best_state):
            m.load_state_dict(st)
        chosen = best_it
    else:
        chosen = it
    return {"steps": it, "selected_step": chosen, "final_loss": losses[-1] if losses else float("nan"),
            "loss_curve": curve(losses, log_points), "val_curve": val_curve,
            "best_val": best if val_curve else None}


# --------------------------------------------------------------------------------------------------
# The method
# --------------------------------------------------------------------------------------------------


class FlowMatching(Method):
    """Shared fit/predict of the eight methods; a subclass only names its :class:`Recipe`."""

    recipe: Recipe = Recipe("independent", "constant")
    capabilities = Capabilities(interpolate=True, forecast=False, framework="torch", num_gpus=0.0)

    @classmethod
    def default_hparams(cls, task: str, profile: str) -> dict[str, Any]:
        return resolve_hparams(HPARAMS[cls.name], task, profile)

    @classmethod
    def check_hparams(cls, hp: dict[str, Any]) -> None:
        require_widths(hp, "hidden", *({"geo_hidden"} & hp.keys()))
        require_at_least(hp, "batch_size", "iterations", "euler_steps", "log_points")
        require_at_least(hp, "val_every", "patience", *({"geo_val_every", "geo_patience"} & hp.keys()), minimum=0)
        require_positive(hp, "lr", "sigma", *({"geo_lr", "land_gamma", "land_alpha", "ref_scale"} & hp.keys()))
        require(hp, "weight_decay", lambda v: v >= 0, "0 or more")
        require(hp, "val_fraction", lambda v: 0 < v < 1, "between 0 and 1")
        require(hp, "time_scale", lambda v: v > 0, "above 0", optional=True)
        require_choice(hp, "optimizer", ("adam", "adamw"))
        require_choice(hp, "select", ("last", "best"))
        if "geo_iterations" in hp:
            require_at_least(hp, "geo_iterations")
            require_choice(hp, "geo_optimizer", ("adam", "adamw"))
            require_choice(hp, "geo_select", ("last", "best"))
        if "land_rho" in hp:
            require(hp, "land_rho", lambda v: v >= 0, "0 or more")
        if "knn" in hp:
            require_at_least(hp, "knn")
        if "score_weight" in hp:
            require(hp, "score_weight", lambda v: v >= 0, "0 or more")

    # -- one training step's loss ------------------------------------------------------------------

    def _couple(self, x0: np.ndarray, x1: np.ndarray, rng: np.random.Generator, pair: _Pair | None = None,
                v0=None, v1=None) -> tuple[np.ndarray, np.ndarray]:
        """Indices (i, j) of the coupled rows of one pair's minibatch."""
        kind, b = self.recipe.coupling, len(x0)
        if kind == "curly" and self._geo_training:
            kind = "independent"  # Curly-FM fits its interpolant on independent pairs
        if kind == "independent":
            return np.arange(b), np.arange(b)
        if kind == "exact":
            return draw_from_plan(exact_plan(x0, x1), b, rng)
        if kind == "sinkhorn":
            plan = sinkhorn_plan(x0, x1, 2 * float(self.hparams["sigma"]) ** 2)
            if plan is None:
                self._fallbacks += 1
                plan = np.ones((b, len(x1)))
            return draw_from_plan(plan, b, rng)
        return self._curly_couple(x0, x1, v0, v1, pair, rng)

    def _curly_couple(self, x0, x1, v0, v1, pair, rng):
        """Curly-FM: at one shared s, cost 0.5‖dμ/dτ - ref_scale·u_ref(μ)‖² over all b × b pairs,
        solved exactly by the Hungarian method (a permutation)."""
        from scipy.optimize import linear_sum_assignment

        torch = _torch()
        hp, b = self.hparams, len(x0)
        t0, t1 = self._t(x0), self._t(x1)
        ref_pts, ref_vel = torch.cat([t0, t1]), torch.cat([self._t(v0), self._t(v1)])
        X0 = t0[:, None, :].expand(b, b, -1).reshape(b * b, -1)
        X1 = t1[None, :, :].expand(b, b, -1).reshape(b * b, -1)
        s = torch.full((b * b,), float(rng.random()), dtype=X0.dtype)
        with torch.no_grad():
            mu, _, _, dmu = conditional_path(self.recipe, X0, X1, s, pair.tau_a, pair.span, torch.zeros_like(X0),
                                             0.0, self._geo)
            uref = float(hp["ref_scale"]) * knn_reference(mu, ref_pts, ref_vel, int(hp["knn"]))
            cost = 0.5 * ((dmu - uref) ** 2).sum(1).reshape(b, b).double().numpy()
        return linear_sum_assignment(cost)

    def _t(self, a):
        torch = _torch()
        return torch.tensor(np.asarray(a), dtype=torch.float32)

    def _pair_batch(self, pair: _Pair, rng, b: int, val: bool = False):
        """One pair's coupled minibatch as tensors (x0, x1, s, eps) (+ velocities for Curly)."""
        if val:
            m = min(len(pair.x0_val), len(pair.x1_val))
            x0, x1 = pair.x0_val[:m], pair.x1_val[:m]
            v0 = None if pair.v0_val is None else pair.v0_val[:m]
            v1 = None if pair.v1_val is None else pair.v1_val[:m]
        else:
            i0, i1 = _rows(len(pair.x0), b, rng), _rows(len(pair.x1), b, rng)
            x0, x1 = pair.x0[i0], pair.x1[i1]
            v0 = None if pair.v0 is None else pair.v0[i0]
            v1 = None if pair.v1 is None else pair.v1[i1]
        i, j = self._couple(x0, x1, rng, pair, v0, v1)
        n = len(i)
        s = np.clip(rng.random(n), 1e-5, 1 - 1e-5)  # the Brownian-bridge target is singular at 0, 1
        eps = rng.standard_normal((n, x0.shape[1]))
        return self._t(x0[i]), self._t(x1[j]), self._t(s), self._t(eps), x0, x1, v0, v1

    def _flow_loss(self, pairs: list[_Pair], rng, b: int, val: bool = False):
        torch = _torch()
        sigma = float(self.hparams["sigma"])
        total = 0.0
        for pair in pairs:
            x0, x1, s, eps, *_ = self._pair_batch(pair, rng, b, val)
            x, u, sd, dmu = conditional_path(self.recipe, x0, x1, s, pair.tau_a, pair.span, eps, sigma, self._geo)
            if self._geo is not None:
                x, u = x.detach(), u.detach()
            tau = pair.tau_a + pair.span * s
            loss = ((field(self._flow, x, tau) - u) ** 2).mean()
            if self.recipe.score:
                lam = 2 * sd / sigma**2
                score_loss = ((lam * field(self._score, x, tau) + eps) ** 2).mean()
                loss = loss + float(self.hparams["score_weight"]) * score_loss
            total = total + loss
        return total / len(pairs)

    def _geo_loss(self, pairs: list[_Pair], rng, b: int, val: bool = False):
        """The geodesic stage's objective on one minibatch of every pair."""
        torch = _torch()
        hp = self.hparams
        sigma = float(hp["sigma"])
        total = 0.0
        for k, pair in enumerate(pairs):
            x0, x1, s, eps, bx0, bx1, bv0, bv1 = self._pair_batch(pair, rng, b, val)
            x, _, _, dmu = conditional_path(self.recipe, x0, x1, s, pair.tau_a, pair.span, eps, sigma, self._geo)
            if self.recipe.geodesic == "land":
                g = land_metric(x, self._metric_samples[k], float(hp["land_gamma"]), float(hp["land_rho"]),
                                float(hp["land_alpha"]))
                total = total + (dmu**2 * g).mean() / self._geo_scale
            else:  # curly
                ref = knn_reference(x.detach(), torch.cat([self._t(bx0), self._t(bx1)]),
                                    torch.cat([self._t(bv0), self._t(bv1)]), int(hp["knn"]))
                target = float(hp["ref_scale"]) * ref
                cos = torch.nn.functional.cosine_similarity(ref, dmu, dim=1)
                total = total + ((target - dmu) ** 2).sum(1).mean() + (1 - cos.mean())
        return total / len(pairs)

    # -- fit ----------------------------------------------------------------------------------------

    def fit(self, data: TrainData) -> None:
        torch = _torch()
        hp, r = self.hparams, self.recipe
        if r.geodesic == "curly" and any(m.v is None for m in data.marginals):
            raise PopbenchError(f"{self.name} needs the task's observed velocities, and {data.family}/{data.variant} "
                                "has none")
        torch.manual_seed(self.seed)
        rng = np.random.default_rng(self.seed)
        pairs = split_pairs(data, hp, self.seed)
        self._t_first, self._scale = model_times(data, hp.get("time_scale"))
        self._pair_edges = [(p.tau_a, p.span) for p in pairs]
        d, b = data.dim, int(hp["batch_size"])
        self._fallbacks = 0
        self._geo = None
        learned: dict[str, Any] = {}
        if r.geodesic is not None:
            self._geo = mlp(2 * d + 1, hp["geo_hidden"], d)
            self._geo_training = True
            learned["geodesic"] = self._fit_geodesic(pairs, rng, b)
            self._geo.requires_grad_(False)
        self._geo_training = False
        self._flow = mlp(d + 1, hp["hidden"], d)
        self._score = mlp(d + 1, hp["hidden"], d) if r.score else None
        val_rng_seed = [self.seed, 23]
        flow = optimise(
            [self._flow] + ([self._score] if self._score is not None else []),
            lambda: self._flow_loss(pairs, rng, b),
            lambda: self._flow_loss(pairs, np.random.default_rng(val_rng_seed), b, val=True),
            optimizer=hp["optimizer"], lr=float(hp["lr"]), weight_decay=float(hp["weight_decay"]),
            iterations=int(hp["iterations"]), val_every=int(hp["val_every"]), patience=int(hp["patience"]),
            select=hp["select"], log_points=int(hp["log_points"]),
        )
        self._flow.eval()
        self._learned = {
            "recipe": f"coupling={r.coupling}, sigma_s={r.schedule}, geodesic={r.geodesic}, score={r.score}",
            "model_time": f"tau = (t - {self._t_first:g}) / {self._scale:g}",
            "iterations": flow["steps"], "selected_iteration": flow["selected_step"],
            "final_loss": flow["final_loss"], "loss_curve": flow["loss_curve"],
            **({"val_curve": flow["val_curve"], "best_val_loss": flow["best_val"],
                "validation": "flow-matching loss on 10% of each training marginal (fixed draws)"}
               if hp["val_every"] else {}),
            **({"sinkhorn_uniform_fallbacks": self._fallbacks} if r.coupling == "sinkhorn" else {}),
        }
        for key, val in learned.get("geodesic", {}).items():
            self._learned[f"geo_{key}"] = val

    def _fit_geodesic(self, pairs: list[_Pair], rng, b: int) -> dict[str, Any]:
        torch = _torch()
        hp = self.hparams
        self._geo_scale = 1.0
        if self.recipe.geodesic == "land":
            # metric samples: both training marginals of each pair (training rows only); the loss is
            # divided by the straight path's (φ = 0) energy on one fixed minibatch, as MFM does
            self._metric_samples = [torch.cat([self._t(p.x0), self._t(p.x1)]) for p in pairs]
            geo, self._geo = self._geo, None
            with torch.no_grad():
                self._geo_scale = max(float(self._geo_loss(pairs, np.random.default_rng([self.seed, 31]), b)), 1e-12)
            self._geo = geo
        val_seed = [self.seed, 29]
        out = optimise(
            [self._geo], lambda: self._geo_loss(pairs, rng, b),
            lambda: self._geo_loss(pairs, np.random.default_rng(val_seed), b, val=True),
            optimizer=hp["geo_optimizer"], lr=float(hp["geo_lr"]), weight_decay=float(hp["geo_weight_decay"]),
            iterations=int(hp["geo_iterations"]), val_every=int(hp["geo_val_every"]),
            patience=int(hp["geo_patience"]), select=hp["geo_select"], log_points=int(hp["log_points"]),
        )
        return {"iterations": out["steps"], "selected_iteration": out["selected_step"],
                "final_loss": out["final_loss"], "loss_curve": out["loss_curve"],
                **({"val_curve": out["val_curve"]} if hp["geo_val_every"] else {})}

    # -- predict ------------------------------------------------------------------------------------

    def _diffusion(self, tau: float) -> float:
        """g at model time τ: σ/√span of the training pair that contains τ (a bridge over a pair of
        span Δ has variance σ² s(1-s) = g² Δ s(1-s))."""
        span = self._pair_edges[-1][1]
        for a, sp in self._pair_edges:
            if tau < a + sp - 1e-9:
                span = sp
                break
        return float(self.hparams["sigma"]) / math.sqrt(span)

    def predict(self, start: Marginal, times: Sequence[float], *, seed: int) -> Prediction:
        torch = _torch()
        hp = self.hparams
        sigma = float(hp.get("sigma", 0.0))
        rng = np.random.default_rng(seed)
        x = self._t(start.x)
        tau = (start.t - self._t_first) / self._scale
        out = []
        with torch.no_grad():
            for t in times:
                tau_next = (float(t) - self._t_first) / self._scale
                n = int(hp["euler_steps"])
                h = (tau_next - tau) / n
                for i in range(n):
                    tt = torch.full((x.shape[0],), tau + i * h)
                    v = field(self._flow, x, tt)
                    if self.recipe.score:
                        g = self._diffusion(tau + i * h)
                        drift = v + field(self._score, x, tt) * (g**2 / sigma**2)
                        xi = self._t(rng.standard_normal(tuple(x.shape)))
                        x = x + h * drift + g * math.sqrt(abs(h)) * xi
                    else:
                        x = x + h * v
                tau = tau_next
                out.append(x.double().numpy().copy())
        return Prediction(tuple(out))

    def learned(self) -> dict[str, Any]:
        return dict(getattr(self, "_learned", {}))


class ICFM(FlowMatching):
    """I-CFM: independent pairs, straight paths, constant σ."""

    name = "i_cfm"
    recipe = Recipe("independent", "constant")


class OTCFM(FlowMatching):
    """OT-CFM: exact minibatch OT pairs, straight paths, constant σ."""

    name = "ot_cfm"
    recipe = Recipe("exact", "constant")


class SBCFM(FlowMatching):
    """SB-CFM: Sinkhorn (reg 2σ²) pairs, Brownian bridges; ODE prediction of the probability flow."""

    name = "sb_cfm"
    recipe = Recipe("sinkhorn", "brownian", bridge_velocity=True)


class SF2MExact(FlowMatching):
    """SF2M with exact OT pairs: SB-CFM's flow plus a score head; Euler-Maruyama prediction."""

    name = "sf2m_exact"
    recipe = Recipe("exact", "brownian", bridge_velocity=True, score=True)
    capabilities = Capabilities(interpolate=True, forecast=False, framework="torch", num_gpus=0.0, stochastic=True)


class SF2MSink(SF2MExact):
    """SF2M with Sinkhorn (reg 2σ²) pairs."""

    name = "sf2m_sink"
    recipe = Recipe("sinkhorn", "brownian", bridge_velocity=True, score=True)


class IMFM(FlowMatching):
    """I-MFM: independent pairs, a LAND-metric geodesic interpolant trained first."""

    name = "i_mfm"
    recipe = Recipe("independent", "constant", geodesic="land", bend=2.0)


class OTMFM(FlowMatching):
    """OT-MFM: exact OT pairs, a LAND-metric geodesic interpolant trained first."""

    name = "ot_mfm"
    recipe = Recipe("exact", "constant", geodesic="land", bend=2.0)


class CurlyFM(FlowMatching):
    """Curly-FM: an interpolant fitted to the kNN reference of observed velocities, Hungarian
    pairs on the reference mismatch. Needs the task's velocities (the vortex has them; eb300 not)."""

    name = "curly_fm"
    recipe = Recipe("curly", "brownian", geodesic="curly", bend=1.0)
    capabilities = Capabilities(interpolate=True, forecast=False, uses_velocities=True, requires_velocities=True,
                                framework="torch", num_gpus=0.0)
