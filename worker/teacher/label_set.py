"""Label sets: what a zero-shot or NLI teacher scores against (``schemas/label_set.v1.json``).

A label set is a JSON file: label names in logit order, each with one or more descriptions,
optional example utterances in any language and optional NLI hypothesis templates. Its id,
``name@<12 hex>``, hashes its canonical JSON: change one word of one description and the id,
hence the teacher's identity and every dataset it labels, changes with it.

A teacher without a label-set file (the trained head, a user's ONNX classifier) still has a
label set: its label names alone, with the id ``labels@<12 hex>``
(`worker.models.onnx.label_names_id`).
"""

from __future__ import annotations

import hashlib
import json
import re
import string
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from worker.errors import ModelError

SCHEMA_VERSION = 1
DEFAULT_TEMPLATE = "This example is {label}."
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_SET_KEYS = {"schema_version", "name", "description", "hypothesis_templates", "labels"}
_LABEL_KEYS = {"name", "descriptions", "examples", "hypothesis_templates"}


def canonical_json(value: object) -> bytes:
    """The bytes a label set's hash covers: sorted keys, no whitespace, UTF-8."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


@dataclass(frozen=True)
class LabelSpec:
    """One label: its name, descriptions, examples and NLI hypothesis templates."""

    name: str
    descriptions: tuple[str, ...]
    examples: tuple[str, ...] = ()
    hypothesis_templates: tuple[str, ...] = ()

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {"name": self.name, "descriptions": list(self.descriptions)}
        if self.examples:
            out["examples"] = list(self.examples)
        if self.hypothesis_templates:
            out["hypothesis_templates"] = list(self.hypothesis_templates)
        return out


@dataclass(frozen=True)
class LabelSet:
    """A validated label set; ``labels`` are in logit order."""

    name: str
    labels: tuple[LabelSpec, ...]
    description: str = ""
    hypothesis_templates: tuple[str, ...] = ()
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        names = [label.name for label in self.labels]
        if len(names) < 2:
            raise ModelError(f"label set {self.name!r}: needs at least 2 labels, has {len(names)}")
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ModelError(f"label set {self.name!r}: label names repeated: {repeated}")
        for template in self.hypothesis_templates:
            _check_template(self.name, template)
        for label in self.labels:
            for template in label.hypothesis_templates:
                _check_template(f"{self.name}/{label.name}", template)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(label.name for label in self.labels)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(canonical_json(self.to_json())).hexdigest()

    @property
    def id(self) -> str:
        """``name@<first 12 hex digits of sha256>``: what datasets, cards and intents carry."""
        return f"{self.name}@{self.sha256[:12]}"

    def hypotheses(self, label: LabelSpec) -> tuple[str, ...]:
        """The NLI hypotheses of ``label``: its templates, else the set's, else the default."""
        templates = label.hypothesis_templates or self.hypothesis_templates or (DEFAULT_TEMPLATE,)
        return tuple(t.format(label=label.name, description=label.descriptions[0]) for t in templates)

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {"schema_version": self.schema_version, "name": self.name}
        if self.description:
            out["description"] = self.description
        if self.hypothesis_templates:
            out["hypothesis_templates"] = list(self.hypothesis_templates)
        out["labels"] = [label.to_json() for label in self.labels]
        return out

    @classmethod
    def from_json(cls, value: object, source: str = "label set") -> LabelSet:
        """Validate a decoded label-set document; a `ModelError` names the file and the field."""
        doc = _object(value, source, _SET_KEYS)
        if doc.get("schema_version") != SCHEMA_VERSION:
            raise ModelError(
                f"{source}: schema_version must be {SCHEMA_VERSION}, got {doc.get('schema_version')!r}"
            )
        name = doc.get("name")
        if not isinstance(name, str) or not _NAME.match(name) or len(name) > 64:
            raise ModelError(f"{source}: 'name' must match {_NAME.pattern} (at most 64 characters)")
        description = doc.get("description", "")
        if not isinstance(description, str):
            raise ModelError(f"{source}: 'description' must be a string")
        raw_labels = doc.get("labels")
        if not isinstance(raw_labels, list):
            raise ModelError(f"{source}: 'labels' must be a list of label objects")
        labels = []
        for i, raw in enumerate(raw_labels):
            where = f"{source}: labels[{i}]"
            item = _object(raw, where, _LABEL_KEYS)
            label_name = item.get("name")
            if not isinstance(label_name, str) or not 0 < len(label_name) <= 64:
                raise ModelError(f"{where}: 'name' must be a string of 1-64 characters")
            labels.append(
                LabelSpec(
                    name=label_name,
                    descriptions=_texts(item, "descriptions", f"{where} ({label_name})", required=True),
                    examples=_texts(item, "examples", f"{where} ({label_name})"),
                    hypothesis_templates=_texts(item, "hypothesis_templates", f"{where} ({label_name})"),
                )
            )
        try:
            return cls(
                name=name,
                labels=tuple(labels),
                description=description,
                hypothesis_templates=_texts(doc, "hypothesis_templates", source),
            )
        except ModelError as exc:
            raise ModelError(f"{source}: {exc}") from exc

    @classmethod
    def from_file(cls, path: Path) -> LabelSet:
        try:
            value = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ModelError(f"cannot read label set {path}: {exc}") from exc
        return cls.from_json(value, str(path))

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_json(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _object(value: object, where: str, allowed: set[str]) -> Mapping[str, object]:
    if not isinstance(value, dict):
        raise ModelError(f"{where}: must be a JSON object")
    unknown = sorted(set(value) - allowed)
    if unknown:
        # A hand-written file: a misspelt key ("exmaples") must not be silently ignored.
        raise ModelError(f"{where}: unknown fields {unknown} (allowed: {sorted(allowed)})")
    return value


def _texts(doc: Mapping[str, object], key: str, where: str, *, required: bool = False) -> tuple[str, ...]:
    if key not in doc:
        if required:
            raise ModelError(f"{where}: '{key}' is required")
        return ()
    value = doc[key]
    if not isinstance(value, list) or not value or not all(isinstance(t, str) and t for t in value):
        raise ModelError(f"{where}: '{key}' must be a non-empty list of non-empty strings")
    return tuple(value)


def _check_template(where: str, template: str) -> None:
    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as exc:
        raise ModelError(f"{where}: hypothesis template {template!r} is malformed: {exc}") from exc
    unknown = sorted(fields - {"label", "description"})
    if unknown:
        raise ModelError(
            f"{where}: hypothesis template {template!r} uses {unknown}; only {{label}} and {{description}}"
        )
