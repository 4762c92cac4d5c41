"""EAGLE draft heads in the three layouts serving engines load: read into the official form, written from it.

- ``official`` (SafeAILab EAGLE, this engine): a Llama-like ``config.json`` (+ ``draft_vocab_size``,
  ``target_hidden_size`` for EAGLE-3; ``bias``: the EAGLE-1/2 fc's); weights ``fc``, ``layers.0.*``
  (EAGLE-1/2) or ``midlayer.*`` + ``norm``, ``lm_head``, ``d2t``, ``t2d`` (EAGLE-3).
- ``sglang`` (SGLang; SpecForge exports it): the official layout with ``architectures``
  ``LlamaForCausalLMEagle3`` (EAGLE-3) or ``LlamaForCausalLMEagle`` (EAGLE-1/2, whose fc always has a bias),
  ``tie_word_embeddings: false``, optionally ``eagle_config.eagle_aux_hidden_state_layer_ids``.
- ``vllm`` (vLLM; the ``speculators`` library writes it, EAGLE-3 only): ``speculators_model_type: eagle3``,
  ``speculators_config`` (algorithm, proposal methods, verifier), the draft layer's Llama fields under
  ``transformer_layer_config``, ``draft_vocab_size``, ``norm_before_residual`` ...; ``layers.0.*`` for
  ``midlayer.*``, and no ``d2t``/``t2d`` when the draft vocabulary is the target's.

``d2t`` is an offset in every format (draft id ``i`` -> target id ``i + d2t[i]``, int64); ``t2d`` a bool mask
over the target vocabulary. Target layers feeding an EAGLE-3 head, in this engine's numbering (the residual
stream at the *input* of each layer, default ``(2, L // 2, L - 3)``): vLLM's
``eagle_aux_hidden_state_layer_ids`` use the same numbers; SGLang's name the layer whose *output* is taken
(one less). The README's "Draft head formats" section gives the sources.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch

from ..errors import CheckpointMismatchError, DraftMismatchError, ModelLoadError, UnsupportedModelError
from .config import ModelConfig, check_int, load_model_config, read_json
from .draft import eagle3_aux_layers
from .weights import WEIGHT_FILES, iter_checkpoint

FORMATS = ("official", "sglang", "vllm")
OFFICIAL_WEIGHT_FILES = ("pytorch_model.bin", "model.safetensors")  # the official loader tries .bin first
SGLANG_ARCHITECTURES = {"eagle1": "LlamaForCausalLMEagle", "eagle3": "LlamaForCausalLMEagle3"}
VLLM_ARCHITECTURE = "Eagle3Speculator"
WHERE = {
    "official": "draft head config.json",
    "sglang": "SGLang draft head config.json",
    "vllm": "vLLM (speculators) draft head config.json",
}
# transformers' LlamaConfig defaults: speculators saves transformer_layer_config as a diff against them
LLAMA_DEFAULTS = {
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "hidden_act": "silu",
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6,
}
# official config keys that are not the draft layer's own (kept out of vLLM's transformer_layer_config)
EAGLE_KEYS = ("architectures", "draft_vocab_size", "target_hidden_size", "bias", "qkv_bias")


@dataclass
class TargetInfo:
    """A head's target (``--base``): its name as given, its ``architectures`` and its parsed config."""

    name_or_path: str
    architectures: list
    config: ModelConfig

    @classmethod
    def from_dir(cls, model_dir: str) -> "TargetInfo":
        config = load_model_config(model_dir)  # names a missing directory or a bad config.json
        archs = read_json(os.path.join(model_dir, "config.json"), "model config").get("architectures") or []
        return cls(model_dir, list(archs), config)


