"""boids: the update rules by hand, unit speed, the boundary, splits, the unseen-init queries, the oracle."""

from __future__ import annotations

import numpy as np
import pytest

from harness.conformance import check_task
from harness.protocol import TableColumn
from tasks import boids
from tasks.boids import Boids


@pytest.fixture(autouse=True, scope="module")
def _isolated_cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("POPBENCH_CACHE_DIR", str(tmp_path_factory.mktemp("popbench-cache")))
        yield


def unit(a):
    a = np.asarray(a, dtype=float)
    return a / np.linalg.norm(a, axis=-1, keepdims=True)


def test_rules_by_hand_two_boids():
    # distance 0.5: cohesion and alignment (means over i and its neighbour), no separation
    x = np.array([[0.0, 0.0], [0.5, 0.0]])
    v = np.array([[1.0, 0.0], [0.0, 1.0]])
    dv = boids.accelerations(x, v)
    coh = np.array([0.25, 0.0])  # mean{0, (0.5, 0)}
    ali = np.array([-0.5, 0.5])  # mean{0, v2 - v1}
    assert np.allclose(dv[0], 0.005 * coh + 0.3 * ali)
    assert np.allclose(dv[1], 0.005 * -coh + 0.3 * -ali)
    # distance 0.2: separation is a sum, -(x_j - x_i)
    x = np.array([[0.0, 0.0], [0.2, 0.0]])
    v = np.array([[0.0, 1.0], [0.0, 1.0]])
    dv = boids.accelerations(x, v)
    assert np.allclose(dv[0], 0.005 * np.array([0.1, 0.0]) + 0.1 * np.array([-0.2, 0.0]))
    # distance 1.2: no interaction at all
    x = np.array([[0.0, 0.0], [1.2, 0.0]])
    assert np.allclose(boids.accelerations(x, v), 0.0)
    # boundary, per coordinate, beyond |x| = 5
    x = np.array([[6.0, -7.0], [4.0, 5.5]])
    dv = boids.accelerations(x, v)
    assert np.allclose(dv, 0.5 * np.array([[-1.0, 1.0], [0.0, -1.0]]))


def test_speed_is_one_after_every_step():
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal((300, 2))
    v0 = boids.initial_velocities(300, rng)
    assert np.allclose(np.linalg.norm(v0, axis=1), 1.0)
    xs, vs = boids.simulate(x0, v0, 15)
    assert np.allclose(np.linalg.norm(vs, axis=2), 1.0, atol=1e-12)
    assert np.allclose(np.linalg.norm(np.diff(xs, axis=0), axis=2), boids.DT, atol=1e-12)


def test_lone_boid_moves_straight():
    x0 = np.array([[0.3, -1.0], [10.0, 10.0]]) * 0.4  # two boids 4.7 apart: neither has a neighbour
    v0 = unit([[0.6, 0.8], [-1.0, 0.2]])
    xs, vs = boids.simulate(x0, v0, 6)
    for k in range(7):
        assert np.allclose(xs[k], x0 + k * boids.DT * v0)
        assert np.allclose(vs[k], v0)


def test_boid_far_outside_the_box_turns_back():
    x0 = np.array([[20.0, 0.0]])
    v0 = unit([[np.cos(0.3), np.sin(0.3)]])  # heading outwards (not exactly head-on)
    xs, vs = boids.simulate(x0, v0, 40)
    assert vs[-1, 0, 0] < -0.9  # now heading back towards the box
    assert xs[-1, 0, 0] < 20.0
    assert np.all(np.diff(np.arctan2(vs[:12, 0, 1], vs[:12, 0, 0])) > 0)  # it keeps turning


def test_simulator_is_permutation_invariant_bitwise():
    rng = np.random.default_rng(1)
    x0 = rng.standard_normal((400, 2))
    v0 = boids.initial_velocities(400, rng)
    p = rng.permutation(400)
    xs, _ = boids.simulate(x0, v0, 12)
    ys, _ = boids.simulate(x0[p], v0[p], 12)
    assert np.array_equal(xs[:, p], ys)


