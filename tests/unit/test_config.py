"""The README's configuration table lists every setting, with its environment variable."""

from __future__ import annotations

import re
from dataclasses import asdict

import pytest

from worker.config import (
    REPO_ROOT,
    GateSettings,
    LabellerSettings,
    PipelineSettings,
    SamplingSettings,
    Settings,
    env_vars,
)
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


def test_the_options_classes_default_to_the_settings_defaults() -> None:
    """One source per default: the plain options the code takes are the settings' defaults."""
    assert SamplingPolicy() == SamplingPolicy.from_settings(SamplingSettings.model_construct())
    assert PipelineOptions() == PipelineOptions.from_settings(PipelineSettings.model_construct())
    assert asdict(Thresholds()) == {
        **GateSettings.model_construct().model_dump(),
        "languages": None,
        "new_label_set": False,
    }
    labeller = LabellerSettings.model_construct()
    options = LabellerOptions(prefix="p")
    assert (options.group, options.shard_rows, options.claim_idle_s, options.max_deliveries) == (
        labeller.group,
        labeller.shard_rows,
        labeller.claim_idle_s,
        labeller.max_deliveries,
    )
