"""Vocabulary pruning: keep the teacher's pieces seen in a corpus, add byte fallback.

The student tokenizer is the teacher's Unigram tokenizer restricted to the kept pieces,
with the same pre-tokeniser, no prefix and no special tokens around the text. Its normaliser
is the teacher's, then `join_cjk_spaces`: Japanese and Chinese are written without spaces, and
a space between two of their characters (text segmented word by word upstream, as some speech
recognisers and data sets do) would otherwise give word-start pieces the training text never
shows. The 256 byte pieces ``<0x00>``..``<0xFF>`` make byte fallback total: a character no
kept piece covers becomes its UTF-8 bytes, so no input is ever unknown.

Student id layout: 0 ``<pad>``, 1 ``<unk>``, 2..257 bytes, then the kept pieces.
`PrunedVocab.teacher_ids` maps each student id to its teacher row (-1 for pad/unk/bytes),
which is how student embeddings are initialised from the teacher's.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import islice

import numpy as np
import numpy.typing as npt
from tokenizers import Regex, Tokenizer, normalizers
from tokenizers.models import Unigram

PAD, UNK = "<pad>", "<unk>"
BYTE_PIECES = tuple(f"<0x{b:02X}>" for b in range(256))
FIRST_PIECE_ID = 2 + len(BYTE_PIECES)

#: Kana, CJK ideographs and CJK punctuation: the scripts written without spaces between words.
#: (Hangul and Thai are not: Korean spaces its words, Thai its phrases.)
_CJK = "".join(
    f"{chr(low)}-{chr(high)}"
    for low, high in (
        (0x3000, 0x30FF),
        (0x31F0, 0x31FF),
        (0x3400, 0x4DBF),
        (0x4E00, 0x9FFF),
        (0xF900, 0xFAFF),
    )
)
#: Spaces with a CJK character on one side and a CJK character or a digit on the other
#: ("午後 5 時 に" → "午後5時に"); spaces next to Latin words stay.
_CJK_SPACES = rf"(?<=[{_CJK}])\s+(?=[{_CJK}0-9])|(?<=[{_CJK}0-9])\s+(?=[{_CJK}])"


def join_cjk_spaces() -> normalizers.Normalizer:
    """The normaliser step that deletes spaces inside Japanese and Chinese text (`_CJK_SPACES`)."""
    return normalizers.Replace(Regex(_CJK_SPACES), "")


@dataclass(frozen=True)
class PrunedVocab:
    pieces: tuple[str, ...]  # student id -> piece
    teacher_ids: npt.NDArray[np.int64]  # student id -> teacher id, -1 where none

    def __len__(self) -> int:
        return len(self.pieces)


def count_pieces(teacher_tokenizer: Tokenizer, texts: Iterable[str], chunk: int = 4096) -> Counter[int]:
    """How often each teacher piece id occurs in ``texts`` (specials excluded)."""
    counts: Counter[int] = Counter()
    iterator = iter(texts)
    while batch := list(islice(iterator, chunk)):
        for encoding in teacher_tokenizer.encode_batch(batch, add_special_tokens=False):
            counts.update(encoding.ids)
    return counts


def character_pieces(teacher_tokenizer: Tokenizer) -> set[int]:
    """The teacher's pieces that are one character, with or without the word-start mark.

    About 15,000 in e5's vocabulary: every kana, hanzi, Hangul syllable, Thai or Devanagari
    letter it has. Kept whatever the traffic shows (``prune(always_keep=...)``), a character
    the traffic never held gets a row of its own instead of its UTF-8 bytes.
    """
    return {
        i
        for i, (piece, _) in enumerate(json.loads(teacher_tokenizer.to_str())["model"]["vocab"])
        if len(str(piece).removeprefix("\u2581")) == 1
    }


def prune(
    teacher_tokenizer: Tokenizer, counts: Counter[int], min_count: int = 1, always_keep: Iterable[int] = ()
) -> tuple[Tokenizer, PrunedVocab]:
    """A student tokenizer keeping teacher pieces seen at least ``min_count`` times, and those in
    ``always_keep``."""
    spec = json.loads(teacher_tokenizer.to_str())
    teacher_vocab: list[list[object]] = spec["model"]["vocab"]
    unk_id = int(spec["model"]["unk_id"])
    specials = {
        i for i, (piece, _) in enumerate(teacher_vocab) if str(piece) in ("<s>", "</s>", "<pad>", "<unk>")
    }
    wanted = {i for i, n in counts.items() if n >= min_count} | set(always_keep)
    kept = sorted(i for i in wanted if i not in specials and i != unk_id)
    lowest = min(float(str(score)) for _, score in teacher_vocab)
    vocab: list[tuple[str, float]] = [(PAD, 0.0), (UNK, 0.0)]
    # Byte pieces never match ordinary text (their strings are "<0x41>"), so their score
    # only matters for byte fallback, which tokenizers applies to uncovered characters.
    vocab += [(piece, lowest - 20.0) for piece in BYTE_PIECES]
    vocab += [(str(teacher_vocab[i][0]), float(str(teacher_vocab[i][1]))) for i in kept]
    tokenizer = Tokenizer(Unigram(vocab, unk_id=1, byte_fallback=True))
    steps = [step for step in (teacher_tokenizer.normalizer, join_cjk_spaces()) if step is not None]
    tokenizer.normalizer = normalizers.Sequence(steps)
    tokenizer.pre_tokenizer = teacher_tokenizer.pre_tokenizer
    tokenizer.decoder = teacher_tokenizer.decoder
    teacher_ids = np.array([-1] * FIRST_PIECE_ID + kept, dtype=np.int64)
    pieces = tuple(piece for piece, _ in vocab)
    return tokenizer, PrunedVocab(pieces=pieces, teacher_ids=teacher_ids)
