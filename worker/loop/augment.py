"""Augmented distillation texts: variants of corpus rows for the teacher to label.

Distillation needs inputs, not labels: any plausible text the teacher scores teaches the
student. Two cheap families:
- ``surface``: case and punctuation perturbations (lower/upper/title case, punctuation
  stripped or added, a polite word added), as ASR and typing vary them;
- ``switch``: code-switching, one word replaced by a word from a sentence in another
  language, so the student sees each language's pieces in command contexts.

A variant's id is ``<source id>:aug-<kind>-<n>``; the trainer splits on the part before the
first colon, so a variant always falls in its source row's split and a validation row's
variants never reach training.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator, Sequence

from worker.data.corpora import language_of
from worker.loop.seeding import SourceRow

_PUNCT = re.compile(r"[^\w\s']", re.UNICODE)
_POLITE = ("please", "bitte", "por favor", "s'il te plaît", "per favore", "пожалуйста", "お願い", "请")


def surface_variant(text: str, rng: random.Random) -> str:
    choice = rng.randrange(5)
    if choice == 0:
        return text.upper()
    if choice == 1:
        return text.title()
    if choice == 2:
        return _PUNCT.sub("", text).strip() or text
    if choice == 3:
        return text.rstrip(" .!?") + rng.choice(("?", "!", "...", " ?"))
    return f"{rng.choice(_POLITE)} {text}" if rng.random() < 0.5 else f"{text} {rng.choice(_POLITE)}"


def switch_variant(text: str, donors: Sequence[str], rng: random.Random) -> str:
    words = text.split()
    donor_words = rng.choice(donors).split()
    if not words or not donor_words:
        return text
    words[rng.randrange(len(words))] = rng.choice(donor_words).strip(".,!?。、")
    return " ".join(words)


def augment(
    rows: Sequence[SourceRow], donors_by_locale: dict[str, list[str]], per_row: int, seed: int
) -> Iterator[SourceRow]:
    """``per_row`` variants of each row, alternating surface and code-switch variants."""
    rng = random.Random(seed)
    locales = sorted(donors_by_locale)
    for row in rows:
        for n in range(per_row):
            if n % 2 == 0:
                kind, text = "surface", surface_variant(row.text, rng)
            else:
                others = [loc for loc in locales if language_of(loc) != language_of(row.locale)] or locales
                kind, text = "switch", switch_variant(row.text, donors_by_locale[rng.choice(others)], rng)
            if text != row.text:
                yield SourceRow(f"{row.id}:aug-{kind}-{n}", text, row.locale, f"augment:{kind}")
