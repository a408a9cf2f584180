"""Action matching: ``am``, ``uam``, ``sam`` (Neklyudov et al. 2023), methods.md section 5.

A scalar network ``s(x, t)`` whose gradient ``∇_x s`` is the velocity field that transports the
observed marginals. Reference-free first-order interpolators: they declare ``interpolate=True``,
``forecast=False`` (they only learn the dynamics inside the training time range).

Training samples between snapshots (the construction of methods.md section 5): draw t in
``[t_0, t_K]`` (a stratified low-discrepancy grid with one random offset per batch), find the
bracketing training marginals ``k, k+1``, and take ``x_t = (1-u) x_k + u x_{k+1}`` with
``u = (t - t_k) / (t_{k+1} - t_k)``. ``x_k`` and ``x_{k+1}`` are drawn independently
(``pairing: "independent"``) or matched by an exact OT plan on the minibatch (``pairing: "ot"``).
Non-uniform training grids (a held-out gap) are handled by the bracketing search; time is in the
task's units (the network sees ``(t - t_0)/(t_K - t_0)``, an affine change of variable that autograd
accounts for in ``∂_t s``).

Losses (means over the batch; ``T = t_K - t_0``):

- AM:  ``mean s(x_0, t_0) - mean s(x_K, t_K) + T · mean[½‖∇s(x_t, t)‖² + ∂_t s(x_t, t)]``
- sAM: adds ``(σ²/2) Δ_x s`` inside the mean (exact Laplacian for d ≤ ``EXACT_LAPLACIAN_MAX_DIM`` = 5,
  a Hutchinson estimate above); predicts with Euler-Maruyama ``x += ∇s Δt + σ sqrt(Δt) ξ``.
- UAM: adds ``(λ/2) s²`` inside the mean (unit masses); predicts with the augmented ODE
  ``ẋ = ∇s, d(log w)/dt = λ s`` and returns the weights (the harness scores weighted W1).

Prediction (AM, UAM): classical RK4 with ``steps_per_unit`` steps per unit of time (sAM: as many
Euler-Maruyama steps), at least ``min_steps`` per requested interval (gf_sde's intervals are 0.01).

The module imports neither torch nor POT at import time (``_torch()``/``_build_model`` do it).
``methods/dice.py`` reuses the network, the training loop and the integrators.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from harness.protocol import (
    Capabilities, Marginal, Method, Prediction, TrainData, require_at_least, require_choice, require_positive,
    resolve_hparams,
)

# --------------------------------------------------------------------------------------------------
# Hyperparameters. HPARAMS[profile][task_key]; task_key is "family/variant", "family" or "default".
# `paper`: the WLM paper's Appendix C.2 (same settings for every family: the paper used its vortex
# settings for EB too). Note that 2000 Adam steps at lr 1e-4 leave the network undertrained on the
# vortex (lr 1e-3 roughly halves its W1); `paper` keeps the paper's values regardless.
# The AM family is cheap (a 64-64 MLP, 2000 iterations of 256 points), so `quick` equals `paper`.
# `smoke` only proves the code path (seconds per job, tests and CI).
# --------------------------------------------------------------------------------------------------

_PAPER: dict[str, Any] = {
    "hidden": 64,  # MLP (d+1) -> 64 -> 64 -> 1, SiLU
    "depth": 2,
    "lr": 1e-4,  # Adam, constant
    "grad_clip": 1.0,
    "batch_size": 256,
    "iterations": 2000,
    "pairing": "independent",  # or "ot": exact OT pairing inside each minibatch (POT)
    "steps_per_unit": 100,  # RK4 / Euler-Maruyama steps per unit of time at prediction
    "min_steps": 10,  # at least this many steps per requested interval (gf_sde's dt = 0.01)
    "log_points": 100,  # loss curve length in learned()
    "eval_every": 0,  # AM family: no checkpoint selection (final weights)
    "val_steps_per_unit": 20,  # RK4 steps per unit time of the validation flow (when eval_every > 0)
    "val_max_points": 1000,  # rows per marginal in the validation W1 (a seeded subsample)
}
# smoke: seconds per job, only proves the code path.
_SMOKE: dict[str, Any] = dict(_PAPER, iterations=30, steps_per_unit=20, min_steps=2, log_points=10)
_FAMILIES = ("vortex", "eb", "eb300", "gf_sde", "boids", "default")

HPARAMS: dict[str, dict[str, dict[str, Any]]] = {
    # The paper used one setting for every dataset (its vortex settings, reused for EB).
    "paper": {key: dict(_PAPER) for key in _FAMILIES},
    # quick = paper: the cost per iteration does not grow with the marginal size (minibatches of
    # 256). Measured fit time of one paper job on 1 CPU thread: AM/UAM ~15 s, sAM 20-30 s (the
    # exact 5-D Laplacian costs 5 extra backward passes); ~30 s for AM on the shared 2-core box.
    "quick": {key: dict(_PAPER) for key in _FAMILIES},
    "smoke": {key: dict(_SMOKE) for key in _FAMILIES},
}
# The per-variant extras (sigma for sAM, lam for UAM) are added by each class's default_hparams.
SAM_SIGMA = 0.1
UAM_LAMBDA = 1.0
EXACT_LAPLACIAN_MAX_DIM = 5


# --------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------


def _torch():
    import torch

    return torch


def _torch_device(device: str) -> str:
    torch = _torch()
    return "cuda" if device == "cuda" and torch.cuda.is_available() else "cpu"


def _build_model(dim: int, hidden: int, depth: int, t0: float, t1: float):
    """``s(x, t)``: an MLP on ``[x, (t - t0)/(t1 - t0)]`` returning one scalar per row."""
    torch = _torch()
    nn = torch.nn

    class ScalarNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            layers: list[nn.Module] = []
            width = dim + 1
            for _ in range(depth):
                layers += [nn.Linear(width, hidden), nn.SiLU()]
                width = hidden
            layers.append(nn.Linear(width, 1))
            self.net = nn.Sequential(*layers)
            self.t0 = float(t0)
            self.t_span = float(t1 - t0) if t1 > t0 else 1.0

        def forward(self, x, t):
            """x: (n, d); t: (n,) or (n, 1) in the task's time units. Returns (n,)."""
            tau = ((t.reshape(-1, 1) - self.t0) / self.t_span).to(x.dtype)
            return self.net(torch.cat([x, tau.expand(x.shape[0], 1)], dim=1)).squeeze(1)

    return ScalarNet()


