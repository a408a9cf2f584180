"""Registries: lazy built-ins, entry points, module:Class references, did-you-mean."""

import subprocess
import sys
from importlib import metadata

import pytest

from harness import registry
from harness.protocol import Method, PopbenchError

from .conftest import ROOT


def test_list_and_help_import_no_framework():
    code = (
        "import sys, io, contextlib\n"
        "from harness.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    main(['--list'])\n"
        "    try:\n"
        "        main(['--help'])\n"
        "    except SystemExit:\n"
        "        pass\n"
        "heavy = sorted(m for m in ('torch', 'jax', 'ray', 'geomloss', 'ot') if m in sys.modules)\n"
        "print(heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_unknown_names_suggest_the_closest():
    with pytest.raises(PopbenchError, match="did you mean 'static'"):
        registry.methods.entry("statc")
    with pytest.raises(PopbenchError, match="did you mean 'ou/paired'"):
        registry.expand_tasks("ou/pared")


def test_globs_families_and_references_expand():
    assert registry.expand_tasks("ou") == [("ou", "paired"), ("ou", "unpaired")]
    assert registry.expand_tasks("ou/un*") == [("ou", "unpaired")]
    assert registry.methods.expand("static,velocity_*") == ["static", "velocity_extrapolation"]
    assert registry.methods.load("harness.testing:Raises").name == "test_raises"
    with pytest.raises(PopbenchError, match="not a subclass"):
        registry.methods.load("harness.protocol:Marginal")


def test_entry_points_are_discovered_lazily(monkeypatch):
    ep = metadata.EntryPoint(name="my_static", value="methods.reference:Static", group=registry.METHOD_GROUP)
    broken = metadata.EntryPoint(name="my_broken", value="no_such_module_xyz:Thing", group=registry.METHOD_GROUP)
    monkeypatch.setattr(registry.metadata, "entry_points",
                        lambda group: [ep, broken] if group == registry.METHOD_GROUP else [])
    reg = registry.Registry("method", Method, {"static": "methods.reference:Static"}, registry.METHOD_GROUP)
    assert "my_static" in reg.names()
    assert reg.load("my_static").name == "static"
    with pytest.raises(PopbenchError, match="failed to load"):
        reg.load("my_broken")  # a broken plugin fails only its own lookup
    assert reg.load("static").name == "static"
