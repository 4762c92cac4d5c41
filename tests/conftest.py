"""Shared pytest setup: make the packages importable from a plain checkout too."""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (ROOT, os.path.join(ROOT, "python")):
    if path not in sys.path:
        sys.path.insert(0, path)
