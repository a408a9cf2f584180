"""Registries of methods and task families.

Three sources, looked up in this order:

1. built-ins, registered by ``"module:Class"`` strings (importing a name imports only its module,
   so ``--help`` and ``--list`` never import torch, JAX or Ray: method modules import their
   framework inside functions);
2. installed packages, through the entry-point groups ``popbench.methods`` and ``popbench.tasks``
   (scanned once, on the first lookup; an entry point is loaded only when its name is asked for,
   so a broken plugin breaks only its own lookup);
3. an explicit ``"package.module:Class"`` reference for code that is not packaged.

Unknown names fail with a :class:`PopbenchError` that suggests the closest names.
"""

from __future__ import annotations

import difflib
import fnmatch
import importlib
from dataclasses import dataclass
from importlib import metadata
from typing import Any

from harness.protocol import Method, PopbenchError, Task

BUILTIN_METHODS: dict[str, str] = {
    "static": "methods.reference:Static",
    "velocity_extrapolation": "methods.reference:VelocityExtrapolation",
    "oracle": "methods.reference:Oracle",
    "wlm": "methods.wlm:WLM",
    "wlm_zero_friction": "methods.wlm:WLMZeroFriction",
    "wlm_full_gradient": "methods.wlm:WLMFullGradient",
    "wlm_zero_friction_full_gradient": "methods.wlm:WLMZeroFrictionFullGradient",
    "jkonet_star": "methods.jkonet_star:JKOnetStar",
    "jkonet_star_t": "methods.jkonet_star:JKOnetStarT",
    "jkonet_star_v": "methods.jkonet_star:JKOnetStarV",
    "ijkonet": "methods.ijkonet:IJKOnet",
    "nn_appex": "methods.nn_appex:NNAPPEX",
    "am": "methods.action_matching:AM",
    "uam": "methods.action_matching:UAM",
    "sam": "methods.action_matching:SAM",
    "dice": "methods.dice:DICE",
    "sbirr": "methods.sbirr:SBIRR",
    "vanilla_sb": "methods.sbirr:VanillaSB",
    "snap_mmd": "methods.snap_mmd:SnapMMD",
    "i_cfm": "methods.flow_matching:ICFM",
    "ot_cfm": "methods.flow_matching:OTCFM",
    "sb_cfm": "methods.flow_matching:SBCFM",
    "sf2m_exact": "methods.flow_matching:SF2MExact",
    "sf2m_sink": "methods.flow_matching:SF2MSink",
    "i_mfm": "methods.flow_matching:IMFM",
    "ot_mfm": "methods.flow_matching:OTMFM",
    "curly_fm": "methods.flow_matching:CurlyFM",
}
"""Reference rows first, then the learners in the paper's order."""

BUILTIN_TASKS: dict[str, str] = {
    "ou": "tasks.ou:OU",
    "gf_sde": "tasks.gf_sde:GFSDE",
    "vortex": "tasks.vortex:Vortex",
    "eb": "tasks.eb:EB",
    "eb300": "tasks.eb:EB300",
    "boids": "tasks.boids:Boids",
}

METHOD_GROUP = "popbench.methods"
TASK_GROUP = "popbench.tasks"


def import_object(ref: str) -> Any:
    """Import ``"package.module:Attr"``; errors become one-sentence :class:`PopbenchError`."""
    module_name, _, attr = ref.partition(":")
    if not module_name or not attr:
        raise PopbenchError(f"{ref!r} is not of the form 'package.module:Class'")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise PopbenchError(f"cannot import {module_name!r} for {ref!r}: {exc}") from exc
    try:
        return getattr(module, attr)
    except AttributeError as exc:
        raise PopbenchError(f"module {module_name!r} has no attribute {attr!r}") from exc


@dataclass
class _Entry:
    name: str
    ref: str
    source: str  # "builtin", "entry-point:<dist>", "path"
    loader: Any = None  # an importlib.metadata.EntryPoint, when from a plugin
    obj: Any = None


