"""Loading (and saving) of models: Hugging Face targets; EAGLE and Medusa heads in their official formats."""

from __future__ import annotations

import json
import os

import torch

from ..errors import CheckpointMismatchError, DraftMismatchError, ModelLoadError
from .config import load_model_config
from .draft import Eagle1Head, Eagle3Head, _DraftHead, build_head, check_head_config, head_lm_head
from .head_formats import check_aux_layers, read_head
from .llama import LlamaModel, rotary_table
from .medusa import MedusaHeads, is_medusa_dir, load_medusa, save_medusa
from .parallel import TensorParallel, whole_vocab_weight
from .weights import iter_checkpoint, load_into, resolve_dtype


def load_target(
    model_dir: str,
    *,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = torch.float32,
    tp: TensorParallel | None = None,
) -> LlamaModel:
    """Load ``config.json`` + weights (safetensors, sharded safetensors or ``pytorch_model.bin``); with
    tensor parallelism ``tp``, only this rank's shard (see :mod:`.parallel`).

    Raises :class:`~eagle_engine.errors.ModelLoadError`, ``UnsupportedModelError`` or
    ``CheckpointMismatchError`` with a message naming the problem; never runs checkpoint code.
    """
    config = load_model_config(model_dir)
    dtype = resolve_dtype(dtype)
    with torch.device("meta"):
        model = LlamaModel(config, tp)
    model = model.to_empty(device=device).to(dtype)

    def ignore(name: str) -> bool:
        # Rotary frequencies are computed, not loaded; a tied checkpoint may still carry its lm_head copy.
        return name.endswith("rotary_emb.inv_freq") or (
            config.tie_word_embeddings and name == "lm_head.weight"
        )

    shard = None if tp is None else tp.shard_index
    load_into(model, iter_checkpoint(model_dir, shard=shard), ignore=ignore, optional=("cos_sin",))
    model.init_rotary(device)
    return model.eval().requires_grad_(False)



OUTPUT_LAYERS = ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")


def load_output_layers(model_dir: str, *, device="cpu", dtype=torch.float32) -> LlamaModel:
    """The target with only its embedding, final norm and output projection loaded (its decoder layers stay
    on the meta device: no memory, and any use of them fails loudly). Enough to start, train and save a
    head from cached features."""
    config = load_model_config(model_dir)
    dtype = resolve_dtype(dtype)
    with torch.device("meta"):
        model = LlamaModel(config)
    own = dict(model.named_parameters())
    wanted = [n for n in OUTPUT_LAYERS if n in own]
    for name in wanted:
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        setattr(
            module,
            attr,
            torch.nn.Parameter(torch.empty(own[name].shape, device=device, dtype=dtype), requires_grad=False),
        )

    def only_wanted(name, shape):
        return None if name in wanted else tuple(slice(0, 0) for _ in shape)

    found = set()
    for name, tensor in iter_checkpoint(model_dir, shard=only_wanted):
        if name in wanted:
            with torch.no_grad():
                model.get_parameter(name).copy_(tensor.to(dtype))
            found.add(name)
    missing = set(wanted) - found
    if missing:
        raise CheckpointMismatchError(f"{model_dir}: the checkpoint lacks {', '.join(sorted(missing))}")
    return model.eval()



def detect_kind(keys: set[str], raw: dict) -> str:
    """``"eagle3"`` when the checkpoint has ``midlayer.*`` keys (or a draft vocabulary), else ``"eagle1"``."""
    if any(k.startswith("midlayer.") for k in keys) or "draft_vocab_size" in raw:
        return "eagle3"
    if any(k.startswith("layers.0.") for k in keys):
        return "eagle1"
    raise ModelLoadError("not an EAGLE head: no layers.0.* (EAGLE-1/2) or midlayer.* (EAGLE-3) weights")


