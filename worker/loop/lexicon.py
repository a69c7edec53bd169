"""Word-by-word translations of assistant commands, from a lexicon the teacher itself induces.

The distillation corpus has assistant-domain text only in English, German and Swahili
(MASSIVE); its other languages come as general sentences (Tatoeba). A student then never sees
"sveglia" or "アラーム" in a command, and disagrees with the teacher on them. Translating the
commands word by word, with a bilingual lexicon, puts those words in command contexts
(the code-switching augmentation of CoSDA-ML, Qin et al. 2020); the teacher labels the result,
so a bad translation costs nothing but a less useful row.

**The lexicon** comes from the teacher's own multilingual embedding space, with no dictionary:
every candidate word (English words of the commands; words of each language's unlabelled
text, or frequent character n-grams for scripts written without spaces) is embedded alone,
and an English word maps to a word of language L when each is the other's nearest neighbour
(mutual nearest neighbours, a standard guard of lexicon induction). Of those pairs, only the
most similar ``keep`` share per language is kept: the encoder's cosines crowd into 0.85-1.0
and differ by language, so a rank is a steadier cut than a fixed similarity. Pairs that pass
are mostly right ("tomorrow" → "domani", "明日"; "weather" → "wetter", "cuaca"), and the
rest are look-alikes ("came" → "cama") that only make a row less useful.
"""

from __future__ import annotations

import random
import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from worker.loop.seeding import SourceRow

#: Languages written without spaces between words: candidates are frequent character n-grams.
UNSPACED = frozenset({"ja", "zh", "th"})

_WORD = re.compile(r"[\w']+", re.UNICODE)

Embed = Callable[[Sequence[str]], npt.NDArray[np.float32]]


def words_of(text: str, lang: str, max_ngram: int = 3) -> list[str]:
    """Candidate words of ``text``: lower-cased words, or character n-grams for unspaced scripts."""
    text = unicodedata.normalize("NFKC", text).lower()
    if lang not in UNSPACED:
        return [w.strip("'") for w in _WORD.findall(text) if w.strip("'") and not w.isdigit()]
    grams = []
    for chunk in _WORD.findall(text):
        for n in range(1, max_ngram + 1):
            grams += [chunk[i : i + n] for i in range(len(chunk) - n + 1)]
    return grams


def candidates(texts: Iterable[str], lang: str, *, min_count: int, limit: int) -> list[str]:
    """The ``limit`` most frequent candidate words of ``texts`` seen at least ``min_count`` times."""
    counts = Counter(w for text in texts for w in words_of(text, lang))
    return [w for w, c in counts.most_common(limit) if c >= min_count]


@dataclass(frozen=True)
class Lexicon:
    """English word → its translation, per target language."""

    entries: Mapping[str, Mapping[str, str]]

    def size(self) -> dict[str, int]:
        return {lang: len(words) for lang, words in sorted(self.entries.items())}


def induce(
    english: Sequence[str],
    targets: Mapping[str, Sequence[str]],
    embed: Embed,
    *,
    keep: float = 0.5,
) -> Lexicon:
    """The most similar ``keep`` share of mutual-nearest-neighbour pairs between ``english`` and
    each language's candidate words (identical spellings excluded: they need no translation)."""
    source = _normalised(embed(english))
    entries: dict[str, dict[str, str]] = {}
    for lang, words in sorted(targets.items()):
        if not words:
            continue
        target = _normalised(embed(words))
        similarity = source @ target.T  # [english, target]
        best_target = similarity.argmax(axis=1)
        best_source = similarity.argmax(axis=0)
        mutual = sorted(
            (
                (float(similarity[i, j]), english[i], words[j])
                for i, j in enumerate(best_target)
                if best_source[j] == i and words[j] != english[i]
            ),
            reverse=True,
        )
        kept = mutual[: round(len(mutual) * keep)]
        entries[lang] = {source_word: word for _, source_word, word in kept}
    return Lexicon(entries)


def _normalised(values: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    norms = np.maximum(np.linalg.norm(values, axis=1, keepdims=True), 1e-12)
    normalised: npt.NDArray[np.float32] = (values / norms).astype(np.float32)
    return normalised


def translate(text: str, pairs: Mapping[str, str], lang: str) -> tuple[str, int]:
    """``text`` with every word the lexicon knows replaced; and how many were replaced.

    In a language written without spaces, two translated words in a row are joined without one.
    """
    out: list[str] = []
    replaced = 0
    previous = False  # the previous word was translated
    for word in text.split():
        key = unicodedata.normalize("NFKC", word).lower().strip(".,!?'\"")
        current = key in pairs
        if out and not (current and previous and lang in UNSPACED):
            out.append(" ")
        out.append(pairs[key] if current else word)
        replaced += current
        previous = current
    return "".join(out), replaced


def lexical_variants(
    rows: Sequence[SourceRow], lexicon: Lexicon, *, per_row: int, min_replaced: int, seed: int
) -> Iterator[SourceRow]:
    """``per_row`` translations of each row, each into a language drawn at random; a translation
    that replaces fewer than ``min_replaced`` words is skipped. A variant's id is
    ``<source id>:aug-lex-<lang>-<n>`` (it falls in its source row's split) and its locale is
    the target language."""
    rng = random.Random(seed)
    langs = sorted(lang for lang, pairs in lexicon.entries.items() if pairs)
    if not langs:
        return
    for row in rows:
        for n, lang in enumerate(rng.sample(langs, min(per_row, len(langs)))):
            text, replaced = translate(row.text, lexicon.entries[lang], lang)
            if replaced >= min_replaced:
                yield SourceRow(f"{row.id}:aug-lex-{lang}-{n}", text, lang, "augment:lexicon")
