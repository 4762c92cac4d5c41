"""EAGLE draft heads in the official checkpoint format: EAGLE-1/2 (``fc`` + ``layers.0``) and EAGLE-3
(``fc`` + ``midlayer`` + own ``norm``/``lm_head`` over a draft vocabulary with ``d2t``/``t2d``).

Both heads expose one interface to the engine:
- ``target_features(out)``: the H-wide features a head consumes, from a target :class:`ForwardOutput`;
- ``step(tokens, features, positions, cache, tree_mask, tree_len)``: one draft forward over the head's own
  :class:`KVCache`; row ``i`` pairs the feature of position ``p`` with the token at ``p + 1``;
- ``topk(hidden, k)``: top-k log-probabilities and *target* token ids of the next token.
"""

from __future__ import annotations

import torch
from torch import nn

import eagle_kernels as ops

from ..errors import DraftMismatchError
from ..kv_cache import KVCache, PoolShape
from .config import ConfigReader, ModelConfig
from .llama import MLP, Attention, LlamaModel, RMSNorm, rotary_table
from .parallel import whole_vocab_weight

HEAD_CONFIG = "draft head config.json"


def head_config(raw: dict, target: ModelConfig) -> ModelConfig:
    """The head's attention/MLP shapes as a one-layer Llama config (absent fields: the target's)."""
    fields = dict(ConfigReader(raw, HEAD_CONFIG).cfg)
    fields.pop("eos_token_id", None)  # unused by a head (EAGLE-3 configs may list target ids)
    fields["model_type"] = "llama"
    fields["num_hidden_layers"] = 1
    fields.setdefault("vocab_size", target.vocab_size)
    fields.setdefault("max_position_embeddings", target.max_position_embeddings)
    if "rope_theta" not in fields and "rope_parameters" not in fields:
        fields["rope_parameters"] = {"rope_type": "default", "rope_theta": target.rope.theta}
    cfg = ModelConfig.from_dict(fields, HEAD_CONFIG)
    cfg.attention_bias = ConfigReader(raw, HEAD_CONFIG).flag("qkv_bias")
    cfg.o_proj_bias = cfg.mlp_bias = False
    # The draft must reach as far as the target does.
    cfg.max_position_embeddings = max(cfg.max_position_embeddings, target.max_length)
    cfg.sliding_window = None
    return cfg


