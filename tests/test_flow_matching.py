"""Flow matching (i_cfm, ot_cfm, sb_cfm, sf2m_exact, sf2m_sink, i_mfm, ot_mfm, curly_fm): conformance,
the couplings against POT, the conditional paths, the LAND metric and the Curly reference against
hand computations, the Euler-Maruyama noise, OT-CFM on a translated Gaussian against the displacement
interpolant, and (when torchcfm is installed) the same x_t, u_t and plans as torchcfm's classes."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest

from harness.conformance import check_method
from harness.metrics import w1
from harness.protocol import Marginal, PopbenchError, TrainData
from methods import flow_matching as fm
from methods.flow_matching import (
    CurlyFM, ICFM, IMFM, OTCFM, OTMFM, SBCFM, SF2MExact, SF2MSink, Recipe, conditional_path, draw_from_plan,
    exact_plan, knn_reference, land_metric, sinkhorn_plan, split_pairs,
)

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

ALL = [ICFM, OTCFM, SBCFM, SF2MExact, SF2MSink, IMFM, OTMFM, CurlyFM]
NO_VELOCITIES = [c for c in ALL if c is not CurlyFM]


def test_module_imports_without_torch_or_pot():
    code = "import sys, methods.flow_matching; assert 'torch' not in sys.modules and 'ot' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("cls", NO_VELOCITIES)
def test_conformance(cls):
    check_method(cls)


def test_curly_conformance_on_the_vortex_and_refusal_without_velocities():
    check_method(CurlyFM)  # on the vortex: the toy task has no velocities past t0
    data = TrainData(tuple(Marginal(t, np.random.default_rng(0).normal(size=(30, 2))) for t in (0.0, 1.0)), "eb300",
                     "holdout-1")
    with pytest.raises(PopbenchError, match="curly_fm needs the task's observed velocities.*eb300/holdout-1"):
        CurlyFM(CurlyFM.default_hparams("eb300/holdout-1", "smoke")).fit(data)


def test_the_sweep_does_not_offer_curly_fm_a_task_without_velocities(tmp_path):
    from .conftest import run_cli

    r = run_cli("--tasks", "eb300", "--methods", "curly_fm", "--dry-run", "--out", str(tmp_path / "run"))
    assert r.returncode == 2, r.stderr
    assert "nothing to run: curly_fm on eb300/holdout-1: it needs observed velocities and the task has none" in r.stderr
    assert "Traceback" not in r.stderr
    r = run_cli("--tasks", "vortex/interpolation,eb300/holdout-1", "--methods", "curly_fm,ot_cfm", "--dry-run",
                "--out", str(tmp_path / "run"))
    assert r.returncode == 0, r.stderr
    assert "not offered: curly_fm on eb300/holdout-1" in r.stderr
    assert r.stdout.count("curly_fm") == 1 and r.stdout.count("ot_cfm") == 2


def test_capabilities_names_and_settings():
    from harness.reports import load_paper_results

    for cls in ALL:
        caps = cls.capabilities
        assert caps.interpolate and not caps.forecast and caps.framework == "torch"
        assert caps.uses_velocities == caps.requires_velocities == (cls is CurlyFM)
        assert caps.stochastic == cls.recipe.score
    paper = load_paper_results()
    published = set(paper.loc[paper["table"].isin([2, 3]), "method"])
    assert {c.name for c in ALL} <= published  # each row lines up with the paper's
    # vortex: the Curly-FM notebook's OT-CFM and Curly-FM cells
    ot = OTCFM.default_hparams("vortex/interpolation", "paper")
    assert (ot["sigma"], ot["lr"], ot["iterations"], ot["batch_size"], ot["hidden"], ot["euler_steps"],
            ot["time_scale"], ot["val_every"]) == (0.01, 1e-4, 10_000, 64, [64, 64, 64], 99, 2.0, 0)
    cu = CurlyFM.default_hparams("vortex/interpolation", "paper")
    assert (cu["geo_iterations"], cu["iterations"], cu["knn"], cu["ref_scale"], cu["geo_optimizer"]) == (
        5_000, 3_000, 20, 1.0, "adamw")
    # EB: the torchcfm runner (index time, best validation weights) and the MFM configs
    eb = ICFM.default_hparams("eb/holdout-2", "paper")
    assert (eb["sigma"], eb["optimizer"], eb["lr"], eb["time_scale"], eb["select"], eb["euler_steps"]) == (
        0.1, "adamw", 1e-3, 1.0, "best", 100)
    assert SBCFM.default_hparams("eb/holdout-1", "paper")["sigma"] == 1.0
    om = OTMFM.default_hparams("eb/holdout-1", "paper")
    assert (om["land_gamma"], om["land_rho"], om["land_alpha"], om["time_scale"], om["patience"], om["select"]) == (
        0.125, 0.001, 2.0, 4.0, 5, "last")
    im = IMFM.default_hparams("eb300/holdout-3", "paper")
    assert (im["land_gamma"], im["land_rho"], im["land_alpha"], im["hidden"]) == (0.175, 0.2, 1.0, [32, 32, 32])
    assert (im["iterations"], im["val_every"], im["geo_val_every"]) == (2_000, 20, 2)  # 2 steps per epoch
    for cls in ALL:
        for task in ("vortex/interpolation", "eb/holdout-1", "eb300/holdout-2", "ou/paired"):
            assert cls.default_hparams(task, "quick") == cls.default_hparams(task, "paper")
            cls.check_hparams(cls.default_hparams(task, "paper"))
    with pytest.raises(ValueError, match="select must be"):
        OTCFM.check_hparams(dict(ot, select="first"))


# -- couplings ---------------------------------------------------------------------------------------


def test_exact_coupling_is_pots_plan_and_pairs_lie_on_it():
    import ot

    rng = np.random.default_rng(0)
    x0, x1 = rng.normal(size=(40, 2)), rng.normal(size=(40, 2)) + 1.0
    plan = exact_plan(x0, x1)
    cost = ((x0[:, None] - x1[None]) ** 2).sum(-1)
    np.testing.assert_allclose(plan, ot.emd(np.full(40, 1 / 40), np.full(40, 1 / 40), cost), atol=1e-12)
    perm = plan.argmax(1)
    assert sorted(perm) == list(range(40)) and np.allclose(plan.max(1), 1 / 40)  # a permutation
    i, j = draw_from_plan(plan, 500, rng)
    assert np.all(plan[i, j] > 0)  # every drawn pair is in the plan's support
    # a shuffled copy is undone exactly
    shuffle = rng.permutation(40)
    assert np.array_equal(exact_plan(x0, x0[shuffle] + 1e-3).argmax(1), np.argsort(shuffle))


def test_sinkhorn_coupling_is_pots_and_an_underflow_falls_back_to_uniform():
    import ot

    rng = np.random.default_rng(1)
    x0, x1 = rng.normal(size=(30, 3)), rng.normal(size=(30, 3))
    cost = ((x0[:, None] - x1[None]) ** 2).sum(-1)
    uniform = np.full(30, 1 / 30)
    np.testing.assert_allclose(sinkhorn_plan(x0, x1, 0.5), ot.sinkhorn(uniform, uniform, cost, 0.5), rtol=1e-10)
    assert sinkhorn_plan(x0 * 1e3, x1 * 1e3, 0.02) is None  # exp(-cost/reg) underflows to 0
    m = SF2MSink(dict(SF2MSink.default_hparams("default", "smoke"), sigma=0.1), seed=0)
    m._fallbacks, m._geo_training = 0, False
    i, j = m._couple(x0 * 1e3, x1 * 1e3, rng)
    assert m._fallbacks == 1 and len(i) == 30


# -- paths, metric, reference ------------------------------------------------------------------------


def _t(a):
    return torch.tensor(np.asarray(a), dtype=torch.float64)


def test_straight_and_bridge_paths_closed_forms():
    rng = np.random.default_rng(2)
    x0, x1, eps = _t(rng.normal(size=(8, 2))), _t(rng.normal(size=(8, 2))), _t(rng.normal(size=(8, 2)))
    s = _t(rng.uniform(0.1, 0.9, 8))
    sig, span = 0.3, 2.0
    x, u, sd, _ = conditional_path(Recipe("exact", "constant"), x0, x1, s, 1.0, span, eps, sig)
    np.testing.assert_allclose(x, (1 - s[:, None]) * x0 + s[:, None] * x1 + sig * eps)
    np.testing.assert_allclose(u, (x1 - x0) / span)  # d/dτ over a pair of span 2
    x, u, sd, _ = conditional_path(Recipe("sinkhorn", "brownian", bridge_velocity=True), x0, x1, s, 1.0, span, eps, sig)
    ss = s[:, None]
    np.testing.assert_allclose(sd, sig * torch.sqrt(ss * (1 - ss)))
    # the Brownian bridge: u = d/dτ of μ + σ√(s(1-s)) ε at fixed ε
    np.testing.assert_allclose(u, ((x1 - x0) + sig * (1 - 2 * ss) / (2 * torch.sqrt(ss * (1 - ss))) * eps) / span)


def test_geodesic_path_velocity_is_the_time_derivative():
    """μ(τ) with a fixed φ network: u = dμ/dτ (autograd's forward mode) equals a central difference."""
    torch.manual_seed(0)
    geo = fm.mlp(5, [16, 16], 2).double().requires_grad_(False)
    rng = np.random.default_rng(3)
    x0, x1 = _t(rng.normal(size=(6, 2))), _t(rng.normal(size=(6, 2)))
    s, zero = _t(rng.uniform(0.1, 0.9, 6)), torch.zeros(6, 2, dtype=torch.float64)
    tau_a, span, h = 0.5, 0.25, 1e-6
    mfm = Recipe("exact", "constant", geodesic="land", bend=2.0)
    curly = Recipe("curly", "brownian", geodesic="curly", bend=1.0)
    for recipe in (mfm, curly):
        _, u, _, _ = conditional_path(recipe, x0, x1, s, tau_a, span, zero, 0.0, geo)
        hi, _, _, _ = conditional_path(recipe, x0, x1, s + h / span, tau_a, span, zero, 0.0, geo)
        lo, _, _, _ = conditional_path(recipe, x0, x1, s - h / span, tau_a, span, zero, 0.0, geo)
        np.testing.assert_allclose(u, (hi - lo) / (2 * h), rtol=1e-6, atol=1e-6)
        s0 = torch.zeros(6, dtype=torch.float64)
        end0, _, _, _ = conditional_path(recipe, x0, x1, s0, tau_a, span, zero, 0.0, geo)
        np.testing.assert_allclose(end0, x0, atol=1e-12)  # the bend vanishes at the ends


def test_land_metric_by_hand():
    x = np.array([[0.0, 0.0], [1.0, 2.0]])
    pts = np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 1.0]])
    gamma, rho, alpha = 0.8, 0.01, 2.0
    expect = np.zeros((2, 2))
    for i in range(2):
        h = np.zeros(2)
        for p in pts:
            w = math.exp(-np.sum((x[i] - p) ** 2) / (2 * gamma**2))
            h += w * (p - x[i]) ** 2
        expect[i] = (h + rho) ** (-alpha)
    np.testing.assert_allclose(land_metric(_t(x), _t(pts), gamma, rho, alpha).numpy(), expect, rtol=1e-12)


