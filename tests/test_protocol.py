"""harness/protocol.py helpers: learned curves, and the job identity of budget keys."""

import numpy as np

from harness.protocol import curve, curve_steps
from harness.runner import Job


def test_curve_block_means_keep_trend_and_length():
    assert curve([3.0, 1.0], points=5) == [3.0, 1.0]  # short curves unchanged
    v = np.arange(1000, dtype=float)
    c = curve(v, points=10)
    assert len(c) == 10 and c[0] == np.mean(v[:100]) and c[-1] == np.mean(v[900:])
    noisy = 1.0 + np.where(np.arange(1001) % 2, 0.5, -0.5)  # alternating noise around 1
    assert np.allclose(curve(noisy, points=7), 1.0, atol=1e-2)


def test_budget_keys_do_not_change_a_jobs_identity():
    hp = {"iterations": 100, "max_minutes": None}
    uncapped = Job("ou", "paired", "wlm", "paper", 0, hp, budget_keys=("max_minutes",))
    capped = Job("ou", "paired", "wlm", "paper", 0, dict(hp, max_minutes=30), budget_keys=("max_minutes",))
    other = Job("ou", "paired", "wlm", "paper", 0, dict(hp, iterations=200), budget_keys=("max_minutes",))
    assert capped.job_id == uncapped.job_id != other.job_id
    # without the declaration the cap would be a setting like any other
    assert Job("ou", "paired", "wlm", "paper", 0, dict(hp, max_minutes=30)).job_id != uncapped.job_id


def test_curve_steps_name_the_last_iteration_each_block_mean_covers():
    assert curve_steps(3, 3) == [1, 2, 3]  # unchanged curves: one value per iteration
    its = np.arange(1, 1001, dtype=float)  # a curve whose value is its own iteration number
    means, ends = curve(its, points=200), curve_steps(1000, 200)
    assert len(ends) == 200 and ends[0] == 5 and ends[-1] == 1000
    starts = [1] + [e + 1 for e in ends[:-1]]
    assert means == [(a + b) / 2 for a, b in zip(starts, ends)]  # block k averages iterations starts[k]..ends[k]
