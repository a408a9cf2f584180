"""Action matching (am, uam, sam): conformance, closed forms of the loss and the integrators, and a
pure translation that AM must learn."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from harness.conformance import check_method
from harness.protocol import Marginal, TrainData
from methods.action_matching import AM, SAM, UAM, am_loss, grad_x, integrate, interpolant_batch, laplacian

from .conftest import fixed_potential

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_module_imports_without_torch():
    code = "import sys, methods.action_matching, methods.dice; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("cls", [AM, UAM, SAM])
def test_conformance(cls):
    check_method(cls)


@pytest.mark.parametrize("cls", [AM, UAM, SAM])
def test_declares_interpolation_only(cls):
    caps = cls.capabilities
    assert caps.interpolate and not caps.forecast and not caps.uses_velocities and caps.framework == "torch"
    assert caps.stochastic == (cls is SAM)
    for profile in ("smoke", "quick", "paper"):
        for task in ("vortex/interpolation", "eb/holdout-1", "eb300/holdout-2", "gf_sde/quadratic-paired", "ou/paired"):
            hp = cls.default_hparams(task, profile)
            assert hp["hidden"] == 64 and hp["depth"] == 2
    paper = cls.default_hparams("vortex/interpolation", "paper")
    assert (paper["lr"], paper["batch_size"], paper["iterations"], paper["grad_clip"]) == (1e-4, 256, 2000, 1.0)


def test_am_loss_closed_form():
    """s = c t + a·x: the loss is a·(m_0 - m_K) + ½ (t_K - t_0) ‖a‖² exactly (∂_t s = c cancels the
    boundary terms in c), whatever the interpolant; non-uniform times."""
    rng = np.random.default_rng(0)
    times = np.array([0.0, 2.0, 3.0, 4.0])
    xs = [rng.normal(size=(50, 2)) + k for k in range(4)]
    a = torch.tensor([0.7, -1.3], dtype=torch.float64)
    c = 2.5
    model = fixed_potential(lambda x, t: c * t + x @ a)
    hp = {"batch_size": 50, "pairing": "independent"}
    val = float(am_loss(model, xs, times, np.random.default_rng(1), hp).detach())
    m0, mk = xs[0].mean(0), xs[-1].mean(0)
    expect = float(a.numpy() @ (m0 - mk) + 0.5 * 4.0 * (a.numpy() ** 2).sum())
    assert val == pytest.approx(expect, rel=1e-10, abs=1e-10)
    # UAM adds (λ/2) s² inside the time integral: with s = 1 (constant) the loss is exactly λ/2 · T
    one = fixed_potential(lambda x, t: torch.ones(x.shape[0], dtype=x.dtype))
    assert float(am_loss(one, xs, times, np.random.default_rng(1), hp, lam=1.0).detach()) == pytest.approx(2.0)


def test_interpolant_brackets_nonuniform_grid():
    """Samples at time t lie on segments between the bracketing marginals of a non-uniform grid."""
    times = np.array([0.0, 2.0, 3.0, 4.0])
    xs = [np.full((20, 1), v) for v in (0.0, 10.0, 20.0, 40.0)]  # point masses
    xt, t = interpolant_batch(xs, times, 512, np.random.default_rng(0), "independent")
    expect = np.interp(t, times, [0.0, 10.0, 20.0, 40.0])
    np.testing.assert_allclose(xt[:, 0], expect, atol=1e-12)
    assert t.min() >= 0.0 and t.max() < 4.0
    # low-discrepancy: every 1/b-wide bin of [t0, tK) holds exactly one sample
    assert np.all(np.bincount(np.floor(t / 4.0 * 512).astype(int), minlength=512) == 1)


def test_sam_laplacian_exact_on_quadratic():
    """Δ_x (xᵀ A x + t bᵀx) = tr(A + Aᵀ), exactly, for any A (d = 3, the exact path), and the
    Hutchinson path (d = 7) is unbiased: its mean over many rows matches."""
    for d, tol in ((3, 1e-10), (7, 0.5)):
        g = torch.Generator().manual_seed(d)
        A = torch.randn(d, d, generator=g, dtype=torch.float64)
        b = torch.randn(d, generator=g, dtype=torch.float64)
        model = fixed_potential(lambda x, t: ((x @ A) * x).sum(1) + t * (x @ b))
        x = torch.randn(4000, d, generator=g, dtype=torch.float64).requires_grad_(True)
        t = torch.rand(4000, generator=g, dtype=torch.float64)
        lap = laplacian(model, x, t, generator=g)
        exact = float(torch.trace(A + A.T))
        if d <= 5:
            np.testing.assert_allclose(lap.detach().numpy(), exact, atol=tol)
        else:
            assert float(lap.mean()) == pytest.approx(exact, abs=tol)


def test_sam_laplacian_matches_hessian_of_the_network():
    from methods.action_matching import _build_model

    torch.manual_seed(0)
    net = _build_model(3, 16, 2, 0.0, 4.0).double()
    x = torch.randn(5, 3, dtype=torch.float64).requires_grad_(True)
    t = torch.rand(5, dtype=torch.float64) * 4
    lap = laplacian(net, x, t).detach()
    for i in range(5):
        H = torch.autograd.functional.hessian(lambda z: net(z[None], t[i : i + 1]).sum(), x[i].detach())
        assert float(lap[i]) == pytest.approx(float(torch.trace(H)), rel=1e-8, abs=1e-10)


def test_integrators_closed_forms():
    """s = x₁: ẋ = e₁ (RK4 is exact), and UAM's log-weight is ∫ λ x₁(t) dt = λ (x₁(0) T + T²/2), so
    the weights are ∝ exp(λ T x₁(0)). s = 0 with σ: Euler-Maruyama gives pure N(0, σ² T) noise."""
    rng = np.random.default_rng(0)
    x0 = rng.normal(size=(300, 2))
    model = fixed_potential(lambda x, t: x[:, 0])
    xs, ws = integrate(model, x0, 1.0, [1.5, 3.0], steps_per_unit=10, min_steps=1, growth=0.7)
    np.testing.assert_allclose(xs[1], x0 + [2.0, 0.0], atol=1e-12)
    w = np.exp(0.7 * 2.0 * x0[:, 0])
    np.testing.assert_allclose(ws[1], w / w.sum(), rtol=1e-9)
    assert all(np.all(wi > 0) for wi in ws)
    zero = fixed_potential(lambda x, t: 0 * x[:, 0])
    big = rng.normal(size=(20000, 2))
    (xe,), none = integrate(zero, big, 0.0, [4.0], steps_per_unit=5, min_steps=1, sigma=0.1, seed=3)
    assert none is None
    assert np.std(xe - big) == pytest.approx(0.1 * 2.0, rel=0.03)
    (xe2,), _ = integrate(zero, big, 0.0, [4.0], steps_per_unit=5, min_steps=1, sigma=0.1, seed=4)
    assert not np.allclose(xe, xe2)


def _translation(times, c, n=200, spread=0.05, seed=0):
    rng = np.random.default_rng(seed)
    base = spread * rng.normal(size=(n, 2))
    return TrainData(
        tuple(Marginal(t, rng.permutation(base + c * t), index=i) for i, t in enumerate(times)), "toy", "translation"
    )


def test_am_learns_a_pure_translation():
    """Every snapshot is the previous one shifted by c per unit time (non-uniform grid 0, 1, 3, 4):
    ∇s ≈ c on the data, and a prediction moves the cloud by c Δt (static would be off by |c| Δt)."""
    c = np.array([1.0, -0.5])
    data = _translation([0.0, 1.0, 3.0, 4.0], c)
    hp = dict(AM.default_hparams("default", "paper"), iterations=400, lr=3e-3, steps_per_unit=20)
    m = AM(hp, seed=0)
    m.fit(data)
    for mg in data.marginals:
        x = torch.tensor(mg.x, dtype=torch.float32)
        _, g = grad_x(m._model, x, torch.full((len(x),), mg.t))
        err = np.linalg.norm(g.numpy() - c, axis=1)
        assert np.sqrt(np.mean(err**2)) < 0.15 * np.linalg.norm(c), (mg.t, np.sqrt(np.mean(err**2)))
    start = data.marginals[1]
    pred = m.predict(Marginal(start.t, start.x), [2.0], seed=0)
    np.testing.assert_allclose(pred.samples[0].mean(0), start.x.mean(0) + c, atol=0.1)
    assert m.learned()["loss_curve"][-1][0] == 400


def test_uam_returns_positive_weights():
    from tasks.ou import OU

    task = OU("paired", seed=0)
    m = UAM(UAM.default_hparams("ou/paired", "smoke"), seed=0)
    m.fit(task.train_data())
    q = task.queries()[0]
    pred = m.predict(q.start.without_velocities(), q.times[:3], seed=0)
    assert pred.weights is not None and len(pred.weights) == 3
    for w in pred.weights:
        assert w.shape == (q.start.n,) and np.all(w > 0) and np.isfinite(w).all()
        assert w.sum() == pytest.approx(1.0)
    assert m.hparams["lam"] == 1.0


def test_ot_pairing_is_the_optimal_permutation_and_a_capped_solve_raises(monkeypatch):
    from harness import metrics
    from methods.action_matching import _ot_pairs

    rng = np.random.default_rng(0)
    xa = rng.standard_normal((40, 2))
    perm = rng.permutation(40)
    assert np.array_equal(_ot_pairs(xa, xa[perm] + 1e-3), np.argsort(perm))  # undoes a shuffle
    monkeypatch.setattr(metrics, "NUM_ITER_MAX", 3)
    with pytest.raises(metrics.SolverError, match="exact OT pairing failed"), pytest.warns(UserWarning):
        _ot_pairs(xa, rng.standard_normal((40, 2)))
