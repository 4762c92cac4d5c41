"""eagle_engine: a thin EAGLE speculative-decoding engine over eagle_kernels ops.

``EagleEngine.from_pretrained(base, draft)`` then ``generate`` (EAGLE) or ``generate_vanilla``.
"""

from .engine import EagleEngine
from .errors import (
    CheckpointMismatchError,
    DraftMismatchError,
    EagleError,
    InvalidRequestError,
    ModelLoadError,
    UnsupportedModelError,
)
from .requests import GenerationResult
from .sampling import SamplingParams

__version__ = "0.1.0"

__all__ = [
    "EagleEngine",
    "GenerationResult",
    "SamplingParams",
    "EagleError",
    "ModelLoadError",
    "UnsupportedModelError",
    "CheckpointMismatchError",
    "DraftMismatchError",
    "InvalidRequestError",
]
