"""JKOnet*, its potential-only model and JKOnet*-t (JAX): conformance, Gaussian-mixture densities
against a hand computation, couplings from whole marginals, learned diffusivities ordered like the
truth, drift recovery and beating ``static`` on the toy OU task.

Kept fast: the smoke networks (16-16) are reused everywhere, so the jitted epoch compiles once per
class for the whole file (the cache in ``methods.jkonet_star.train_fns``)."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("jax")
pytest.importorskip("optax")

from harness.conformance import check_method  # noqa: E402
from harness.metrics import w1  # noqa: E402
from harness.protocol import Marginal, TrainData  # noqa: E402
from methods.jkonet_star import (  # noqa: E402
    JKOnetStar,
    JKOnetStarT,
    JKOnetStarV,
    build_rows,
    density_score,
    fit_gmm,
    gmm_density,
    step_plan,
)
from tasks import ou  # noqa: E402
from tasks.ou import OU  # noqa: E402


def test_modules_import_without_jax():
    code = ("import sys, methods.jkonet_star, methods.ijkonet; "
            "assert not {'jax', 'sklearn'} & sys.modules.keys(), 'jax or sklearn imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_conformance_jkonet_star():
    check_method(JKOnetStar)


def test_conformance_jkonet_star_t():
    check_method(JKOnetStarT)


def test_conformance_jkonet_star_v():
    check_method(JKOnetStarV)


def test_potential_only_model_has_no_internal_settings():
    hp = JKOnetStarV.default_hparams("gf_sde/quadratic-unpaired", "paper")
    assert hp["internal"] is False and not {"gmm_components", "theta3_init", "gmm_min_det"} & hp.keys()
    full = JKOnetStar.default_hparams("gf_sde/quadratic-unpaired", "paper")
    assert full["internal"] is True and full["theta3_constraint"] == "none" and full["gmm_min_det"] == 1e-4


# Two components, diagonal covariances: ρ and ∇ρ written out coordinate by coordinate.
_W = np.array([0.3, 0.7])
_MU = np.array([[0.0, 0.0], [1.0, 2.0]])
_VAR = np.array([[0.5, 0.2], [1.0, 0.4]])  # per-coordinate variances (det 0.1 and 0.4)


def _hand_density(p):
    rho, grad = 0.0, np.zeros(2)
    for w, mu, var in zip(_W, _MU, _VAR):
        g = w * math.exp(-0.5 * ((p[0] - mu[0]) ** 2 / var[0] + (p[1] - mu[1]) ** 2 / var[1]))
        g /= 2 * math.pi * math.sqrt(var[0] * var[1])
        rho += g
        grad += g * np.array([-(p[0] - mu[0]) / var[0], -(p[1] - mu[1]) / var[1]])
    return rho, grad


def test_gmm_density_and_gradient_match_a_hand_computation():
    gmm = {"weights": _W, "means": _MU, "covs": np.array([np.diag(v) for v in _VAR])}
    y = np.array([[0.0, 0.0], [1.0, 2.0], [0.5, 1.0], [-1.0, 3.0], [2.0, -0.5]])
    rho, grad = gmm_density(gmm, y)
    for p, r, g in zip(y, rho, grad):
        hr, hg = _hand_density(p)
        assert r == pytest.approx(hr, rel=1e-12) and np.allclose(g, hg, rtol=1e-12, atol=1e-15)
    # at the first mean: 0.3 / (2π sqrt(0.1)) + the second component's tail
    tail = 0.7 * math.exp(-0.5 * (1 / 1.0 + 4 / 0.4)) / (2 * math.pi * math.sqrt(0.4))
    assert rho[0] == pytest.approx(0.3 / (2 * math.pi * math.sqrt(0.1)) + tail, rel=1e-12)
    # a full (non-diagonal) covariance: ∇ρ is the derivative of ρ (central differences)
    full = dict(gmm, covs=np.array([[[0.5, 0.2], [0.2, 0.3]], [[1.0, -0.3], [-0.3, 0.4]]]))
    h = 1e-6
    for dim in range(2):
        e = np.zeros(2)
        e[dim] = h
        fd = (gmm_density(full, y + e)[0] - gmm_density(full, y - e)[0]) / (2 * h)
        assert np.allclose(gmm_density(full, y)[1][:, dim], fd, rtol=1e-6, atol=1e-10)
    # the score: ∇ρ/ρ above the floor, 0 below it (the clipped density is flat there)
    far = np.array([[0.5, 1.0], [30.0, 30.0]])
    score = density_score(gmm, far, floor=1e-5)
    r, g = _hand_density(far[0])
    assert np.allclose(score[0], g / r) and np.array_equal(score[1], [0.0, 0.0])


def test_gmm_fit_separates_clusters_and_drops_degenerate_components():
    rng = np.random.default_rng(1)
    wide = np.concatenate([rng.normal(-3, 0.3, (600, 2)), rng.normal(3, 0.3, (300, 2))])
    gmm = fit_gmm(wide, n_components=2, seed=0)
    order = np.argsort(gmm["means"][:, 0])
    assert np.allclose(gmm["weights"][order], [2 / 3, 1 / 3], atol=0.01)
    assert np.allclose(gmm["means"][order], [[-3, -3], [3, 3]], atol=0.05)
    # a third, tight cluster (sd 0.01: det(cov) ~ 1e-8 <= 1e-4) is dropped, the rest renormalised
    tight = np.concatenate([wide, rng.normal(0, 0.01, (100, 2))])
    gmm3 = fit_gmm(tight, n_components=3, seed=0)
    assert len(gmm3["weights"]) == 2 and gmm3["weights"].sum() == pytest.approx(1.0)
    assert np.all(np.abs(gmm3["means"][:, 0]) > 2.5)  # the two wide clusters are what is left
    assert len(fit_gmm(tight, n_components=3, seed=0, min_det=0.0)["weights"]) == 3


def _shuffled(data: TrainData, seed: int) -> TrainData:
    rng = np.random.default_rng(seed)
    ms = tuple(Marginal(m.t, m.x[rng.permutation(m.n)], None, m.index) for m in data.marginals)
    return TrainData(ms, data.family, data.variant, paired=False)


def test_coupling_uses_whole_marginals_not_rows():
    data = OU("paired", seed=0).train_data()
    hp = dict(JKOnetStar.default_hparams("ou/paired", "smoke"), internal=False)
    a = build_rows(data, hp, 0)
    b = build_rows(_shuffled(data, 1), hp, 0)
    assert float(a["coupling_cost"]) == pytest.approx(float(b["coupling_cost"]), rel=1e-9)
    assert len(a["w"]) == len(b["w"])
    # the same set of coupled pairs (as point pairs), whatever the row order
    def pairs(r):
        p = np.concatenate([r["x"], r["y"]], 1)
        return p[np.lexsort(p.T[::-1])]

    assert np.array_equal(pairs(a), pairs(b))
    # the OT coupling of paired data is not the identity pairing: rows are not trusted
    m0, m1 = data.marginals[:2]
    sel = a["t_next"] == m1.t
    assert np.array_equal(a["x"][sel], m0.x)  # one row per source particle (a permutation plan)
    assert np.mean(np.all(a["y"][sel] == m1.x, axis=1)) < 0.9  # ... but not the row-index pairing


def test_rows_use_physical_steps_on_non_uniform_grids():
    full = OU("paired", seed=0).train_data()
    ms = tuple(m for m in full.marginals if m.index != 3)  # a held-out time -> steps 0.25 and 0.5
    data = TrainData(ms, "ou", "paired", paired=True)
    rows = build_rows(data, dict(JKOnetStar.default_hparams("ou/paired", "smoke"), internal=False), 0)
    assert set(np.round(rows["tau"], 9)) == {0.25, 0.5}
    assert np.allclose(rows["tau"][rows["t_next"] == ms[3].t], 0.5)
    # prediction steps: one per data interval; an off-grid gap is split into steps <= the median step
    assert [round(p[0], 9) for p in step_plan(0.0, [0.25, 0.5], 0.25)] == [0.25, 0.25]
    plan = step_plan(0.0, [0.6], 0.25)
    assert len(plan) == 3 and np.isclose(sum(p[0] for p in plan), 0.6) and plan[-1][2]


def _forecast_w1(method, task) -> tuple[float, float]:
    q = task.queries()[0]
    start, times = q.request()
    pred = method.predict(start.without_velocities(), times, seed=7)
    fc = [w1(p, tg.x) for p, tg in zip(pred.samples, q.targets) if tg.group == "test"]
    static = [w1(start.x, tg.x) for tg in q.targets if tg.group == "test"]
    return float(np.mean(fc)), float(np.mean(static))


def test_jkonet_star_recovers_ou_drift_and_beats_static():
    task = OU("paired", seed=0)
    data = task.train_data()
    hp = dict(JKOnetStar.default_hparams(task.name, "smoke"), epochs=150)  # same shapes: no recompile
    m = JKOnetStar(hp, seed=0)
    m.fit(data)
    x = np.concatenate([mm.x for mm in data.marginals])
    true = -ou.THETA * (x - ou.M)
    err = np.linalg.norm(m.drift(x) - true) / np.linalg.norm(true)
    assert err < 0.35, err
    learned = m.learned()
    assert 0.0 < learned["diffusivity"] < 1.0 and learned["loss_curve"][-1] < learned["loss_curve"][0]
    fc, static = _forecast_w1(m, task)
    assert fc < 0.5 * static, (fc, static)


def test_jkonet_star_t_beats_static():
    task = OU("unpaired", seed=0)
    m = JKOnetStarT(dict(JKOnetStarT.default_hparams(task.name, "smoke"), epochs=150), seed=0)
    m.fit(task.train_data())
    fc, static = _forecast_w1(m, task)
    assert fc < 0.5 * static, (fc, static)


def _ou_unpaired(sigma2: float, seed: int, n: int = 300, n_times: int = 8, dt: float = 0.25) -> TrainData:
    """Unpaired marginals of the OU process of ``tasks.ou`` (same drift) with diffusivity ``sigma2``:
    an independent draw from the closed-form Gaussian marginal at each time."""
    rng = np.random.default_rng(seed)
    ms = []
    for k in range(n_times):
        t = dt * k
        e = np.exp(-2 * ou.THETA * t)
        var = ou.S0**2 * e + sigma2 / (2 * ou.THETA) * (1 - e)
        ms.append(Marginal(t, ou.mean_at(t) + np.sqrt(var) * rng.standard_normal((n, 2)), None, index=k))
    return TrainData(tuple(ms), "ou", "unpaired", paired=False)


def test_learned_diffusivities_are_ordered_like_the_truth():
    hp = dict(JKOnetStar.default_hparams("ou/unpaired", "smoke"), epochs=60)
    learned = {}
    for sigma2 in (0.5, 2.0):
        m = JKOnetStar(hp, seed=0)
        m.fit(_ou_unpaired(sigma2, seed=0))
        learned[sigma2] = m.learned()["diffusivity"]
    # measured 0.31 and 1.06 (seed 1: 0.30 and 1.15): under the truth, as the reference's, but ordered
    assert learned[0.5] > 0.1, learned
    assert learned[2.0] > 2.0 * learned[0.5], learned
