"""Exact W1/W2/MMD against closed forms (harness/metrics.py)."""

import numpy as np
import pytest
from scipy.stats import wasserstein_distance

from harness import metrics


def test_w1_of_a_translate_is_the_shift_length():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 2))
    s = np.array([0.3, -0.4])
    assert metrics.w1(x, x + s) == pytest.approx(0.5, abs=1e-9)
    assert metrics.w2(x, x + s) == pytest.approx(0.5, abs=1e-9)


def test_w1_is_permutation_invariant_and_symmetric():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(200, 3)), rng.normal(1.0, 1.0, size=(250, 3))
    perm = rng.permutation(len(x))
    assert metrics.w1(x[perm], y) == pytest.approx(metrics.w1(x, y), rel=1e-12)
    assert metrics.w1(y, x) == pytest.approx(metrics.w1(x, y), rel=1e-12)


def test_w1_at_most_w2():
    rng = np.random.default_rng(2)
    for _ in range(5):
        x, y = rng.normal(size=(150, 2)), rng.standard_t(3, size=(120, 2))
        assert metrics.w1(x, y) <= metrics.w2(x, y) + 1e-12


def test_w1_matches_the_1d_closed_form_with_weights():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(100, 1)), rng.exponential(size=(80, 1))
    a = rng.uniform(0.1, 1.0, size=100)
    expected = wasserstein_distance(x[:, 0], y[:, 0], u_weights=a)
    assert metrics.w1(x, y, a) == pytest.approx(expected, rel=1e-9)


def test_energy_mmd_is_zero_on_equal_sets_and_positive_otherwise():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(200, 2))
    assert metrics.energy_mmd(x, x) == pytest.approx(0.0, abs=1e-12)
    assert metrics.energy_mmd(x, x + 1.0) > 0.1


def test_a_solver_stopped_by_its_iteration_cap_is_an_error(monkeypatch):
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(200, 2)), rng.normal(size=(200, 2))
    monkeypatch.setattr(metrics, "NUM_ITER_MAX", 10)
    with pytest.raises(metrics.SolverError):
        metrics.w1(x, y)


def test_bad_inputs_are_refused():
    x = np.zeros((5, 2))
    with pytest.raises(ValueError):
        metrics.w1(x, np.zeros((5, 3)))
    with pytest.raises(ValueError):
        metrics.w1(x, np.full((5, 2), np.nan))
    with pytest.raises(ValueError):
        metrics.w1(x, x, a=-np.ones(5))
