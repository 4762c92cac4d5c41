"""What is speculative: draft trees, their verification, and the target distribution sampling draws from."""

from .sampling import SamplingParams
from .tree import TreeConfig

__all__ = ["SamplingParams", "TreeConfig"]