def test_knn_reference_by_hand():
    pts = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [5.0, 5.0]])
    vel = np.array([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0], [9.0, 9.0]])
    x = np.array([[0.0, 0.5]])
    # k = 3 nearest of (0, 0.5): distances 0.5, √1.25, 1.5 (the far point is excluded); h = 1.5
    d = np.array([0.5, math.sqrt(1.25), 1.5])
    w = np.exp(-(d**2) / (2 * 1.5**2))
    expect = (w[:, None] * vel[:3]).sum(0) / w.sum()
    np.testing.assert_allclose(knn_reference(_t(x), _t(pts), _t(vel), 3).numpy()[0], expect, rtol=1e-12)


# -- protocol pieces ---------------------------------------------------------------------------------


def test_pairs_keep_the_true_span_and_validation_is_a_tenth_of_each_training_marginal():
    rng = np.random.default_rng(4)
    sizes = ((0.0, 100), (2.0, 80), (3.0, 120), (4.0, 90))
    ms = tuple(Marginal(t, rng.normal(size=(n, 2)), index=int(t)) for t, n in sizes)
    data = TrainData(ms, "eb300", "holdout-1")
    hp = OTCFM.default_hparams("eb300/holdout-1", "paper")
    pairs = split_pairs(data, hp, seed=0)
    assert [(p.tau_a, p.span) for p in pairs] == [(0.0, 2.0), (2.0, 1.0), (3.0, 1.0)]  # index time, the gap kept
    assert [len(p.x0_val) for p in pairs] == [10, 8, 12] and len(pairs[-1].x1_val) == 9
    for p, m in zip(pairs, ms):  # train and validation rows split the marginal
        rows = np.vstack([p.x0, p.x0_val])
        assert len(rows) == m.n and len(np.unique(rows, axis=0)) == m.n
        assert set(map(tuple, rows)) == set(map(tuple, m.x))
    mfm = split_pairs(data, OTMFM.default_hparams("eb300/holdout-1", "paper"), seed=0)
    assert [(p.tau_a, p.span) for p in mfm] == [(0.0, 0.5), (0.5, 0.25), (0.75, 0.25)]  # the days on [0, 1]
    vortex = split_pairs(data, OTCFM.default_hparams("vortex/interpolation", "paper"), seed=0)
    assert all(len(p.x0_val) == 0 for p in vortex)  # no validation: every row trains


