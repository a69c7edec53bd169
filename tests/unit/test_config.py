"""The README's configuration table lists every setting, with its environment variable."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from worker.config import (
    REPO_ROOT,
    DefaultPaths,
    GateSettings,
    LabellerSettings,
    PipelineSettings,
    SamplingSettings,
    Settings,
    env_vars,
)
from worker.data.corpora import require_shared_data
from worker.errors import DataError
from worker.loop.gate import Thresholds
from worker.loop.labelling import LabellerOptions
from worker.stream.pipeline import PipelineOptions
from worker.stream.sampling import SamplingPolicy


def test_readme_lists_every_setting() -> None:
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    listed = set(re.findall(r"^\| `(INTENT_[A-Z0-9_]+)` \|", readme, flags=re.MULTILINE))
    assert listed == set(env_vars())


def test_every_setting_has_a_description() -> None:
    assert [name for name, field in env_vars().items() if not field.description] == []


def test_each_policy_reads_its_own_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    """The nested policies keep the flat names of the configuration table."""
    monkeypatch.setenv("INTENT_SAMPLE_RATE", "0.3")
    monkeypatch.setenv("INTENT_MAX_BATCH", "64")
    monkeypatch.setenv("INTENT_LABELLER_SHARD_ROWS", "10")
    monkeypatch.setenv("INTENT_GATE_MAX_F1_DROP", "0.02")
    settings = Settings()
    assert settings.sampling.rate == 0.3
    assert settings.pipeline.max_batch == 64
    assert settings.labeller.shard_rows == 10
    assert settings.gate.max_f1_drop == 0.02


def test_served_languages_are_a_list_read_from_a_comma_separated_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("INTENT_SERVED_LANGUAGES", "en, DE,ja,")
    assert Settings().served_languages == ["en", "de", "ja"]
    assert Settings(served_languages=["fr"]).served_languages == ["fr"]


def test_the_options_classes_are_the_settings_models() -> None:
    """One source per default: the options the code takes extend the nested settings models."""
    for options, settings in (
        (PipelineOptions(), PipelineSettings()),
        (SamplingPolicy(), SamplingSettings()),
        (Thresholds(), GateSettings()),
        (LabellerOptions(prefix="p"), LabellerSettings()),
    ):
        assert isinstance(options, type(settings))
        assert options.model_dump(include=set(type(settings).model_fields)) == settings.model_dump()
    assert Settings().gate.model_dump() == GateSettings().model_dump()  # no INTENT_GATE_* set here


def test_an_installed_package_has_no_default_path_inside_site_packages(tmp_path: Path) -> None:
    package = tmp_path / "site-packages" / "worker"
    package.mkdir(parents=True)
    paths = DefaultPaths.for_package(package, {"HOME": str(tmp_path / "home")})
    assert paths.checkout is None
    assert paths.shared_data is None  # no ../shared outside development
    for path in (paths.models, paths.run, paths.datasets):
        assert path.is_relative_to(tmp_path / "home")
    assert paths.models == tmp_path / "home" / ".local" / "share" / "intent-worker" / "models"
    xdg = DefaultPaths.for_package(package, {"XDG_DATA_HOME": str(tmp_path / "data")})
    assert xdg.models == tmp_path / "data" / "intent-worker" / "models"


def test_a_source_checkout_keeps_its_files_in_the_tree(tmp_path: Path) -> None:
    (tmp_path / "repo" / "worker").mkdir(parents=True)
    (tmp_path / "repo" / "pyproject.toml").write_text("[project]\n")
    paths = DefaultPaths.for_package(tmp_path / "repo" / "worker", {})
    assert paths.checkout == tmp_path / "repo"
    assert paths.models == tmp_path / "repo" / "models"
    assert paths.shared_data == tmp_path / "shared" / "data"


def test_without_development_data_the_error_names_the_variable() -> None:
    with pytest.raises(DataError, match="INTENT_SHARED_DATA_DIR"):
        require_shared_data(Settings(shared_data_dir=None).shared_data_dir)
