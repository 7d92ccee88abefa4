"""What a wheel of tiled_hydra ships: every package, and every config file as tiled_hydra/conf."""

from __future__ import annotations

import glob
import tomllib

import setuptools

from tests.helpers import CONF_DIR, REPO


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
