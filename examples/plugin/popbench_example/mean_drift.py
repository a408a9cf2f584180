"""``mean_drift``: move the start population by the mean velocity of the training data.

A complete popbench method in ~30 lines: it fits the population mean of each training marginal,
interpolates/extrapolates that mean linearly in time, and translates the start population by the
change of the mean. Registered through the ``popbench.methods`` entry point in pyproject.toml.
"""

from __future__ import annotations

import numpy as np

from harness.protocol import Capabilities, Method, Prediction, resolve_hparams

HPARAMS = {p: {"default": {"degree": 1}} for p in ("smoke", "quick", "paper")}


class MeanDrift(Method):
    name = "mean_drift"
    capabilities = Capabilities(interpolate=True, forecast=True)

    @classmethod
    def default_hparams(cls, task, profile):
        return resolve_hparams(HPARAMS, task, profile)

    def fit(self, data):
        means = np.stack([m.x.mean(axis=0) for m in data.marginals])
        self.coef = np.polyfit(data.times, means, deg=int(self.hparams["degree"]))

    def _mean(self, t):
        return np.array([np.polyval(self.coef[:, j], t) for j in range(self.coef.shape[1])])

    def predict(self, start, times, *, seed):
        base = self._mean(start.t)
        return Prediction(tuple(start.x + (self._mean(t) - base) for t in times))
