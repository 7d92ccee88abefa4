"""What a wheel of tiled_hydra ships: every package, every config file as tiled_hydra/conf, and commands
that start (console scripts and ``python -m``)."""

from __future__ import annotations

import glob
import subprocess
import sys
import tomllib

import pytest
import setuptools

from tests.helpers import CONF_DIR, ENV, REPO


def setuptools_table() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_the_package_list_names_every_package():
    found = setuptools.find_packages(where=str(REPO), exclude=["tests", "tests.*", "build", "build.*"])
    # Hydra finds launcher plugins only in the namespace package hydra_plugins (no __init__.py of its own)
    plugins = [f"hydra_plugins.{p.parent.name}" for p in (REPO / "hydra_plugins").glob("*/__init__.py")]
    # conf/ is not a Python package: it ships as tiled_hydra.conf through package-dir
    assert sorted(setuptools_table()["packages"]) == sorted([*found, *plugins, "tiled_hydra.conf"])
    assert {"tiled_hydra", "tiled_hydra.slots", "tiled_hydra.models.padim"} <= set(found)
    assert setuptools_table()["package-dir"] == {"tiled_hydra.conf": "conf"}


def test_every_config_file_is_package_data():
    patterns = setuptools_table()["package-data"]["tiled_hydra.conf"]
    # setuptools expands package-data globs like glob.glob(recursive=True) below the package's directory
    shipped = {path for pattern in patterns for path in glob.glob(str(CONF_DIR / pattern), recursive=True)}
    files = {str(p) for p in CONF_DIR.rglob("*") if p.is_file()}
    assert len(files) > 40 and files <= shipped, sorted(files - shipped)
    # a config group nested two levels deep (hydra/launcher/) is shipped too
    assert any(p.endswith("hydra/launcher/local_parallel.yaml") for p in shipped)


def test_the_installed_package_finds_its_configs():
    from tiled_hydra.config import CONF_DIR as used

    assert (used / "config.yaml").is_file() and (used / "setup" / "ens9.yaml").is_file()


def scripts() -> dict[str, str]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]


def test_every_console_script_names_a_function():
    import importlib

    for name, target in scripts().items():
        module, function = target.split(":")
        assert callable(getattr(importlib.import_module(module), function)), name


@pytest.mark.slow
def test_every_command_runs_as_python_m_and_answers_help():
    """``python -m tiled_hydra...`` for every command (the shims and __main__ modules exist and wire the
    entry point): --help exits 0 with the command's usage. Started together: mostly interpreter start-up."""
    commands = {"tiled_hydra": "+setup= is required", "tiled_hydra.predict": "usage: tiled-hydra-predict",
                "tiled_hydra.compare": "usage: tiled-hydra-compare", "tiled_hydra.datastats": "usage: tiled-hydra-datastats",
                "tiled_hydra.clean": "usage: tiled-hydra-clean", "tiled_hydra.plan": "memory_budget",
                "tiled_hydra.scaling": "resolutions", "tiled_hydra.export": "usage: tiled-hydra-export"}
    procs = {module: subprocess.Popen([sys.executable, "-m", module, "--help"], cwd=REPO, env=ENV, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE) for module in commands}
    for module, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, (module, err[-2000:])
        assert commands[module] in out, (module, out[:500])
