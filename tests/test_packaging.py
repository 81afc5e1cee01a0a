"""What a built wheel ships: the types marker, the licence, one version."""

from __future__ import annotations

import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

import mfu_callbacks
from mfu_callbacks._version import __version__

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    folder = tmp_path_factory.mktemp("wheel")
    pytest.importorskip("setuptools")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(folder),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    (path,) = folder.glob("mfu_callbacks-*.whl")
    return zipfile.ZipFile(path)


def test_the_wheel_ships_py_typed_and_the_license(wheel):
    names = wheel.namelist()
    assert "mfu_callbacks/py.typed" in names
    licence = next(
        name
        for name in names
        if name.endswith(".dist-info/licenses/LICENSE") or name.endswith(".dist-info/LICENSE")
    )
    assert "Apache License" in wheel.read(licence).decode() and "Version 2.0" in wheel.read(licence).decode()


def test_the_version_is_written_once_and_the_wheel_carries_it(wheel):
    assert mfu_callbacks.__version__ == __version__
    metadata = next(name for name in wheel.namelist() if name.endswith(".dist-info/METADATA"))
    text = wheel.read(metadata).decode()
    assert f"\nVersion: {__version__}\n" in text
    assert "Requires-Python: >=3.11" in text
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "version" not in project and "version" in project["dynamic"]


def test_the_wheel_names_the_project_urls_and_classifiers(wheel):
    metadata = next(name for name in wheel.namelist() if name.endswith(".dist-info/METADATA"))
    text = wheel.read(metadata).decode()
    for label in ("Homepage", "Repository", "Issues", "Changelog", "Documentation"):
        assert f"\nProject-URL: {label}, https://github.com/mfu-callbacks/mfu-callbacks" in text
    assert (
        "Classifier: Typing :: Typed" in text and "Classifier: Programming Language :: Python :: 3.11" in text
    )
    assert "Provides-Extra: docs" in text