@dataclass
class HeadFiles:
    """A head directory's ``config.json`` in the official form (``config``); :meth:`tensors` reads the weights
    under their official names. ``kind`` is None when only the weights tell it (the official format);
    ``aux_layers``: target layers the files pin, in this engine's convention (None: the defaults)."""

    directory: str
    fmt: str
    config: dict
    kind: str | None = None
    aux_layers: tuple[int, ...] | None = None
    verifier: dict | None = field(default=None, repr=False)

    @property
    def where(self) -> str:
        return f"{WHERE[self.fmt]} ({self.directory})"

    def tensors(self) -> dict[str, torch.Tensor]:
        """The weights under official names (CPU tensors, as stored). For the SGLang and vLLM formats, missing
        ``d2t``/``t2d`` are filled in as those engines read them (identity map; ``t2d`` from ``d2t``)."""
        if self.fmt == "official":
            return dict(iter_checkpoint(self.directory, OFFICIAL_WEIGHT_FILES))
        state = {}
        for name, tensor in iter_checkpoint(self.directory, WEIGHT_FILES):
            if self.fmt == "sglang":
                name = name.removeprefix("model.")  # SGLang adds the prefix when absent, takes it given
            elif name.startswith("layers."):
                if not name.startswith("layers.0."):
                    raise UnsupportedModelError(
                        f"{self.where}: weight {name}: the engine runs one-layer EAGLE-3 heads"
                    )
                name = "midlayer." + name.removeprefix("layers.0.")
            state[name] = tensor
        if self.kind == "eagle3":
            _fill_vocab_maps(state, self.config, self.where)
        elif self.kind == "eagle1" and "fc.bias" in state and not bool(state["fc.bias"].any()):
            # SGLang's EAGLE-1/2 fc always has a bias: a zero one stands for the official "bias": false
            del state["fc.bias"]
            self.config["bias"] = False
        return state


def detect_format(directory: str) -> str:
    """``official``, ``sglang`` or ``vllm``, from the directory's ``config.json``."""
    if not os.path.isdir(directory):
        raise ModelLoadError(f"draft head directory not found: {directory}")
    return config_format(read_json(os.path.join(directory, "config.json"), "draft head config"))


def config_format(raw) -> str:
    if not isinstance(raw, dict):
        return "official"  # the config checks name the problem
    if "speculators_model_type" in raw or "speculators_config" in raw:
        return "vllm"
    archs = raw.get("architectures")
    archs = archs if isinstance(archs, list) else []
    if "eagle_config" in raw or any(a in SGLANG_ARCHITECTURES.values() for a in archs):
        return "sglang"
    return "official"


def read_head(directory: str) -> HeadFiles:
    """Read a head directory's ``config.json`` in any of :data:`FORMATS` into the official form (no weights
    yet: :meth:`HeadFiles.tensors`). Raises :class:`ModelLoadError` for a missing directory or file and
    :class:`UnsupportedModelError` naming the field for a head the engine cannot run."""
    if not os.path.isdir(directory):
        raise ModelLoadError(f"draft head directory not found: {directory}")
    raw = read_json(os.path.join(directory, "config.json"), "draft head config")
    fmt = config_format(raw)
    if fmt == "official":
        return HeadFiles(directory, fmt, raw)
    files = HeadFiles(directory, fmt, {})
    (_read_sglang if fmt == "sglang" else _read_vllm)(files, raw)
    return files


def _fail(files: HeadFiles, name: str, why: str):
    raise UnsupportedModelError(f"{files.where}: field {name!r} {why}")


def _flag(files: HeadFiles, raw: dict, name: str, allowed: bool, what: str, default=None, section="") -> None:
    """Refuse ``raw[name]`` unless it is ``allowed`` (absent: ``default``, None meaning fine)."""
    value = raw.get(name, default)
    if value is None or value == allowed:
        return
    if not isinstance(value, bool):
        _fail(files, section + name, f"must be true or false, got {value!r}")
    _fail(files, section + name, f"is {json.dumps(value)}: {what}, which this engine's heads do not have")


def _llama_fields(raw: dict) -> dict:
    """``raw`` with transformers' LlamaConfig defaults for absent fields, as SGLang and vLLM read it."""
    fields = {**LLAMA_DEFAULTS, **{k: v for k, v in raw.items() if v is not None}}
    if "rope_theta" not in fields and "rope_parameters" not in fields:
        fields["rope_theta"] = 10000.0  # LlamaConfig's (an absent official field means the target's)
    return fields


def _layer_ids(files: HeadFiles, name: str, value) -> list[int]:
    if not isinstance(value, list) or len(value) != 3:
        _fail(files, name, f"must list three target layers, got {value!r}")
    return [check_int(v, name, files.where, lo=0) for v in value]


