"""nn-APPEX: alternating projection parameter estimation for a gradient-flow SDE (methods.md section 4).

Guan et al., "Gradient-flow SDEs have unique transient population dynamics". The model is

    dX = b(X) dt + σ dW,   b = −∇φ,   isotropic diffusivity σ²,

identified from unpaired marginals by alternating three steps (``n_outer`` times), starting from a
data-independent guess (σ²₀ = ``sigma2_init`` = 1.0, drift b ≡ 0):

1. **E-step** (trajectory inference). Multi-marginal entropic OT along the chain of training
   marginals, with the Euler-Maruyama transition density of the current model as the kernel. For
   the pair (k, k+1) with step Δt_k = t_{k+1} − t_k (non-uniform grids are fine):

       C^k_ij = ‖x^{k+1}_j − x^k_i − Δt_k b(x^k_i)‖² / (2 σ² Δt_k),    K^k = exp(−C^k / ε),  ε = 1.

   The chain problem ``P(i_0..i_K) ∝ Π_k h_k(i_k) Π_k K^k(i_k, i_{k+1})`` with uniform node marginals
   is solved by IPF (at most ``ipf_max_sweeps`` sweeps; stop when the largest marginal error, in
   probability units as in the reference, max |plan marginal − 1/n|, is below ``ipf_tol``).
   Because the cost is a chain, the optimal multi-marginal coupling is the Markov chain whose
   pairwise couplings are the K independent two-marginal entropic plans (joint entropy = Σ pair
   entropies − Σ inner node entropies, and the node marginals are fixed). So the reference's
   node-potential chain IPF and the pairwise form have the same unique solution, and the pairwise
   form is what we solve: all pairs of a chain at once, as one batched (K, n, m) problem (torch;
   GPU when present). ``ipf_scheme="damped"`` (``paper``) is the reference's update, both
   potentials at once with damping η = 0.5, ``f ← (1−η) f + η (log a − LSE_j(log K + g))`` and
   likewise g; ``"alternating"`` (``quick``, ``smoke``) is undamped alternating Sinkhorn, the same
   fixed point in 2-3× fewer sweeps (on gf_sde it reaches 1e-5 in ~80-130 cold sweeps, where the
   damped update stops at the 200-sweep cap near 2e-5). Speed-ups (same fixed point): the sweeps
   run in the scaling domain (two batched mat-vecs per sweep instead of two N×N log-sum-exps),
   with the scalings absorbed into log-domain potentials, and that sweep done in the log domain,
   whenever they would leave [e^−30, e^30] (stabilised Sinkhorn); the first sweep is a log-domain
   one from the warm start, so no row or column of the scaled kernel is empty; the dual potentials
   are kept across outer iterations (warm start). Tests check the plans against POT's Sinkhorn and
   against brute-force IPF on the full joint tensor of a tiny chain.
   Paths: ``n_paths`` start indices drawn uniformly from marginal 0, then a Markov chain through
   the row-normalised plans.
2. **M-step, drift**: a fresh MLP potential φ (d → 128 → 128 → 1, SiLU) fit by Adam to
   ``mean w_k ‖−∇φ(X_k) − (X_{k+1} − X_k)/Δt_k‖²`` over all path increments (500 epochs,
   batch 512, lr 3e-3). ``w_k = Δt_k / mean(Δt)`` is the Euler-Maruyama likelihood weight; it is 1
   on a uniform grid (the paper's case). The gradient of ∇φ with respect to the weights is
   written out by hand (:func:`_loss_and_grad`, checked against autograd in the tests).
3. **M-step, diffusivity** (closed form, the Euler-Maruyama MLE):
   ``σ² = mean over increments of ‖ΔX − Δt_k b(X)‖² / (d Δt_k)``, i.e. the spec's
   ``mean((ΔX − Δt b(X))²) / Δt`` with each increment divided by its own step.

Prediction: Euler-Maruyama with −∇φ̂ and σ̂², one step per requested interval; an interval longer
than the shortest training step is split into equal steps no longer than that step (the model's
transition was only ever calibrated at the training steps). Noise comes from ``predict``'s seed;
prediction is NumPy (the potential's weights are stored as arrays).

Checkpoints: given the harness's ``checkpoint_path``, the state after every outer iteration is
saved (``harness/checkpoint.py``), and a rerun of an interrupted job continues from it exactly as
the uninterrupted fit would.

Known behaviour (measured, issue-6 report): on *unpaired* marginals the E-step inflates σ̂². Two
independent finite samples of consecutive marginals need extra transport that a true coupling
would not (sampling noise), so even with the true drift the map σ²_ref → σ̂² has its fixed point
near 2.0 on gf_sde/quadratic-unpaired (N = 1000, Δt = 0.01), against 1.0 on the paired variant;
σ̂² climbs from 1.0 towards it over the outer iterations while the rollout W1 stays at the
paper's values. ``benchmarks/appex_sigma_bias.py`` measures that map with the true drift and POT's
solver (not this module's): fixed point 3.8 at N = 250, 2.3 at N = 1000, falling as N grows.

The module imports no framework at import time: torch is imported inside functions.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from harness import checkpoint
from harness.protocol import (
    Capabilities, Marginal, Method, Prediction, TrainData, require, require_at_least, require_choice, require_positive,
    resolve_hparams,
)

# --------------------------------------------------------------------------------------------------
# Hyperparameters: HPARAMS[profile][task_key], task_key = "family/variant", "family" or "default".
# `paper`: methods.md section 4 (the reference's defaults; the WLM paper ran nn-APPEX with them on
# every family). The same settings for every family.
# --------------------------------------------------------------------------------------------------

_PAPER: dict[str, Any] = {
    "n_outer": 30,  # alternating iterations
    "sigma2_init": 1.0,  # data-independent start (the reference starts from the true σ² × noise)
    "init_drift": "zero",  # drift of the first E-step: b ≡ 0
    # E-step: multi-marginal entropic OT along the chain
    "epsilon": 1.0,  # entropic regularisation, K = exp(−C/ε)
    "ipf_scheme": "damped",  # the reference's damped simultaneous update ("alternating": Sinkhorn)
    "ipf_damping": 0.5,
    "ipf_max_sweeps": 200,
    "ipf_tol": 1e-5,  # max |plan marginal − 1/n| (probability units)
    "warm_start": True,  # keep the dual potentials across outer iterations
    "n_paths": 2000,  # sampled trajectories per E-step
    "estep_dtype": "float64",
    "estep_max_elements": 20_000_000,  # pairs are solved in chunks of at most this many plan entries
    # M-step: fresh potential MLP per outer iteration
    "width": 128,
    "depth": 2,
    "lr": 3e-3,
    "epochs": 500,
    "batch_size": 512,
    "sigma2_min": 1e-8,
}

# `quick`: a few CPU-minutes per job on 1 thread. The drift fit dominates (paper: 500 epochs over
# 2000 paths × 9 increments = 18k Adam steps per outer iteration at gf_sde size, ~50 CPU-s).
# quick keeps the E-step's kernel, tolerance and 2000 paths (cheap here), solves it with the
# alternating scheme (same fixed point, fewer sweeps), and runs 10 outer iterations of 100 epochs
# (3.6k steps): ~2-5 minutes per gf_sde job on one shared core, with rollout W1 at the paper's
# nn-APPEX values on gf_sde/quadratic (issue-6 report).
_QUICK: dict[str, Any] = dict(_PAPER, n_outer=10, epochs=100, ipf_scheme="alternating")
# boids: 50 training marginals (49 pairs): 2000 paths give 98k increments per epoch, so fewer
# paths and epochs keep a job at a few minutes.
_QUICK_BOIDS: dict[str, Any] = dict(_QUICK, n_outer=6, n_paths=1000, epochs=30)
# `smoke`: seconds per job, only proves the code path (tests, CI).
_SMOKE: dict[str, Any] = dict(
    _PAPER,
    ipf_scheme="alternating",
    n_outer=2,
    n_paths=200,
    ipf_max_sweeps=50,
    ipf_tol=1e-4,
    width=32,
    epochs=3,
    batch_size=256,
)

_FAMILIES = ("gf_sde", "boids", "vortex", "eb", "eb300", "default")
HPARAMS: dict[str, dict[str, dict[str, Any]]] = {
    "paper": {k: dict(_PAPER) for k in _FAMILIES},
    "quick": {k: dict(_QUICK_BOIDS if k == "boids" else _QUICK) for k in _FAMILIES},
    "smoke": {k: dict(_SMOKE) for k in _FAMILIES},
}

ABSORB_LOG = 30.0  # scalings beyond e^±30 are absorbed into the log-domain potentials


# --------------------------------------------------------------------------------------------------
# Model: the potential φ (MLP d → width → ... → 1, SiLU) and its explicit gradient
# --------------------------------------------------------------------------------------------------


def _init_potential(d: int, width: int, depth: int, seed: int) -> list[np.ndarray]:
    """Fresh weights [W1, b1, ..., W_depth, b_depth, w_out, b_out], PyTorch's Linear init
    (U(±1/sqrt(fan_in)) for weights and biases), drawn from ``seed``."""
    rng = np.random.default_rng(seed)
    params: list[np.ndarray] = []
    fan_in = d
    for _ in range(depth):
        bound = 1.0 / math.sqrt(fan_in)
        params.append(rng.uniform(-bound, bound, (width, fan_in)))
        params.append(rng.uniform(-bound, bound, (width,)))
        fan_in = width
    bound = 1.0 / math.sqrt(fan_in)
    params.append(rng.uniform(-bound, bound, (fan_in,)))
    params.append(rng.uniform(-bound, bound, ()))
    return params


def grad_potential(params: Sequence, x, lib=np):
    """∇φ(x) for the MLP potential, written out (works for NumPy arrays and torch tensors):
    forward ``z_l = h_{l−1} W_lᵀ + b_l``, ``h_l = silu(z_l)``, ``φ = h_L · w + c``; backward
    ``δ = w``, then ``δ ← (δ ⊙ silu'(z_l)) W_l`` from the last layer to the first."""
    hidden = [(params[i], params[i + 1]) for i in range(0, len(params) - 2, 2)]
    w_out = params[-2]
    cache = []
    h = x
    for W, b in hidden:
        z = h @ W.T + b
        with np.errstate(over="ignore"):  # z < -709 (a particle far off): exp → inf, s → 0, silu's exact limit
            s = 1.0 / (1.0 + lib.exp(-z))
        cache.append((z, s))
        h = z * s
    delta = w_out
    for (W, _), (z, s) in zip(reversed(hidden), reversed(cache)):
        delta = (delta * (s * (1.0 + z * (1.0 - s)))) @ W
    return delta


def drift(params: Sequence, x, lib=np):
    """b(x) = −∇φ(x)."""
    return -grad_potential(params, x, lib)


# --------------------------------------------------------------------------------------------------
# E-step: chain entropic OT (batched over the pairs of the chain), then path sampling
# --------------------------------------------------------------------------------------------------


def _log_kernel(means, x1, dts, sigma2: float, epsilon: float):
    """log K = −‖x^{k+1}_j − m^k_i‖² / (2 σ² Δt_k ε) with m^k = x^k + Δt_k b(x^k); (B, n, m)."""
    import torch

    sq = (means * means).sum(-1)[:, :, None] + (x1 * x1).sum(-1)[:, None, :]
    sq = torch.baddbmm(sq, means, x1.transpose(1, 2), alpha=-2.0).clamp_(min=0.0)
    return sq.mul_((-1.0 / (2.0 * sigma2 * epsilon)) / dts[:, None, None])


def _scaled_kernel(means, x1, dts, sigma2, epsilon, f, g):
    """One undamped alternating sweep in the log domain (c-transforms: f from g, then g from f),
    then the scaled kernel ``P = exp(log K + f ⊕ g)``: every row and column of P carries mass, so
    the scaling-domain sweeps that follow cannot divide by zero. Returns ``(P, f, g)``."""
    import torch

    log_k = _log_kernel(means, x1, dts, sigma2, epsilon)
    f = -math.log(means.shape[1]) - torch.logsumexp(log_k + g[:, None, :], dim=2)
    g = -math.log(x1.shape[1]) - torch.logsumexp(log_k + f[:, :, None], dim=1)
    return log_k.add_(f[:, :, None]).add_(g[:, None, :]).exp_(), f, g  # reuses log_k's memory


def _ipf_batch(means, x1, dts, sigma2, f, g, *, epsilon, damping, max_sweeps, tol, scheme="damped"):
    """IPF for a batch of pairs with uniform marginals (sizes n, m), warm-started from ``f, g``.

    ``scheme="damped"`` (the reference): both potentials updated at once from the same plan,
    ``log u ← (1−η) log u + η (log a − log rowsum)``, likewise v. ``"alternating"``: undamped
    alternating (Gauss-Seidel) Sinkhorn, the same fixed point in about 2-3× fewer sweeps.
    A sweep is one update of both potentials: two batched mat-vecs with the scaled kernel P. When
    a scaling would leave [e^−30, e^30] (or a row or column sum underflows), the scalings are
    absorbed into the log-domain potentials and the sweep is done in the log domain instead
    (:func:`_scaled_kernel`, stabilised Sinkhorn).
    Returns ``(P, u, v, f, g, sweeps, err)``: the plan is ``diag(u) P diag(v)``; ``f, g`` are the
    final log potentials (scalings included) for the next warm start; ``err`` the largest marginal
    error reached (probability units).
    """
    import torch

    if scheme not in ("damped", "alternating"):
        raise ValueError(f"ipf_scheme must be 'damped' or 'alternating', got {scheme!r}")
    a, b = 1.0 / means.shape[1], 1.0 / x1.shape[1]
    P, f, g = _scaled_kernel(means, x1, dts, sigma2, epsilon, f, g)
    u, v = torch.ones_like(f), torch.ones_like(g)
    sweeps, err = 1, float("inf")
    while True:
        row = torch.bmm(P, v[:, :, None])[:, :, 0]  # Σ_j P_ij v_j
        err = float((u * row - a).abs().max())
        if scheme == "damped":
            col = torch.bmm(u[:, None, :], P)[:, 0, :]  # Σ_i u_i P_ij
            err = max(err, float((v * col - b).abs().max()))
        # (alternating: the columns are exact after every v-update)
        if err < tol or sweeps >= max_sweeps:
            break
        sweeps += 1
        if scheme == "damped":
            u_new = u.pow(1.0 - damping) * (a / row).pow(damping)
            v_new = v.pow(1.0 - damping) * (b / col).pow(damping)
        else:
            u_new = a / row
            v_new = b / torch.bmm(u_new[:, None, :], P)[:, 0, :]
        lim = math.exp(ABSORB_LOG)
        ok = all(
            bool(((s > 1.0 / lim) & (s < lim)).all()) for s in (u_new, v_new)
        )  # False on 0, inf and NaN too
        if ok:
            u, v = u_new, v_new
        else:
            f, g = f + u.log(), g + v.log()
            del P
            P, f, g = _scaled_kernel(means, x1, dts, sigma2, epsilon, f, g)
            u, v = torch.ones_like(f), torch.ones_like(g)
    return P, u, v, f + u.log(), g + v.log(), sweeps, err


def _chunks(sizes: list[int], max_elements: int) -> list[tuple[int, int]]:
    """Consecutive runs of pairs (k0, k1) with equal shapes, at most ``max_elements`` plan entries."""
    out = []
    k0 = 0
    K = len(sizes) - 1
    while k0 < K:
        k1 = k0 + 1
        shape = (sizes[k0], sizes[k0 + 1])
        while (
            k1 < K
            and (sizes[k1], sizes[k1 + 1]) == shape
            and (k1 - k0 + 1) * shape[0] * shape[1] <= max_elements
        ):
            k1 += 1
        out.append((k0, k1))
        k0 = k1
    return out


def chain_plans(
    xs: Sequence[np.ndarray],
    dts: Sequence[float],
    sigma2: float,
    drift_fn: Callable[[np.ndarray], np.ndarray] | None = None,
    *,
    epsilon: float = 1.0,
    damping: float = 0.5,
    max_sweeps: int = 200,
    tol: float = 1e-5,
    scheme: str = "damped",
    max_elements: int = 20_000_000,
) -> tuple[list[np.ndarray], int, float]:
    """The E-step's pairwise plans (NumPy, one (n_k, n_{k+1}) array per pair) for the kernel of
    drift ``drift_fn`` (NumPy in, NumPy out; None = zero drift) and diffusivity ``sigma2``, the
    sweeps used and the final marginal error. For tests and inspection; ``fit`` uses :func:`_estep`."""
    import torch

    out: list[np.ndarray] = []
    sweeps_max, err_max = 0, 0.0
    for k0, k1 in _chunks([len(x) for x in xs], max_elements):
        x0 = np.stack([np.asarray(x, dtype=np.float64) for x in xs[k0:k1]])
        b0 = np.zeros_like(x0) if drift_fn is None else np.stack([drift_fn(x) for x in x0])
        dt = np.asarray(dts[k0:k1], dtype=np.float64)
        means = torch.as_tensor(x0 + dt[:, None, None] * b0)
        x1 = torch.as_tensor(np.stack([np.asarray(x, dtype=np.float64) for x in xs[k0 + 1 : k1 + 1]]))
        f = torch.zeros(means.shape[:2], dtype=torch.float64)
        g = torch.zeros(x1.shape[:2], dtype=torch.float64)
        P, u, v, _, _, sweeps, err = _ipf_batch(
            means,
            x1,
            torch.as_tensor(dt),
            sigma2,
            f,
            g,
            epsilon=epsilon,
            damping=damping,
            max_sweeps=max_sweeps,
            tol=tol,
            scheme=scheme,
        )
        plans = u[:, :, None] * P * v[:, None, :]
        out.extend(p.numpy() for p in plans)
        sweeps_max, err_max = max(sweeps_max, sweeps), max(err_max, err)
    return out, sweeps_max, err_max


def _estep(xs, dts, sigma2, params, potentials, hp, gen, device, dtype):
    """Solve the chain OT (chunked, batched) and sample ``n_paths`` paths, shape (n_paths, K+1, d).

    ``potentials``: per pair (f, g) from the previous outer iteration (or None), updated in place.
    Returns (paths, sweeps (max over chunks), err (max), seconds IPF, seconds sampling).
    """
    import torch

    sizes = [len(x) for x in xs]
    n_paths = int(hp["n_paths"])
    paths = torch.empty((n_paths, len(xs), xs[0].shape[1]), dtype=dtype, device=device)
    idx = torch.randint(sizes[0], (n_paths,), generator=gen, device=device)
    paths[:, 0] = xs[0][idx]
    t_ipf = t_sample = 0.0
    sweeps_max, err_max = 0, 0.0
    tparams = [torch.as_tensor(p, dtype=dtype, device=device) for p in params] if params is not None else None
    for k0, k1 in _chunks(sizes, int(hp["estep_max_elements"])):
        t0 = time.perf_counter()
        x0 = torch.stack(xs[k0:k1])
        x1 = torch.stack(xs[k0 + 1 : k1 + 1])
        dt = torch.as_tensor(dts[k0:k1], dtype=dtype, device=device)
        means = x0 if tparams is None else x0 + dt[:, None, None] * drift(tparams, x0, torch)
        warm = [potentials[k] for k in range(k0, k1)]
        if hp["warm_start"] and all(w is not None for w in warm):
            f = torch.stack([w[0] for w in warm])
            g = torch.stack([w[1] for w in warm])
        else:
            f = torch.zeros(x0.shape[:2], dtype=dtype, device=device)
            g = torch.zeros(x1.shape[:2], dtype=dtype, device=device)
        P, u, v, f, g, sweeps, err = _ipf_batch(
            means,
            x1,
            dt,
            float(sigma2),
            f,
            g,
            epsilon=float(hp["epsilon"]),
            damping=float(hp["ipf_damping"]),
            max_sweeps=int(hp["ipf_max_sweeps"]),
            tol=float(hp["ipf_tol"]),
            scheme=hp["ipf_scheme"],
        )
        for i, k in enumerate(range(k0, k1)):
            potentials[k] = (f[i], g[i])
        sweeps_max, err_max = max(sweeps_max, sweeps), max(err_max, err)
        t1 = time.perf_counter()
        # Markov chain through the row-normalised plans: row i of pair k is ∝ P_ij v_j
        for i, k in enumerate(range(k0, k1)):
            probs = P[i].index_select(0, idx) * v[i][None, :]
            idx = torch.multinomial(probs, 1, generator=gen)[:, 0]
            paths[:, k + 1] = xs[k + 1][idx]
        del P
        if paths.is_cuda:
            torch.cuda.synchronize()  # honest phase timings
        t_sample += time.perf_counter() - t1
        t_ipf += t1 - t0
    return paths, sweeps_max, err_max, t_ipf, t_sample


# --------------------------------------------------------------------------------------------------
# M-step: drift (fresh potential MLP fit to the path increments) and diffusivity (closed form)
# --------------------------------------------------------------------------------------------------


def _loss_and_grad(views, gviews, x, y, wt=None, ws=None):
    """Loss ``mean wt ‖−∇φ(x) − y‖²`` (mean over rows and coordinates) and its gradient with
    respect to every weight, written out by hand (the gradient of a gradient: one forward pass,
    the ∇φ pass, and their reverse) into ``gviews``; checked against autograd in the tests.
    ``views``: [W1, b1, ..., w_out, b_out].

    Speed (this is the inner loop of the drift fit: 18k calls per paper outer iteration): every
    intermediate lives in a preallocated buffer of the workspace dict ``ws`` (keyed by batch shape;
    pass the same dict on every call), so a step allocates nothing: fresh 256 KB tensors cost a
    page-faulting mmap each with glibc's allocator. Products with the input dimension d on the
    outside are taken transposed (MKL is ~5× slower on (n, width) @ (width, d)). With
    s = σ(z), h = z s: silu'(z) = s + h − h s, silu''(z) = s (1 − s)(2 + z − 2h).
    2.4 ms per 512-row step at width 128 on one thread here, against 4.6 ms allocating (of which
    the six 512×128×128 matrix products, ~1.4 ms, are the floor).
    """
    import torch

    L = (len(views) - 2) // 2
    Ws, bs, w = views[0 : 2 * L : 2], views[1 : 2 * L : 2], views[-2]
    gW, gb, gw = gviews[0 : 2 * L : 2], gviews[1 : 2 * L : 2], gviews[-2]
    n, dim = x.shape
    if ws is None:
        ws = {}
    key = (n, x.dtype, x.device)
    if key not in ws:
        widths = [W.shape[0] for W in Ws]

        def empty(cols):
            return torch.empty((n, cols), dtype=x.dtype, device=x.device)

        ws[key] = {name: [empty(k) for k in widths] for name in ("Z", "S", "H", "D", "A", "DA", "DD", "T", "DH")}
        ws[key].update(Q=[empty(W.shape[1]) for W in Ws], DQ=[empty(W.shape[1]) for W in Ws], R=empty(dim))
    buf = ws[key]
    Z, S, H, D, A, Q, DQ, DA, DD, T, DH = (buf[k] for k in ("Z", "S", "H", "D", "A", "Q", "DQ", "DA", "DD", "T", "DH"))
    h = x
    for l in range(L):  # forward: z, s = σ(z), h = z s, d = silu'(z) = s + h − h s
        torch.addmm(bs[l], h, Ws[l].T, out=Z[l])
        torch.sigmoid(Z[l], out=S[l])
        torch.mul(Z[l], S[l], out=H[l])
        torch.add(S[l], H[l], out=D[l]).addcmul_(H[l], S[l], value=-1.0)
        h = H[l]
    torch.mul(D[L - 1], w, out=A[L - 1])  # ∇φ pass
    for l in range(L - 1, -1, -1):
        if l > 0:
            torch.mm(A[l], Ws[l], out=Q[l])
            torch.mul(Q[l], D[l - 1], out=A[l - 1])
        else:  # q_0 = a_0 W_0 is (n, d), d small: the transposed product is ~5x faster in MKL
            Q[0].copy_(torch.mm(Ws[0].T, A[0].T).T)
    r = torch.add(Q[0], y, out=buf["R"])
    if wt is None:
        loss = torch.dot(r.view(-1), r.view(-1)) / (n * dim)
        dq = torch.mul(r, 2.0 / (n * dim), out=DQ[0])
    else:
        loss = torch.dot((r * r).sum(1), wt) / (n * dim)
        dq = torch.mul(r, wt[:, None] * (2.0 / (n * dim)), out=DQ[0])
    for l in range(L):  # reverse of the ∇φ pass
        if l > 0:
            torch.mm(A[l].T, dq, out=gW[l])
        else:
            gW[0].copy_(torch.mm(dq.T, A[0]).T)
        da = torch.mm(dq, Ws[l].T, out=DA[l])
        if l < L - 1:
            torch.mul(da, Q[l + 1], out=DD[l])
            dq = torch.mul(da, D[l], out=DQ[l + 1])
        else:
            torch.mul(da, w, out=DD[l])
            torch.sum(da.mul_(D[l]), 0, out=gw)
    dh = None
    for l in range(L - 1, -1, -1):  # reverse of the forward pass; silu'' = s(1−s)(2 + z − 2h)
        dz = DD[l].mul_(torch.addcmul(S[l], S[l], S[l], value=-1.0, out=T[l]))
        dz.mul_(torch.add(Z[l], H[l], alpha=-2.0, out=T[l]).add_(2.0))
        if dh is not None:
            dz.addcmul_(dh, D[l])
        torch.sum(dz, 0, out=gb[l])
        if l > 0:
            gW[l].addmm_(dz.T, H[l - 1])
            dh = torch.mm(dz, Ws[l], out=DH[l])
        else:
            gW[0].add_(torch.mm(x.T, dz).T)
    return loss


def fit_potential(
    x: np.ndarray,
    y: np.ndarray,
    w: np.ndarray | None = None,
    *,
    width: int = 128,
    depth: int = 2,
    lr: float = 3e-3,
    epochs: int = 500,
    batch_size: int = 512,
    seed: int = 0,
    device: str = "cpu",
) -> tuple[list[np.ndarray], float]:
    """Fit a fresh potential so that −∇φ(x) ≈ y (weighted mean squared error; Adam with PyTorch's
    defaults β = (0.9, 0.999), eps 1e-8; shuffled minibatches, the last partial batch kept; float32).
    Returns the weights (NumPy float64) and the last epoch's mean loss."""
    import torch

    gen = torch.Generator().manual_seed(int(seed))
    init = _init_potential(x.shape[1], width, depth, seed)
    flat = torch.tensor(np.concatenate([np.reshape(p, -1) for p in init]), dtype=torch.float32, device=device)
    gflat = torch.zeros_like(flat)
    views, gviews, o = [], [], 0
    for p in init:
        k = int(np.size(p))
        views.append(flat[o : o + k].view(np.shape(p)))
        gviews.append(gflat[o : o + k].view(np.shape(p)))
        o += k
    m1, m2 = torch.zeros_like(flat), torch.zeros_like(flat)
    b1, b2, eps = 0.9, 0.999, 1e-8
    xt = torch.as_tensor(np.asarray(x, dtype=np.float32), device=device)
    yt = torch.as_tensor(np.asarray(y, dtype=np.float32), device=device)
    wt = None if w is None else torch.as_tensor(np.asarray(w, dtype=np.float32), device=device)
    n = xt.shape[0]
    ws: dict = {}  # _loss_and_grad's buffers
    step, last = 0, float("nan")
    for _ in range(int(epochs)):
        perm = torch.randperm(n, generator=gen).to(device)
        xe, ye = xt[perm], yt[perm]  # one gather per epoch; the minibatches are then slices
        we = None if wt is None else wt[perm]
        total = torch.zeros((), device=device)
        for s in range(0, n, batch_size):
            sl = slice(s, s + batch_size)
            loss = _loss_and_grad(views, gviews, xe[sl], ye[sl], None if we is None else we[sl], ws)
            step += 1
            m1.lerp_(gflat, 1.0 - b1)
            m2.mul_(b2).addcmul_(gflat, gflat, value=1.0 - b2)
            denom = (m2 / (1.0 - b2**step)).sqrt_().add_(eps)
            flat.addcdiv_(m1, denom, value=-lr / (1.0 - b1**step))
            total += loss * min(batch_size, n - s)
        last = float(total) / n
    return [v.detach().cpu().double().numpy() for v in views], last


def sigma2_update(x0: np.ndarray, x1: np.ndarray, dt: np.ndarray, b: np.ndarray) -> float:
    """Closed-form isotropic diffusivity from increments x0 → x1 over steps dt (one per increment)
    given the drift b(x0): the maximiser of the Euler-Maruyama likelihood
    ``Π N(x1; x0 + dt b, σ² dt I)``, ``mean_i ‖x1 − x0 − dt b‖²_i / (d dt_i)``. (Pooling,
    ``Σ ‖·‖² / (d Σ dt)``, agrees only on a uniform grid: on EB's 2-day gap it is not the MLE.)"""
    dt = np.asarray(dt, dtype=float).reshape(-1)
    resid = x1 - x0 - dt[:, None] * b
    return float(((resid**2).sum(1) / dt).mean() / x0.shape[1])


def euler_maruyama(
    x: np.ndarray,
    t: float,
    times: Sequence[float],
    drift_fn: Callable[[np.ndarray], np.ndarray],
    sigma2: float,
    step_max: float,
    rng: np.random.Generator,
) -> list[np.ndarray]:
    """Push ``x`` from ``t`` through ``times``: one Euler-Maruyama step per interval, or equal
    steps no longer than ``step_max`` when the interval is longer."""
    x = np.array(x, dtype=np.float64)
    out = []
    for tt in times:
        gap = float(tt) - t
        n_sub = max(1, math.ceil(gap / step_max - 1e-9))
        h = gap / n_sub
        for _ in range(n_sub):
            x = x + h * drift_fn(x) + math.sqrt(sigma2 * h) * rng.standard_normal(x.shape)
        t = float(tt)
        out.append(x.copy())
    return out


# --------------------------------------------------------------------------------------------------
# Checkpoints: a paper-profile fit is 12-20 CPU-minutes on gf_sde and 65-71 on Boids. With the
# harness's checkpoint path, the state after every outer iteration is saved, and a rerun of an
# interrupted job continues from there exactly as the uninterrupted fit (tests/test_nn_appex.py).
# --------------------------------------------------------------------------------------------------
PROGRESS_MINUTES = 1.0  # at most one progress line on stderr per this many minutes


def _code_id() -> str:
    """The training code a checkpoint stretch ran (this module's source and torch's version)."""
    return checkpoint.code_id(__file__)


def _progress(method: Method, done: int, done_here: int, seconds: float, sigma2: float, *, saved: bool) -> None:
    """One line on stderr: where a long fit is."""
    import sys

    total = int(method.hparams["n_outer"])
    rate = seconds / max(done_here, 1)
    print(f"[nn_appex seed {method.seed}] outer iteration {done} of {total} ({100.0 * done / total:.0f}%), "
          f"sigma2 {sigma2:.4g}, {rate:.1f} s/iteration, ~{(total - done) * rate / 60:.0f} min left"
          + (", checkpoint saved" if saved else ""), file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------
# The method
# --------------------------------------------------------------------------------------------------


class NNAPPEX(Method):
    name = "nn_appex"
    capabilities = Capabilities(
        interpolate=True, forecast=True, uses_velocities=False, framework="torch", num_gpus=1, stochastic=True
    )

    record_history = False
    """Diagnostics: set True on an instance before ``fit`` to keep the potential's weights of every
    outer iteration in ``_params_per_iter`` (e.g. to compute the drift error per iteration)."""

    on_outer_iteration: Callable[[int], None] | None = None
    """Tests and experiments: called with the number of outer iterations done after each one
    (after its checkpoint is saved)."""

    @classmethod
    def default_hparams(cls, task: str, profile: str) -> dict[str, Any]:
        return resolve_hparams(HPARAMS, task, profile)

    @classmethod
    def check_hparams(cls, hp: dict[str, Any]) -> None:
        require_choice(hp, "init_drift", ("zero", "random"))
        require_choice(hp, "ipf_scheme", ("damped", "alternating"))
        require_choice(hp, "estep_dtype", ("float64", "float32"))
        require_at_least(hp, "n_outer", "ipf_max_sweeps", "n_paths", "estep_max_elements", "width", "depth",
                         "epochs", "batch_size")
        require_positive(hp, "sigma2_init", "epsilon", "ipf_tol", "lr", "sigma2_min")
        require(hp, "ipf_damping", lambda v: 0 < v <= 1, "in (0, 1]")

    def fit(self, data: TrainData) -> None:
        import torch

        hp = self.hparams
        device = self.device if (self.device == "cpu" or torch.cuda.is_available()) else "cpu"
        dtype = {"float64": torch.float64, "float32": torch.float32}[hp["estep_dtype"]]
        torch.manual_seed(self.seed)
        gen = torch.Generator(device=device).manual_seed(self.seed)

        times = data.times
        dts = np.diff(times)
        xs = [torch.tensor(m.x, dtype=dtype, device=device) for m in data.marginals]
        K = len(xs) - 1
        d = data.dim
        sigma2 = float(hp["sigma2_init"])
        if hp["init_drift"] == "zero":
            params = None
        elif hp["init_drift"] == "random":
            params = _init_potential(d, int(hp["width"]), int(hp["depth"]), self.seed + 10_007)
        else:
            raise ValueError(f"init_drift must be 'zero' or 'random', got {hp['init_drift']!r}")
        potentials: list = [None] * K
        self._params_per_iter: list[list[np.ndarray]] = []  # filled when record_history is set
        w_pair = dts / dts.mean()  # Euler-Maruyama likelihood weights (1 on a uniform grid)

        self._trace: dict[str, list] = {
            k: [] for k in ("sigma2", "ipf_sweeps", "ipf_err", "drift_loss", "t_ipf", "t_paths", "t_drift", "t_sigma2")
        }
        # Resume from this job's checkpoint (one per finished outer iteration) when it holds this fit.
        # The path generator's state is device-specific: a checkpoint of the other device is not resumed.
        ckpt = self.checkpoint_path
        fingerprint = checkpoint.fingerprint(self, data)
        dev_type = torch.device(device).type
        state = checkpoint.load(ckpt, fingerprint, "nn-APPEX", expect={"device": dev_type})
        trained_by = checkpoint.CodeTrail(_code_id(), unit="outer iteration")
        resumed_at: list[int] = []
        first, prior_s = 0, 0.0
        if state is not None:
            try:  # everything read before anything is set: a checkpoint of another layout starts over
                saved = (int(state["outer_done"]), float(state["sigma2"]), list(state["params"]),
                         [None if p is None else tuple(t.to(device) for t in p) for p in state["potentials"]],
                         {k: list(state["trace"][k]) for k in self._trace}, list(state["params_per_iter"]),
                         float(state["fit_seconds"]), list(state["resumed_at"]))
                gen.set_state(state["generator"])
            except (KeyError, TypeError, ValueError, RuntimeError) as exc:
                warnings.warn(f"ignoring nn-APPEX checkpoint {ckpt}: unexpected contents ({exc!r}); training "
                              "starts from scratch", stacklevel=2)
                state = None
        if state is not None:
            first, sigma2, params, potentials, self._trace, history, prior_s, resumed = saved
            # with record_history, entry i is outer iteration i: None where the saved fit kept none
            self._params_per_iter = history if len(history) == first else [None] * first
            resumed_at = [*resumed, first]
            trained_by.resume(state.get("trained_by"), first, "nn-APPEX", ckpt)
        t_start = last_line = time.perf_counter()
        for it in range(first, int(hp["n_outer"])):
            paths, sweeps, err, t_ipf, t_paths = _estep(xs, dts, sigma2, params, potentials, hp, gen, device, dtype)
            P = paths.cpu().double().numpy()  # (n_paths, K+1, d)
            x0 = P[:, :-1].reshape(-1, d)
            x1 = P[:, 1:].reshape(-1, d)
            dt_inc = np.broadcast_to(dts, (P.shape[0], K)).reshape(-1)
            w_inc = np.broadcast_to(w_pair, (P.shape[0], K)).reshape(-1)

            t0 = time.perf_counter()
            params, loss = fit_potential(
                x0,
                (x1 - x0) / dt_inc[:, None],
                None if np.allclose(w_pair, 1.0) else w_inc,
                width=int(hp["width"]),
                depth=int(hp["depth"]),
                lr=float(hp["lr"]),
                epochs=int(hp["epochs"]),
                batch_size=int(hp["batch_size"]),
                seed=self.seed * 1000 + it,
                device=device,
            )
            t1 = time.perf_counter()
            sigma2 = max(sigma2_update(x0, x1, dt_inc, drift(params, x0)), float(hp["sigma2_min"]))
            t2 = time.perf_counter()
            if self.record_history:
                self._params_per_iter.append(params)
            for key, val in (
                ("sigma2", sigma2),
                ("ipf_sweeps", sweeps),
                ("ipf_err", err),
                ("drift_loss", loss),
                ("t_ipf", t_ipf),
                ("t_paths", t_paths),
                ("t_drift", t1 - t0),
                ("t_sigma2", t2 - t1),
            ):
                self._trace[key].append(float(val) if key != "ipf_sweeps" else int(val))
            if ckpt is not None:
                checkpoint.save(ckpt, {
                    "fingerprint": fingerprint, "outer_done": it + 1, "sigma2": sigma2, "params": params,
                    "potentials": [None if p is None else tuple(t.cpu() for t in p) for p in potentials],
                    "device": dev_type, "generator": gen.get_state(), "trace": self._trace,
                    "params_per_iter": self._params_per_iter, "resumed_at": resumed_at,
                    "trained_by": trained_by.state(), "fit_seconds": prior_s + time.perf_counter() - t_start,
                })
            if time.perf_counter() - last_line > 60.0 * PROGRESS_MINUTES:
                last_line = time.perf_counter()
                _progress(self, it + 1, it + 1 - first, last_line - t_start, sigma2, saved=ckpt is not None)
            if self.on_outer_iteration is not None:  # tests: e.g. interrupt the fit here
                self.on_outer_iteration(it + 1)

        self._resumed_at = resumed_at
        self._trained_by = trained_by
        self._fit_seconds = prior_s + time.perf_counter() - t_start
        self._params = [np.asarray(p, dtype=np.float64) for p in params]
        self._sigma2 = sigma2
        self._step_max = float(dts.min())

    def predict(self, start: Marginal, times: Sequence[float], *, seed: int) -> Prediction:
        out = euler_maruyama(
            start.x,
            start.t,
            times,
            lambda x: drift(self._params, x),
            self._sigma2,
            self._step_max,
            np.random.default_rng(seed),
        )
        return Prediction(tuple(out))

    def learned(self) -> dict[str, Any]:
        if not hasattr(self, "_trace"):
            return {}
        tr = self._trace
        return {
            "sigma2": float(self._sigma2),
            "sigma2_init": float(self.hparams["sigma2_init"]),
            "sigma2_per_iter": tr["sigma2"],
            "ipf_sweeps_per_iter": tr["ipf_sweeps"],
            "ipf_err_per_iter": tr["ipf_err"],
            "drift_loss_per_iter": tr["drift_loss"],
            "seconds": {
                "estep_ipf": float(sum(tr["t_ipf"])),
                "path_sampling": float(sum(tr["t_paths"])),
                "drift_fit": float(sum(tr["t_drift"])),
                "sigma2_update": float(sum(tr["t_sigma2"])),
            },
            "seconds_per_iter": {
                "estep_ipf": tr["t_ipf"],
                "path_sampling": tr["t_paths"],
                "drift_fit": tr["t_drift"],
                "sigma2_update": tr["t_sigma2"],
            },
            "predict_step_max": float(self._step_max),
            "fit_seconds": float(self._fit_seconds),  # every call of fit, resumed ones included
            "resumed_at": ",".join(str(i) for i in self._resumed_at),  # outer iterations done at each resume
            # one code id, or "from outer iteration I: code" per stretch when a resume changed the code
            "trained_by": str(self._trained_by),
        }