def eagle3_aux_layers(num_target_layers: int) -> tuple[int, ...]:
    """The target layers whose input residual streams feed an EAGLE-3 head: ``(2, L // 2, L - 3)``, as the
    official code, SGLang and vLLM take them by default."""
    return (2, num_target_layers // 2, num_target_layers - 3)


class _DraftHead(nn.Module):
    kind = ""

    def __init__(self, cfg: ModelConfig, vocab_size: int):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(vocab_size, cfg.hidden_size)
        self.owns_embedding = True  # False when taken from the target: then it is not saved
        self.register_buffer("cos_sin", torch.empty(0), persistent=False)

    def allocate_cache(self, batch: int, capacity: int, pool: PoolShape | None = None) -> KVCache:
        """As :meth:`LlamaModel.allocate_cache`: the head's one layer (contiguous, or paged as ``pool``)."""
        w, cfg = self.embed_tokens.weight, self.config
        return KVCache.allocate(1, batch, cfg.num_key_value_heads, capacity, cfg.head_dim, dtype=w.dtype,
                                device=w.device, **({} if pool is None else pool.kwargs()))

    def aux_layers(self, num_target_layers: int) -> tuple[int, ...]:
        return ()

    def ensure_positions(self, num_positions: int) -> None:
        """Grow the rotary table to cover positions ``< num_positions`` (a no-op when it does)."""
        if self.cos_sin.shape[0] < num_positions:
            self.cos_sin = rotary_table(self.config, self.cos_sin.device, num_positions)

    def fuse(self) -> None:
        """Fused projections for inference (idempotent); the head's parameters keep their names."""
        for module in self.modules():
            if isinstance(module, (Attention, MLP)):
                module.fuse()

    def _attend(self, attn: Attention, x, positions, cache: KVCache, tree_mask, tree_len):
        return attn(
            x, positions, self.cos_sin, *cache.layer(0), cache.lengths, cache.block_table, tree_mask, tree_len
        )


class Eagle1Head(_DraftHead):
    """EAGLE-1/2: ``fc(cat(embed, feature))`` -> decoder layer without input norm; logits by the target's
    ``lm_head`` (handed in at load time as ``lm_head_weight``)."""

    kind = "eagle1"

    def __init__(self, cfg: ModelConfig, fc_bias: bool = True):
        super().__init__(cfg, cfg.vocab_size)
        h = cfg.hidden_size
        self.fc = nn.Linear(2 * h, h, bias=fc_bias)
        layer = nn.Module()
        layer.self_attn = Attention(cfg)
        layer.post_attention_layernorm = RMSNorm(h, cfg.rms_norm_eps)
        layer.mlp = MLP(h, cfg.intermediate_size, False)
        self.layers = nn.ModuleList([layer])
        self.lm_head_weight: torch.Tensor | None = None
        self.draft_token_ids: torch.Tensor | None = None  # [Vd] target ids of a reduced draft vocabulary

    def target_features(self, out) -> torch.Tensor:
        return out.hidden

    def step(self, tokens, features, positions, cache, tree_mask=None, tree_len=None) -> torch.Tensor:
        b, t = tokens.shape
        h = self.config.hidden_size
        x = ops.draft_fc(
            tokens.reshape(-1),
            self.embed_tokens.weight,
            features.reshape(b * t, h),
            self.fc.weight,
            self.fc.bias,
        ).view(b, t, h)
        layer = self.layers[0]
        attn = self._attend(layer.self_attn, x, positions, cache, tree_mask, tree_len)
        norm = layer.post_attention_layernorm
        y, residual = ops.add_rms_norm(attn, x, norm.weight, norm.eps)
        return layer.mlp(y) + residual

    def topk(self, hidden: torch.Tensor, k: int):
        """``[..., H]`` -> top-k ``(logprobs [..., k], target token ids [..., k])`` (over the reduced draft
        vocabulary when :meth:`reduce_vocab` made one)."""
        logprobs, ids = ops.lm_head_topk(hidden.reshape(-1, hidden.shape[-1]), self.lm_head_weight, k)
        if self.draft_token_ids is not None:
            ids = self.draft_token_ids[ids]
        return logprobs.view(*hidden.shape[:-1], k), ids.view(*hidden.shape[:-1], k)

    def reduce_vocab(self, token_ids: torch.Tensor) -> None:
        """Rank drafts over the target ids ``token_ids`` (long ``[Vd]``, unique) only: the head keeps its own
        ``[Vd, H]`` copy of those rows of the target's lm_head, so each draft level reads ``Vd / V`` of
        the weight. Lossless whatever the ids: the target verifies every draft. Inference only (a trained
        head stays whole); applied once, to a head that ranks over the whole vocabulary."""
        if self.draft_token_ids is not None:
            raise DraftMismatchError("this head's draft vocabulary is already reduced")
        ids = token_ids.to(self.lm_head_weight.device, torch.long)
        vocab = self.lm_head_weight.shape[0]
        if ids.dim() != 1 or ids.numel() == 0 or ids.unique().numel() != ids.numel():
            raise DraftMismatchError(f"a draft vocabulary is unique token ids [Vd], got {tuple(ids.shape)}")
        if bool((ids < 0).any() or (ids >= vocab).any()):
            raise DraftMismatchError(f"draft vocabulary ids outside the target's {vocab}-token vocabulary")
        self.lm_head_weight = self.lm_head_weight[ids].contiguous()
        self.draft_token_ids = ids


class Eagle3Head(_DraftHead):
    """EAGLE-3: ``fc`` maps three target layers' features to H; the mid layer attends over
    ``cat(input_layernorm(embed), hidden_norm(h))``; logits ``lm_head(norm(h))`` over a draft vocabulary."""

    kind = "eagle3"

    def __init__(self, cfg: ModelConfig, target_vocab: int, draft_vocab: int, target_hidden: int):
        super().__init__(cfg, target_vocab)
        h = cfg.hidden_size
        self.fc = nn.Linear(3 * target_hidden, h, bias=False)
        mid = nn.Module()
        mid.input_layernorm = RMSNorm(h, cfg.rms_norm_eps)
        mid.hidden_norm = RMSNorm(h, cfg.rms_norm_eps)
        mid.post_attention_layernorm = RMSNorm(h, cfg.rms_norm_eps)
        mid.self_attn = Attention(cfg, in_features=2 * h)
        mid.mlp = MLP(h, cfg.intermediate_size, False)
        self.midlayer = mid
        self.norm = RMSNorm(h, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(h, draft_vocab, bias=False)
        self.register_buffer("d2t", torch.zeros(draft_vocab, dtype=torch.long))
        self.register_buffer("t2d", torch.zeros(target_vocab, dtype=torch.bool))

    def aux_layers(self, num_target_layers: int) -> tuple[int, ...]:
        return eagle3_aux_layers(num_target_layers)

    def target_features(self, out) -> torch.Tensor:
        return self.fc(out.aux)

    def step(self, tokens, features, positions, cache, tree_mask=None, tree_len=None) -> torch.Tensor:
        mid = self.midlayer
        x = torch.cat([mid.input_layernorm(self.embed_tokens(tokens)), mid.hidden_norm(features)], -1)
        attn = self._attend(mid.self_attn, x, positions, cache, tree_mask, tree_len)
        norm = mid.post_attention_layernorm
        y, residual = ops.add_rms_norm(attn, features, norm.weight, norm.eps)
        return mid.mlp(y) + residual

    def topk(self, hidden: torch.Tensor, k: int):
        """``[..., H]`` -> top-k ``(logprobs [..., k], target token ids [..., k])`` over the draft vocab."""
        flat = self.norm(hidden).reshape(-1, hidden.shape[-1])
        logprobs, draft_ids = ops.lm_head_topk(flat, self.lm_head.weight, k)
        target_ids = draft_ids + self.d2t[draft_ids]
        return logprobs.view(*hidden.shape[:-1], k), target_ids.view(*hidden.shape[:-1], k)

    def set_draft_vocab(self, token_ids: torch.Tensor) -> None:
        """Make the draft vocabulary the target ids ``token_ids`` (long ``[Vd]``, ascending, unique): draft id
        ``i`` is ``token_ids[i]`` (``d2t[i] = token_ids[i] - i``: the official offsets); ``t2d`` marks
        them."""
        ids = token_ids.to(self.d2t.device, torch.long)
        if ids.shape != self.d2t.shape or bool((ids[1:] <= ids[:-1]).any()):
            raise DraftMismatchError(
                f"a draft vocabulary needs {self.d2t.numel()} ascending unique token ids, got "
                f"{tuple(ids.shape)}"
            )
        self.d2t.copy_(ids - torch.arange(ids.numel(), device=ids.device))
        self.t2d.zero_()
        self.t2d[ids] = True


def check_head_config(raw: dict, target: ModelConfig) -> ModelConfig:
    """Type- and range-check every field of a head's ``config.json`` (any kind) before its weights are read;
    returns the head's model config. Errors are :class:`UnsupportedModelError` naming the file and field."""
    cfg = head_config(raw, target)
    reader = ConfigReader(raw, HEAD_CONFIG)
    reader.flag("bias", True)
    reader.int("target_hidden_size", target.hidden_size)
    reader.int("draft_vocab_size", cfg.vocab_size)
    return cfg


def build_head(kind: str, raw: dict, target: LlamaModel, state_keys: set[str] | None = None) -> _DraftHead:
    """An empty head of ``kind`` shaped by the head config ``raw`` and checked against ``target``."""
    tcfg = target.config
    cfg = check_head_config(raw, tcfg)
    reader = ConfigReader(raw, HEAD_CONFIG)
    has_embedding = state_keys is not None and "embed_tokens.weight" in state_keys
    if cfg.hidden_size != tcfg.hidden_size and not (kind == "eagle3" and has_embedding):
        raise DraftMismatchError(
            f"draft head hidden_size {cfg.hidden_size} does not fit the target's "
            f"hidden_size {tcfg.hidden_size}"
        )
    if kind == "eagle1":
        if cfg.vocab_size != tcfg.vocab_size:
            raise DraftMismatchError(
                f"draft head vocab_size {cfg.vocab_size} does not fit the target's "
                f"vocab_size {tcfg.vocab_size}"
            )
        return Eagle1Head(cfg, fc_bias=reader.flag("bias", True))
    if tcfg.num_hidden_layers < 3:
        raise DraftMismatchError(
            f"an EAGLE-3 head needs a target of >= 3 layers, got {tcfg.num_hidden_layers}"
        )
    target_hidden = reader.int("target_hidden_size", tcfg.hidden_size)
    if target_hidden != tcfg.hidden_size:
        raise DraftMismatchError(
            f"EAGLE-3 head target_hidden_size {target_hidden} does not fit the target's "
            f"hidden_size {tcfg.hidden_size}"
        )
    draft_vocab = reader.int("draft_vocab_size", reader.int("vocab_size", tcfg.vocab_size))
    return Eagle3Head(cfg, tcfg.vocab_size, draft_vocab, target_hidden)


def head_lm_head(target: LlamaModel, whole_embedding: torch.Tensor) -> torch.Tensor:
    """The lm_head an EAGLE-1/2 head ranks its drafts with: the target's own (shared, not owned), or under
    tensor parallelism a whole copy gathered once from the vocabulary shards (the embedding when tied), so
    the head runs unchanged and identically on every rank. Cost per rank: ``V x H`` elements for the
    embedding the head holds whole, plus ``V x H`` for an untied lm_head."""
    if target.tp is None:
        return target.lm_head_weight.detach()
    if target.config.tie_word_embeddings:
        return whole_embedding
    return whole_vocab_weight(target.lm_head_weight.detach(), target.tp)


def init_random_head(
    kind: str,
    target: LlamaModel,
    *,
    seed: int = 0,
    std: float = 0.02,
    draft_vocab: int | None = None,
    intermediate_size: int | None = None,
) -> _DraftHead:
    """A randomly initialised head shaped for ``target`` (tests, benchmarks, the start of training).

    EAGLE-3 heads get the identity vocabulary map onto the first ``draft_vocab`` target ids (``d2t = 0``;
    a trained head would map its most frequent tokens instead).
    """
    tcfg = target.config
    raw = {
        "hidden_size": tcfg.hidden_size,
        "intermediate_size": intermediate_size or tcfg.intermediate_size,
        "num_attention_heads": tcfg.num_attention_heads,
        "num_key_value_heads": tcfg.num_key_value_heads,
        "head_dim": tcfg.hidden_size // tcfg.num_attention_heads,
        "rms_norm_eps": tcfg.rms_norm_eps,
        "rope_theta": tcfg.rope.theta,
        "max_position_embeddings": tcfg.max_position_embeddings,
        "vocab_size": tcfg.vocab_size,
        "bias": True,
    }
    if kind == "eagle3":
        raw["draft_vocab_size"] = draft_vocab or tcfg.vocab_size
    emb = whole_vocab_weight(target.model.embed_tokens.weight, target.tp)
    gen = torch.Generator().manual_seed(seed)
    head = build_head(kind, raw, target)
    with torch.no_grad():
        for name, p in head.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name != "embed_tokens.weight":
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    head = head.to(device=emb.device, dtype=emb.dtype)
    head.embed_tokens.weight.data = emb.data
    head.owns_embedding = False
    if kind == "eagle1":
        head.lm_head_weight = head_lm_head(target, emb)  # shared, not owned (without TP)
    else:
        head.t2d[: head.d2t.numel()] = True
    head.cos_sin = rotary_table(head.config, emb.device)
    return head.eval()
