"""Snap-MMD: a 9-parameter vortex SDE fitted to snapshots by simulation and MMD (vortex family only).

The model of the authors' public code for the Gulf-of-Mexico vortex (their ``lamboseendiv`` SDE),
with no neural network: a Lamb-Oseen vortex plus a linear divergence, and constant isotropic noise,

    dX = f(X) dτ + e^{log σ} dW,   in model time τ = (t − t₀) / time_scale,

    u = (x − x₀) c,  v = (y − y₀) c,  c = exp(−exp(log_scale)),  r² = u² + v²,
    f_vortex = Γ (1 − e^{−r²}) / r² · (−v, u)
    f_div    = D · ((x − x₀ᵈ) exp(−exp(log_scale_div)),  y − y₀ᵈ)

(the double exponential of the scales and the unscaled y of the divergence term are the authors'
parametrisation, kept so that their initial values mean the same thing). Nine parameters
``(x₀, y₀, log_scale, Γ, x₀ᵈ, y₀ᵈ, log_scale_div, D, log σ)``, initialised at the authors'
``(0, 0, −1.5, −1.5, 0, 0, −1.5, 0, 0.01)``.

Training (the authors' settings): each epoch simulates the SDE by Euler-Maruyama (step
``euler_dt`` = 1e-3 in model time, torchsde's default, which they used) from the first training
marginal through every training time, and minimises

    Σ_k w_k MMD²(simulated at t_k, observed at t_k),   w_k ∝ n_k², Σ w_k = 1,

the biased (V-statistic) MMD with the Gaussian kernel ``exp(−‖a − b‖² / bandwidth)``, the bandwidth
fixed before training at the median squared pairwise distance of all training marginals pooled
(zeros of the diagonal included, as in their code). Adam, lr 0.05, 300 full-batch epochs. As in
their code the Brownian path is drawn once and reused by every epoch (a fixed noise realisation,
so training is deterministic given the seed). The gradient is exact backpropagation through the
Euler-Maruyama loop; the authors used torchsde's adjoint method, which approximates the same
gradient by solving an adjoint SDE backwards (no torchsde dependency here). Their kernel is a sum
of five identical RBF kernels (a multiplier of 1), i.e. five times this loss: Adam does not see a
constant factor.

Time: ``time_scale = 10`` index units per model time unit, so the big vortex's 11 snapshots span
model time [0, 1] in steps of 0.1, as the authors' 11-snapshot ocean file did (their ``time_scale``
of 8 on a 0.8 grid); the small vortex uses the same scale (model time [0, 0.8] in steps of 0.1).

Prediction (this harness's protocol): Euler-Maruyama of the fitted SDE from the query's start
marginal, with the same step and fresh noise from ``predict``'s seed: a held-out time from the
previous marginal, the forecast from t0 (the authors' own forecast: first marginal to the last
time) and from t9 (the WLM paper's extra column). Their data differ from this harness's: a separate
1,000-particle release cloud as the start of training and 200 particles per snapshot; here training
starts from the first training marginal itself.

``quick`` equals ``paper`` (one job is a few CPU-minutes); ``smoke`` proves the code path. The
module imports no framework at import time.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from harness.protocol import (
    Capabilities, DivergedError, Marginal, Method, PopbenchError, Prediction, TrainData, curve, require,
    require_at_least, require_positive, resolve_hparams,
)

# --------------------------------------------------------------------------------------------------
# Hyperparameters (HPARAMS[profile][family]); the vortex family only.
# --------------------------------------------------------------------------------------------------

PARAMS = ("x0", "y0", "log_scale", "circulation", "x0_div", "y0_div", "log_scale_div", "divergence", "log_sigma")

_PAPER: dict[str, Any] = {
    "lr": 0.05,  # Adam
    "epochs": 300,  # full batch: one simulation of all particles per epoch
    "euler_dt": 1e-3,  # Euler-Maruyama step in model time (torchsde's default)
    "time_scale": 10.0,  # index-time units per model-time unit
    "init": [0.0, 0.0, -1.5, -1.5, 0.0, 0.0, -1.5, 0.0, 0.01],  # in PARAMS order
}
HPARAMS: dict[str, dict[str, dict[str, Any]]] = {
    "paper": {"vortex": dict(_PAPER)},
    "quick": {"vortex": dict(_PAPER)},  # = paper: ~2-4 CPU-minutes a job
    "smoke": {"vortex": dict(_PAPER, epochs=5, euler_dt=1e-2)},
}


def _jax():
    import jax

    return jax


def drift(theta, x):
    """``f(x)`` (n, 2) in model time for the parameter vector ``theta`` (9,) (see the docstring)."""
    jnp = _jax().numpy
    x0, y0, log_scale, gamma, xd, yd, log_scale_div, div = (theta[i] for i in range(8))
    c = jnp.exp(-jnp.exp(log_scale))
    u = (x[:, 0] - x0) * c
    v = (x[:, 1] - y0) * c
    r2 = jnp.maximum(u * u + v * v, 1e-12)
    f = -jnp.expm1(-r2) / r2  # (1 − e^{−r²}) / r², → 1 at the centre
    cd = jnp.exp(-jnp.exp(log_scale_div))
    return jnp.stack([-gamma * f * v + div * (x[:, 0] - xd) * cd, gamma * f * u + div * (x[:, 1] - yd)], axis=1)


def euler_steps(gap: float, dt: float) -> int:
    return max(1, math.ceil(gap / dt - 1e-9))


def simulate(theta, x0, noise, h, ends: Sequence[int]) -> list:
    """States after ``ends[k]`` Euler-Maruyama steps from ``x0``, for each k: step i has size
    ``h[i]`` and standard normals ``noise[i]`` (n, 2). One ``lax.scan`` over all steps (``jit``
    traces one step)."""
    jax = _jax()
    jnp = jax.numpy
    sigma = jnp.exp(theta[8])

    def step(x, inp):
        z, hi = inp
        x = x + hi * drift(theta, x) + sigma * jnp.sqrt(hi) * z
        return x, x

    _, states = jax.lax.scan(step, x0, (noise, h))
    return [states[e - 1] for e in ends]


def mmd2(a, b, bandwidth: float):
    """Biased (V-statistic) squared MMD with the kernel ``exp(−‖·‖² / bandwidth)``."""
    jnp = _jax().numpy

    def k(p, q):
        d2 = jnp.sum((p[:, None, :] - q[None, :, :]) ** 2, axis=-1)
        return jnp.mean(jnp.exp(-d2 / bandwidth))

    return k(a, a) - 2 * k(a, b) + k(b, b)


def median_bandwidth(xs: Sequence[np.ndarray]) -> float:
    """Median squared pairwise distance over all training marginals pooled (diagonal included; the
    lower median, as their ``torch.median``)."""
    pooled = np.concatenate(xs)
    sq = np.sum(pooled**2, axis=1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * pooled @ pooled.T, 0.0)
    np.fill_diagonal(d2, 0.0)
    d2 = d2.ravel()
    return float(np.partition(d2, (d2.size - 1) // 2)[(d2.size - 1) // 2])


def euler_grid(gaps: Sequence[float], dt: float) -> tuple[np.ndarray, list[int]]:
    """Step sizes and the cumulative step count at the end of each gap: ``euler_steps(gap, dt)``
    equal steps per gap."""
    counts = [euler_steps(g, dt) for g in gaps]
    h = np.concatenate([np.full(n, g / n) for g, n in zip(gaps, counts)])
    return h, [int(e) for e in np.cumsum(counts)]


@functools.lru_cache(maxsize=None)
def _compiled():
    """``(adam_step, run)`` under ``jit``, built once per process: a second fit or query of the
    same shapes reuses the compiled code. Call them inside ``jax.enable_x64(True)``."""
    jax = _jax()
    jnp = jax.numpy

    def loss_fn(theta, x0, noise, h, targets, weights, bandwidth, ends):
        sims = simulate(theta, x0, noise, h, ends)
        # the first marginal's term is MMD²(x₀, x₀) = 0: training starts from it
        return sum(w * mmd2(s, y, bandwidth) for w, s, y in zip(weights, sims, targets))

    def adam_step(theta, m, v, step, lr, x0, noise, h, targets, weights, bandwidth, ends):
        """One step of Adam (β = 0.9, 0.999, ε = 1e-8, bias-corrected: torch's defaults)."""
        loss, g = jax.value_and_grad(loss_fn)(theta, x0, noise, h, targets, weights, bandwidth, ends)
        m = 0.9 * m + 0.1 * g
        v = 0.999 * v + 0.001 * g * g
        m_hat = m / (1 - 0.9**step)
        v_hat = v / (1 - 0.999**step)
        return theta - lr * m_hat / (jnp.sqrt(v_hat) + 1e-8), m, v, loss

    return (jax.jit(adam_step, static_argnames=("ends",)),
            jax.jit(simulate, static_argnames=("ends",)))


# --------------------------------------------------------------------------------------------------
# The method
# --------------------------------------------------------------------------------------------------


class SnapMMD(Method):
    name = "snap_mmd"
    capabilities = Capabilities(interpolate=True, forecast=True, uses_velocities=False, framework="jax",
                                num_gpus=0.0, stochastic=True, families=("vortex",))

    @classmethod
    def default_hparams(cls, task: str, profile: str) -> dict[str, Any]:
        return resolve_hparams(HPARAMS, task, profile)

    @classmethod
    def check_hparams(cls, hp: dict[str, Any]) -> None:
        require_at_least(hp, "epochs")
        require_positive(hp, "lr", "euler_dt", "time_scale")
        require(hp, "init", lambda v: len(v) == len(PARAMS) and all(isinstance(a, (int, float)) for a in v),
                f"a list of {len(PARAMS)} numbers ({', '.join(PARAMS)})")

    def fit(self, data: TrainData) -> None:
        jax = _jax()
        hp = self.hparams
        if data.dim != 2:
            raise PopbenchError(f"snap_mmd models a planar flow; the data have dimension {data.dim}")
        t_start = time.perf_counter()
        scale, dt = float(hp["time_scale"]), float(hp["euler_dt"])
        xs = [np.asarray(m.x, dtype=np.float64) for m in data.marginals]
        h, ends = euler_grid([float(g) / scale for g in np.diff(data.times)], dt)
        sizes = np.array([len(x) for x in xs], dtype=float)
        weights = sizes**2 / np.sum(sizes**2)
        bandwidth = median_bandwidth(xs)
        rng = np.random.default_rng(self.seed)
        noise = rng.standard_normal((len(h), len(xs[0]), 2))  # one Brownian path for every epoch
        adam_step, _ = _compiled()
        with jax.enable_x64(True):
            jnp = jax.numpy
            theta = jnp.asarray([float(a) for a in hp["init"]], dtype=jnp.float64)
            m = v = jnp.zeros_like(theta)
            args = (jnp.asarray(xs[0]), jnp.asarray(noise), jnp.asarray(h), tuple(jnp.asarray(x) for x in xs[1:]),
                    tuple(float(w) for w in weights[1:]), bandwidth)
            losses = []
            for epoch in range(int(hp["epochs"])):
                theta_next, m, v, loss = adam_step(theta, m, v, epoch + 1, float(hp["lr"]), *args, ends=tuple(ends))
                loss = float(loss)
                if not math.isfinite(loss) or not np.all(np.isfinite(np.asarray(theta_next))):
                    raise DivergedError(f"snap_mmd: non-finite loss or parameters at epoch {epoch + 1}")
                theta = theta_next
                losses.append(loss)  # the loss of the parameters before this epoch's update
            self._theta = np.asarray(theta, dtype=np.float64)
        self._losses = losses
        self._bandwidth = bandwidth
        self._fit_seconds = time.perf_counter() - t_start

    def predict(self, start: Marginal, times: Sequence[float], *, seed: int) -> Prediction:
        jax = _jax()
        hp = self.hparams
        scale, dt = float(hp["time_scale"]), float(hp["euler_dt"])
        gaps = np.diff(np.concatenate([[start.t], np.asarray(times, dtype=float)])) / scale
        h, ends = euler_grid([float(g) for g in gaps], dt)
        noise = np.random.default_rng(int(seed)).standard_normal((len(h), start.n, 2))
        _, run = _compiled()
        with jax.enable_x64(True):
            jnp = jax.numpy
            out = run(jnp.asarray(self._theta), jnp.asarray(start.x), jnp.asarray(noise), jnp.asarray(h), ends=tuple(ends))
            return Prediction(tuple(np.asarray(x, dtype=np.float64) for x in out))

    def params(self) -> dict[str, float]:
        """The fitted parameters by name."""
        return {k: float(v) for k, v in zip(PARAMS, self._theta)}

    def learned(self) -> dict[str, Any]:
        if not hasattr(self, "_theta"):
            return {}
        return {
            **self.params(),
            "sigma_model_time": math.exp(float(self._theta[8])),
            "bandwidth": float(self._bandwidth),
            "loss": curve(self._losses),
            "final_loss": float(self._losses[-1]),
            "fit_seconds": float(self._fit_seconds),
        }