def grad_x(model, x, t, create_graph: bool = False):
    """``(s, ∇_x s)`` at rows ``x`` and times ``t``."""
    torch = _torch()
    with torch.enable_grad():
        x = x if x.requires_grad else x.detach().requires_grad_(True)
        s = model(x, t)
        (g,) = torch.autograd.grad(s.sum(), x, create_graph=create_graph)
    return s, g


def laplacian(fn, x, t, grad=None, *, exact_max_dim: int = EXACT_LAPLACIAN_MAX_DIM, generator=None):
    """``Δ_x fn(x, t)`` per row, differentiable (for the sAM loss).

    Exact (a loop over the d diagonal Hessian entries) for ``d ≤ exact_max_dim``; above that, a
    one-probe Hutchinson estimate ``εᵀ ∇(εᵀ∇s)`` with Rademacher ε (unbiased). ``x`` must require
    grad; ``grad`` is ``∇_x fn`` computed with ``create_graph=True`` (computed here when omitted).
    """
    torch = _torch()
    if grad is None:
        (grad,) = torch.autograd.grad(fn(x, t).sum(), x, create_graph=True)
    d = x.shape[1]
    if d <= exact_max_dim:
        lap = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        for i in range(d):
            (h,) = torch.autograd.grad(grad[:, i].sum(), x, create_graph=True)
            lap = lap + h[:, i]
        return lap
    eps = (torch.randint(0, 2, x.shape, generator=generator, device="cpu").to(x) * 2 - 1).to(x.device)
    (hv,) = torch.autograd.grad((grad * eps).sum(), x, create_graph=True)
    return (hv * eps).sum(1)


