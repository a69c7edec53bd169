"""Lexicon induction and word-by-word translation (worker.loop.lexicon), on a hand-made embedding."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from worker.loop.lexicon import Lexicon, candidates, induce, lexical_variants, translate, words_of
from worker.loop.seeding import SourceRow

# Each word is a direction; translations share one, look-alikes sit close to another word's.
VECTORS = {
    "alarm": [1.0, 0.0, 0.0, 0.0],
    "sveglia": [0.98, 0.05, 0.0, 0.0],
    "set": [0.0, 1.0, 0.0, 0.0],
    "imposta": [0.05, 0.97, 0.0, 0.0],
    "the": [0.0, 0.0, 1.0, 0.0],
    "il": [0.0, 0.0, 0.6, 0.8],  # far from everything: its pair is the least similar
    "musica": [0.0, 0.0, 0.0, 1.0],
    "アラーム": [0.99, 0.0, 0.1, 0.0],
}


def embed(words: Sequence[str]) -> npt.NDArray[np.float32]:
    return np.array([VECTORS[w] for w in words], dtype=np.float32)


def test_words_are_lower_cased_without_digits_and_unspaced_scripts_give_ngrams() -> None:
    assert words_of("Set the ALARM for 7 o'clock!", "en") == ["set", "the", "alarm", "for", "o'clock"]
    assert words_of("明日", "ja") == ["明", "日", "明日"]


def test_candidates_are_the_most_frequent_words_seen_often_enough() -> None:
    texts = ["set the alarm", "set a timer", "the alarm"]
    assert candidates(texts, "en", min_count=2, limit=10) == ["set", "the", "alarm"]
    assert candidates(texts, "en", min_count=1, limit=2) == ["set", "the"]


def test_induce_keeps_mutual_nearest_neighbours_most_similar_first() -> None:
    english = ["alarm", "set", "the"]
    lexicon = induce(english, {"it": ["sveglia", "imposta", "il"], "ja": ["アラーム"]}, embed, keep=1.0)
    assert lexicon.entries["it"] == {"alarm": "sveglia", "set": "imposta", "the": "il"}
    assert lexicon.entries["ja"] == {"alarm": "アラーム"}  # "set" and "the" are not its nearest
    strict = induce(english, {"it": ["sveglia", "imposta", "il"]}, embed, keep=0.67)
    assert strict.entries["it"] == {"alarm": "sveglia", "set": "imposta"}  # the weakest pair goes


def test_identical_spellings_are_not_translations() -> None:
    lexicon = induce(["alarm"], {"it": ["alarm", "sveglia"]}, embed, keep=1.0)
    assert lexicon.entries["it"] == {}


def test_translate_replaces_known_words_and_joins_unspaced_languages() -> None:
    assert translate("Set the alarm!", {"set": "imposta", "alarm": "sveglia"}, "it") == (
        "imposta the sveglia",
        2,
    )
    pairs = {"play": "播放", "music": "音乐"}
    assert translate("play music now", pairs, "zh") == ("播放音乐 now", 2)
    assert translate("play music now", pairs, "it") == ("播放 音乐 now", 2)


def test_variants_keep_the_source_split_and_skip_rows_with_nothing_translated() -> None:
    lexicon = Lexicon({"it": {"alarm": "sveglia"}, "ja": {"alarm": "アラーム"}, "fr": {}})
    rows = [
        SourceRow("massive-1", "set an alarm", "en-US", "en-US.jsonl"),
        SourceRow("massive-2", "hi", "en-US", "x"),
    ]
    variants = list(lexical_variants(rows, lexicon, per_row=2, min_replaced=1, seed=0))
    assert sorted(v.locale for v in variants) == ["it", "ja"]
    assert all(v.id.startswith("massive-1:aug-lex-") for v in variants)
    assert {v.text for v in variants} == {"set an sveglia", "set an アラーム"}
    assert list(lexical_variants(rows, lexicon, per_row=2, min_replaced=1, seed=0)) == variants  # seeded
