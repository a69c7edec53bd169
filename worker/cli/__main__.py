"""``python -m worker.cli``: the same as the ``intent-worker`` script."""

from worker.cli import main

raise SystemExit(main())