def test_best_checkpoint_is_the_lowest_validation_loss():
    rng = np.random.default_rng(5)
    data = TrainData(tuple(Marginal(t, rng.normal(size=(200, 2)) + t) for t in (0.0, 1.0, 2.0)), "toy", "x")
    hp = dict(ICFM.default_hparams("eb300/holdout-1", "smoke"), iterations=60, val_every=10, select="best")
    m = ICFM(hp, seed=0)
    m.fit(data)
    val = np.array(m.learned()["val_curve"])
    assert m.learned()["selected_iteration"] == int(val[np.argmin(val[:, 1]), 0])
    stop = ICFM(dict(hp, iterations=10_000, patience=2), seed=0)
    stop.fit(data)
    assert stop.learned()["iterations"] < 10_000  # early stopping fired


def test_sf2m_sde_noise_is_the_bridge_diffusion():
    """With zero flow and score networks, Euler-Maruyama adds N(0, g² Δτ) with g² = σ²/span of the
    pair the query lies in (span 2 across a held-out day in index time), and depends on the seed."""
    rng = np.random.default_rng(6)
    data = TrainData(tuple(Marginal(t, rng.normal(size=(50, 2))) for t in (0.0, 2.0, 3.0)), "eb300", "holdout-1")
    m = SF2MExact(dict(SF2MExact.default_hparams("eb300/holdout-1", "smoke"), iterations=1, euler_steps=20), seed=0)
    m.fit(data)
    for net in (m._flow, m._score):
        for p in net.parameters():
            torch.nn.init.zeros_(p)
    x0 = np.zeros((20_000, 2))
    out = m.predict(Marginal(0.0, x0), [1.0], seed=1).samples[0]
    assert np.var(out) == pytest.approx(0.1**2 / 2 * 1.0, rel=0.03)
    out2 = m.predict(Marginal(2.0, x0), [3.0], seed=1).samples[0]
    assert np.var(out2) == pytest.approx(0.1**2 / 1 * 1.0, rel=0.03)
    assert not np.allclose(out, m.predict(Marginal(0.0, x0), [1.0], seed=2).samples[0])


