"""eagle_engine: a thin EAGLE speculative-decoding engine over eagle_kernels ops.

``EagleEngine.from_pretrained(base, draft)`` then ``generate`` (EAGLE) or ``generate_vanilla``.
"""

from .engine import EagleEngine
from .engine.sequence import GenerationResult
from .errors import (
    CheckpointMismatchError,
    DraftMismatchError,
    EagleError,
    InvalidDeviceError,
    InvalidRequestError,
    ModelLoadError,
    NonFiniteWeightsError,
    TrainingInputError,
    UnsupportedModelError,
)
from .speculative import SamplingParams, TreeConfig
from .tools.demo import demo_head_path, demo_paths

__version__ = "0.1.0"

__all__ = [
    "EagleEngine",
    "GenerationResult",
    "SamplingParams",
    "TreeConfig",
    "demo_paths",
    "demo_head_path",
    "EagleError",
    "ModelLoadError",
    "UnsupportedModelError",
    "CheckpointMismatchError",
    "NonFiniteWeightsError",
    "DraftMismatchError",
    "InvalidRequestError",
    "InvalidDeviceError",
    "TrainingInputError",
]
