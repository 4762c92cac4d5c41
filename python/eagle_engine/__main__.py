"""``python -m eagle_engine ...`` runs the ``eagle`` command."""

import sys

from .tools.cli import main

sys.exit(main())
