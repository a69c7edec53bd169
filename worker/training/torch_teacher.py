"""The embedded teacher as a torch module, for labelling on an accelerator.

`corpus build --device cuda` labels with it: the same e5 weights, tokenizer, prefix, head and
identity as the ONNX teacher (`worker.teacher.load_embedded_teacher`), so datasets from either
are interchangeable. The encoder is `PrunedTransformer` with every layer kept and the whole
vocabulary, with the teacher's head: the torch twin of the teacher's ONNX graph.

Matrix products run in full float32 (TF32 off): a labelling run must give the logits the CPU
teacher gives, to within float rounding (`tests/unit/test_torch_teacher.py` holds the two
within 1e-3).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from worker.config import Settings
from worker.models.onnx import clean_text, pad_batch, read_labels
from worker.teacher.e5format import E5File
from worker.teacher.onnx_graph import HeadWeights
from worker.teacher.runtime import CHARS_PER_TOKEN, FixedLabelsTeacher, Logits, run_in_batches
from worker.training import require_torch
from worker.training.pruned.distil import PrunedTransformer
from worker.training.pruned.encoder import PrunedEncoder

torch = require_torch()

_LAYER_PARTS = ("q", "k", "v", "ao", "fi", "fo", "aln", "oln")


def full_encoder(e5: E5File) -> PrunedEncoder:
    """Every layer and every vocabulary row of ``e5``, dequantised to float32."""
    names = ["emb.word", "emb.pos", "emb.type", "emb.ln.w", "emb.ln.b"]
    names += [
        f"l{i}.{part}.{kind}" for i in range(e5.config.layers) for part in _LAYER_PARTS for kind in "wb"
    ]
    tensors = {name: e5.tensor(name) for name in names}
    return PrunedEncoder(tuple(range(e5.config.layers)), e5.config, e5.vocab, tensors)


class TorchTeacher(FixedLabelsTeacher):
    """A `worker.teacher.Teacher`: e5 encoder on a torch device, classification head in numpy."""

    def __init__(
        self,
        e5: E5File,
        tokenizer_path: Path,
        head: HeadWeights,
        labels: Sequence[str],
        identity: str,
        *,
        device: str = "cuda",
        prefix: str = "query: ",
        max_length: int = 512,
        batch_tokens: int = 131072,
    ) -> None:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        self._labels = tuple(labels)
        self._identity = identity
        self._device = torch.device(device)
        self._model = PrunedTransformer(full_encoder(e5), head).to(self._device).eval()
        self._pad = e5.vocab.pad
        self._hidden = e5.config.hidden
        self._tokenizer = Tokenizer.from_file(str(tokenizer_path))
        self._tokenizer.no_padding()
        self._tokenizer.enable_truncation(max_length=max_length)
        self._prefix = prefix
        self._max_chars = CHARS_PER_TOKEN * max_length
        self._batch_tokens = batch_tokens

    def embeddings(self, texts: Sequence[str]) -> Logits:
        """L2-normalised sentence embeddings [n, hidden], in input order."""
        return self._run(texts, output=1, width=self._hidden)

    def logits(self, texts: Sequence[str]) -> Logits:
        return self._run(texts, output=0, width=len(self._labels))

    def _run(self, texts: Sequence[str], *, output: int, width: int) -> Logits:
        """One of the model's outputs (0: logits, 1: embedding) for ``texts``, in input order."""
        cleaned = [self._prefix + clean_text(t, self._max_chars) for t in texts]
        ids = [e.ids for e in self._tokenizer.encode_batch(cleaned)]
        if not ids:
            return np.zeros((0, width), np.float32)

        def batch(rows: list[int]) -> Logits:
            input_ids, mask = pad_batch([ids[i] for i in rows], self._pad)
            with torch.inference_mode():
                values = self._model(
                    torch.from_numpy(input_ids).to(self._device), torch.from_numpy(mask).to(self._device)
                )[output]
            out: Logits = values.float().cpu().numpy()
            return out

        return run_in_batches([len(row) for row in ids], self._batch_tokens, batch)


def load_embedded_torch_teacher(settings: Settings, device: str, e5_path: Path | None = None) -> TorchTeacher:
    """The embedded teacher (`worker.teacher.load_embedded_teacher`) on a torch ``device``."""
    from worker.teacher import E5_PREFIX, embedded_identity
    from worker.teacher.build import ensure_encoder
    from worker.teacher.e5format import default_weights_path
    from worker.teacher.head import head_digest, load_head

    path = e5_path or default_weights_path(settings.teacher_weights)
    files = ensure_encoder(settings.cache_dir, path, settings.teacher_max_length)
    labels = read_labels(settings.teacher_dir / "labels.json")
    head = load_head(settings.teacher_dir / "head.npz")
    return TorchTeacher(
        E5File(path),
        files.tokenizer,
        head,
        labels,
        embedded_identity(files.key, head_digest(head, labels)),
        device=device,
        prefix=E5_PREFIX,
        max_length=settings.teacher_max_length,
    )