def test_default_splits_and_queries():
    task = Boids("default", seed=0)
    data = task.train_data()
    assert len(data.marginals) == 50 and not data.paired
    assert [m.index for m in data.marginals] == list(range(50))
    assert np.allclose(data.times, 0.5 * np.arange(50))
    m0 = data.marginals[0]
    assert m0.v is not None and all(m.v is None for m in data.marginals[1:])
    assert np.allclose(np.linalg.norm(m0.v, axis=1), 1.0)
    assert m0.n == 1000 and m0.dim == 2
    (q,) = task.queries()
    assert q.name == "rollout" and q.kind == "rollout" and q.start.index == 0
    assert np.array_equal(q.start.x, m0.x) and np.array_equal(q.start.v, m0.v)
    assert [tg.index for tg in q.targets] == list(range(1, 100))
    assert [tg.group for tg in q.targets] == ["train"] * 49 + ["test"] * 50
    assert np.allclose(q.times, 0.5 * np.arange(1, 100))
    # the start population is N(0, I)-like and its velocities are mean-removed random directions
    assert np.all(np.abs(m0.x.mean(0)) < 0.15) and np.allclose(m0.x.std(0), 1.0, atol=0.1)
    w = list(np.arange(99.0))
    assert task.summarize(q, w) == {
        TableColumn("", "train_w1", "default"): float(np.mean(w[:49])),
        TableColumn("", "forecast_w1", "default"): float(np.mean(w[49:])),
    }
    assert Boids.paper_table == {"": (4, "default")}


def test_rows_are_shuffled_per_time_and_the_oracle_reproduces_them():
    task = Boids("default", seed=0)
    (q,) = task.queries()
    # consecutive marginals: row i is not the same boid (a boid moves exactly 0.5 per step)
    step = np.linalg.norm(q.targets[0].x - q.start.x, axis=1)
    assert np.mean(np.isclose(step, 0.5)) < 0.05
    out = task.simulator()(q.start, q.times[:20:6], seed=123)
    for x, tg in zip(out, q.targets[:20:6]):
        a = x[np.lexsort(x.T[::-1])]
        b = tg.x[np.lexsort(tg.x.T[::-1])]
        assert np.array_equal(a, b)  # the same population, bitwise: the oracle's floor is 0
    with pytest.raises(ValueError):
        task.simulator()(q.start.without_velocities(), q.times[:1], 0)


def test_unseen_init_queries():
    task = Boids("unseen-init", seed=0)
    assert np.array_equal(task.train_data().marginals[5].x, Boids("default", seed=0).train_data().marginals[5].x)
    qs = task.queries()
    assert [q.name for q in qs] == ["gmm2", "gmm3", "gmm4"]
    starts = []
    for q in qs:
        assert q.kind == "rollout" and q.start.t == 0.0 and q.start.v is not None and q.start.index == -1
        assert np.allclose(np.linalg.norm(q.start.v, axis=1), 1.0)
        assert [tg.t for tg in q.targets] == [0.5 * k for k in range(5, 100, 5)]
        assert all(tg.group == "test" and tg.index == -1 for tg in q.targets)
        starts.append(q.start.x)
        out = task.simulator()(q.start, q.times[:1], 0)[0]
        assert np.array_equal(np.sort(out[:, 0]), np.sort(q.targets[0].x[:, 0]))
    assert not np.allclose(starts[0], starts[1])
    cells = task.summarize(qs[1], [0.1] * 19)
    assert cells == {TableColumn("unseen-init", "w1_gmm3"): pytest.approx(0.1)}


def test_check_task_both_variants():
    for v in Boids.variants:
        check_task(Boids, v, seed=0)
    a = Boids("default", seed=0).train_data().marginals[1].x
    b = Boids("default", seed=1).train_data().marginals[1].x
    assert not np.array_equal(a, b)