# --------------------------------------------------------------------------------------------------
# Training samples
# --------------------------------------------------------------------------------------------------


def _rows(n: int, b: int, rng: np.random.Generator) -> np.ndarray:
    """``b`` row indices of an ``n``-row marginal: without replacement when possible."""
    return rng.choice(n, size=b, replace=b > n)


def stratified_times(t0: float, t1: float, b: int, rng: np.random.Generator) -> np.ndarray:
    """A low-discrepancy grid of ``b`` times in ``[t0, t1)``: ``(u + i/b) mod 1`` with one random u."""
    u = (rng.random() + np.arange(b) / b) % 1.0
    return t0 + (t1 - t0) * u


def _ot_pairs(xa: np.ndarray, xb: np.ndarray) -> np.ndarray:
    """Permutation ``p`` pairing ``xa[i]`` with ``xb[p[i]]`` by the exact OT plan (squared cost)."""
    import ot

    m = len(xa)
    cost = ((xa[:, None, :] - xb[None, :, :]) ** 2).sum(-1)
    from harness.metrics import NUM_ITER_MAX, SolverError

    plan, log = ot.emd(np.full(m, 1.0 / m), np.full(m, 1.0 / m), cost, numItermax=NUM_ITER_MAX, log=True)
    if log.get("result_code", 1) != 1 or log.get("warning"):  # a capped solve is not a permutation
        raise SolverError(f"exact OT pairing failed ({log.get('warning') or log.get('result_code')})")
    return plan.argmax(1)  # uniform, equal sizes: the plan is a permutation (a vertex of the polytope)


def interpolant_batch(
    xs: Sequence[np.ndarray], times: np.ndarray, b: int, rng: np.random.Generator, pairing: str
) -> tuple[np.ndarray, np.ndarray]:
    """``b`` samples ``(x_t, t)`` on the piecewise-linear interpolant between training marginals."""
    t = stratified_times(float(times[0]), float(times[-1]), b, rng)
    k = np.clip(np.searchsorted(times, t, side="right") - 1, 0, len(times) - 2)
    u = (t - times[k]) / (times[k + 1] - times[k])
    dim = xs[0].shape[1]
    xt = np.empty((b, dim))
    for j in np.unique(k):
        sel = np.flatnonzero(k == j)
        xa = xs[j][_rows(len(xs[j]), len(sel), rng)]
        xb = xs[j + 1][_rows(len(xs[j + 1]), len(sel), rng)]
        if pairing == "ot" and len(sel) > 1:
            xb = xb[_ot_pairs(xa, xb)]
        elif pairing not in ("independent", "ot"):
            raise ValueError(f"pairing must be 'independent' or 'ot', got {pairing!r}")
        uu = u[sel, None]
        xt[sel] = (1 - uu) * xa + uu * xb
    return xt, t


# --------------------------------------------------------------------------------------------------
# Prediction: integrators of ẋ = ∇s (RK4), with log-weights (UAM) or noise (sAM, Euler-Maruyama)
# --------------------------------------------------------------------------------------------------


def _n_steps(dt: float, steps_per_unit: float, min_steps: int) -> int:
    return max(int(min_steps), int(math.ceil(abs(dt) * steps_per_unit - 1e-9)), 1)