def _read_sglang(files: HeadFiles, raw: dict) -> None:
    archs = raw.get("architectures") if isinstance(raw.get("architectures"), list) else []
    files.kind = "eagle1" if SGLANG_ARCHITECTURES["eagle1"] in archs else "eagle3"
    raw = _llama_fields(raw)
    if raw["num_hidden_layers"] != 1:
        _fail(files, "num_hidden_layers", f"is {raw['num_hidden_layers']!r}: the engine runs one-layer heads")
    # SGLang gives q/k/v/o biases for "attention_bias" or "bias" (EAGLE-1/2; its fc always has a bias)
    _flag(files, raw, "attention_bias", False, "attention biases")
    _flag(files, raw, "qkv_bias", False, "q/k/v biases")
    if files.kind == "eagle1":
        _flag(files, raw, "bias", False, "attention biases (SGLang reads 'bias' as such)")
    else:
        _flag(files, raw, "bias", False, "fc and o_proj biases (SGLang reads 'bias' as both)")
        _flag(files, raw, "tie_word_embeddings", False, "an lm_head tied to the embedding")
        _flag(files, raw, "fc_norm", False, "norms over each target feature before fc")
        _flag(files, raw, "norm_output", True, "logits of the un-normed hidden state")
        if raw.get("draft_vocab_size") is None:
            _fail(files, "draft_vocab_size", "is missing: SGLang then takes the lm_head from the target")
        eagle = raw.get("eagle_config") or {}
        if not isinstance(eagle, dict):
            _fail(files, "eagle_config", f"must be an object, got {eagle!r}")
        if eagle.get("use_aux_hidden_state", True) is not True:
            _fail(files, "eagle_config.use_aux_hidden_state", "is not true: EAGLE-3 heads read three layers")
        ids = eagle.get("eagle_aux_hidden_state_layer_ids")
        if ids is not None:  # SGLang's ids name the layer whose output is taken: the input of the next one
            name = "eagle_config.eagle_aux_hidden_state_layer_ids"
            files.aux_layers = tuple(i + 1 for i in _layer_ids(files, name, ids))
    drop = ("eagle_config", "tie_word_embeddings", "fc_norm", "norm_output", "attention_bias")
    files.config = {k: v for k, v in raw.items() if k not in drop}
    files.config["architectures"] = ["LlamaForCausalLM"]
    if files.kind == "eagle1":
        files.config["bias"] = True  # the fc's (tensors() notes an all-zero one as absent)


def _read_vllm(files: HeadFiles, raw: dict) -> None:
    files.kind = "eagle3"
    kind = raw.get("speculators_model_type")
    if kind != "eagle3":
        _fail(files, "speculators_model_type", f"is {kind!r}: the engine loads 'eagle3' speculators")
    spec = raw.get("speculators_config")
    if not isinstance(spec, dict):
        _fail(files, "speculators_config", f"must be an object, got {spec!r}")
    verifier = spec.get("verifier")
    files.verifier = dict(verifier) if isinstance(verifier, dict) else None
    tlc = raw.get("transformer_layer_config")
    if not isinstance(tlc, dict):
        _fail(files, "transformer_layer_config", f"must be an object, got {tlc!r}")
    if tlc.get("model_type") != "llama":
        name = "transformer_layer_config.model_type"
        _fail(files, name, f"is {tlc.get('model_type')!r}: the engine runs llama layers")
    layer = _llama_fields(tlc)
    if layer["num_hidden_layers"] != 1:
        _fail(files, "transformer_layer_config.num_hidden_layers",
              f"is {layer['num_hidden_layers']!r}: the engine runs one-layer heads")  # fmt: skip
    for name, what in (("attention_bias", "attention biases"), ("mlp_bias", "MLP biases")):
        _flag(files, layer, name, False, what, section="transformer_layer_config.")
    _flag(files, layer, "bias", False, "biases", section="transformer_layer_config.")
    # vLLM reads an absent norm_before_residual as true: the residual is then the normed feature
    _flag(files, raw, "norm_before_residual", False, "a residual taken after hidden_norm", default=True)
    _flag(files, raw, "norm_before_fc", False, "a norm over the target features before fc")
    _flag(files, raw, "fc_norm", False, "norms over each target feature before fc")
    _flag(files, raw, "norm_output", False, "normed hidden states fed back between draft steps")
    ids = raw.get("eagle_aux_hidden_state_layer_ids")
    if ids is not None:
        files.aux_layers = tuple(_layer_ids(files, "eagle_aux_hidden_state_layer_ids", ids))
    drop = ("attention_bias", "mlp_bias", "bias", "tie_word_embeddings", "architectures", "model_type")
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}
    config.update({k: v for k, v in layer.items() if k not in drop})
    config["qkv_bias"] = False
    # vLLM: an absent draft_vocab_size means the target's vocabulary
    config["draft_vocab_size"] = raw.get("draft_vocab_size") or layer["vocab_size"]
    if raw.get("target_hidden_size") is not None:
        config["target_hidden_size"] = raw["target_hidden_size"]
    files.config = config


