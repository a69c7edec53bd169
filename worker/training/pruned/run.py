"""`intent-worker train --arch pruned`: dataset -> pruned vocabulary -> cut encoder -> head -> model dir.

Steps:
1. Vocabulary: the teacher pieces seen in the distillation corpus's training rows (with the
   ``query:`` prefix), plus 256 byte pieces and ``<s>``/``</s>`` (`build_pruned_tokenizer`).
2. Encoder: the teacher's layers ``request.layers`` with their dequantised e5 weights.
3. Head (both modes): the teacher head's own recipe (`HeadRecipe`, read from the teacher card)
   refit on the cut encoder's embeddings of the same rows the teacher head saw, MASSIVE
   ``train`` with gold intents folded into labels. This is the L2_ends recipe (no training
   of the encoder). Chosen over distilling the head to the teacher's logits so that the
   `refit` rows measure what layer pruning alone costs, with the teacher's procedure unchanged.
4. Mode ``distil`` then trains encoder and head on the teacher's logits (and, with ``cosine``,
   its sentence embeddings) over ``train.fraction`` of the corpus (`distil_pruned`).
5. Export: FP32 ONNX from the teacher's graph builder; guarded INT8 (weight MatMuls + per-row
   INT8 embeddings), shipped only at >= `MIN_INT8_AGREEMENT` label agreement with FP32. The
   card also records the parity of onnxruntime's default dynamic INT8, the known failure.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import structlog
from tokenizers import Tokenizer

from worker.data.corpora import LabelledSet
from worker.loop.dataset import read_manifest
from worker.loop.label_sets import common_label_set
from worker.teacher.e5format import E5File
from worker.teacher.head import HeadConfig, load_head, save_head, train_head
from worker.teacher.onnx_graph import HeadWeights
from worker.training.distil import stream_examples
from worker.training.export import verify_parity
from worker.training.pruned.encoder import (
    PrunedMode,
    build_graph,
    build_pruned_tokenizer,
    cut_encoder,
    quantise_guarded,
    quantise_naive,
    run_graph,
    vocabulary_report,
    weight_only_tries,
)
from worker.training.run import MIN_INT8_AGREEMENT, TrainRequest, new_staging, publish_model_dir
from worker.training.vocab import count_pieces

log = structlog.get_logger(__name__)
Array = npt.NDArray[np.float32]
VALID_ROWS = 1024  # validation rows for the distillation loss: enough to see it move, cheap at 1 thread


@dataclass(frozen=True)
class HeadRecipe:
    """How the teacher head was trained: what it scores and its hyper-parameters."""

    target: str  # "intents" (folded into labels) or "labels"
    config: HeadConfig

    @classmethod
    def from_card(cls, card: dict[str, Any]) -> HeadRecipe:
        head = dict(card["head"])
        fields = {k: head[k] for k in HeadConfig.__dataclass_fields__ if k in head}
        return cls(target=str(head["target"]), config=HeadConfig(**fields))


@dataclass(frozen=True)
class PrunedInputs:
    """What the pruned pipeline needs beyond a `TrainRequest`; all loaded by the caller."""

    head_data: LabelledSet  # the teacher head's training rows (MASSIVE train)
    intent_labels: dict[str, str]  # intent -> label
    recipe: HeadRecipe
    prefix: str  # the teacher's text prefix ("query: ")
    teacher_embeddings: Callable[[Sequence[str]], Array] | None = None  # for --cosine
    # Refit heads are deterministic in (layers, vocabulary, rows, recipe); a cache lets the
    # distil variant start from its refit twin's head without paying for the refit twice.
    head_cache: Path | None = None


@contextlib.contextmanager
def _subnormals_flushed() -> Iterator[None]:
    """Flush subnormal floats to zero on this thread, then restore the default.

    The head's Adam moments decay into subnormals, which x86 computes many times slower
    (measured: over 10 minutes instead of 93 s for the 60-epoch head). onnxruntime resets the
    flag whenever it creates a session, so it is set right around the numpy training.
    """
    from worker.training import require_torch

    torch = require_torch()
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


def refit_head(
    embeddings: Array, data: LabelledSet, labels: Sequence[str], inputs: PrunedInputs
) -> HeadWeights:
    """The teacher head's recipe, trained on ``embeddings`` of ``data``."""
    with _subnormals_flushed():
        return _refit_head(embeddings, data, labels, inputs)


