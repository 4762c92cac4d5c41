"""Shared pytest setup: make the packages importable from a plain checkout too."""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (ROOT, os.path.join(ROOT, "python")):
    if path not in sys.path:
        sys.path.insert(0, path)

import torch  # noqa: E402

# The test models are tiny: threading overhead dominates their ops, and CI has two cores.
torch.set_num_threads(1)
