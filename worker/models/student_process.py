"""The student in a child process, so inference never waits on the event loop for Python's GIL.

In one process, the inference thread and the event loop (faust, decoding, outputs) take turns
on the GIL: onnxruntime and the tokenizer release it, but every return from them waits until
the event loop's thread lets go (up to the 5 ms switch interval), and a micro-batch makes
about twenty such returns. Measured on 2 cores with the shipped CNN, the two threads then sat
at about 55% each and the worker did 6,275 utterances/s; with the model in its own process the
same worker does 9,000/s (``benchmarks/bench_worker.py``, paths ``worker_inference_thread`` and
``worker``).

One child per served model: a fresh interpreter (``python -m worker.models.student_process``;
never a ``fork`` of the threaded worker, nor ``multiprocessing``'s spawn, which re-imports the
parent's main module) on one end of a socket pair. It loads the model directory, answers
``("ready", version, labels)``, then for each list of texts sends their logits, computed in
length-sorted chunks of ``rows`` exactly as :func:`worker.models.student.chunked_logits` does
in-process, with how many of them a cascade escalated. The parent builds the predictions.

Lifetime: the child runs in a session of its own and ignores SIGINT and SIGTERM (a terminal's
Ctrl-C or an orchestrator's stop of the whole process group must not take the model away
while the worker finishes its batches in flight); it stops when the parent closes the pipe or
sends ``None``, and the kernel kills it if the parent dies (``PR_SET_PDEATHSIG``). A child
that dies makes the next call raise :class:`ModelError`, which fails the batch: the worker
stops and its partitions are redone, as for any inference failure.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, ClassVar

import structlog

from worker.errors import ModelError
from worker.models.student import Logits, Prediction, predictions

log = structlog.get_logger(__name__)

START_TIMEOUT_S = 120.0  # loading a model directory (and importing onnxruntime) in a fresh interpreter
STOP_TIMEOUT_S = 10.0


class StudentProcess:
    """A student directory served by a child process; :meth:`classify` is the pipeline's ``Classify``."""

    #: Children this process has started that loaded their student (one ONNX session each).
    loads: ClassVar[int] = 0
    #: Utterances the children's cascades sent on to their second student.
    escalations: ClassVar[int] = 0

    def __init__(self, directory: Path, *, threads: int, rows: int) -> None:
        ours, theirs = socket.socketpair()
        command = [
            sys.executable,
            "-m",
            "worker.models.student_process",
            str(directory),
            str(threads),
            str(rows),
            str(os.getpid()),
        ]
        with theirs:
            self._process = subprocess.Popen(  # its stdout and stderr are the worker's
                [*command, str(theirs.fileno())],
                stdin=subprocess.DEVNULL,
                pass_fds=(theirs.fileno(),),
                start_new_session=True,  # a signal to the worker's process group is not for it
            )
        self._conn = Connection(ours.detach())  # the child's end is closed here: its death is our EOF
        self._lock = threading.Lock()
        try:
            if not self._conn.poll(START_TIMEOUT_S):
                raise ModelError(
                    f"the inference process for {directory} did not start in {START_TIMEOUT_S:.0f} s"
                )
            reply = self._receive()
            if reply[0] != "ready":
                raise ModelError(str(reply[1]))
        except BaseException:
            self.close()
            raise
        self.version: str = reply[1]
        self.labels: tuple[str, ...] = tuple(reply[2])
        StudentProcess.loads += 1
        log.info("inference_process_started", pid=self.pid, version=self.version, directory=str(directory))

    @property
    def pid(self) -> int:
        return self._process.pid

    def logits(self, texts: Sequence[str]) -> tuple[Logits, float]:
        """Logits for ``texts`` and the child's inference time in milliseconds."""
        with self._lock:  # one request at a time on the pipe
            try:
                self._conn.send(list(texts))
            except (OSError, ValueError) as exc:  # a broken pipe, or a closed connection
                raise self._died() from exc
            reply = self._receive()
        if reply[0] != "ok":
            raise ModelError(f"inference failed in process {self.pid}: {reply[1]}")
        values: Logits = reply[1]
        StudentProcess.escalations += int(reply[3])
        return values, float(reply[2])

    def classify(self, texts: Sequence[str]) -> tuple[list[Prediction], float]:
        values, elapsed_ms = self.logits(texts)
        return predictions(self.labels, values), elapsed_ms

    def close(self) -> None:
        """Stop the child (after the call in progress, if any, up to a timeout); idempotent."""
        if self._lock.acquire(timeout=STOP_TIMEOUT_S):
            try:
                with contextlib.suppress(OSError, ValueError):
                    self._conn.send(None)
            finally:
                self._lock.release()
        self._conn.close()
        try:
            self._process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait(STOP_TIMEOUT_S)

    def _receive(self) -> tuple[Any, ...]:
        try:
            reply: tuple[Any, ...] = self._conn.recv()
        except (EOFError, OSError, ValueError) as exc:
            raise self._died() from exc
        return reply

    def _died(self) -> ModelError:
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._process.wait(1.0)
        return ModelError(f"the inference process {self.pid} is gone (exit code {self._process.returncode})")


def serve(conn: Connection, directory: str, threads: int, rows: int) -> None:
    """The child: load the student, then answer requests until told to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from worker.models.student import Student, chunked_logits

    try:
        student = Student(Path(directory), threads=threads)
    except Exception as exc:  # ModelError, or anything onnxruntime raises
        conn.send(("error", str(exc)))
        return
    conn.send(("ready", student.version, student.labels))
    reported = 0  # escalations already sent to the parent
    while True:
        try:
            texts = conn.recv()
        except (EOFError, OSError):
            return
        if texts is None:
            return
        started = time.perf_counter()
        try:
            values = chunked_logits(texts, student, rows)
        except Exception as exc:
            conn.send(("error", repr(exc)))
            continue
        escalated = Student.escalations
        conn.send(("ok", values, (time.perf_counter() - started) * 1000, escalated - reported))
        reported = escalated


def main(argv: Sequence[str]) -> None:
    """``python -m worker.models.student_process DIRECTORY THREADS ROWS PARENT_PID FD`` (the worker runs it)."""
    from worker.process import die_with_parent

    directory, threads, rows, parent_pid, fd = argv
    die_with_parent(signal.SIGKILL, int(parent_pid))
    with Connection(int(fd)) as conn:
        serve(conn, directory, int(threads), int(rows))


if __name__ == "__main__":
    main(sys.argv[1:])
