"""Build a target model from a Hugging Face model directory."""

from __future__ import annotations

import torch

from .config import load_model_config
from .llama import LlamaModel
from .weights import iter_checkpoint, load_into, resolve_dtype


def load_target(
    model_dir: str, *, device: str | torch.device = "cpu", dtype: str | torch.dtype = torch.float32
) -> LlamaModel:
    """Load ``config.json`` + weights (safetensors, sharded safetensors or ``pytorch_model.bin``).

    Raises :class:`~eagle_engine.errors.ModelLoadError`, ``UnsupportedModelError`` or
    ``CheckpointMismatchError`` with a message naming the problem; never runs checkpoint code.
    """
    config = load_model_config(model_dir)
    dtype = resolve_dtype(dtype)
    with torch.device("meta"):
        model = LlamaModel(config)
    model = model.to_empty(device=device).to(dtype)

    def ignore(name: str) -> bool:
        # Rotary frequencies are computed, not loaded; a tied checkpoint may still carry its lm_head copy.
        return name.endswith("rotary_emb.inv_freq") or (
            config.tie_word_embeddings and name == "lm_head.weight"
        )

    load_into(model, iter_checkpoint(model_dir), ignore=ignore, optional=("cos_sin",))
    model.init_rotary(device)
    return model.eval().requires_grad_(False)
