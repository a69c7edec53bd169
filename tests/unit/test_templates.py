"""The seed templates: every domain in every served language, every slot filled, seeded samples."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from worker.config import SERVED_LANGUAGES
from worker.data.corpora import language_of
from worker.loop.templates import ALARMS, DOMAINS, expansions, template_rows


@pytest.mark.parametrize("domain", list(DOMAINS))
def test_every_served_language_has_templates_whose_slots_all_fill(domain: str) -> None:
    assert set(DOMAINS[domain]) == set(SERVED_LANGUAGES)
    slot_names = {name for spec in DOMAINS[domain].values() for name in spec} - {"patterns"}
    for language, spec in DOMAINS[domain].items():
        texts = expansions(language, domain)
        assert len(texts) >= (100 if domain == "alarms" else 40), language
        assert len(set(texts)) == len(texts)
        assert not any("{" in text or "}" in text for text in texts), language
        assert set(spec) == {"patterns", *slot_names}, language  # the same slots in every language
        for pattern in spec["patterns"]:
            assert set(re.findall(r"\{(\w+)\}", pattern)) <= slot_names, (language, pattern)
        for slot in slot_names:  # every value of every slot is used somewhere
            assert all(any(value in text for text in texts) for value in spec[slot]), (language, slot)


def test_template_rows_sample_per_language_and_domain_with_stable_ids() -> None:
    rows = list(template_rows(50, seed=3))
    assert len(rows) == 50 * len(ALARMS) * len(DOMAINS)
    assert len({row.id for row in rows}) == len(rows)
    assert all(language_of(row.locale) == row.id.split("-")[1] for row in rows)
    assert rows == list(template_rows(50, seed=3))
    assert [r.text for r in rows] != [r.text for r in template_rows(50, seed=4)]
    everything = list(template_rows(10_000))
    assert len(everything) == sum(len(expansions(lang, d)) for lang in ALARMS for d in DOMAINS)


def test_adding_a_domain_moves_no_alarm_row() -> None:
    """The alarm rows keep the ids (and so the training or validation bucket) they had alone."""
    alarms = list(template_rows(10_000, domains=["alarms"]))
    assert all(re.fullmatch(r"template-[a-z]{2}-\d+", row.id) for row in alarms)
    assert [row for row in template_rows(10_000) if row in alarms] == alarms
    music = list(template_rows(10_000, domains=["music"]))
    assert music and all(row.id.startswith(f"template-{row.locale}-music-") for row in music)
    with pytest.raises(ValueError, match="unknown template domains"):
        list(template_rows(10, domains=["gardening"]))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"templates": 10, "data": ["x.jsonl"]}, "--templates"),
        ({"templates": 0, "template_domains": ["music"]}, "--template-domains"),
        ({"templates": 10, "template_domains": ["gardening"]}, "unknown template domains"),
    ],
)
def test_corpus_build_refuses_templates_mixed_with_other_input(
    options: dict[str, object], message: str
) -> None:
    from worker.cli.model_commands import corpus_build
    from worker.config import Settings
    from worker.errors import WorkerError

    defaults: dict[str, object] = {
        "templates": 0,
        "template_domains": [],
        "data": [],
        "augment": 0,
        "lexicon": 0,
        "held_back": None,
    }
    with pytest.raises(WorkerError, match=message):
        corpus_build(Settings(), argparse.Namespace(**{**defaults, **options}))


def test_corpus_build_labels_a_sample_of_every_language(tmp_path: Path) -> None:
    from worker.cli import main
    from worker.loop.dataset import read_manifest

    out = tmp_path / "t"
    assert main(["corpus", "build", "--templates", "2", "--template-domains", "alarms", "weather",
                 "--out", str(out), "--quiet"]) == 0  # fmt: skip
    manifest = read_manifest(out)
    assert sum(shard["rows"] for shard in manifest["shards"]) == 2 * 2 * len(ALARMS)
