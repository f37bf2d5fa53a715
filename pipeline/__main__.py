"""``python -m pipeline`` is the ``pipeline`` command (also what ``torchrun -m pipeline`` runs)."""

import sys

from pipeline.cli import main

sys.exit(main())
