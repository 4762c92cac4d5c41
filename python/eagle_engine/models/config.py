"""Target model configuration parsed from a Hugging Face ``config.json``."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field

import torch

from ..errors import ModelLoadError, UnsupportedModelError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


@dataclass
class RopeConfig:
    """Rotary embedding settings; ``rope_type`` is ``default``, ``linear`` or ``llama3``."""

    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self):
        if self.rope_type not in ("default", "linear", "llama3"):
            raise UnsupportedModelError(
                f"rope scaling type {self.rope_type!r} is not supported (supported: default, linear, llama3)"
            )

    def inv_freq(self, head_dim: int) -> torch.Tensor:
        """Per-pair inverse frequencies ``[head_dim // 2]`` (fp64 for an exact table)."""
        inv = 1.0 / (self.theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
        if self.rope_type == "linear":
            return inv / self.factor
        if self.rope_type == "llama3":
            old_len = self.original_max_position_embeddings
            wavelen = 2 * math.pi / inv
            low_wavelen, high_wavelen = old_len / self.low_freq_factor, old_len / self.high_freq_factor
            smooth = (old_len / wavelen - self.low_freq_factor) / (
                self.high_freq_factor - self.low_freq_factor
            )
            blended = (1 - smooth) * inv / self.factor + smooth * inv
            inv = torch.where(
                wavelen > low_wavelen, inv / self.factor, torch.where(wavelen < high_wavelen, inv, blended)
            )
        return inv


@dataclass
class ModelConfig:
    """The fields of a Llama-family config that the engine uses."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = field(default_factory=RopeConfig)
    attention_bias: bool = False  # q/k/v (and for Llama o) projections carry a bias
    o_proj_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k before rotary
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "max_position_embeddings",
        ):
            if getattr(self, name) <= 0:
                raise UnsupportedModelError(
                    f"config field {name} must be positive, got {getattr(self, name)}"
                )
        if self.num_attention_heads % self.num_key_value_heads:
            raise UnsupportedModelError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            raise UnsupportedModelError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")

    @property
    def max_length(self) -> int:
        """Longest sequence (prompt + generated) the engine runs: sliding windows are not implemented, so a
        sequence never grows past the window, where full attention would still be exact."""
        if self.sliding_window:
            return min(self.max_position_embeddings, self.sliding_window)
        return self.max_position_embeddings

    @classmethod
    def from_dict(cls, cfg: dict) -> "ModelConfig":
        """Parse a Hugging Face config dict (transformers 4.x ``rope_scaling`` or 5.x ``rope_parameters``)."""
        model_type = cfg.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            archs = cfg.get("architectures")
            raise UnsupportedModelError(
                f"unsupported architecture: model_type={model_type!r} "
                f"architectures={archs!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        if cfg.get("hidden_act", "silu") != "silu":
            raise UnsupportedModelError(f"hidden_act {cfg['hidden_act']!r} is not supported (only silu)")
        try:
            heads = int(cfg["num_attention_heads"])
            hidden = int(cfg["hidden_size"])
            head_dim = cfg.get("head_dim") or hidden // heads
            sliding = cfg.get("sliding_window")
            if model_type in ("qwen2", "qwen3") and not cfg.get("use_sliding_window", False):
                sliding = None
            eos = cfg.get("eos_token_id")
            return cls(
                model_type=model_type,
                vocab_size=int(cfg["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(cfg["intermediate_size"]),
                num_hidden_layers=int(cfg["num_hidden_layers"]),
                num_attention_heads=heads,
                num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
                head_dim=int(head_dim),
                max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                rope=parse_rope(cfg),
                attention_bias=bool(cfg.get("attention_bias", False)) or model_type == "qwen2",
                o_proj_bias=bool(cfg.get("attention_bias", False)) and model_type != "qwen2",
                mlp_bias=bool(cfg.get("mlp_bias", False)),
                qk_norm=model_type == "qwen3",
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                sliding_window=int(sliding) if sliding else None,
                eos_token_ids=tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),)),
            )
        except KeyError as e:
            raise UnsupportedModelError(f"config.json lacks the required field {e.args[0]!r}") from None


def parse_rope(cfg: dict) -> RopeConfig:
    """Rotary settings from either ``rope_parameters`` (transformers 5) or ``rope_theta``/``rope_scaling``."""
    params = dict(cfg.get("rope_parameters") or {})
    scaling = dict(cfg.get("rope_scaling") or {})
    params = {**scaling, **params}
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    kwargs = {
        k: params[k]
        for k in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        if k in params
    }
    return RopeConfig(theta=float(theta), rope_type=rope_type, **kwargs)


def read_json(path: str, what: str) -> dict:
    """Read a JSON file, turning absence or bad syntax into :class:`ModelLoadError`."""
    if not os.path.isfile(path):
        raise ModelLoadError(f"{what}: file not found: {path}")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{what}: cannot read {path}: {e}") from None


def load_model_config(model_dir: str) -> ModelConfig:
    """Read ``config.json`` (and ``generation_config.json``'s eos ids, if present) from a model directory."""
    if not os.path.isdir(model_dir):
        raise ModelLoadError(f"model directory not found: {model_dir}")
    config = ModelConfig.from_dict(read_json(os.path.join(model_dir, "config.json"), "model config"))
    gen_path = os.path.join(model_dir, "generation_config.json")
    if os.path.isfile(gen_path):
        eos = read_json(gen_path, "generation config").get("eos_token_id")
        if eos is not None:
            config.eos_token_ids = tuple(eos) if isinstance(eos, list) else (int(eos),)
    return config
