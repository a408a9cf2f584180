"""gf_sde: closed-form OU marginals, paired/unpaired structure, the exact t0 velocity, the task contract."""

from __future__ import annotations

import math

import numpy as np
import pytest

from harness.conformance import check_task
from harness.metrics import w1
from harness.protocol import PopbenchError, TableColumn
from tasks import gf_sde
from tasks.gf_sde import GFSDE


@pytest.fixture(autouse=True, scope="module")
def _isolated_cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("POPBENCH_CACHE_DIR", str(tmp_path_factory.mktemp("popbench-cache")))
        mp.setenv("POPBENCH_OFFLINE", "1")
        yield


# The paper's potentials (equations 41-45), written out again independently of the module.
SPEC_V = {
    "bohachevsky": lambda x: 10 * (x[:, 0] ** 2 + 2 * x[:, 1] ** 2 - 0.3 * np.cos(3 * np.pi * x[:, 0])
                                   - 0.4 * np.cos(4 * np.pi * x[:, 1])),
    "oakley_ohagan": lambda x: 5 * (np.sin(x) + np.cos(x) + x**2 + x).sum(1),
    "quadratic": lambda x: 5 * (x**2).sum(1),
    "styblinski_tang": lambda x: 0.5 * (x**4 - 16 * x**2 + 5 * x).sum(1),
    "wavy_plateau": lambda x: (np.cos(np.pi * x) + 0.5 * x**4 - 3 * x**2 + 1).sum(1),
}


def ou_var(t: float) -> float:
    """Per-coordinate variance of dX = -10 X dt + dW, X0 ~ N(0, 0.2 I)."""
    e = math.exp(-20 * t)
    return 0.2 * e + (1 - e) / 20


def test_variants_and_paper_mapping():
    assert len(GFSDE.variants) == 10
    assert set(GFSDE.variants) == {f"{p}-{m}" for p in SPEC_V for m in ("paired", "unpaired")}
    assert GFSDE.paper_table == {"paired": (1, "mean-of-5/paired"), "unpaired": (1, "mean-of-5/unpaired")}
    assert GFSDE.has_simulator


@pytest.mark.parametrize("mode", ["paired", "unpaired"])
def test_quadratic_matches_ou_closed_form(mode):
    task = GFSDE(f"quadratic-{mode}", seed=3)
    xs = task._all()
    assert xs.shape == (20, 1000, 2)
    n = xs.shape[1]
    for k in (0, 2, 5, 10, 19):
        t = k / 100
        var = ou_var(t)
        x = xs[k]
        # mean 0: each coordinate within 4.5 standard errors
        assert np.all(np.abs(x.mean(0)) < 4.5 * math.sqrt(var / n)), (k, x.mean(0))
        cov = np.cov(x.T)
        # variance: SE = var sqrt(2/(n-1)); allow 1% for the Euler-Maruyama bias (0.5% at stationarity)
        for c in range(2):
            assert abs(cov[c, c] - var) < 4.5 * var * math.sqrt(2 / (n - 1)) + 0.01 * var, (k, cov, var)
        assert abs(cov[0, 1]) < 4.5 * var / math.sqrt(n), (k, cov)


def test_quadratic_closed_form_large_sample():
    """A sharper check of the simulator itself (20000 particles): variance at t = 0.05, 0.19."""
    rng = np.random.default_rng(0)
    xs = gf_sde.SDE(gf_sde.SHIPPED["quadratic"]).paired(20000, GFSDE.times, rng)
    for k in (5, 19):
        var = xs[k].var(0)
        assert np.allclose(var, ou_var(k / 100), rtol=0.045), (k, var, ou_var(k / 100))


def test_unpaired_rows_independent_across_times():
    xs = GFSDE("quadratic-unpaired", seed=1)._all()
    n = xs.shape[1]
    for k1, k2 in [(0, 1), (1, 2), (5, 6), (9, 10), (0, 19)]:
        for c in range(2):
            r = np.corrcoef(xs[k1][:, c], xs[k2][:, c])[0, 1]
            assert abs(r) < 4.5 / math.sqrt(n), (k1, k2, c, r)
    # no row of the t0 sample survives into a later marginal (fresh draws, not resampled particles)
    for k in range(1, 20):
        assert np.intersect1d(xs[k][:, 0], xs[0][:, 0]).size == 0


def test_paired_rows_are_trajectories():
    """Row i at t_{k+1} is row i at t_k after 10 EM steps: x' = 0.99^10 x + independent noise."""
    xs = GFSDE("quadratic-paired", seed=1)._all()
    a = 0.99**10
    noise_var = 0.001 * sum(0.99 ** (2 * j) for j in range(10))
    n = xs.shape[1]
    for k in (0, 4, 12):
        res = xs[k + 1] - a * xs[k]
        assert np.allclose(res.var(0), noise_var, rtol=0.15), (res.var(0), noise_var)
        for c in range(2):
            assert abs(np.corrcoef(res[:, c], xs[k][:, c])[0, 1]) < 4.5 / math.sqrt(n)
            assert np.corrcoef(xs[k][:, c], xs[k + 1][:, c])[0, 1] > 0.9
    data = GFSDE("quadratic-paired", seed=1).train_data()
    assert data.paired and not GFSDE("quadratic-unpaired", seed=1).train_data().paired