def _fill_vocab_maps(state: dict, config: dict, where: str) -> None:
    """SGLang and vLLM read only ``d2t`` (absent: identity) and speculators omits both maps when the draft
    vocabulary is the target's: give the official head both."""
    vocab = config.get("vocab_size")
    if "d2t" not in state:
        lm_head = state.get("lm_head.weight")
        draft = lm_head.shape[0] if lm_head is not None else config.get("draft_vocab_size")
        if draft is None or draft != vocab:
            raise CheckpointMismatchError(
                f"{where}: no d2t, yet the draft vocabulary ({draft}) is not the target's ({vocab})"
            )
        state["d2t"] = torch.zeros(draft, dtype=torch.long)
    if "t2d" not in state and isinstance(vocab, int):
        ids = torch.arange(state["d2t"].numel()) + state["d2t"].long()
        if bool((ids < 0).any() or (ids >= vocab).any()):
            raise CheckpointMismatchError(f"{where}: d2t maps draft ids outside the vocabulary of {vocab}")
        t2d = torch.zeros(vocab, dtype=torch.bool)
        t2d[ids] = True
        state["t2d"] = t2d


def check_aux_layers(recorded, num_target_layers: int, where: str) -> None:
    """Raise :class:`DraftMismatchError` when a head pins target layers other than the engine's."""
    expected = eagle3_aux_layers(num_target_layers)
    if recorded is not None and tuple(recorded) != expected:
        raise DraftMismatchError(
            f"{where} pins the target layers feeding the head to {list(recorded)} (their inputs, as vLLM "
            f"numbers them); this engine feeds EAGLE-3 heads layers {list(expected)} (2, L//2, L-3 of the "
            f"target's {num_target_layers})"
        )


# ------------------------------------------------------------------------------------------------ writing