def integrate(
    model,
    x0: np.ndarray,
    t_start: float,
    times: Sequence[float],
    *,
    steps_per_unit: float,
    min_steps: int,
    device: str = "cpu",
    growth: float = 0.0,
    sigma: float = 0.0,
    seed: int = 0,
) -> tuple[list[np.ndarray], list[np.ndarray] | None]:
    """Push ``x0`` (at ``t_start``) through the learned flow; return samples (and weights when
    ``growth`` > 0) at every time in ``times``.

    ``sigma == 0``: RK4 on ``ẋ = ∇s`` (with ``d(log w)/dt = growth · s`` when ``growth > 0``).
    ``sigma > 0``: Euler-Maruyama ``x += ∇s Δt + σ sqrt(Δt) ξ``, ξ from ``seed`` (NumPy, so the
    noise does not depend on the device).
    """
    torch = _torch()
    dtype = next(model.parameters()).dtype
    x = torch.as_tensor(np.array(x0), dtype=dtype, device=device)
    logw = torch.zeros(x.shape[0], dtype=dtype, device=device)
    rng = np.random.default_rng(seed)
    t = float(t_start)
    out_x: list[np.ndarray] = []
    out_w: list[np.ndarray] = []

    def field(xx, tt):
        s, g = grad_x(model, xx, torch.full((xx.shape[0],), tt, dtype=dtype, device=device))
        return g.detach(), s.detach()

    for t_next in times:
        n = _n_steps(t_next - t, steps_per_unit, min_steps)
        h = (float(t_next) - t) / n
        for _ in range(n):
            if sigma > 0:
                g, _ = field(x, t)
                xi = torch.as_tensor(rng.standard_normal(tuple(x.shape)), dtype=dtype, device=device)
                x = x + h * g + sigma * math.sqrt(abs(h)) * xi
            else:
                g1, s1 = field(x, t)
                g2, s2 = field(x + 0.5 * h * g1, t + 0.5 * h)
                g3, s3 = field(x + 0.5 * h * g2, t + 0.5 * h)
                g4, s4 = field(x + h * g3, t + h)
                x = x + (h / 6.0) * (g1 + 2 * g2 + 2 * g3 + g4)
                if growth:
                    logw = logw + growth * (h / 6.0) * (s1 + 2 * s2 + 2 * s3 + s4)
            t += h
        t = float(t_next)
        out_x.append(x.double().cpu().numpy().copy())
        if growth:
            lw = logw.double().cpu().numpy()
            w = np.exp(lw - lw.max())
            out_w.append(w / w.sum())
    return out_x, (out_w if growth else None)


def one_step_w1(model, data: TrainData, hp: dict, device: str, max_points: int, seed: int) -> float:
    """Validation signal from training marginals only: mean over consecutive training pairs of the
    exact W1 between the flow of marginal k (pushed to t_{k+1}) and marginal k+1. At most
    ``max_points`` rows of each marginal (a fixed, seeded subsample)."""
    from harness.metrics import w1

    rng = np.random.default_rng([seed, 7])
    vals = []
    for a, b in zip(data.marginals, data.marginals[1:]):
        xa = a.x if a.n <= max_points else a.x[rng.choice(a.n, max_points, replace=False)]
        xb = b.x if b.n <= max_points else b.x[rng.choice(b.n, max_points, replace=False)]
        (pred,), _ = integrate(
            model, xa, a.t, [b.t], steps_per_unit=float(hp["val_steps_per_unit"]), min_steps=int(hp["min_steps"]),
            device=device,
        )
        vals.append(w1(pred, xb) if np.all(np.isfinite(pred)) else float("inf"))
    return float(np.mean(vals))


# --------------------------------------------------------------------------------------------------
# The methods
# --------------------------------------------------------------------------------------------------


