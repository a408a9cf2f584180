"""Training checkpoints for methods whose ``fit`` is long (hours on a GPU, days on a CPU).

The harness gives each job a file it alone may write (:attr:`harness.protocol.Method.checkpoint_path`)
and deletes it once the job is stored ``ok``. A method that uses it saves its whole training state
there now and then and, when the job is rerun after an interruption (a killed worker, a
``--timeout``, a budget key such as WLM's ``max_minutes``), continues exactly as the uninterrupted
fit would have. These helpers are what such a method needs, so that every method does it the same
way (WLM and nn-APPEX use them; a plug-in method may too):

- :func:`fingerprint`: what a checkpoint must match to be resumed (the method, its settings less
  the budget keys, its seed and the training data). A checkpoint of another fit is ignored.
- :func:`save` / :func:`load`: ``torch.save`` written atomically, read back with a warning (not
  an error) when the file is torn or belongs to another fit: training then starts from scratch.
- :func:`code_id` and :class:`CodeTrail`: which code trained which stretch of a resumed fit, so a
  result trained partly by older code says so instead of passing a mix of two versions off as one.

torch is imported inside the functions that need it.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from harness.protocol import Method, TrainData


def fingerprint(method: Method, data: TrainData) -> str:
    """A hash of the method's class, settings (less ``budget_keys``) and seed, and of the training
    marginals (times, positions, velocities)."""
    h = hashlib.sha256()
    hp = {k: v for k, v in method.hparams.items() if k not in method.budget_keys}
    h.update(json.dumps([type(method).__name__, hp, method.seed], sort_keys=True, default=str).encode())
    for m in data.marginals:
        h.update(np.float64(m.t).tobytes())
        h.update(np.ascontiguousarray(m.x, dtype=np.float64).tobytes())
        if m.v is not None:
            h.update(np.ascontiguousarray(m.v, dtype=np.float64).tobytes())
    return h.hexdigest()


def code_id(module_file: str | Path) -> str:
    """The training code: the module's file name, a hash of its source, and torch's version
    (e.g. ``"wlm.py 3f2a9c01b7de, torch 2.13.0"``)."""
    import torch

    path = Path(module_file)
    return f"{path.name} {hashlib.sha256(path.read_bytes()).hexdigest()[:12]}, torch {torch.__version__}"


def save(path: str | Path, state: dict[str, Any]) -> None:
    """``torch.save`` the state to ``path`` atomically: a kill mid-write leaves the previous file."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load(path: str | Path | None, fp: str, what: str, expect: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The state saved at ``path`` when it holds the fit with fingerprint ``fp``, else None: no
    file (or no path), an unreadable file, another fit's, or one whose entries differ from
    ``expect`` (e.g. ``{"device": "cuda"}`` for a state that only that device can resume), the last
    three with a warning naming ``what`` (e.g. ``"WLM"``). A state saved by :func:`save` carries its
    fingerprint under ``"fingerprint"``."""
    import torch

    if path is None or not Path(path).exists():
        return None
    try:  # our own file (it may hold NumPy's generator state, hence not weights_only)
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - a torn or foreign file must not kill the job
        warnings.warn(f"ignoring unreadable {what} checkpoint {path}: {exc}", stacklevel=3)
        return None
    if not isinstance(state, dict) or state.get("fingerprint") != fp:
        warnings.warn(f"ignoring {what} checkpoint {path}: it belongs to another fit (settings, seed "
                      "or data differ); training starts from scratch", stacklevel=3)
        return None
    for key, want in (expect or {}).items():
        if state.get(key) != want:
            warnings.warn(f"ignoring {what} checkpoint {path}: it was written with {key} {state.get(key)!r}, this "
                          f"fit has {want!r}; training starts from scratch", stacklevel=3)
            return None
    return state


class CodeTrail:
    """Which code trained a fit, per stretch: ``[(first step, code id), ...]``.

    Start it with the current code; on resume, :meth:`resume` takes the saved trail and adds a
    stretch (with a warning) when the code changed. ``str()`` is one code id when a single code
    trained the whole fit, else ``"from <unit> I: code; ..."``."""

    def __init__(self, code: str, unit: str = "iteration"):
        self.code = code
        self.unit = unit
        self.stretches: list[tuple[int, str]] = [(0, code)]

    def resume(self, saved: list | None, at: int, what: str, path: str | Path) -> None:
        """Continue the saved trail (None: written by code that kept none) at step ``at``."""
        self.stretches = [(int(i), str(c)) for i, c in (saved or [(0, "unrecorded")])]
        if self.stretches[-1][1] != self.code:
            warnings.warn(f"{what} checkpoint {path} was trained by other code ({self.stretches[-1][1]}; now "
                          f"{self.code}): the result will say so in trained_by", stacklevel=3)
            self.stretches.append((int(at), self.code))

    def state(self) -> list[tuple[int, str]]:
        """What to save in a checkpoint."""
        return list(self.stretches)

    def __str__(self) -> str:
        if len(self.stretches) == 1:
            return self.stretches[0][1]
        return "; ".join(f"from {self.unit} {i}: {c}" for i, c in self.stretches)
