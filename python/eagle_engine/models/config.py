"""Target model configuration parsed from a Hugging Face ``config.json``."""

from __future__ import annotations

import contextlib
import json
import math
import numbers
import operator
import os
from dataclasses import dataclass, field

import torch

from ..errors import ModelLoadError, UnsupportedModelError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


MAX_POSITION_EMBEDDINGS = 2**24
# Upper bounds on config integers, far above any released model (Llama 3.1 405B: hidden 16384, MLP 53248,
# 126 layers, 128 heads, vocabulary 128256): a typo or a corrupt file fails while parsing, not by asking for
# terabytes. The position bound caps rotary tables and KV caches sized by ``max_position_embeddings``.
INT_LIMITS = {
    "vocab_size": 2**24,
    "hidden_size": 2**17,
    "intermediate_size": 2**20,
    "num_hidden_layers": 2**12,
    "num_attention_heads": 2**12,
    "num_key_value_heads": 2**12,
    "head_dim": 2**12,
    "max_position_embeddings": MAX_POSITION_EMBEDDINGS,
    "original_max_position_embeddings": MAX_POSITION_EMBEDDINGS,
    "sliding_window": MAX_POSITION_EMBEDDINGS,
    "target_hidden_size": 2**17,
    "draft_vocab_size": 2**24,
}
_ABSENT = object()


class ConfigReader:
    """Typed, range-checked reads of one config file's fields; every error names the file and the field.

    ``null`` counts as absent. Integers must be JSON integers (``4.7`` is an error, never truncated), floats
    finite numbers, flags JSON booleans. Errors are :class:`UnsupportedModelError`.
    """

    def __init__(self, cfg: dict, where: str = "config.json"):
        if not isinstance(cfg, dict):
            raise UnsupportedModelError(f"{where} must hold a JSON object, got {type(cfg).__name__}")
        self.cfg, self.where = cfg, where

    def fail(self, name: str, rule: str, value) -> None:
        raise UnsupportedModelError(f"{self.where}: field {name!r} must be {rule}, got {value!r}")

    @contextlib.contextmanager
    def naming_file(self):
        """Prefix this file's name to the :class:`UnsupportedModelError` of a cross-field check."""
        try:
            yield
        except UnsupportedModelError as e:
            raise UnsupportedModelError(f"{self.where}: {e}") from None

    def get(self, name: str, default=_ABSENT):
        value = self.cfg.get(name)
        if value is None:
            if default is _ABSENT:
                raise UnsupportedModelError(f"{self.where} lacks the required field {name!r}")
            return default
        return value

    def int(self, name: str, default=_ABSENT, *, lo: int = 1, value=_ABSENT) -> int:
        """An integer in ``[lo, INT_LIMITS[name]]`` (``value`` when given, else the field)."""
        value = self.get(name, default) if value is _ABSENT else value
        return check_int(value, name, self.where, lo=lo, hi=INT_LIMITS.get(name))

    def float(self, name: str, default=_ABSENT, *, value=_ABSENT) -> float:
        """A finite number > 0."""
        value = self.get(name, default) if value is _ABSENT else value
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            self.fail(name, "a number", value)
        if not (math.isfinite(value) and value > 0):
            self.fail(name, "a finite number > 0", value)
        return float(value)

    def flag(self, name: str, default: bool = False) -> bool:
        value = self.get(name, default)
        if not isinstance(value, bool):
            self.fail(name, "true or false", value)
        return value

    def token_ids(self, name: str, vocab_size: int) -> tuple[int, ...]:
        """An id or a list of ids, each an integer in ``[0, vocab_size)``; absent -> ``()``."""
        value = self.get(name, None)
        ids = [] if value is None else value if isinstance(value, list) else [value]
        for t in ids:
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size:
                self.fail(name, f"a token id or a list of token ids in [0, {vocab_size})", value)
        return tuple(ids)