class _ScalarFlowMethod(Method):
    """Shared fit/predict for the AM family and DICE: subclasses implement :meth:`_loss`.

    ``num_gpus = 0``: the code runs on ``device="cuda"`` (and falls back to CPU when CUDA is
    missing), but a 64-64 MLP on 256-row batches is launch-bound: on an H100 a vortex fit took
    21 s (AM) and 141 s (DICE) against 15 s and 95 s on one CPU thread, so the harness should not
    spend a GPU on these rows.
    """

    capabilities = Capabilities(interpolate=True, forecast=False, framework="torch", num_gpus=0.0)
    growth = 0.0  # UAM: λ (weights at prediction)
    noise = 0.0  # sAM: σ (Euler-Maruyama at prediction)

    @classmethod
    def default_hparams(cls, task: str, profile: str) -> dict[str, Any]:
        return resolve_hparams(HPARAMS, task, profile)

    @classmethod
    def check_hparams(cls, hp: dict[str, Any]) -> None:
        require_choice(hp, "pairing", ("independent", "ot"))
        require_at_least(hp, "hidden", "depth", "batch_size", "iterations", "steps_per_unit", "min_steps",
                         "log_points", "val_steps_per_unit", "val_max_points")
        require_at_least(hp, "eval_every", *({"lam", "sigma"} & hp.keys()), minimum=0)  # UAM, sAM
        require_positive(hp, "lr", "grad_clip")  # a clip at norm 0 zeroes every update: it would never train

    # -- training -----------------------------------------------------------------------------------

    def _loss(self, model, xs, times, rng, hp):  # pragma: no cover - abstract
        raise NotImplementedError

    def fit(self, data: TrainData) -> None:
        torch = _torch()
        hp = self.hparams
        dev = _torch_device(self.device)
        torch.manual_seed(self.seed)
        rng = np.random.default_rng(self.seed)
        times = data.times.astype(float)
        xs = [m.x for m in data.marginals]
        model = _build_model(data.dim, int(hp["hidden"]), int(hp["depth"]), times[0], times[-1]).to(dev)
        opt = torch.optim.Adam(model.parameters(), lr=float(hp["lr"]))
        iters = int(hp["iterations"])
        every = int(hp.get("eval_every", 0) or 0)
        window = max(1, iters // max(1, int(hp.get("log_points", 100))))
        losses, curve, val_curve = [], [], []
        best = (float("inf"), 0, None)
        self._dev = dev
        for it in range(1, iters + 1):
            loss = self._loss(model, xs, times, rng, hp)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), float(hp["grad_clip"]))
            opt.step()
            losses.append(float(loss.detach()))
            if it % window == 0 or it == iters:
                curve.append([it, float(np.mean(losses[-window:]))])
            if every and (it % every == 0 or it == iters):
                val = one_step_w1(model, data, hp, dev, int(hp["val_max_points"]), self.seed)
                val_curve.append([it, val])
                if val < best[0]:
                    best = (val, it, copy.deepcopy(model.state_dict()))
        if every and best[2] is not None:
            model.load_state_dict(best[2])
        elif every:  # no finite validation W1 (the flow diverged): the final weights are what predicts
            best = (float("nan"), iters, None)
        model.eval()
        self._model = model
        self._learned: dict[str, Any] = {
            "iterations": iters,
            "final_loss": losses[-1] if losses else float("nan"),
            "loss_curve": curve,
            "pairing": hp.get("pairing", "independent"),
            "time_scaling": "network sees (t - t0)/(tK - t0); losses and integrators in task units",
        }
        if every:
            self._learned.update(
                {
                    "selected_iteration": int(best[1]),
                    "selected_val_w1": float(best[0]),
                    "val_curve": val_curve,
                    "selection_signal": "one-step W1 between consecutive TRAINING marginals (RK4 flow "
                    "of marginal k to t_{k+1} vs marginal k+1, mean over k), every eval_every iterations",
                }
            )

    # -- prediction ---------------------------------------------------------------------------------

    def predict(self, start: Marginal, times: Sequence[float], *, seed: int) -> Prediction:
        hp = self.hparams
        xs, ws = integrate(
            self._model,
            start.x,
            start.t,
            list(times),
            steps_per_unit=float(hp["steps_per_unit"]),
            min_steps=int(hp["min_steps"]),
            device=self._dev,
            growth=float(hp.get("lam", 0.0)) if self.growth else 0.0,
            sigma=float(hp.get("sigma", 0.0)) if self.noise else 0.0,
            seed=seed,
        )
        if ws is None:
            return Prediction(tuple(xs))
        return Prediction(tuple(xs), tuple(ws))

    def learned(self) -> dict[str, Any]:
        return dict(getattr(self, "_learned", {}))

    def __getstate__(self) -> dict:
        # Pickles before fit (Ray); after fit the model travels as a CPU state dict.
        state = dict(self.__dict__)
        model = state.pop("_model", None)
        if model is not None:
            state["_model_state"] = {k: v.detach().cpu() for k, v in model.state_dict().items()}
            state["_model_meta"] = (model.net[0].in_features - 1, self.hparams, model.t0, model.t0 + model.t_span)
        return state

    def __setstate__(self, state: dict) -> None:
        ms = state.pop("_model_state", None)
        meta = state.pop("_model_meta", None)
        self.__dict__.update(state)
        if ms is not None:
            dim, hp, t0, t1 = meta
            self._dev = "cpu"
            self._model = _build_model(dim, int(hp["hidden"]), int(hp["depth"]), t0, t1)
            self._model.load_state_dict(ms)
            self._model.eval()


