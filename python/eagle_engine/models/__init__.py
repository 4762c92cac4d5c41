"""Target models and draft heads, with Hugging Face checkpoint loading."""

from .config import ModelConfig, load_model_config
from .llama import LlamaModel
from .loading import load_target

__all__ = ["ModelConfig", "LlamaModel", "load_model_config", "load_target"]
