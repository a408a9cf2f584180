"""SBIRR and Vanilla-SB (methods/sbirr.py): conformance, the GP drift against a known linear drift,
Vanilla-SB's bridge between two Gaussians against the closed form, the reference families, the
prediction's pieces, and checkpoint resumption."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from harness.conformance import check_method  # noqa: E402
from harness.metrics import w1  # noqa: E402
from harness.protocol import Marginal, PopbenchError, TrainData  # noqa: E402
from methods import sbirr  # noqa: E402
from methods.sbirr import SBIRR, VanillaSB, build_reference, fit_gp_drift, fit_reference, simulate  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_modules_import_without_a_framework():
    code = ("import sys, methods.sbirr, methods.snap_mmd; "
            "assert 'torch' not in sys.modules and 'jax' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.fixture(scope="module")
def small_vortex():
    from harness import data as data_files
    from tasks.vortex import Vortex

    try:
        data_files.resolve("ocean/oceans_with_v0.npz")
    except PopbenchError as exc:
        pytest.skip(str(exc))
    return Vortex("interpolation")


@pytest.mark.parametrize("cls", [SBIRR, VanillaSB])
def test_conformance_on_the_small_vortex(cls, small_vortex):
    check_method(cls, task=small_vortex)


def test_settings_are_the_authors_and_other_families_are_refused():
    for profile in ("smoke", "quick", "paper"):
        for task in ("vortex/interpolation", "vortex/forecast", "eb/holdout-1", "eb300/holdout-2"):
            sb, van = SBIRR.default_hparams(task, profile), VanillaSB.default_hparams(task, profile)
            assert sb["sigma"] == van["sigma"] == 0.1 and sb["gp_lengthscale"] == 1.0
            assert van["outer_iterations"] == 1
            SBIRR.check_hparams(sb)
            VanillaSB.check_hparams(van)
    paper = SBIRR.default_hparams("vortex/interpolation", "paper")
    assert (paper["steps_per_unit"], paper["ipf_iterations"], paper["outer_iterations"]) == (10, 10, 10)
    assert (paper["reference"], paper["reference_lr"], paper["reference_epochs"]) == ("vortex", 0.05, 20)
    assert SBIRR.default_hparams("vortex/interpolation", "quick") == paper
    eb = SBIRR.default_hparams("eb300/holdout-1", "paper")
    assert (eb["steps_per_unit"], eb["reference"], eb["reference_lr"], eb["reference_widths"]) == (
        20, "potential_mlp", 0.01, [128, 64, 64])
    assert VanillaSB.default_hparams("eb300/holdout-1", "paper")["reference"] == "constant"
    assert VanillaSB.default_hparams("vortex/forecast", "paper")["reference"] == "vortex"
    from harness import registry

    for cls in (SBIRR, VanillaSB):  # made for the vortex and EB families: not offered another's task
        assert cls.capabilities.families == ("vortex", "eb", "eb300")
        assert not cls.capabilities.accepts(registry.tasks.load("gf_sde"), "quadratic-paired")
        assert not cls.capabilities.accepts(registry.tasks.load("boids"), "default")
        assert cls.capabilities.accepts(registry.tasks.load("eb300"), "holdout-1")
        with pytest.raises(PopbenchError, match="no 'quick' hyperparameters for task 'gf_sde/quadratic-paired'"):
            cls.default_hparams("gf_sde/quadratic-paired", "quick")


def test_gp_drift_reproduces_a_known_linear_drift():
    """Euler-Maruyama paths of dX = A X dt + σ dW (rotation plus contraction); the GP posterior mean
    of the finite differences recovers A x on fresh paths of the same law, to a few percent of
    |A x|. σ = 0.01 here: with the authors' fixed noise σ²/h against a prior variance 1/h the GP
    nearly interpolates the finite differences, whose noise σ/√h is then 0.03 (at the methods'
    σ = 0.1 the same fit is off by ~20%, the price of their fixed hyperparameters)."""
    A = torch.tensor([[-0.5, 1.0], [-1.0, -0.5]], dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    h, sigma = 0.1, 0.01

    def paths(n):
        x0 = 1.0 + 0.3 * torch.randn((n, 2), dtype=torch.float64, generator=gen)
        return simulate(lambda x, s: x @ A.T, x0, 20, h, sigma, gen)

    gp = fit_gp_drift(paths(100), h, sigma=sigma, lengthscale=1.0, jitter=1e-6)
    fresh = paths(50)
    steps = (2, 7, 12, 17)  # each probe at its own time
    est = torch.cat([gp(fresh[:, i], i * h) for i in steps])
    true = torch.cat([fresh[:, i] @ A.T for i in steps])
    rel = float(torch.linalg.norm(est - true, dim=1).mean() / torch.linalg.norm(true, dim=1).mean())
    assert rel < 0.05, rel
    # and it is the drift, not a constant: the mean drift alone misses by far more
    const = float(torch.linalg.norm(true.mean(0) - true, dim=1).mean() / torch.linalg.norm(true, dim=1).mean())
    assert const > 5 * rel


def test_gp_drift_is_the_closed_form_posterior_mean():
    """k(z, Z) (K + (σ²/h + jitter) I)⁻¹ Y with k = (1/h) exp(−‖z − z'‖), written out in NumPy."""
    rng = np.random.default_rng(0)
    paths = torch.tensor(rng.normal(size=(6, 5, 2)))
    h, sigma = 0.25, 0.3
    gp = fit_gp_drift(paths, h, sigma=sigma, lengthscale=1.0, jitter=1e-6)
    P = paths.numpy()
    Z = np.concatenate([P[:, :-1], np.broadcast_to((np.arange(4) * h)[None, :, None], (6, 4, 1))], axis=2).reshape(-1, 3)
    Y = ((P[:, 1:] - P[:, :-1]) / h).reshape(-1, 2)

    def k(a, b):
        return np.exp(-np.linalg.norm(a[:, None] - b[None], axis=-1)) / h

    x = rng.normal(size=(3, 2))
    z = np.concatenate([x, np.full((3, 1), 0.4)], axis=1)
    expect = k(z, Z) @ np.linalg.solve(k(Z, Z) + (sigma**2 / h + 1e-6) * np.eye(len(Z)), Y)
    np.testing.assert_allclose(gp(torch.tensor(x), 0.4).numpy(), expect, rtol=1e-9, atol=1e-9)


def _gaussian_pair(n=150, seed=0):
    rng = np.random.default_rng(seed)
    m0, s0, m1, s1 = np.array([0.0, 0.0]), 0.03, np.array([1.0, 0.5]), 0.06
    xs = (m0 + s0 * rng.standard_normal((n, 2)), m1 + s1 * rng.standard_normal((n, 2)))
    return xs, (m0, s0, m1, s1)


def entropic_interpolant(m0, s0, m1, s1, sigma, T, tau):
    """Mean and per-coordinate std at time τT of the Schrödinger bridge of dX = σ dW between
    N(m0, s0² I) and N(m1, s1² I): coupling covariance c = (sqrt(4 s0² s1² + ε²) − ε)/2 with
    ε = σ² T, then a Brownian bridge: var = (1−τ)² s0² + τ² s1² + 2τ(1−τ) c + σ² T τ(1−τ)."""
    eps = sigma**2 * T
    c = 0.5 * (math.sqrt(4 * s0**2 * s1**2 + eps**2) - eps)
    var = (1 - tau) ** 2 * s0**2 + tau**2 * s1**2 + 2 * tau * (1 - tau) * c + eps * tau * (1 - tau)
    return (1 - tau) * m0 + tau * m1, math.sqrt(var)


def test_vanilla_bridge_matches_the_closed_form_between_gaussians():
    """Zero-drift reference, σ = 0.1, two small Gaussian clouds 1.1 apart (the vortex's regime: a
    spread of a few hundredths, σ√T = 0.1): the bridge pushed from the first marginal alone to the
    middle time is the closed-form entropic interpolant up to W1 < 0.1, a sixth of what the end
    marginals or their mixture give (what no transport, or a wrong coupling, would); the bridge
    ends on the second marginal. The residual (mean ~0.03 ahead, spread ~30% narrow, at 10 IPF
    iterations) is the authors' estimator's: the GP with their fixed noise σ²/h nearly interpolates
    the noisy finite differences of the paths. (IPF from a Brownian reference also needs σ√T not
    small against the clouds' spread: with σ = 0.02 the bridge barely leaves the first cloud.)"""
    (x0, x1), (m0, s0, m1, s1) = _gaussian_pair()
    data = TrainData((Marginal(0.0, x0), Marginal(1.0, x1)), family="vortex", variant="toy")
    hp = VanillaSB.default_hparams("vortex/interpolation", "paper")
    m = VanillaSB(hp, seed=0)
    m.fit(data)
    mean, std = entropic_interpolant(m0, s0, m1, s1, 0.1, 1.0, 0.5)
    rng = np.random.default_rng(1)
    pred = m.predict(Marginal(0.0, x0), [0.5], seed=3).samples[0]
    truth = mean + std * rng.standard_normal((4000, 2))
    err = w1(pred, truth)
    mixture = np.concatenate([x0[: len(x0) // 2], x1[: len(x1) // 2]])
    assert err < 0.1, err
    assert w1(x0, truth) > 5 * err and w1(x1, truth) > 5 * err and w1(mixture, truth) > 5 * err
    np.testing.assert_allclose(pred.mean(0), mean, atol=0.06)
    end = m.predict(Marginal(0.0, x0), [1.0], seed=4).samples[0]
    assert w1(end, x1) < 0.05


def test_reference_families_fit_their_own_drift():
    """The vortex family recovers its four parameters from exact drifts; the constant family the
    mean; the MLP potential's drift is the gradient of its potential."""
    rng = np.random.default_rng(0)
    x = torch.tensor(rng.uniform(-1, 1, (400, 2)))
    true = build_reference("vortex", 2, [])
    with torch.no_grad():
        true.x0.fill_(0.3), true.y0.fill_(-0.2), true.log_y_scale.fill_(0.4), true.scale.fill_(1.5)
        y = true(x)
    model = build_reference("vortex", 2, [])
    loss = fit_reference(model, x, y, lr=0.05, epochs=600)
    assert loss < 1e-6
    got = [float(p.detach()) for p in (model.x0, model.y0, model.log_y_scale, model.scale)]
    np.testing.assert_allclose(got, [0.3, -0.2, 0.4, 1.5], atol=1e-3)
    const = build_reference("constant", 3, [])
    yc = torch.tensor(rng.normal(size=(50, 3))) + torch.tensor([1.0, -2.0, 0.5])
    fit_reference(const, torch.zeros((50, 3), dtype=torch.float64), yc, lr=0.05, epochs=400)
    np.testing.assert_allclose(const.w.detach().numpy(), yc.mean(0).numpy(), atol=1e-3)
    torch.manual_seed(0)
    pot = build_reference("potential_mlp", 3, [16, 8])
    pot.eval()
    xp = torch.tensor(rng.normal(size=(5, 3)))
    g = pot(xp)
    eps = 1e-6
    for i in range(3):
        e = torch.zeros(3, dtype=torch.float64)
        e[i] = eps
        fd = (pot.net(xp + e) - pot.net(xp - e)).squeeze(1) / (2 * eps)
        np.testing.assert_allclose(g[:, i].detach().numpy(), fd.detach().numpy(), atol=1e-6)
    with pytest.raises(PopbenchError, match="planar"):
        build_reference("vortex", 5, [])


def test_prediction_uses_the_bridge_inside_and_the_reference_outside():
    """Training times 0, 2, 3: a time in [2, 3) is pushed by interval 1's forward drift from its
    elapsed time, a time past 3 by the reference; with window_drift = "reference" the reference
    everywhere. A zero-noise prediction through the reference alone is the reference ODE."""
    rng = np.random.default_rng(0)
    ms = tuple(Marginal(t, rng.normal(size=(30, 2)) + t) for t in (0.0, 2.0, 3.0))
    data = TrainData(ms, family="vortex", variant="toy")
    hp = dict(SBIRR.default_hparams("vortex/interpolation", "smoke"), outer_iterations=1)
    m = SBIRR(hp, seed=0)
    m.fit(data)
    drift, s, end, h = m._drift_at(2.5)
    assert drift is m._forwards[1] and s == pytest.approx(0.5) and end == 3.0 and h == pytest.approx(0.5)
    drift, s, end, h = m._drift_at(0.0)
    assert drift is m._forwards[0] and s == 0.0 and end == 2.0
    drift, _, end, h = m._drift_at(3.0)
    assert drift not in m._forwards and end == math.inf and h == pytest.approx(1 / hp["steps_per_unit"])
    m.hparams["window_drift"] = "reference"
    assert m._drift_at(0.5)[0] not in m._forwards
    # the reference ODE: with σ = 0 and a set vortex, one unit of time rotates the cloud
    m.hparams["sigma"] = 0.0
    with torch.no_grad():
        m._reference.scale.fill_(1.0), m._reference.x0.fill_(0.0), m._reference.y0.fill_(0.0)
        m._reference.log_y_scale.fill_(0.0)
    x = np.array([[1.0, 0.0]])
    m.hparams["steps_per_unit"] = 2000
    out = m.predict(Marginal(3.0, x), [3.0 + math.pi / 2], seed=0).samples[0]
    np.testing.assert_allclose(out, [[0.0, -1.0]], atol=2e-3)  # b = (y, −x): clockwise


class _Interrupted(Exception):
    pass


def _stop_after(n):
    def hook(done):
        if done == n:
            raise _Interrupted

    return hook


def test_an_interrupted_fit_resumes_bit_for_bit(tmp_path):
    """Stopped after outer iteration 1 (its checkpoint saved), the rerun ends with the same
    reference, the same bridges and the same predictions as the uninterrupted fit."""
    (x0, x1), _ = _gaussian_pair(n=40)
    data = TrainData((Marginal(0.0, x0), Marginal(1.0, x1), Marginal(2.0, x1 + 1.0)), family="vortex", variant="toy")
    hp = dict(SBIRR.default_hparams("vortex/interpolation", "smoke"), outer_iterations=3)
    whole = SBIRR(hp, seed=5)
    whole.fit(data)
    ckpt = tmp_path / "job.ckpt"
    first = SBIRR(hp, seed=5)
    first.checkpoint_path = ckpt
    first.on_outer_iteration = _stop_after(1)
    with pytest.raises(_Interrupted):
        first.fit(data)
    resumed = SBIRR(hp, seed=5)
    resumed.checkpoint_path = ckpt
    resumed.fit(data)
    a, b = whole.learned(), resumed.learned()
    assert b["resumed_at"] == "1" and a["resumed_at"] == ""
    for key in ("reference_loss_per_outer", "reference_x0", "reference_y0", "reference_scale", "reference_log_y_scale"):
        assert a[key] == b[key], key
    start = Marginal(0.0, x0)
    np.testing.assert_array_equal(whole.predict(start, [0.5, 2.5], seed=1).samples[1],
                                  resumed.predict(start, [0.5, 2.5], seed=1).samples[1])
    # a finished fit's checkpoint is not trained again
    again = SBIRR(hp, seed=5)
    again.checkpoint_path = ckpt
    again.on_outer_iteration = lambda n: pytest.fail("a finished fit was trained again")
    again.fit(data)
    assert again.learned()["reference_x0"] == a["reference_x0"]


def test_progress_line(monkeypatch, capsys):
    (x0, x1), _ = _gaussian_pair(n=20)
    data = TrainData((Marginal(0.0, x0), Marginal(1.0, x1)), family="vortex", variant="toy")
    monkeypatch.setattr(sbirr, "PROGRESS_MINUTES", 0.0)
    VanillaSB(VanillaSB.default_hparams("vortex/interpolation", "smoke"), seed=0).fit(data)
    assert "[vanilla_sb seed 0] outer iteration 1 of 1 (100%)" in capsys.readouterr().err