@pytest.mark.parametrize("potential", list(SPEC_V))
def test_exposed_t0_velocity_is_probability_flow(potential):
    task = GFSDE(f"{potential}-unpaired", seed=0)
    m0 = task.train_data().marginals[0]
    start = task.queries()[0].start
    assert m0.v is not None and start.v is not None
    assert np.array_equal(start.x, m0.x) and np.array_equal(start.v, m0.v)
    assert all(m.v is None for m in task.train_data().marginals[1:])
    # -∇V by central differences of the spec's formula, + (σ²/2) x / 0.2 with σ² = 1
    x = m0.x
    h = 1e-5
    grad = np.stack([(SPEC_V[potential](x + h * e) - SPEC_V[potential](x - h * e)) / (2 * h)
                     for e in np.eye(2)], 1)
    assert np.allclose(m0.v, -grad + 0.5 * x / 0.2, rtol=1e-6, atol=1e-5)


def test_quadratic_velocity_push_matches_closed_form_variance():
    """Pushing p0 by v0 = -7.5 x over dt gives var 0.2 (1 - 7.5 dt)², the SDE's var to O(dt²)."""
    x = GFSDE("quadratic-paired", seed=0).train_data().marginals[0]
    dt = 1e-3
    pushed = x.x + dt * x.v
    ratio = pushed.var(0) / x.x.var(0)
    # first-order change 1.5e-2, second-order difference ~1e-4
    assert np.allclose(ratio, ou_var(dt) / 0.2, rtol=3e-4)
    wrong_sign = x.x + dt * (-10 * x.x - 0.5 * x.x / 0.2)  # the score term with the other sign
    assert not np.allclose(wrong_sign.var(0) / x.x.var(0), ou_var(dt) / 0.2, rtol=3e-4)


@pytest.mark.parametrize("potential", list(SPEC_V))
def test_velocity_push_matches_sde_second_moment_growth(potential):
    """d/dt E|X|² over one EM step (0.001) equals that of the deterministic push by v0."""
    rng = np.random.default_rng(7)
    process = GFSDE(f"{potential}-paired").sde()
    x = process.sample_p0((200_000,), rng)
    dt = process.em_step
    push = ((x + dt * process.flow_velocity(x)) ** 2).sum(1).mean() - (x**2).sum(1).mean()
    sde = (process.steps(x, 1, rng) ** 2).sum(1).mean() - (x**2).sum(1).mean()
    rate_push, rate_sde = push / dt, sde / dt
    assert abs(rate_push - rate_sde) < 0.03 * abs(rate_sde) + 0.4, (rate_push, rate_sde)


def test_splits_queries_and_columns():
    task = GFSDE("styblinski_tang-unpaired", seed=0)
    data = task.train_data()
    assert [m.index for m in data.marginals] == list(range(10))
    assert np.allclose(data.times, np.arange(10) * 0.01)
    (q,) = task.queries()
    assert q.name == "rollout" and q.kind == "rollout" and q.start.index == 0 and q.start.t == 0.0
    assert [tg.index for tg in q.targets] == list(range(1, 20))
    assert [tg.group for tg in q.targets] == ["train"] * 9 + ["test"] * 10
    assert np.allclose(q.times, np.arange(1, 20) * 0.01)
    for m in data.marginals:
        assert np.array_equal(m.x, task._all()[m.index])
    w = list(np.arange(19, dtype=float))
    cells = task.summarize(q, w)
    assert cells == {
        TableColumn("unpaired", "train_w1", "styblinski_tang/unpaired"): float(np.mean(w[:9])),
        TableColumn("unpaired", "forecast_w1", "styblinski_tang/unpaired"): float(np.mean(w[9:])),
    }


def test_check_task_seed_and_oracle_floor():
    task = check_task(GFSDE, "quadratic-unpaired", seed=0)
    other = GFSDE("quadratic-unpaired", seed=1).train_data()
    assert not np.array_equal(task.train_data().marginals[3].x, other.marginals[3].x)
    assert not np.array_equal(GFSDE("quadratic-paired", seed=0)._all()[0], task._all()[0])
    (q,) = task.queries()
    sim = task.simulator()
    out = sim(q.start, (q.times[-1],), 5)
    again = sim(q.start, (q.times[-1],), 5)
    assert np.array_equal(out[0], again[0])
    target = q.targets[-1].x
    floor, static = w1(out[0], target), w1(q.start.x, target)
    assert floor < 0.12 < static, (floor, static)


# ---------------------------------------------------------------------------------------------
# The template: every setting is the task's, from a subclass or the constructor


