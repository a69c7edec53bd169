"""Reading utterance data sets (JSONL) and mapping their intents to the label set.

Rows have ``id``, ``locale`` and ``text``; labelled rows add ``intent`` (mapped to a label
through a mapping file of ``{intent: [label, ambiguous, reason]}``) or a direct ``label``.
Everything streams line by line; only what a caller keeps is held in memory.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt

from worker.errors import DataError

MAPPING_FILES = ("massive_to_3class.json", "xsid_to_3class.json")


@dataclass(frozen=True)
class IntentMapping:
    """intent -> (label, ambiguous); several mapping files merge into one."""

    entries: dict[str, tuple[str, bool]]

    @classmethod
    def from_files(cls, paths: Iterable[Path]) -> IntentMapping:
        entries: dict[str, tuple[str, bool]] = {}
        for path in paths:
            try:
                raw = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise DataError(f"cannot read intent mapping {path}: {exc}") from exc
            for intent, value in raw.items():
                if intent.startswith("_"):
                    continue
                entries[intent] = (str(value[0]), bool(value[1]))
        return cls(entries)

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(sorted({label for label, _ in self.entries.values()}))


@dataclass
class LabelledSet:
    """Parallel columns of a labelled data set."""

    ids: list[str] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    locales: list[str] = field(default_factory=list)
    intents: list[str] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    ambiguous: list[bool] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.texts)

    def gold(self, label_names: Sequence[str]) -> npt.NDArray[np.int64]:
        index = {name: i for i, name in enumerate(label_names)}
        try:
            return np.array([index[label] for label in self.labels], dtype=np.int64)
        except KeyError as exc:
            raise DataError(
                f"gold label {exc.args[0]!r} is not in the label set {list(label_names)}"
            ) from exc

    def subset(self, keep: Sequence[bool]) -> LabelledSet:
        out = LabelledSet()
        for name in ("ids", "texts", "locales", "intents", "labels", "ambiguous"):
            column = getattr(self, name)
            setattr(out, name, [v for v, k in zip(column, keep, strict=True) if k])
        return out


def read_jsonl(path: Path) -> Iterator[dict[str, object]]:
    """Rows of a JSONL file; a malformed line is a `DataError` naming file and line."""
    if not path.exists():
        raise DataError(f"data file {path} does not exist")
    with path.open(encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as exc:
                raise DataError(f"{path}:{number}: invalid JSON: {exc}") from exc
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise DataError(f"{path}:{number}: a row needs a string field 'text'")
            yield row


def load_labelled(paths: Iterable[Path], mapping: IntentMapping, split: str | None) -> LabelledSet:
    """Rows of ``split`` (all rows if None) that carry a mappable intent or a label."""
    out = LabelledSet()
    for path in paths:
        for row in read_jsonl(path):
            if split is not None and row.get("split") != split:
                continue
            intent = str(row.get("intent", ""))
            if "label" in row:
                label, ambiguous = str(row["label"]), False
            elif intent in mapping.entries:
                label, ambiguous = mapping.entries[intent]
            else:
                raise DataError(f"{path}: row {row.get('id')!r} has intent {intent!r} with no mapping")
            out.ids.append(str(row.get("id", "")))
            out.texts.append(str(row["text"]))
            out.locales.append(str(row.get("locale", "")))
            out.intents.append(intent)
            out.labels.append(label)
            out.ambiguous.append(ambiguous)
    return out


def require_shared_data(shared_dir: Path | None) -> Path:
    """``shared_dir`` if it holds the development data, else a clear `DataError`."""
    if shared_dir is None:
        raise DataError(
            "no development data is configured (an installed package has no default); set "
            "INTENT_SHARED_DATA_DIR to the directory holding massive/, xsid/, tatoeba/ and mappings/"
        )
    if not (shared_dir / "massive").is_dir():
        raise DataError(
            f"the development data is not at {shared_dir}; set INTENT_SHARED_DATA_DIR "
            "to the directory holding massive/, xsid/, tatoeba/ and mappings/"
        )
    return shared_dir


def shared_mapping(shared_dir: Path) -> IntentMapping:
    return IntentMapping.from_files(shared_dir / "mappings" / name for name in MAPPING_FILES)


def massive_files(shared_dir: Path) -> list[Path]:
    return sorted((shared_dir / "massive").glob("*.jsonl"))


def xsid_files(shared_dir: Path) -> list[Path]:
    return sorted((shared_dir / "xsid").glob("*.jsonl"))


def language_of(locale: str) -> str:
    """``de-DE``, ``de_ba``, ``DE`` -> ``de``."""
    return locale.replace("_", "-").split("-")[0].lower()
