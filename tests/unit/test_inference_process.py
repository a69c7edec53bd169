"""The student in a child process: same predictions as in-process, and a lifetime tied to the worker's."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from worker.config import MODELS_DIR
from worker.errors import ModelError
from worker.models.student import Student, classify_chunked
from worker.models.student_process import StudentProcess

SHIPPED = MODELS_DIR / "student"
TEXTS = ["set an alarm for seven", "", "what did i order yesterday", "明日の天気は", "hola " * 300, "ok"]


@pytest.fixture
def served() -> Iterator[StudentProcess]:
    process = StudentProcess(SHIPPED, threads=1, rows=2)
    yield process
    process.close()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (dead, not yet reaped by its parent) counts as gone.
    return "State:\tZ" not in Path(f"/proc/{pid}/status").read_text()


def test_the_child_gives_the_in_process_predictions(served: StudentProcess) -> None:
    student = Student(SHIPPED, threads=1)
    remote, elapsed_ms = served.classify(TEXTS)
    local, _ = classify_chunked(TEXTS, student, rows=2)
    assert served.version == student.version and served.labels == student.labels
    assert [p.label for p in remote] == [p.label for p in local]
    np.testing.assert_allclose([p.logits for p in remote], [p.logits for p in local], rtol=1e-6)
    assert elapsed_ms > 0
    assert served.classify([]) == ([], pytest.approx(0, abs=50))


def test_a_directory_that_does_not_load_is_refused_with_the_childs_reason(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"lacks model\.onnx"):
        StudentProcess(tmp_path, threads=1, rows=32)


def test_a_child_that_dies_fails_the_next_call_clearly(served: StudentProcess) -> None:
    os.kill(served.pid, signal.SIGKILL)
    with pytest.raises(ModelError, match=f"inference process {served.pid} is gone"):
        served.classify(TEXTS)


def test_the_child_outlives_sigterm_but_not_close(served: StudentProcess) -> None:
    # An orchestrator's stop reaches the whole process group: the worker finishes its batches first.
    os.kill(served.pid, signal.SIGTERM)
    time.sleep(0.2)
    predictions, _ = served.classify(["set an alarm"])
    assert [p.label for p in predictions] == ["Action"]
    served.close()
    assert not alive(served.pid)
    served.close()  # idempotent


def test_the_child_dies_with_its_parent() -> None:
    script = textwrap.dedent(
        f"""
        import sys, time
        from pathlib import Path
        from worker.models.student_process import StudentProcess
        served = StudentProcess(Path({str(SHIPPED)!r}), threads=1, rows=32)
        print("PID", served.pid, flush=True)
        time.sleep(60)
        """
    )
    with subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True) as parent:
        assert parent.stdout is not None
        child = int(next(line for line in parent.stdout if line.startswith("PID")).split()[1])
        assert alive(child)
        parent.kill()
    deadline = time.monotonic() + 10
    while alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(child)
