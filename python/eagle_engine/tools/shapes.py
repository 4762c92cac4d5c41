"""Real model shapes without weights: a target and its EAGLE heads built from configs alone, on any device
(``meta`` for the round model, a GPU with random weights for ``benchmarks/bench_round.py``).

Shapes are the published configs' (Hugging Face ``config.json`` fields); the heads are the shapes of the
published EAGLE heads for those targets: EAGLE-1/2, one decoder layer of the target's shape over
``fc(cat(embed, feature))``, ranked by the target's ``lm_head``; EAGLE-3, one layer over ``cat(embed,
fc(3 features))`` with its own ``lm_head`` over a 32,000-token draft vocabulary.
"""

from __future__ import annotations

import contextlib

import torch

from ..models.config import ModelConfig
from ..models.draft import Eagle1Head, Eagle3Head, build_head
from ..models.llama import LlamaModel

_LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}

MODELS = {
    "llama3.1-8b": dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                        max_position_embeddings=131072, rms_norm_eps=1e-5, rope_parameters=_LLAMA3_ROPE),
    "qwen2.5-7b": dict(model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                       num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                       max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1000000.0),
    "qwen3-8b": dict(model_type="qwen3", vocab_size=151936, hidden_size=4096, intermediate_size=12288,
                     num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                     max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1000000.0),
    # Not a published model: a four-layer Llama small enough for a CPU, to dry-run what the others run.
    "tiny": dict(model_type="llama", vocab_size=1000, hidden_size=128, intermediate_size=256,
                 num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                 max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0),
    "mistral-7b": dict(model_type="mistral", vocab_size=32768, hidden_size=4096, intermediate_size=14336,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                       max_position_embeddings=32768, rms_norm_eps=1e-5, rope_theta=1000000.0),
}
EAGLE3_DRAFT_VOCAB = 32000


def model_config(name: str) -> ModelConfig:
    """The :class:`ModelConfig` of a preset in :data:`MODELS`."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    return ModelConfig.from_dict(dict(MODELS[name]), f"preset {name}")


def head_config(target: ModelConfig, kind: str) -> dict:
    """The ``config.json`` of a published-shape EAGLE head (``kind`` ``"eagle1"`` or ``"eagle3"``); the draft
    vocabulary of an EAGLE-3 head is at most the target's."""
    raw = dict(hidden_size=target.hidden_size, intermediate_size=target.intermediate_size,
               num_attention_heads=target.num_attention_heads, num_key_value_heads=target.num_key_value_heads,
               head_dim=target.head_dim, rms_norm_eps=target.rms_norm_eps, vocab_size=target.vocab_size,
               max_position_embeddings=target.max_position_embeddings, rope_theta=target.rope.theta,
               bias=False)
    if kind == "eagle3":
        raw["draft_vocab_size"] = min(EAGLE3_DRAFT_VOCAB, target.vocab_size)
    return raw


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_target(cfg: ModelConfig, device, dtype: torch.dtype = torch.bfloat16) -> LlamaModel:
    """The target, parameters allocated on ``device`` in ``dtype`` and left uninitialised (see
    :func:`randomize`); its rotary table built."""
    with torch.device(device), _default_dtype(dtype):
        model = LlamaModel(cfg)
    model.init_rotary(device)
    return model.eval().requires_grad_(False)


def build_eagle_head(target: LlamaModel, kind: str) -> Eagle1Head | Eagle3Head:
    """A published-shape EAGLE head for ``target`` on its device and dtype, uninitialised; an EAGLE-1/2 head
    shares the target's embedding and ``lm_head``, as loading an official head does."""
    weight = target.model.embed_tokens.weight
    with torch.device(weight.device), _default_dtype(weight.dtype):
        head = build_head(kind, head_config(target.config, kind), target)
    head.embed_tokens.weight = target.model.embed_tokens.weight
    head.owns_embedding = False
    if kind == "eagle1":
        head.lm_head_weight = target.lm_head_weight.detach()  # shared, not a parameter of the head
    head.ensure_positions(target.cos_sin.shape[0])
    return head.eval().requires_grad_(False)


def randomize(module: torch.nn.Module, seed: int = 0, std: float = 0.02) -> None:
    """Random weights in place (norms at 1): round cost does not depend on them, acceptance does."""
    gen = torch.Generator(device=next(module.parameters()).device).manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, std, generator=gen)


__all__ = ["MODELS", "model_config", "head_config", "build_target", "build_eagle_head", "randomize"]
