"""The arrows between worker's subpackages go one way: import-linter's contracts in pyproject.toml.

The layering (README "Code map"): ``cli`` on top; ``stream``, ``training`` and ``dev`` below it,
none importing another; then ``loop``, ``teacher``, ``data``, ``models``, and the package root
(config, schemas, topics, logging, process, then errors). ``stream`` imports only ``models`` and
the root.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def lint_imports(project: Path) -> subprocess.CompletedProcess[str]:
    if not LINT_IMPORTS.is_file():
        pytest.fail(f"{LINT_IMPORTS} is missing: pip install -e '.[dev]' (import-linter)")
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache", "--config", str(project / "pyproject.toml")],
        cwd=project,
        env={**os.environ, "PYTHONPATH": str(project), "COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_no_import_runs_against_the_layering() -> None:
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(
    ("module", "wrong_import", "contract"),
    [
        ("worker/models/student.py", "import worker.stream.app", "cli > stream"),
        ("worker/stream/pipeline.py", "import worker.loop.gate", "stream imports only models"),
        ("worker/loop/gate.py", "import worker.dev.services", "cli > stream"),
    ],
)
def test_a_wrong_way_import_breaks_a_contract(
    tmp_path: Path, module: str, wrong_import: str, contract: str
) -> None:
    """The same contracts on a copy of the package with one import against the arrows."""
    shutil.copytree(ROOT / "worker", tmp_path / "worker", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    target = tmp_path / module
    target.write_text(target.read_text() + f"\n{wrong_import}  # noqa\n")
    result = lint_imports(tmp_path)
    assert result.returncode != 0
    broken = [line for line in result.stdout.splitlines() if line.endswith("BROKEN")]
    assert any(contract in line for line in broken), result.stdout


def test_the_registry_and_the_command_line_load_without_onnxruntime() -> None:
    """``rollback`` and ``models`` (and every command's start) never import the model runtime."""
    code = (
        "import sys, worker.models.registry, worker.cli; "
        "print(sorted(m for m in ('onnxruntime', 'faust', 'torch') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert result.stdout.strip() == "[]"