def test_the_shipped_family_is_the_template_with_the_papers_settings():
    assert issubclass(GFSDE, gf_sde.GradientFlowSDE)
    assert (GFSDE.dim, GFSDE.sigma, GFSDE.n, GFSDE.n_train, GFSDE.em_step, GFSDE.p0_var) == (2, 1.0, 1000, 10, 0.001, 0.2)
    assert GFSDE.times == tuple(k / 100 for k in range(20))
    assert gf_sde.GradientFlowSDE.resembles == "gf_sde" and gf_sde.GradientFlowSDE.paper_table == {}


def ou_moments(t, mu0, s2, sigma2, k=10.0):
    """Mean and per-coordinate variance of dX = -k X dt + σ dW from N(mu0, s2 I)."""
    e = math.exp(-k * t)
    return np.asarray(mu0) * e, s2 * e**2 + sigma2 / (2 * k) * (1 - e**2)


@pytest.mark.parametrize("mode", ["paired", "unpaired"])
def test_settings_from_the_constructor_change_the_process_as_written(mode):
    """3-D quadratic (OU, k = 10), σ = 0.5, p0 = N((1, 0, -0.5), 0.1 I), uneven times: every
    marginal has the closed-form mean and variance, and t0 carries the exact flow velocity."""
    mu0, times = (1.0, 0.0, -0.5), (0.0, 0.02, 0.05, 0.1, 0.3)
    task = gf_sde.GradientFlowSDE(f"quadratic-{mode}", seed=2, potentials=("quadratic",), dim=3, sigma=0.5,
                                  n=4000, times=times, n_train=3, p0_mean=mu0, p0_var=0.1)
    assert task.variants == ("quadratic-paired", "quadratic-unpaired")
    data, (q,) = task.train_data(), task.queries()
    assert data.dim == 3 and list(data.times) == list(times[:3]) and data.paired == (mode == "paired")
    assert [(tg.t, tg.group) for tg in q.targets] == [(0.02, "train"), (0.05, "train"), (0.1, "test"), (0.3, "test")]
    xs = [data.marginals[0].x] + [tg.x for tg in q.targets]
    n = xs[0].shape[0]
    for t, x in zip(times, xs):
        mean, var = ou_moments(t, mu0, 0.1, 0.25)
        assert np.all(np.abs(x.mean(0) - mean) < 4.5 * math.sqrt(var / n)), (t, x.mean(0), mean)
        assert np.all(np.abs(x.var(0) - var) < 4.5 * var * math.sqrt(2 / n) + 0.01 * var), (t, x.var(0), var)
    x0 = data.marginals[0].x
    assert np.allclose(data.marginals[0].v, -10 * x0 + 0.5 * 0.25 * (x0 - mu0) / 0.1)
    out = task.simulator()(q.start, (0.3,), 0)[0]  # the oracle runs this SDE, not the default one
    mean, var = ou_moments(0.3, mu0, 0.1, 0.25)
    assert np.all(np.abs(out.mean(0) - mean) < 4.5 * math.sqrt(var / n)) and out.shape == (n, 3)


def _cubic(x):
    return (x**4).sum(1) / 4


def _cubic_grad(x):
    return x**3


def _bad_grad(x):
    return x[:, 0]


class Quartic(gf_sde.GradientFlowSDE):
    family = "quartic"
    potentials = {"quartic": gf_sde.Potential(_cubic, _cubic_grad)}
    n = 100
    modes = ("unpaired",)


def test_a_subclass_with_its_own_potential_is_a_family():
    assert Quartic.variants == ("quartic-unpaired",)
    assert "quartic" in Quartic.description and Quartic.resembles == "gf_sde"
    task = check_task(Quartic, "quartic-unpaired", seed=0)
    (q,) = task.queries()
    assert np.allclose(q.start.v, -q.start.x**3 + 0.5 * q.start.x / 0.2)
    out = task.simulator()(q.start, q.times[:1], 3)  # the oracle steps the same SDE
    assert out[0].shape == (100, 2) and not np.array_equal(out[0], q.start.x)
    cells = task.summarize(q, [0.5] * len(q.targets))
    assert {c.group for c in cells} == {"unpaired"}


def test_bad_potentials_and_times_are_one_sentence_each():
    with pytest.raises(PopbenchError, match="unknown potential 'quadratc'"):
        gf_sde.GradientFlowSDE("quadratc-paired", potentials=("quadratc",)).train_data()
    with pytest.raises(PopbenchError, match="must map"):
        gf_sde.GradientFlowSDE("p-paired", potentials={"p": (_cubic, _bad_grad)}, n=10).train_data()
    with pytest.raises(PopbenchError, match="whole number of Euler-Maruyama steps"):
        gf_sde.GradientFlowSDE("quadratic-paired", potentials=("quadratic",), n=10, times=(0, 0.0105, 0.02),
                               n_train=2).train_data()
    with pytest.raises(TypeError, match="unknown setting"):
        gf_sde.GradientFlowSDE("quadratic-paired", potentials=("quadratic",), sigma2=1.0)
