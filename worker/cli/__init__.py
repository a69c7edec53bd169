"""The ``intent-worker`` command line. Nothing outside this package imports it.

:mod:`.commands` holds the parser and the stream-side commands (run, send, replay, tail,
label); :mod:`.model_commands` the model-side ones (teacher, corpus, train, dataset, promote).
"""

from worker.cli.commands import main

__all__ = ["main"]