# -- OT-CFM recovers the displacement interpolant -----------------------------------------------------


def test_ot_cfm_midpoint_matches_the_displacement_interpolant():
    """Two Gaussians N(0, s²I) at t=0 and N(c, s²I) at t=2; the held-out t=1 is N(c/2, s²I) (the
    displacement interpolant). Predicted from t=0, OT-CFM's answer is within 1.5x the W1 between
    two independent samples of it (static's is |c|/2 = 1.5 away)."""
    rng = np.random.default_rng(7)
    n, s, c = 400, 0.5, np.array([3.0, 0.0])
    data = TrainData((Marginal(0.0, s * rng.normal(size=(n, 2))), Marginal(2.0, c + s * rng.normal(size=(n, 2)))),
                     "toy", "translation")
    hp = dict(OTCFM.default_hparams("default", "paper"), iterations=400, lr=3e-3, batch_size=128, euler_steps=50,
              time_scale=2.0)
    m = OTCFM(hp, seed=0)
    m.fit(data)
    start = s * rng.normal(size=(n, 2))
    pred = m.predict(Marginal(0.0, start), [1.0], seed=0).samples[0]
    truth = c / 2 + s * rng.normal(size=(n, 2))
    floor = w1(c / 2 + s * rng.normal(size=(n, 2)), truth)
    assert w1(pred, truth) < 1.5 * floor, (w1(pred, truth), floor)
    assert w1(start, truth) > 10 * floor