class Registry:
    """A name → class registry with lazy loading (one for methods, one for tasks)."""

    def __init__(self, kind: str, base: type, builtins: dict[str, str], group: str):
        self.kind = kind
        self.base = base
        self.group = group
        self._entries: dict[str, _Entry] = {n: _Entry(n, r, "builtin") for n, r in builtins.items()}
        self._scanned = False

    def _scan_entry_points(self) -> None:
        if self._scanned:
            return
        self._scanned = True
        for ep in metadata.entry_points(group=self.group):
            if ep.name in self._entries:
                continue  # built-ins win; a plugin cannot shadow them silently
            dist = getattr(ep, "dist", None)
            dist_name = getattr(dist, "name", "?") if dist is not None else "?"
            self._entries[ep.name] = _Entry(ep.name, ep.value, f"entry-point:{dist_name}", loader=ep)

    def register(self, name: str, ref_or_obj: str | type) -> None:
        """Register a class (or a ``"module:Class"`` string) under ``name`` at run time."""
        if isinstance(ref_or_obj, str):
            self._entries[name] = _Entry(name, ref_or_obj, "runtime")
        else:
            ref = f"{ref_or_obj.__module__}:{ref_or_obj.__qualname__}"
            self._entries[name] = _Entry(name, ref, "runtime", obj=ref_or_obj)

    def names(self) -> list[str]:
        self._scan_entry_points()
        return list(self._entries)

    def entry(self, name: str) -> _Entry:
        self._scan_entry_points()
        if name in self._entries:
            return self._entries[name]
        if ":" in name:
            return _Entry(name, name, "path")
        close = difflib.get_close_matches(name, list(self._entries), n=3, cutoff=0.5)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise PopbenchError(
            f"unknown {self.kind} {name!r}{hint} (run `python run_all.py --list` to see all)"
        )

    def load(self, name: str) -> Any:
        e = self.entry(name)
        if e.obj is None:
            if e.loader is not None:
                try:
                    e.obj = e.loader.load()
                except Exception as exc:  # a broken plugin fails only its own lookup
                    raise PopbenchError(f"{self.kind} plugin {name!r} ({e.ref}) failed to load: {exc}") from exc
            else:
                e.obj = import_object(e.ref)
        if not (isinstance(e.obj, type) and issubclass(e.obj, self.base)):
            raise PopbenchError(f"{e.ref!r} is not a subclass of harness.protocol.{self.base.__name__}")
        return e.obj

    def expand(self, spec: str) -> list[str]:
        """Expand a comma list of names, globs and ``module:Class`` references."""
        out: list[str] = []
        for part in [p.strip() for p in spec.split(",") if p.strip()]:
            if any(ch in part for ch in "*?[") and ":" not in part:
                hits = [n for n in self.names() if fnmatch.fnmatch(n, part)]
                if not hits:
                    raise PopbenchError(f"no {self.kind} matches {part!r}")
                out.extend(hits)
            else:
                self.entry(part)  # validates, with a "did you mean"
                out.append(part)
        return list(dict.fromkeys(out))


methods = Registry("method", Method, BUILTIN_METHODS, METHOD_GROUP)
tasks = Registry("task family", Task, BUILTIN_TASKS, TASK_GROUP)


def family_name(name: str) -> str:
    """The family a task name stands for: its class's ``family`` (``three_well`` for
    ``popbench_example.three_well:ThreeWell``), what a table is headed with and its files are named
    after; the name itself when it does not load (a family no longer installed)."""
    try:
        return tasks.load(name).family or name
    except PopbenchError:
        return name


def expand_tasks(spec: str) -> list[tuple[str, str]]:
    """Expand ``--tasks`` into ``(family, variant)`` pairs.

    A part may be a family (all its variants), ``family/variant``, or a glob over
    ``family/variant`` names (``gf_sde/*-unpaired``).
    """
    out: list[tuple[str, str]] = []
    for part in [p.strip() for p in spec.split(",") if p.strip()]:
        family, sep, variant = part.partition("/")
        if any(ch in part for ch in "*?["):
            fams = [f for f in tasks.names() if fnmatch.fnmatch(f, family)] if sep else tasks.names()
            hits = []
            for f in fams:
                cls = tasks.load(f)
                for v in cls.variants:
                    full = f"{f}/{v}"
                    if fnmatch.fnmatch(full, part) or (not sep and fnmatch.fnmatch(f, part)):
                        hits.append((f, v))
            if not hits:
                raise PopbenchError(f"no task variant matches {part!r}")
            out.extend(hits)
            continue
        cls = tasks.load(family)
        if not sep:
            out.extend((family, v) for v in cls.variants)
        elif variant in cls.variants:
            out.append((family, variant))
        else:
            close = difflib.get_close_matches(variant, list(cls.variants), n=3, cutoff=0.4)
            hint = f"; did you mean {' or '.join(repr(f'{family}/{c}') for c in close)}?" if close else ""
            raise PopbenchError(f"task family {family!r} has no variant {variant!r}{hint}")
    return list(dict.fromkeys(out))
