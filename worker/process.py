"""Child processes that end with their parent: the kernel's parent-death signal (Linux only).

Used by the embedded services (:mod:`worker.dev.services`, through :func:`parent_death_hook`)
and by the inference child (:mod:`worker.models.student_process`, :func:`die_with_parent`).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Callable

_PR_SET_PDEATHSIG = 1


def parent_death_hook() -> Callable[[], None] | None:
    """A pre-exec hook so the child gets SIGTERM if we die without stopping it (Linux only).

    libc is loaded here, in the parent: only the prctl system call runs between fork and exec.
    """
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl

    def hook() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)

    return hook


def die_with_parent(sig: signal.Signals, parent_pid: int) -> None:
    """Have the kernel send ``sig`` to this process when its parent dies (Linux only).

    For children that are not started through :func:`subprocess.Popen` (a ``multiprocessing``
    child sets it up itself, first thing). A parent already gone by then means exit now.
    """
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, sig)
    if os.getppid() != parent_pid:
        os._exit(1)
