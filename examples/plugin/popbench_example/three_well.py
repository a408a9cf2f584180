"""A sixth gradient-flow SDE: three wells at the corners of a triangle, in 2-D.

    V(x) = -5 log Σ_k exp(-2 ‖x - c_k‖²)

With 300 particles per marginal; everything else (σ, times, p0, paired/unpaired variants, the
oracle) is the gf_sde protocol, and methods use their gf_sde settings.
Run: python run_all.py --tasks popbench_example.three_well:ThreeWell
"""

import numpy as np
from scipy.special import logsumexp, softmax

from tasks.gf_sde import GradientFlowSDE, Potential

CENTRES = np.array([[1.0, 0.0], [-0.5, 0.75**0.5], [-0.5, -0.75**0.5]])


def _sq_distances(x):
    return ((x[:, None, :] - CENTRES) ** 2).sum(-1)  # (n, 3)


def three_well(x):
    return -5 * logsumexp(-2 * _sq_distances(x), axis=1)


def three_well_grad(x):
    w = softmax(-2 * _sq_distances(x), axis=1)
    return 20 * (w[:, :, None] * (x[:, None, :] - CENTRES)).sum(1)


class ThreeWell(GradientFlowSDE):
    family = "three_well"
    potentials = {"three_well": Potential(three_well, three_well_grad)}
    n = 300