def load_draft(draft_dir: str, target: LlamaModel, *, device=None, dtype=None) -> _DraftHead | MedusaHeads:
    """Load an official-format EAGLE head (``config.json`` + ``pytorch_model.bin`` or ``model.safetensors``),
    one in SGLang's or vLLM's (speculators) format (:mod:`.head_formats`, told apart by ``config.json``), or
    Medusa heads when the directory is one (:func:`~.medusa.is_medusa_dir`: :func:`~.medusa.load_medusa`).

    The kind is told apart by keys; the embedding (and for EAGLE-1/2 the lm_head) come from the target when
    the head has none. Raises :class:`DraftMismatchError` naming both sizes when it does not fit the target.
    """
    if not os.path.isdir(draft_dir):
        raise ModelLoadError(f"draft head directory not found: {draft_dir}")
    if is_medusa_dir(draft_dir):
        return load_medusa(draft_dir, target, device=device, dtype=dtype)
    files = read_head(draft_dir)  # the official config as is; SGLang's and vLLM's read into its form
    raw = files.config
    check_head_config(raw, target.config)  # every field, before the weights are read
    tensors = files.tensors()
    kind = files.kind or detect_kind(set(tensors), raw)
    if kind == "eagle3":  # a head trained on other target layers than the engine feeds it is refused
        check_aux_layers(files.aux_layers, target.config.num_hidden_layers, files.where)
    emb = whole_vocab_weight(target.model.embed_tokens.weight, target.tp)  # the head holds it whole
    device = emb.device if device is None else device
    dtype = emb.dtype if dtype is None else dtype
    with torch.device("meta"):
        head = build_head(kind, raw, target, set(tensors))
    head = head.to_empty(device=device).to(dtype)
    for name in ("d2t", "t2d"):  # integer/bool buffers keep their dtypes
        if hasattr(head, name):
            setattr(head, name, getattr(head, name).to(torch.long if name == "d2t" else torch.bool))
    optional = {"cos_sin"}
    if "embed_tokens.weight" not in tensors:
        if emb.shape != head.embed_tokens.weight.shape:
            raise DraftMismatchError(
                f"draft head embedding {tuple(head.embed_tokens.weight.shape)} does not fit "
                f"the target's {tuple(emb.shape)}"
            )
        head.embed_tokens.weight.data = emb.data
        head.owns_embedding = False
        optional.add("embed_tokens.weight")
    load_into(
        head, iter(tensors.items()), ignore=lambda k: k.endswith("rotary_emb.inv_freq"), optional=optional
    )
    if kind == "eagle1":
        head.lm_head_weight = head_lm_head(target, emb)
    else:
        check_vocab_maps(head, target.config.vocab_size)
    head.cos_sin = rotary_table(head.config, device)
    return head.eval().requires_grad_(False)


def check_vocab_maps(head: Eagle3Head, target_vocab: int) -> None:
    mapped = torch.arange(head.d2t.numel(), device=head.d2t.device) + head.d2t
    if bool((mapped < 0).any() or (mapped >= target_vocab).any()):
        raise DraftMismatchError(
            f"EAGLE-3 d2t maps draft ids outside the target vocabulary of {target_vocab}"
        )


def save_draft(head: _DraftHead | MedusaHeads, directory: str, fmt: str = "safetensors") -> str:
    """Write ``config.json`` and ``model.safetensors`` (or ``pytorch_model.bin``) in the official format;
    Medusa heads in theirs (:func:`~.medusa.save_medusa`; ``"bin"`` means ``medusa_lm_head.pt``)."""
    if getattr(head, "kind", "") == "medusa":
        return save_medusa(head, directory, "pt" if fmt == "bin" else fmt)
    os.makedirs(directory, exist_ok=True)
    cfg = head.config
    raw = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": 1,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope.theta,
        "max_position_embeddings": cfg.max_position_embeddings,
        "vocab_size": head.embed_tokens.num_embeddings,
        "qkv_bias": cfg.attention_bias,
    }
    if cfg.rope.rope_type != "default":
        raw["rope_scaling"] = {
            "rope_type": cfg.rope.rope_type,
            "factor": cfg.rope.factor,
            "low_freq_factor": cfg.rope.low_freq_factor,
            "high_freq_factor": cfg.rope.high_freq_factor,
            "original_max_position_embeddings": cfg.rope.original_max_position_embeddings,
        }
    if isinstance(head, Eagle1Head):
        raw["bias"] = head.fc.bias is not None
    else:
        raw["draft_vocab_size"] = head.lm_head.out_features
        raw["target_hidden_size"] = head.fc.in_features // 3
    state = {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
    if not head.owns_embedding:
        state.pop("embed_tokens.weight")
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(raw, f, indent=2)
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(state, os.path.join(directory, "model.safetensors"))
    elif fmt == "bin":
        torch.save(state, os.path.join(directory, "pytorch_model.bin"))
    else:
        raise ValueError(f"unknown format {fmt!r}: use 'safetensors' or 'bin'")
    return directory
