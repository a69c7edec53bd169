"""Which label set a dataset holds, and the one label set a training run may read.

A manifest's ``teacher.label_set`` is the labelling teacher's label-set id (``name@hash``);
manifests written before label sets lack it and mean the id of their label names.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from worker.errors import DataError
from worker.models.onnx import label_names_id


def manifest_label_set(manifest: Mapping[str, Any]) -> str:
    """The label-set id of a parsed ``dataset_manifest.v1``."""
    teacher = manifest["teacher"]
    declared = teacher.get("label_set")
    return str(declared) if declared else label_names_id(teacher["labels"])


def common_label_set(manifests: Mapping[str, Mapping[str, Any]]) -> tuple[str, tuple[str, ...]]:
    """The one label set (id, label order) of the datasets ``{location: manifest}``.

    Datasets of different label sets cannot be mixed in one training run: their logits are
    over different labels, or over the same names meaning different things.
    """
    found = {location: manifest_label_set(m) for location, m in manifests.items()}
    if len(set(found.values())) > 1:
        listing = ", ".join(f"{location}: {label_set}" for location, label_set in found.items())
        raise DataError(
            f"the datasets hold different label sets ({listing}); train on one label set at a time"
        )
    orders = {tuple(m["teacher"]["labels"]) for m in manifests.values()}
    if len(orders) > 1:
        raise DataError(f"the datasets order their labels differently: {sorted(orders)}")
    return next(iter(found.values())), orders.pop()
