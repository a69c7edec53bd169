"""The alarm and reminder seed templates: every served language, every slot filled, seeded samples."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from worker.config import SERVED_LANGUAGES
from worker.data.corpora import language_of
from worker.loop.templates import TEMPLATES, expansions, template_rows


def test_every_served_language_has_templates_whose_slots_all_fill() -> None:
    assert set(TEMPLATES) == set(SERVED_LANGUAGES)
    for language, spec in TEMPLATES.items():
        texts = expansions(language)
        assert len(texts) >= 100, language
        assert len(set(texts)) == len(texts)
        assert not any("{" in text or "}" in text for text in texts), language
        slots = {"time", "day", "thing"}
        assert set(spec) == {"patterns", *slots}, language
        for slot in slots:  # every value of every slot is used somewhere
            assert all(any(value in text for text in texts) for value in spec[slot]), (language, slot)


def test_template_rows_sample_per_language_with_stable_ids() -> None:
    rows = list(template_rows(50, seed=3))
    assert len(rows) == 50 * len(TEMPLATES)
    assert len({row.id for row in rows}) == len(rows)
    assert all(language_of(row.locale) == row.id.split("-")[1] for row in rows)
    assert rows == list(template_rows(50, seed=3))
    assert [r.text for r in rows] != [r.text for r in template_rows(50, seed=4)]
    everything = list(template_rows(10_000))
    assert len(everything) == sum(len(expansions(language)) for language in TEMPLATES)


def test_corpus_build_labels_the_templates_alone() -> None:
    from worker.cli.model_commands import corpus_build
    from worker.config import Settings
    from worker.errors import WorkerError

    args = argparse.Namespace(templates=10, data=["x.jsonl"], augment=0, lexicon=0, held_back=None)
    with pytest.raises(WorkerError, match="--templates"):
        corpus_build(Settings(), args)


def test_corpus_build_labels_a_sample_of_every_language(tmp_path: Path) -> None:
    from worker.cli import main
    from worker.loop.dataset import read_manifest

    assert main(["corpus", "build", "--templates", "2", "--out", str(tmp_path / "t"), "--quiet"]) == 0
    manifest = read_manifest(tmp_path / "t")
    assert sum(shard["rows"] for shard in manifest["shards"]) == 2 * len(TEMPLATES)
