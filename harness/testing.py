"""Fault-injecting and probing dummy methods, for the harness's own tests and benchmarks.

Use them by reference, e.g. ``--methods harness.testing:Raises``. Each is ``static`` plus one
misbehaviour, controlled by the settings it declares (``--set harness.testing:Sleeps.sleep=5``).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from harness.protocol import Capabilities, Marginal, Method, Prediction, TrainData


class _Base(Method):
    capabilities = Capabilities(interpolate=True, forecast=True)
    settings: dict[str, Any] = {}  # the declared settings, the same for every task and profile

    @classmethod
    def default_hparams(cls, task: str, profile: str) -> dict[str, Any]:
        return dict(cls.settings)

    def fit(self, data: TrainData) -> None:
        pass

    def predict(self, start: Marginal, times: Sequence[float], *, seed: int) -> Prediction:
        return Prediction(tuple(start.x.copy() for _ in times))


class Raises(_Base):
    """Raises in ``fit``."""

    name = "test_raises"

    def fit(self, data: TrainData) -> None:
        print("test_raises: about to fail", file=sys.stderr)  # the job's log must keep it
        raise RuntimeError("injected failure")


class ReturnsNaN(_Base):
    """Returns NaN samples."""

    name = "test_nan"

    def predict(self, start: Marginal, times: Sequence[float], *, seed: int) -> Prediction:
        return Prediction(tuple(np.full_like(start.x, np.nan) for _ in times))


class Sleeps(_Base):
    """Sleeps ``hparams["sleep"]`` seconds (default 60) in ``fit``."""

    name = "test_sleeps"
    settings = {"sleep": 60.0}

    def fit(self, data: TrainData) -> None:
        print(f"test_sleeps: pid {os.getpid()}", file=sys.stderr, flush=True)  # the job's log names its process
        time.sleep(float(self.hparams["sleep"]))


class VelocityProbe(_Base):
    """Reports (``learned()["saw_velocities"]``) whether any training marginal had velocities.
    Declares no use of them; :class:`VelocityReadingProbe` does."""

    name = "test_velocity_probe"

    def fit(self, data: TrainData) -> None:
        self._saw = any(m.v is not None for m in data.marginals)

    def learned(self) -> dict[str, Any]:
        return {"saw_velocities": self._saw}


class VelocityReadingProbe(VelocityProbe):
    name = "test_velocity_reading_probe"
    capabilities = Capabilities(interpolate=True, forecast=True, uses_velocities=True)


class Exits(_Base):
    """Calls ``sys.exit(3)`` in ``fit`` (a library that exits instead of raising)."""

    name = "test_exits"

    def fit(self, data: TrainData) -> None:
        sys.exit(3)


class KillsWorker(_Base):
    """Kills its own process in ``fit`` (a segfault, an OOM kill)."""

    name = "test_kills_worker"

    def fit(self, data: TrainData) -> None:
        print("test_kills_worker: about to die", file=sys.stderr)  # the job's log must keep it
        os.kill(os.getpid(), signal.SIGKILL)


class Busy(_Base):
    """Burns ``hparams["seconds"]`` of CPU (default 2) in pure Python: a CPU-bound dummy job."""

    name = "test_busy"
    settings = {"seconds": 2.0}

    def fit(self, data: TrainData) -> None:
        end = time.process_time() + float(self.hparams["seconds"])
        x = 0
        while time.process_time() < end:
            for i in range(10_000):
                x += i * i
        self._x = x


class EnvProbe(_Base):
    """Records where it ran: device, pid, CUDA_VISIBLE_DEVICES, JAX_PLATFORMS, ...

    Its subclass :class:`GpuEnvProbe` declares ``num_gpus=1``."""

    name = "test_env_probe"
    settings = {"sleep": 0.0}

    def fit(self, data: TrainData) -> None:
        started = time.time()
        time.sleep(float(self.hparams["sleep"]))
        self._env = {
            "started": started,
            "ended": time.time(),
            "device": self.device,
            "pid": os.getpid(),
            "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS"),
            "XLA_PYTHON_CLIENT_PREALLOCATE": os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE"),
        }

    def learned(self) -> dict:
        return dict(self._env)


class GpuEnvProbe(EnvProbe):
    name = "test_gpu_env_probe"
    capabilities = Capabilities(interpolate=True, forecast=True, num_gpus=1, framework="torch")


class TwoGpuEnvProbe(EnvProbe):
    """Needs two GPUs: on the test cluster (2 fake GPUs) one such job at a time fits."""

    name = "test_two_gpu_env_probe"
    capabilities = Capabilities(interpolate=True, forecast=True, num_gpus=2, framework="torch")


class InterpolationOnly(_Base):
    """``static`` that declares it cannot forecast."""

    name = "test_interpolation_only"
    capabilities = Capabilities(interpolate=True, forecast=False)