def am_loss(model, xs, times, rng, hp, *, sigma: float = 0.0, lam: float = 0.0):
    """The AM objective (methods.md section 5) on one minibatch; sAM (σ > 0) and UAM (λ > 0) terms
    are added inside the time integral."""
    torch = _torch()
    dev = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    b = int(hp["batch_size"])
    x0 = xs[0][_rows(len(xs[0]), b, rng)]
    xk = xs[-1][_rows(len(xs[-1]), b, rng)]
    xt, t = interpolant_batch(xs, times, b, rng, str(hp.get("pairing", "independent")))

    def tens(a):
        return torch.as_tensor(a, dtype=dtype, device=dev)

    t0 = torch.full((b,), float(times[0]), dtype=dtype, device=dev)
    t1 = torch.full((b,), float(times[-1]), dtype=dtype, device=dev)
    xt_t = tens(xt).requires_grad_(True)
    tt = tens(t).requires_grad_(True)
    s = model(xt_t, tt)
    gx, gt = torch.autograd.grad(s.sum(), (xt_t, tt), create_graph=True, allow_unused=True)
    gx = torch.zeros_like(xt_t) if gx is None else gx  # (a hand-written s may ignore x or t)
    gt = torch.zeros_like(tt) if gt is None else gt
    inner = 0.5 * (gx**2).sum(1) + gt
    if sigma:
        gen = torch.Generator().manual_seed(int(rng.integers(2**31)))
        inner = inner + 0.5 * sigma**2 * laplacian(model, xt_t, tt, gx, generator=gen)
    if lam:
        inner = inner + 0.5 * lam * s**2
    span = float(times[-1] - times[0])
    return model(tens(x0), t0).mean() - model(tens(xk), t1).mean() + span * inner.mean()


class AM(_ScalarFlowMethod):
    """Action matching: ``ẋ = ∇s(x, t)``, RK4 prediction."""

    name = "am"

    def _loss(self, model, xs, times, rng, hp):
        return am_loss(model, xs, times, rng, hp)


class UAM(_ScalarFlowMethod):
    """Unbalanced action matching: growth ``λ s``; predictions carry weights ``w ∝ exp(∫ λ s dt)``."""

    name = "uam"
    growth = 1.0

    @classmethod
    def default_hparams(cls, task: str, profile: str) -> dict[str, Any]:
        return dict(resolve_hparams(HPARAMS, task, profile), lam=UAM_LAMBDA)

    def _loss(self, model, xs, times, rng, hp):
        return am_loss(model, xs, times, rng, hp, lam=float(hp["lam"]))


class SAM(_ScalarFlowMethod):
    """Stochastic action matching: diffusion σ; Euler-Maruyama prediction (stochastic)."""

    name = "sam"
    noise = 1.0
    capabilities = Capabilities(interpolate=True, forecast=False, framework="torch", num_gpus=0.0, stochastic=True)

    @classmethod
    def default_hparams(cls, task: str, profile: str) -> dict[str, Any]:
        return dict(resolve_hparams(HPARAMS, task, profile), sigma=SAM_SIGMA)

    def _loss(self, model, xs, times, rng, hp):
        return am_loss(model, xs, times, rng, hp, sigma=float(hp["sigma"]))

    def learned(self) -> dict[str, Any]:
        return dict(super().learned(), sigma=float(self.hparams["sigma"]))