def _refit_head(
    embeddings: Array, data: LabelledSet, labels: Sequence[str], inputs: PrunedInputs
) -> HeadWeights:
    if inputs.recipe.target == "labels":
        return train_head(embeddings, data.gold(labels), len(labels), None, len(labels), inputs.recipe.config)
    label_index = {name: i for i, name in enumerate(labels)}
    intents = sorted(set(data.intents))
    intent_index = {name: i for i, name in enumerate(intents)}
    groups = np.array([label_index[inputs.intent_labels[i]] for i in intents], dtype=np.int64)
    targets = np.array([intent_index[i] for i in data.intents], dtype=np.int64)
    return train_head(embeddings, targets, len(intents), groups, len(labels), inputs.recipe.config)


def train_pruned_model_dir(
    request: TrainRequest, inputs: PrunedInputs, teacher_tokenizer: Tokenizer, e5: E5File, teacher_id: str
) -> dict[str, Any]:
    """Build a pruned student's model directory; returns the card written to ``request.out``."""
    config = request.train
    mode = PrunedMode(request.mode)
    if not request.datasets:
        raise ValueError("the pruned student needs a distillation dataset (its vocabulary comes from it)")
    label_set, labels = common_label_set({str(d): read_manifest(d) for d in request.datasets})
    started = time.perf_counter()

    def train_rows() -> Any:
        return stream_examples(request.datasets, "train", config)

    # The vocabulary always comes from every training row, so a distilled student trained on a
    # share of the corpus has the same vocabulary (and refit head) as its refit twin.
    every_row = stream_examples(request.datasets, "train", replace(config, fraction=1.0))
    counts = count_pieces(teacher_tokenizer, (inputs.prefix + e.text for e in every_row))
    tokenizer, vocab = build_pruned_tokenizer(
        teacher_tokenizer, counts, request.min_count, e5.vocab, inputs.prefix
    )
    encoder = cut_encoder(e5, request.layers, vocab)
    log.info("pruned_encoder", layers=list(request.layers), vocab=len(vocab), params=encoder.n_parameters)

    threads = config.threads
    key = hashlib.sha256(
        json.dumps(
            [list(request.layers), vocab.pieces, inputs.head_data.texts, inputs.head_data.intents,
             inputs.recipe.target, asdict(inputs.recipe.config), config.max_length]
        ).encode()
    ).hexdigest()[:20]  # fmt: skip
    cached = inputs.head_cache / f"head-{key}.npz" if inputs.head_cache is not None else None
    if cached is not None and cached.exists():
        head = load_head(cached)
    else:
        head_embeddings = run_graph(
            build_graph(encoder, None),
            tokenizer,
            inputs.head_data.texts,
            "embedding",
            threads,
            config.max_length,
        )
        head = refit_head(head_embeddings, inputs.head_data, labels, inputs)
        if cached is not None:
            cached.parent.mkdir(parents=True, exist_ok=True)
            save_head(head, cached)
    refit_seconds = time.perf_counter() - started
    log.info("pruned_head_refit", seconds=round(refit_seconds, 1))

    distillation: dict[str, Any] | None = None
    if mode is PrunedMode.DISTIL:
        from worker.training.pruned.distil import PrunedDistilConfig, distil_pruned

        distil_config = PrunedDistilConfig(
            epochs=config.epochs,
            batch_size=config.batch_size,
            encoder_learning_rate=config.learning_rate,
            cosine=request.cosine,
            max_length=config.max_length,
            seed=config.seed,
            threads=threads,
            device=config.device,
        )
        train = [(e.text, np.asarray(e.target, np.float32)) for e in train_rows()]
        valid = [
            (e.text, np.asarray(e.target, np.float32))
            for e in islice(stream_examples(request.datasets, "valid", config), VALID_ROWS)
        ]
        result = distil_pruned(
            encoder, head, tokenizer, train, valid, distil_config, inputs.teacher_embeddings
        )
        encoder, head = result.encoder, result.head
        distillation = {
            **asdict(distil_config),
            "objective": "MSE on teacher logits"
            + (" + MSE and (1 - cosine) on the teacher's sentence embedding" if request.cosine else ""),
            "train_rows": result.train_rows,
            "valid_rows": result.valid_rows,
            "word_embeddings": "frozen (teacher rows)",
            "history": result.history,
            "seconds": round(result.seconds, 1),
        }

    out = request.out
    staging = new_staging(out, tokenizer, labels)
    fp32 = staging / "fp32.onnx"
    import onnx

    onnx.save(build_graph(encoder, head), str(fp32))
    parity_texts = list(request.parity_texts) or [
        e.text for e in stream_examples(request.datasets, "valid", config)
    ]
    for weight_only in weight_only_tries(len(request.layers)):
        log.info("quantising", int8="guarded dynamic INT8, then its parity with FP32 (a minute or more)")
        int8 = quantise_guarded(
            fp32, staging / "int8.onnx", weight_only=weight_only, word_scales=encoder.word_scales
        )
        parity: dict[str, Any] = {
            **verify_parity(fp32, int8, tokenizer, parity_texts, config.max_length, threads),
            "weight_only_int8": list(weight_only),
        }
        if parity["label_agreement"] >= MIN_INT8_AGREEMENT:
            break
    naive = quantise_naive(fp32, staging / "naive.onnx")
    # A measurement, not a gate: every 4th parity text keeps it cheap at 1 thread.
    naive_parity = verify_parity(fp32, naive, tokenizer, parity_texts[::4], config.max_length, threads)
    naive_bytes = naive.stat().st_size
    naive.unlink()
    ship_int8 = parity["label_agreement"] >= MIN_INT8_AGREEMENT
    shutil.copy(int8 if ship_int8 else fp32, staging / "model.onnx")
    int8_bytes = int8.stat().st_size
    int8.unlink()
    digest = hashlib.sha256((staging / "model.onnx").read_bytes()).hexdigest()
    n_train = sum(1 for _ in train_rows())
    tag = "-".join(str(i) for i in request.layers)
    card: dict[str, Any] = {
        "version": f"pruned-{mode.value}-L{tag}-{digest[:10]}",
        "architecture": {
            "arch": "pruned",
            "layers": list(request.layers),
            "n_layers": len(request.layers),
            "teacher_layers": e5.config.layers,
            "hidden": e5.config.hidden,
            "heads": e5.config.heads,
            "ffn": e5.config.ffn,
            "parameters": encoder.n_parameters + sum(w.size + b.size for w, b in head.layers),
            "head": {
                "target": inputs.recipe.target,
                "hidden": inputs.recipe.config.hidden,
                "fine_classes": 0 if head.groups is None else len(head.groups),
            },
            "prefix": inputs.prefix,
        },
        "mode": mode.value,
        "objective": "head refit on frozen cut encoder (teacher head recipe, gold MASSIVE intents)"
        if mode is PrunedMode.REFIT
        else distillation["objective"]
        if distillation
        else "",
        "teacher": teacher_id,
        "labels": list(labels),
        "label_set": label_set,
        "vocabulary": {
            **vocabulary_report(vocab, e5.config, len(e5.vocab.pieces)),
            "byte_fallback": True,
            "min_count": request.min_count,
            "corpus": "training rows of " + ", ".join(str(d) for d in request.datasets),
            "byte_and_unk_rows": "teacher <unk> row",
        },
        "data": {
            "datasets": [
                {"path": str(d), "dataset_version": read_manifest(d)["dataset_version"]}
                for d in request.datasets
            ],
            "train_rows": n_train,
            "head_rows": len(inputs.head_data),
        },
        "training": {
            "head_recipe": {"target": inputs.recipe.target, **asdict(inputs.recipe.config)},
            "head_refit_seconds": round(refit_seconds, 1),
            "distillation": distillation,
            "threads": threads,
            "max_length": config.max_length,
        },
        "int8": {
            "quantisation": "per-channel dynamic INT8 on the q, k, v, attention-output and FFN-input weight "
            "MatMuls only (LayerNorm, Erf-GELU, Softmax, attention MatMuls and head stay float; the FFN "
            "output weights INT8 per column, multiplied in float, where parity allows: see "
            "parity.weight_only_int8) + word embeddings "
            + (
                "at 4 bits on the teacher's own Q4_0 grid (frozen teacher rows, stored exactly)"
                if encoder.word_scales is not None
                else "per-row symmetric INT8"
            ),
            "parity": parity,
            "naive_dynamic_parity": {**naive_parity, "bytes": naive_bytes},
            "min_agreement": MIN_INT8_AGREEMENT,
            "shipped": ship_int8,
        },
        "sizes_bytes": {
            "model.onnx": (staging / "model.onnx").stat().st_size,
            "fp32.onnx": fp32.stat().st_size,
            "int8.onnx": int8_bytes,
        },
        "sha256": {"model.onnx": digest},
        "command": request.command,
        "seconds": round(time.perf_counter() - started, 1),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    return publish_model_dir(staging, out, card)
