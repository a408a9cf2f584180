"""Registries: lazy built-ins, entry points, module:Class references, did-you-mean."""

import subprocess
import sys
from importlib import metadata

import pytest

from harness import registry
from harness.protocol import Method, PopbenchError, Task, resolve_hparams

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


# ---------------------------------------------------------------------------------------------
# A method's settings for a task come from the task's family, or the family it resembles

TABLE = {"smoke": {"gf_sde": {"lr": 1}, "vortex/forecast": {"lr": 2}, "ou/paired": {"lr": 3},
                   "default": {"lr": 0}}}


class LikeGF(Task):  # only its class attributes are read
    family = "like_gf"
    variants = ("a",)
    resembles = "gf_sde"


class LikeForecast(LikeGF):
    family = "like_forecast"
    resembles = {"a": "vortex/forecast"}


class LikeNothing(LikeGF):
    family = "like_nothing"
    resembles = ""


class Stub(Method):
    name = "stub"

    @classmethod
    def default_hparams(cls, task, profile):
        return resolve_hparams(TABLE, task, profile)

    def fit(self, data):
        pass

    def predict(self, start, times, *, seed):
        pass


def test_settings_follow_the_family_and_what_it_resembles(capsys):
    here = "tests.test_registry"
    assert Stub.default_hparams("ou/paired", "smoke") == {"lr": 3}  # the variant's own
    assert Stub.default_hparams("gf_sde/quadratic-paired", "smoke") == {"lr": 1}  # the family's
    assert Stub.default_hparams(f"{here}:LikeGF/a", "smoke") == {"lr": 1}  # the family it resembles
    assert Stub.default_hparams(f"{here}:LikeForecast/a", "smoke") == {"lr": 2}  # a resembled variant
    assert capsys.readouterr().err == ""
    assert Stub.default_hparams(f"{here}:LikeNothing/a", "smoke") == {"lr": 0}
    Stub.default_hparams(f"{here}:LikeNothing/a", "smoke")
    err = capsys.readouterr().err
    assert err == "note: stub has no settings for task family 'like_nothing'; it runs with its default settings\n"
    assert Stub.default_hparams("ou/unpaired", "smoke") == {"lr": 0}
    assert "family 'ou'" in capsys.readouterr().err


def test_a_method_with_one_setting_for_all_says_nothing(capsys):
    assert resolve_hparams({"smoke": {"default": {"k": 1}}}, "ou/paired", "smoke") == {"k": 1}
    assert capsys.readouterr().err == ""


def test_family_name_of_a_reference_is_its_class_family():
    assert registry.family_name("tests.test_registry:LikeGF") == "like_gf"
    assert registry.family_name("vortex") == "vortex"
    assert registry.family_name("gone_family") == "gone_family"