def check_int(value, name: str, where: str, *, lo: int = 1, hi: int | None = None) -> int:
    """``value`` as an int in ``[lo, hi]``; bools, floats and strings are errors naming ``where``/``name``."""
    rule = f"an integer in [{lo}, {hi}]" if hi is not None else f"an integer >= {lo}"
    try:
        if isinstance(value, bool):
            raise TypeError
        number = operator.index(value)  # ints and NumPy integers; never truncates a float
    except TypeError:
        raise UnsupportedModelError(f"{where}: field {name!r} must be {rule}, got {value!r}") from None
    if number < lo or (hi is not None and number > hi):
        why = " (the engine's limit)" if hi is not None and number > hi else ""
        raise UnsupportedModelError(f"{where}: field {name!r} must be {rule}{why}, got {number!r}")
    return number


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
        if self.rope_type == "llama3" and not self.high_freq_factor > self.low_freq_factor:
            raise UnsupportedModelError(
                f"llama3 rope scaling needs high_freq_factor > low_freq_factor, got "
                f"{self.high_freq_factor} and {self.low_freq_factor}"
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
    def from_dict(cls, cfg: dict, where: str = "config.json") -> "ModelConfig":
        """Parse a Hugging Face config dict (transformers 4.x ``rope_scaling`` or 5.x ``rope_parameters``).

        Every field the engine uses is type- and range-checked here, before anything is allocated; errors are
        :class:`UnsupportedModelError` naming ``where`` and the field.
        """
        r = ConfigReader(cfg, where)
        model_type = cfg.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            archs = cfg.get("architectures")
            raise UnsupportedModelError(
                f"unsupported architecture: model_type={model_type!r} "
                f"architectures={archs!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        if r.get("hidden_act", "silu") != "silu":
            raise UnsupportedModelError(f"hidden_act {cfg['hidden_act']!r} is not supported (only silu)")
        heads, hidden = r.int("num_attention_heads"), r.int("hidden_size")
        if r.get("head_dim", None) is None and hidden % heads:
            raise UnsupportedModelError(
                f"{where}: hidden_size {hidden} is not a multiple of num_attention_heads {heads} "
                "and no head_dim is given"
            )
        head_dim = r.int("head_dim", hidden // heads)
        sliding = 0  # Qwen configs carry a sliding_window that only use_sliding_window turns on
        if model_type not in ("qwen2", "qwen3") or r.flag("use_sliding_window"):
            sliding = r.int("sliding_window", 0, lo=0)
        vocab_size = r.int("vocab_size")
        attention_bias = r.flag("attention_bias")
        fields = dict(
            model_type=model_type,
            vocab_size=vocab_size,
            hidden_size=hidden,
            intermediate_size=r.int("intermediate_size"),
            num_hidden_layers=r.int("num_hidden_layers"),
            num_attention_heads=heads,
            num_key_value_heads=r.int("num_key_value_heads", heads),
            head_dim=head_dim,
            max_position_embeddings=r.int("max_position_embeddings", 2048),
            rms_norm_eps=r.float("rms_norm_eps", 1e-6),
            rope=parse_rope(r),
            attention_bias=attention_bias or model_type == "qwen2",
            o_proj_bias=attention_bias and model_type != "qwen2",
            mlp_bias=r.flag("mlp_bias"),
            qk_norm=model_type == "qwen3",
            tie_word_embeddings=r.flag("tie_word_embeddings"),
            sliding_window=sliding or None,
            eos_token_ids=r.token_ids("eos_token_id", vocab_size),
        )
        with r.naming_file():  # the cross-field checks of __post_init__
            return cls(**fields)


def parse_rope(r: ConfigReader) -> RopeConfig:
    """Rotary settings from ``rope_parameters`` (transformers 5) and/or ``rope_theta``/``rope_scaling``
    (transformers 4). A setting given in several places must agree: a contradiction (a top-level
    ``rope_theta`` of -1 beside ``rope_parameters.rope_theta`` 10000, ``rope_scaling.type`` beside another
    ``rope_parameters.rope_type``) is an error naming both, never settled by picking one."""
    merged, origin = {}, {}
    places = [("rope_theta", {"rope_theta": r.get("rope_theta", None)})]
    for section in ("rope_scaling", "rope_parameters"):
        value = r.get(section, {})
        if not isinstance(value, dict):
            r.fail(section, "an object", value)
        places.append((section, value))
    for section, value in places:
        for k, v in value.items():
            key = "rope_type" if k == "type" else k  # transformers 4's name for the same setting
            where = k if section == k else f"{section}.{k}"
            if v is None:
                continue
            if key in merged and not _same_setting(merged[key], v):
                raise UnsupportedModelError(
                    f"{r.where}: {origin[key]} = {merged[key]!r} contradicts {where} = {v!r}; remove one"
                )
            merged.setdefault(key, v)
            origin.setdefault(key, where)
    theta = merged.get("rope_theta")
    theta = r.float("rope_theta", 10000.0) if theta is None else r.float(origin["rope_theta"], value=theta)
    rope_type = merged.get("rope_type", "default")
    if not isinstance(rope_type, str):
        r.fail(origin.get("rope_type", "rope_type"), "a string", rope_type)
    kwargs = {}
    for k in ("factor", "low_freq_factor", "high_freq_factor"):
        if merged.get(k) is not None:
            kwargs[k] = r.float(origin[k], value=merged[k])
    k = "original_max_position_embeddings"
    if merged.get(k) is not None:
        kwargs[k] = check_int(merged[k], origin[k], r.where, hi=INT_LIMITS[k])
    with r.naming_file():
        return RopeConfig(theta=theta, rope_type=rope_type, **kwargs)


def _same_setting(a, b) -> bool:
    """Two values of one setting agree: equal, numbers compared as numbers (10000 == 10000.0)."""
    if isinstance(a, numbers.Real) and isinstance(b, numbers.Real) and not isinstance(a, bool):
        return not isinstance(b, bool) and float(a) == float(b)
    return a == b


def read_json(path: str, what: str) -> dict:
    """Read a JSON file, turning absence or bad syntax into :class:`ModelLoadError`."""
    if not os.path.isfile(path):
        raise ModelLoadError(f"{what}: file not found: {path}")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{what}: cannot read {path}: {e}") from None


def load_model_config(model_dir: str) -> ModelConfig:
    """Read ``config.json`` (and ``generation_config.json``'s eos ids, if present) from a model directory."""
    if not os.path.isdir(model_dir):
        raise ModelLoadError(f"model directory not found: {model_dir}")
    config = ModelConfig.from_dict(read_json(os.path.join(model_dir, "config.json"), "model config"))
    gen_path = os.path.join(model_dir, "generation_config.json")
    if os.path.isfile(gen_path):
        reader = ConfigReader(read_json(gen_path, "generation config"), "generation_config.json")
        if reader.get("eos_token_id", None) is not None:
            config.eos_token_ids = reader.token_ids("eos_token_id", config.vocab_size)
    return config
