"""What the code stores (dataset manifests and rows, the registry pointer) matches schemas/."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from jsonschema import Draft202012Validator

from worker.config import MODELS_DIR, REPO_ROOT
from worker.loop.dataset import DatasetWriter, ShardRows, compact, read_manifest
from worker.models.registry import Registry


def _validator(name: str) -> Draft202012Validator:
    schema = json.loads((REPO_ROOT / "schemas" / f"{name}.json").read_text())
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


def test_dataset_manifest_and_rows_follow_their_schemas(tmp_path: Path) -> None:
    writer = DatasetWriter(tmp_path / "ds", "teacher@abc", ("Action", "Other", "Recall"))
    rows = ShardRows(
        ids=["u1", "u2"],
        texts=["set an alarm", "hello"],
        locales=["en", "fr"],
        teacher_logits=list(np.eye(3, dtype=np.float32)[:2]),
        teacher_labels=["Action", "Other"],
        sources=["buffer", "buffer"],
        weights=[2.0, 1.0],
        student_logits=[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]],
        model_versions=["cnn-1", "cnn-1"],
        strata=["en|Action", "fr|Other"],
        buffer_ids=["1-0", "1-1"],
        sampled_at=[1.0, 2.0],
    )
    writer.write_shard("a", rows)
    writer.write_shard("b", ShardRows(["u3"], ["x"], ["de"], [np.zeros(3, np.float32)], ["Other"]))
    writer.add_run({"run": "r", "entries": 2, "rows": 2, "disagreement": {"*": {"n": 2, "rate": 0.5}}})
    compact(tmp_path / "ds")
    manifest = read_manifest(tmp_path / "ds")
    _validator("dataset_manifest.v1").validate(manifest)
    row_validator = _validator("dataset_row.v1")
    for shard in manifest["shards"]:
        for row in pq.read_table(tmp_path / "ds" / shard["file"]).to_pylist():
            row_validator.validate(
                {k: v for k, v in row.items() if not (isinstance(v, float) and math.isnan(v))}
            )


def test_the_registry_pointer_follows_its_schema(tmp_path: Path) -> None:
    model = tmp_path / "m"
    shutil.copytree(MODELS_DIR / "student", model)
    registry = Registry(tmp_path / "registry")
    registry.publish(registry.add(model))
    registry.publish(registry.add(model))
    registry.rollback()
    _validator("model_pointer.v1").validate(json.loads(registry.pointer.read_text()))