def write_head(
    directory: str,
    fmt: str,
    config: dict,
    tensors: dict[str, torch.Tensor],
    *,
    kind: str,
    aux_layers: tuple[int, ...] | None = None,
    verifier: dict | None = None,
    target: TargetInfo | None = None,
) -> str:
    """Write a head given in the official form (``config`` + ``tensors`` under official names) to
    ``directory`` as ``config.json`` + ``model.safetensors`` in format ``fmt``.

    ``aux_layers``: target layers the head was trained on, when pinned (this engine's convention; None: the
    defaults). ``target`` (optional): the target's identity and shapes, recorded where the format has room
    (vLLM's verifier, pinned layer ids) and used to check pinned layers. ``verifier``: a vLLM verifier entry
    to keep when no ``target`` is given. Raises :class:`UnsupportedModelError` for a head the format cannot
    express, :class:`DraftMismatchError` for pinned layers the official format cannot record.
    """
    if fmt not in FORMATS:
        raise UnsupportedModelError(f"unknown head format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if kind == "eagle1":
        aux_layers = None
    elif (
        aux_layers is not None
        and target is not None
        and tuple(aux_layers) == eagle3_aux_layers(target.config.num_hidden_layers)
    ):
        aux_layers = None  # the defaults: every format means them when it names none
    config = dict(config)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    for name, dtype in (("d2t", torch.long), ("t2d", torch.bool)):
        if name in tensors:
            tensors[name] = tensors[name].to(dtype)
    if fmt != "official":
        if config.get("qkv_bias"):
            raise UnsupportedModelError(f"a head with q/k/v biases cannot be written for {_engine(fmt)}")
        _fill_target_fields(config, tensors, target)
    if fmt == "official":
        if aux_layers is not None:
            if target is None:
                raise UnsupportedModelError(
                    f"the head pins target layers {list(aux_layers)} (their inputs) and the official format "
                    "cannot record them: pass --base TARGET to check they are this engine's defaults "
                    "(2, L//2, L-3)"
                )
            check_aux_layers(aux_layers, target.config.num_hidden_layers, "the head's config.json")
    elif fmt == "sglang":
        config, tensors = _to_sglang(config, tensors, kind, aux_layers)
    else:
        config, tensors = _to_vllm(config, tensors, kind, aux_layers, verifier, target)
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")
    save_file(tensors, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    return directory


def _fill_target_fields(config: dict, tensors: dict, target: TargetInfo | None) -> None:
    """Fields an official config may leave to the target, which SGLang and vLLM would read as LlamaConfig's
    defaults instead: written out (from ``target``, or the tensors' shapes)."""
    if config.get("vocab_size") is None:
        for name in ("t2d", "embed_tokens.weight"):
            if name in tensors:
                config["vocab_size"] = tensors[name].shape[0]
        if target is not None:
            config["vocab_size"] = target.config.vocab_size
        if config.get("vocab_size") is None:
            raise UnsupportedModelError(
                "the head's config.json has no vocab_size (this engine takes the target's): "
                "pass --base TARGET"
            )
    if config.get("rope_theta") is None and config.get("rope_parameters") is None:
        if target is None:
            raise UnsupportedModelError(
                "the head's config.json has no rope_theta (this engine takes the target's): "
                "pass --base TARGET"
            )
        config["rope_theta"] = target.config.rope.theta
    if config.get("max_position_embeddings") is None and target is not None:
        config["max_position_embeddings"] = target.config.max_position_embeddings


def _engine(fmt: str) -> str:
    return {"sglang": "SGLang", "vllm": "vLLM"}.get(fmt, fmt)


def _to_sglang(config: dict, tensors: dict, kind: str, aux_layers):
    config["architectures"] = [SGLANG_ARCHITECTURES[kind]]
    config["tie_word_embeddings"] = False  # SGLang ties lm_head to the embedding otherwise
    if kind == "eagle1":
        # SGLang reads "bias" as attention biases; its fc always has one (zero stands for none)
        if "fc.bias" not in tensors:
            fc = tensors["fc.weight"]
            tensors["fc.bias"] = torch.zeros(fc.shape[0], dtype=fc.dtype)
        config["bias"] = False
        return config, tensors
    config.setdefault("draft_vocab_size", tensors["lm_head.weight"].shape[0])
    if aux_layers is not None:
        if min(aux_layers) < 1:
            raise UnsupportedModelError(
                f"SGLang cannot express the target layers {list(aux_layers)}: it names the layer whose "
                "output is taken, and layer 0's input is the embedding"
            )
        ids = [i - 1 for i in aux_layers]
        config["eagle_config"] = {"eagle_aux_hidden_state_layer_ids": ids, "use_aux_hidden_state": True}
    return config, tensors


def _to_vllm(config: dict, tensors: dict, kind: str, aux_layers, verifier, target):
    if kind != "eagle3":
        raise UnsupportedModelError(
            "the vLLM (speculators) format exists for EAGLE-3 heads only: vLLM's 'eagle' method reads "
            "EAGLE-1/2 heads in the official format (--to official)"
        )
    layer = {k: v for k, v in config.items() if k not in EAGLE_KEYS}
    layer.update(model_type="llama", num_hidden_layers=1, attention_bias=False, mlp_bias=False)
    layer["tie_word_embeddings"] = False
    if aux_layers is None and target is not None:
        aux_layers = eagle3_aux_layers(target.config.num_hidden_layers)  # pinned: speculators warns otherwise
    if target is not None:
        verifier = {"name_or_path": target.name_or_path, "architectures": target.architectures}
    verifier = verifier or {"name_or_path": None, "architectures": []}
    draft_vocab = tensors["lm_head.weight"].shape[0]
    out = {
        "architectures": [VLLM_ARCHITECTURE],
        "speculators_model_type": "eagle3",
        "speculators_config": {
            "algorithm": "eagle3",
            "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": 3}],
            "default_proposal_method": "greedy",
            "verifier": verifier,
        },
        "transformer_layer_config": layer,
        "draft_vocab_size": draft_vocab,
        "target_hidden_size": config.get("target_hidden_size"),
        "norm_before_residual": False,
        "norm_before_fc": False,
        "fc_norm": False,
        "norm_output": False,
        "eagle_aux_hidden_state_layer_ids": None if aux_layers is None else list(aux_layers),
    }
    renamed = {}
    for name, tensor in tensors.items():
        if name.startswith("midlayer."):
            name = "layers.0." + name.removeprefix("midlayer.")
        renamed[name] = tensor
    d2t, t2d = renamed.get("d2t"), renamed.get("t2d")
    if d2t is not None and t2d is not None and draft_vocab == t2d.numel():
        if not bool(d2t.any()) and bool(t2d.all()):
            del renamed["d2t"], renamed["t2d"]  # as speculators saves a head without a reduced vocabulary
    return out, renamed
