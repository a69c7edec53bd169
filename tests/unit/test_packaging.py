"""pyproject.toml as setuptools reads it: no deprecation warning on any install."""

from __future__ import annotations

import tomllib

import pytest
from setuptools.config.pyprojecttoml import apply_configuration
from setuptools.dist import Distribution

from worker.config import REPO_ROOT

PYPROJECT = REPO_ROOT / "pyproject.toml"


def test_pyproject_configures_setuptools_without_warnings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO_ROOT)  # the readme is read relative to the project
    # Warnings are errors in this suite: the old `license = {text = ...}` table raised here.
    distribution = apply_configuration(Distribution(), str(PYPROJECT))
    assert distribution.metadata.license_expression == "MIT"


def test_build_requires_a_setuptools_that_reads_spdx_licenses() -> None:
    project = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))
    assert isinstance(project["project"]["license"], str)
    assert "setuptools>=77" in project["build-system"]["requires"]  # PEP 639 support
