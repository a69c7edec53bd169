"""`intent-worker train`: dataset -> pruned vocabulary -> student -> ONNX FP32 + INT8 -> model dir.

The model directory holds ``model.onnx`` (INT8, what the worker serves), ``tokenizer.json``,
``labels.json`` and ``card.json``; the float export stays beside it as ``fp32.onnx`` (not
committed). The INT8 model ships only if it agrees with the float one on at least
``min_int8_agreement`` of the parity texts; otherwise ``model.onnx`` is the float model and
the card says why.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import structlog
from tokenizers import Tokenizer

from worker.data.corpora import LabelledSet
from worker.loop.dataset import read_manifest, split_bucket
from worker.loop.label_sets import common_label_set
from worker.models.onnx import label_names_id
from worker.training.distil import (
    Example,
    TrainConfig,
    stream_examples,
    train_student,
)
from worker.training.export import export_onnx, quantise_static, verify_parity
from worker.training.nibbles import embedding_to_4bit, gathered_table, snap_rows
from worker.training.students import StudentConfig, build_student, initial_embeddings
from worker.training.targets import disagreement_weights
from worker.training.vocab import PrunedVocab, character_pieces, count_pieces, prune
from worker.training.warm_start import Remap, map_rows, warm_start_weights

log = structlog.get_logger(__name__)

MIN_INT8_AGREEMENT = 0.995
TABLE_GROUP = 32  # values per 4-bit scale in a ``table_bits`` student's embedding table


@dataclass(frozen=True)
class TrainRequest:
    arch: str
    out: Path
    datasets: tuple[Path, ...] = ()
    labelled: LabelledSet | None = None  # the supervised baseline trains on gold labels
    labels: tuple[str, ...] = ()
    filters: int = 500
    kernel_sizes: tuple[int, ...] = (2, 3, 4, 5, 6)
    embedding_dim: int = 384
    bag_hidden: int = 256
    min_count: int = 1
    #: Also keep every one-character teacher piece (`character_pieces`); those training never
    #: showed ``min_count`` times get their rows from `map_untrained_rows`.
    keep_characters: bool = False
    parity_texts: tuple[str, ...] = ()
    #: A published student of the same architecture whose weights start this one (read back from
    #: its model.onnx; a changed vocabulary keeps its rows by piece: `worker.training.warm_start`);
    #: None: a fresh start.
    init_from: Path | None = None
    command: str = ""
    train: TrainConfig = field(default_factory=TrainConfig)
    # arch "pruned" only (see worker.training.pruned.run)
    layers: tuple[int, ...] = ()
    mode: str = "refit"
    cosine: bool = False
    # texts -> the teacher's sentence embeddings, for ``train.embedding_weight > 0``, and what
    # identifies them (a resumed run must use the same)
    teacher_embeddings: Callable[[Sequence[str]], npt.NDArray[np.float32]] | None = None
    teacher_embeddings_id: str = ""


def _labelled_examples(
    data: LabelledSet, labels: Sequence[str], part: str, config: TrainConfig
) -> Iterator[Example]:
    gold = data.gold(labels)
    for i, row_id in enumerate(data.ids):
        bucket = split_bucket(row_id)
        if (part == "valid") != (bucket < config.valid_fraction):
            continue
        if (
            part == "train"
            and (bucket - config.valid_fraction) / (1 - config.valid_fraction) >= config.fraction
        ):
            continue
        yield Example(data.texts[i], int(gold[i]), data.locales[i])


def train_model_dir(
    request: TrainRequest, teacher_tokenizer: Tokenizer, e5: Any, teacher_id: str
) -> dict[str, Any]:
    """Run the whole pipeline; returns the card written to ``request.out/card.json``."""
    config = request.train
    weighting: dict[str, Any] | None = None
    if request.labelled is not None:
        labels = request.labels
        label_set = label_names_id(labels)  # gold labels: the names are all there is
        config = replace(config, objective="ce")
        data = request.labelled

        def source(part: str) -> Any:
            return lambda: _labelled_examples(data, labels, part, config)
    else:
        label_set, labels = common_label_set({str(d): read_manifest(d) for d in request.datasets})
        weights, weighting = row_weights(request.datasets, labels, config)
        targets = embedding_targets(request, config)

        def source(part: str) -> Any:
            return lambda: stream_examples(request.datasets, part, config, weights, targets)

    train_source, valid_source = source("train"), source("valid")
    counts = count_pieces(teacher_tokenizer, (e.text for e in train_source()))
    characters = character_pieces(teacher_tokenizer) if request.keep_characters else set()
    tokenizer, vocab = prune(teacher_tokenizer, counts, request.min_count, always_keep=characters)
    rows = vocab.teacher_ids[vocab.teacher_ids >= 0]
    teacher_rows = e5.tensor("emb.word", rows=rows)
    embeddings = initial_embeddings(teacher_rows, vocab.teacher_ids, config.seed)
    if request.embedding_dim != embeddings.shape[1]:
        # Project to a smaller width with PCA, keeping the teacher's geometry.
        centred = embeddings - embeddings.mean(axis=0)
        _, _, vt = np.linalg.svd(centred[vocab.teacher_ids >= 0], full_matrices=False)
        embeddings = (centred @ vt[: request.embedding_dim].T).astype(np.float32)
        embeddings[0] = 0.0
    student_config = StudentConfig(
        arch=request.arch,
        vocab_size=len(vocab),
        n_labels=len(labels),
        embedding_dim=embeddings.shape[1],
        kernel_sizes=request.kernel_sizes,
        filters=request.filters,
        bag_hidden=request.bag_hidden,
    )
    log.info("training_started", arch=request.arch, vocab=len(vocab), objective=config.objective)
    checkpoint = checkpoint_path(request.out)
    # What the config's paths stood for when this run started, so a checkpoint made with
    # another student behind the same path (or other embeddings) is not resumed.
    identities = [weighting.get("student") if weighting else None]
    identities.append(request.teacher_embeddings_id if config.embedding_weight > 0 else None)
    start: dict[str, Any] | None = None
    remap: Remap | None = None
    if request.init_from is not None:
        shapes = {k: tuple(v.shape) for k, v in build_student(student_config).state_dict().items()}
        loaded, remap = warm_start_weights(request.init_from, tokenizer.get_vocab(), shapes, embeddings)
        start = dict(loaded)
        card_path = request.init_from / "card.json"
        identities.append(
            str(json.loads(card_path.read_text()).get("version")) if card_path.exists() else None
        )
    result = train_student(
        student_config,
        embeddings,
        tokenizer,
        train_source,
        valid_source,
        config,
        checkpoint=checkpoint,
        fingerprint_extra=json.dumps(identities) if any(identities) else "",
        start_from=start,
    )
    mapped_rows = (
        map_untrained_rows(result.model, embeddings, vocab, counts, request.min_count) if characters else 0
    )
    table: dict[str, Any] | None = None
    table_checkpoint = checkpoint.with_name(checkpoint.name + ".table")  # the stage around the table
    scales: npt.NDArray[np.float16] | None = None
    snapped: npt.NDArray[np.float32] | None = None
    if config.table_bits:
        first = result
        snapped, scales = snap_rows(first.model.embedding.weight.detach().numpy(), TABLE_GROUP)
        second = replace(
            config,
            epochs=config.table_epochs,
            patience=config.table_epochs,
            warmup_epochs=0.0,
            learning_rate=config.learning_rate * config.plateau_factor,
            embedding_weight=0.0,
        )
        log.info(
            "table_snapped", bits=config.table_bits, group=TABLE_GROUP, then="training the rest around it"
        )
        digest = hashlib.sha256(snapped.tobytes()).hexdigest()[:16]
        result = train_student(
            student_config,
            snapped,
            tokenizer,
            train_source,
            valid_source,
            second,
            checkpoint=table_checkpoint,
            fingerprint_extra=digest,
            start_from={k: v for k, v in first.model.state_dict().items() if k != "embedding.weight"},
            freeze_embeddings=True,
        )
        table = {
            "bits": config.table_bits,
            "group": TABLE_GROUP,
            "scale": "float16 max|w| / 7 per group",
            "frozen_table_training": {"epochs": second.epochs, "learning_rate": second.learning_rate},
            "valid_loss_before_snap": min((h["valid_loss"] for h in first.history), default=None),
            "history": result.history,
            "best_epoch": result.best_epoch,
            "seconds": round(result.seconds, 1),
        }
        result = replace(
            result,
            history=first.history + result.history,
            best_epoch=first.best_epoch,
            seconds=first.seconds + result.seconds,
        )
    log.info("exporting", fp32="fp32.onnx", then="INT8 static quantisation (about a minute)")

    out = request.out
    staging = new_staging(out, tokenizer, labels)
    fp32 = export_onnx(result.model, staging / "fp32.onnx")
    int8 = staging / "int8.onnx"
    calibration = [e.text for _, e in zip(range(512), train_source(), strict=False)]
    quantise_static(fp32, int8, tokenizer, calibration, config.max_length)
    if table is not None:
        import onnx

        quantised = onnx.load(str(int8))
        table["sizes"] = embedding_to_4bit(quantised, gathered_table(quantised), TABLE_GROUP, scales, snapped)
        onnx.save(quantised, str(int8))
    parity_texts = list(request.parity_texts) or [e.text for e in valid_source()]
    parity = verify_parity(fp32, int8, tokenizer, parity_texts, config.max_length)
    ship_int8 = parity["label_agreement"] >= MIN_INT8_AGREEMENT
    shutil.copy(int8 if ship_int8 else fp32, staging / "model.onnx")
    if not ship_int8:
        log.warning(
            "int8_parity_too_low_shipping_fp32",
            agreement=parity["label_agreement"],
            required=MIN_INT8_AGREEMENT,
        )
    int8.unlink()
    digest = hashlib.sha256((staging / "model.onnx").read_bytes()).hexdigest()
    locales: dict[str, int] = {}
    for example in train_source():
        locales[example.locale] = locales.get(example.locale, 0) + 1
    card: dict[str, Any] = {
        "version": f"{request.arch}-{digest[:10]}",
        "architecture": student_config.to_json(),
        "objective": "cross-entropy on gold labels (S_sup)"
        if config.objective == "ce"
        else "MSE between student and teacher logits"
        + (
            f" + {config.embedding_weight:g} x (MSE + 1 - cosine) of a projection against the "
            "teacher's sentence embedding"
            if config.embedding_weight > 0
            else ""
        ),
        "teacher": teacher_id,
        "labels": list(labels),
        "label_set": label_set,
        "vocabulary": {
            "size": len(vocab),
            "kept_teacher_pieces": int((vocab.teacher_ids >= 0).sum()),
            "byte_fallback": True,
            "min_count": request.min_count,
            **(
                {"character_pieces": "kept, seen or not", "rows_mapped": mapped_rows}
                if request.keep_characters
                else {}
            ),
        },
        "data": {
            "datasets": [
                {"path": str(d), "dataset_version": read_manifest(d)["dataset_version"]}
                for d in request.datasets
            ],
            "labelled_rows": len(request.labelled) if request.labelled is not None else None,
            "train_rows": result.train_rows,
            "valid_rows": result.valid_rows,
            "train_rows_per_locale": locales,
        },
        "training": {
            **{k: v for k, v in config.__dict__.items()},
            **({"disagreement_weighting": weighting} if weighting is not None else {}),
            **(
                {"init_from": {"path": str(request.init_from), "version": identities[-1], **asdict(remap)}}
                if remap is not None
                else {}
            ),
            "best_epoch": result.best_epoch,
            "seconds": round(result.seconds, 1),
            "history": result.history,
        },
        "int8": {
            "quantisation": "static QDQ, per-channel INT8 weights, UINT8 activations, 512 calibration texts"
            + ("; the embedding table at 4 bits, trained around (see table)" if table is not None else ""),
            **({"table": table} if table is not None else {}),
            "parity": parity,
            "min_agreement": MIN_INT8_AGREEMENT,
            "shipped": ship_int8,
        },
        "sizes_bytes": {
            "model.onnx": (staging / "model.onnx").stat().st_size,
            "fp32.onnx": fp32.stat().st_size,
        },
        "sha256": {"model.onnx": digest},
        "command": request.command,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    card = publish_model_dir(staging, out, card)
    checkpoint.unlink(missing_ok=True)
    table_checkpoint.unlink(missing_ok=True)
    return card


def map_untrained_rows(
    model: Any, initial: npt.NDArray[np.float32], vocab: PrunedVocab, counts: Counter[int], min_count: int
) -> int:
    """Give the table rows of kept pieces that training showed fewer than ``min_count`` times
    the linear map from initial to trained rows of the pieces it did show (`map_rows`), so
    they live where the trained rows do rather than where training started; returns how many.
    """
    import torch

    has_row = vocab.teacher_ids >= 0
    seen = np.array([counts.get(int(t), 0) >= min_count for t in vocab.teacher_ids]) & has_row
    untrained = np.flatnonzero(has_row & ~seen)
    if untrained.size:
        weight = model.embedding.weight
        trained = weight.detach().cpu().numpy()
        rows = map_rows(initial[seen], trained[seen], initial[untrained])
        with torch.no_grad():
            weight[torch.from_numpy(untrained)] = torch.from_numpy(rows).to(weight.device)
    log.info("untrained_rows_mapped", rows=int(untrained.size), from_rows=int(seen.sum()))
    return int(untrained.size)


def row_weights(
    datasets: Sequence[Path], labels: Sequence[str], config: TrainConfig
) -> tuple[dict[str, float] | None, dict[str, Any] | None]:
    """Loss weights by row id from ``config.disagreement_student``'s disagreement with the teacher
    (`disagreement_weights`), and their summary for the card; (None, None) without one."""
    if config.disagreement_student is None:
        return None, None
    from worker.models.student import Student, chunked_logits

    student = Student(Path(config.disagreement_student), threads=config.threads)
    if tuple(student.labels) != tuple(labels):
        raise ValueError(
            f"the disagreement student {config.disagreement_student} has labels {list(student.labels)}, "
            f"the datasets {list(labels)}"
        )
    started = time.perf_counter()
    weights, summary = disagreement_weights(
        stream_examples(datasets, "train", config), lambda texts: chunked_logits(texts, student, 256), config
    )
    card: dict[str, Any] = {
        **summary,
        "student": str(student.version),
        "seconds": round(time.perf_counter() - started, 1),
    }
    log.info("disagreement_weights", **card)
    return weights, card


def embedding_targets(
    request: TrainRequest, config: TrainConfig
) -> dict[str, npt.NDArray[np.float32]] | None:
    """The teacher's sentence embedding of every training row, by row id, when the run targets
    them (``embedding_weight > 0``); None otherwise."""
    if config.embedding_weight <= 0:
        return None
    if request.teacher_embeddings is None:
        raise ValueError("embedding_weight > 0 needs the teacher's sentence embeddings (teacher_embeddings)")
    rows = [(e.row_id, e.text) for e in stream_examples(request.datasets, "train", config)]
    started = time.perf_counter()
    vectors = request.teacher_embeddings([text for _, text in rows])
    log.info("embedding_targets", rows=len(rows), seconds=round(time.perf_counter() - started, 1))
    return {row_id: vectors[i] for i, (row_id, _) in enumerate(rows)}


def checkpoint_path(out: Path) -> Path:
    """Where a run writing ``out`` keeps its per-epoch state: the same command resumes from it."""
    return out.with_name(out.name + ".checkpoint.pt")


def new_staging(out: Path, tokenizer: Tokenizer, labels: Sequence[str]) -> Path:
    """An empty ``<out>.tmp`` beside ``out``, holding the tokenizer and the labels so far."""
    staging = out.with_name(out.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    tokenizer.save(str(staging / "tokenizer.json"))
    (staging / "labels.json").write_text(json.dumps(list(labels)) + "\n")
    return staging


def publish_model_dir(staging: Path, out: Path, card: dict[str, Any]) -> dict[str, Any]:
    """Write the card into ``staging``, then put ``staging`` in the place of ``out``."""
    (staging / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    return card