# -- the same paths and plans as torchcfm -----------------------------------------------------------


def test_same_paths_and_plans_as_torchcfm():
    tcfm = pytest.importorskip("torchcfm.conditional_flow_matching")
    tot = pytest.importorskip("torchcfm.optimal_transport")
    rng = np.random.default_rng(8)
    x0, x1, eps = (torch.tensor(rng.normal(size=(64, 3)), dtype=torch.float64) for _ in range(3))
    t = torch.tensor(rng.uniform(0.05, 0.95, 64), dtype=torch.float64)
    sigma = 0.5  # Sinkhorn at reg 2σ² = 0.5 converges on these rows
    for theirs, ours in (
        (tcfm.ConditionalFlowMatcher(sigma), Recipe("independent", "constant")),
        (tcfm.ExactOptimalTransportConditionalFlowMatcher(sigma), Recipe("exact", "constant")),
        (tcfm.SchrodingerBridgeConditionalFlowMatcher(sigma, ot_method="sinkhorn"),
         Recipe("sinkhorn", "brownian", bridge_velocity=True)),
    ):
        xt = theirs.sample_xt(x0, x1, t, eps)
        ut = theirs.compute_conditional_flow(x0, x1, t, xt)
        x, u, sd, _ = conditional_path(ours, x0, x1, t, 0.0, 1.0, eps, sigma)
        np.testing.assert_allclose(x, xt, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(u, ut, rtol=1e-6, atol=1e-6)  # (x - μ)/σ_t: a cancellation
        # SF2M's score weight λ(t) = 2σ_t/σ²
        lam = theirs.compute_lambda(t) * (sigma**2 + 1e-8) / sigma**2  # theirs adds 1e-8 to σ²
        np.testing.assert_allclose((2 * sd / sigma**2).squeeze(1), lam, rtol=1e-9)
    a, b = x0.numpy(), x1.numpy()
    np.testing.assert_allclose(exact_plan(a, b), tot.OTPlanSampler("exact").get_map(x0, x1), atol=1e-12)
    np.testing.assert_allclose(sinkhorn_plan(a, b, 2 * sigma**2),
                               tot.OTPlanSampler("sinkhorn", reg=2 * sigma**2).get_map(x0, x1), rtol=1e-8, atol=1e-12)
