"""Reference rows that are not learners (protocol.md section 6).

- ``static``: predicts the start marginal unchanged at every target time.
- ``velocity_extrapolation``: ``x + (t - t0) v`` from the start velocities (where the task gives
  them; without velocities it is ``static`` and says so in its row).
- ``oracle``: re-simulates the task's true process from the start state with fresh noise. Its W1
  is the finite-sample floor of section 3. Only tasks with a simulator offer it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from harness.protocol import Capabilities, Marginal, Method, Prediction, Simulator, TrainData


class Static(Method):
    name = "static"
    capabilities = Capabilities(interpolate=True, forecast=True)

    def fit(self, data: TrainData) -> None:
        pass

    def predict(self, start: Marginal, times: Sequence[float], *, seed: int) -> Prediction:
        return Prediction(tuple(start.x.copy() for _ in times))


class VelocityExtrapolation(Method):
    name = "velocity_extrapolation"
    capabilities = Capabilities(interpolate=True, forecast=True, uses_velocities=True)

    def fit(self, data: TrainData) -> None:
        self._had_velocities = False

    def predict(self, start: Marginal, times: Sequence[float], *, seed: int) -> Prediction:
        v = start.v if start.v is not None else np.zeros_like(start.x)
        self._had_velocities = start.v is not None
        return Prediction(tuple(start.x + (t - start.t) * v for t in times))

    def learned(self) -> dict:
        return {"start_velocities": bool(getattr(self, "_had_velocities", False))}


class Oracle(Method):
    name = "oracle"
    capabilities = Capabilities(
        interpolate=True, forecast=True, uses_velocities=True, requires_simulator=True, stochastic=True
    )

    def attach_simulator(self, simulator: Simulator) -> None:
        self._simulator = simulator

    def fit(self, data: TrainData) -> None:
        if getattr(self, "_simulator", None) is None:
            raise RuntimeError("the oracle needs the task's simulator (attach_simulator was not called)")

    def predict(self, start: Marginal, times: Sequence[float], *, seed: int) -> Prediction:
        return Prediction(tuple(np.asarray(x, dtype=float) for x in self._simulator(start, times, seed)))
