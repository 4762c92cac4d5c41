"""Llama-family target model (Llama 2/3/3.1, Mistral, Qwen2, Qwen3) running every op through eagle_kernels.

Parameter names mirror Hugging Face's ``*ForCausalLM`` so checkpoints load by name. One forward serves
prefill (causal), decode (T=1) and tree verification (explicit positions + packed tree mask): new K/V rows are
written at ``cache.lengths[b] + t`` before attention, and ``cache.lengths`` is left for the caller to advance.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import eagle_kernels as ops

from ..kv_cache import KVCache, PoolShape
from .config import ModelConfig
from .parallel import TensorParallel, row_parallel, vocab_embedding, vocab_logits

POSITION_SLACK = 256  # tree positions may run this far past the maximum length (their tokens are never kept)
DEFAULT_ROTARY_POSITIONS = 4096  # built at load time; the runner grows it to its max_model_len


def rotary_table(cfg: ModelConfig, device, num_positions: int | None = None) -> torch.Tensor:
    """fp32 ``[num_positions, D]`` cos|sin table for :func:`eagle_kernels.rotary_store_kv`; by default
    ``min(max_length, DEFAULT_ROTARY_POSITIONS) + POSITION_SLACK`` rows (the slack covers draft-tree rows
    past the last kept token). Sized by what is run, never by a config's maximum alone."""
    if num_positions is None:
        num_positions = min(cfg.max_length, DEFAULT_ROTARY_POSITIONS) + POSITION_SLACK
    inv = cfg.rope.inv_freq(cfg.head_dim)
    positions = torch.arange(num_positions, dtype=torch.float64)
    angles = torch.outer(positions, inv)
    return torch.cat([angles.cos(), angles.sin()], dim=-1).float().to(device)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps)


class Attention(nn.Module):
    """Self-attention over the KV cache; ``in_features`` defaults to the hidden size (EAGLE-3 feeds 2H).
    With tensor parallelism ``tp``, this rank's heads only (q/k/v column-, o row-parallel)."""

    def __init__(self, cfg: ModelConfig, in_features: int | None = None, tp: TensorParallel | None = None):
        super().__init__()
        n = 1 if tp is None else tp.size
        self.num_heads, self.num_kv_heads, self.head_dim = (
            cfg.num_attention_heads // n,
            cfg.num_key_value_heads // n,
            cfg.head_dim,
        )
        self.tp = tp
        h, d = cfg.hidden_size, cfg.head_dim
        x = in_features or h
        self.q_proj = nn.Linear(x, self.num_heads * d, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(x, self.num_kv_heads * d, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(x, self.num_kv_heads * d, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.num_heads * d, h, bias=cfg.o_proj_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(d, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.qk_norm = cfg.qk_norm
        self.qkv_weight: torch.Tensor | None = None  # set by fuse(): q|k|v in one matmul
        self.qkv_bias: torch.Tensor | None = None

    def fuse(self) -> None:
        """One matmul for q, k and v (inference): see :func:`fuse_linears`."""
        if self.qkv_weight is None:
            self.qkv_weight, self.qkv_bias = fuse_linears(self.q_proj, self.k_proj, self.v_proj)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``[B, T, in]`` -> q ``[B, T, Hq, D]``, k and v ``[B, T, Hkv, D]`` (one matmul's views if fused)."""
        b, t, _ = x.shape
        hq, hkv, d = self.num_heads, self.num_kv_heads, self.head_dim
        if self.qkv_weight is None:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        else:
            q, k, v = F.linear(x, self.qkv_weight, self.qkv_bias).split([hq * d, hkv * d, hkv * d], -1)
        return q.view(b, t, hq, d), k.view(b, t, hkv, d), v.view(b, t, hkv, d)

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        cos_sin: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        lengths: torch.Tensor,
        block_table: torch.Tensor,
        tree_mask: torch.Tensor | None,
        tree_len: int | None = None,
    ) -> torch.Tensor:
        """``k_cache``/``v_cache``: this layer's pools, addressed through ``block_table`` (see
        :mod:`eagle_engine.kv_cache`); ``tree_len``: tree rows after the prefix (default ``T``); the ``T``
        queries are the last ones."""
        b, t, _ = x.shape
        q, k, v = self.project(x)
        tree_len = t if tree_len is None else tree_len
        # The new rows are the last T of the tree region: write them at lengths + tree_len - T.
        rows = lengths if tree_len == t else lengths + (tree_len - t)
        norms = (self.q_norm.weight, self.k_norm.weight, self.q_norm.eps) if self.qk_norm else ()
        q = ops.rotary_store_kv(q, k, v, positions, cos_sin, k_cache, v_cache, rows, *norms,
                                block_table=block_table)
        out = ops.tree_attention(q, k_cache, v_cache, lengths, tree_mask, tree_len, block_table=block_table)
        return row_parallel(self.o_proj, out.reshape(b, t, self.num_heads * self.head_dim), self.tp)


def fuse_linears(*linears: nn.Linear) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Concatenate the weights (and biases) of linears sharing an input into one tensor, and make each
    linear's parameters views of it: one matmul instead of several, while parameter names, ``state_dict``
    and loading stay Hugging Face's. Returns ``(weight [sum(out), in], bias [sum(out)] or None)``, or
    ``(None, None)`` (left apart) when only some of them carry a bias."""
    has_bias = [lin.bias is not None for lin in linears]
    if any(has_bias) and not all(has_bias):
        return None, None
    weight = torch.cat([lin.weight.detach() for lin in linears])
    bias = torch.cat([lin.bias.detach() for lin in linears]) if all(has_bias) else None
    start = 0
    for lin in linears:
        rows = lin.weight.shape[0]
        lin.weight = nn.Parameter(weight[start : start + rows], requires_grad=False)
        if bias is not None:
            lin.bias = nn.Parameter(bias[start : start + rows], requires_grad=False)
        start += rows
    return weight, bias


class MLP(nn.Module):
    """SwiGLU MLP; with tensor parallelism ``tp``, ``inter`` is this rank's part (down_proj row-parallel)."""

    def __init__(self, hidden: int, inter: int, bias: bool, tp: TensorParallel | None = None):
        super().__init__()
        self.tp = tp
        self.gate_proj = nn.Linear(hidden, inter, bias=bias)
        self.up_proj = nn.Linear(hidden, inter, bias=bias)
        self.down_proj = nn.Linear(inter, hidden, bias=bias)
        self.gate_up_weight: torch.Tensor | None = None  # set by fuse(): gate|up in one matmul
        self.gate_up_bias: torch.Tensor | None = None

    def fuse(self) -> None:
        """One matmul for gate and up (inference): see :func:`fuse_linears`."""
        if self.gate_up_weight is None:
            self.gate_up_weight, self.gate_up_bias = fuse_linears(self.gate_proj, self.up_proj)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_weight is None:
            return row_parallel(self.down_proj, ops.silu_mul(self.gate_proj(x), self.up_proj(x)), self.tp)
        gate, up = F.linear(x, self.gate_up_weight, self.gate_up_bias).chunk(2, -1)
        return row_parallel(self.down_proj, ops.silu_mul(gate, up), self.tp)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TensorParallel | None = None):
        super().__init__()
        n = 1 if tp is None else tp.size
        self.self_attn = Attention(cfg, tp=tp)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size // n, cfg.mlp_bias, tp)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, h, residual, positions, cos_sin, k_cache, v_cache, lengths, block_table, tree_mask):
        """``h + residual`` is the residual stream entering the layer (``residual`` is None at layer 0)."""
        norm = self.input_layernorm
        if residual is None:
            residual, x = h, norm(h)
        else:
            x, residual = ops.add_rms_norm(h, residual, norm.weight, norm.eps)
        x = self.self_attn(x, positions, cos_sin, k_cache, v_cache, lengths, block_table, tree_mask)
        norm = self.post_attention_layernorm
        x, residual = ops.add_rms_norm(x, residual, norm.weight, norm.eps)
        return self.mlp(x), residual


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TensorParallel | None = None):
        super().__init__()
        vocab = cfg.vocab_size // (1 if tp is None else tp.size)
        self.embed_tokens = nn.Embedding(vocab, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, tp) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


@dataclass
class ForwardOutput:
    """``hidden``: top-layer features after the final norm ``[B, T, H]``; ``aux``: the residual stream at the
    input of each requested layer, concatenated in request order ``[B, T, len(aux_layers) * H]`` (or None)."""

    hidden: torch.Tensor
    aux: torch.Tensor | None = None


class LlamaModel(nn.Module):
    """A Llama-family causal LM over a preallocated :class:`KVCache`. With tensor parallelism ``tp`` (see
    :mod:`.parallel`) it holds this rank's shard; ``config`` stays the whole model's."""

    def __init__(self, cfg: ModelConfig, tp: TensorParallel | None = None):
        super().__init__()
        self.config = cfg
        self.tp = tp
        self.model = Backbone(cfg, tp)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, self.model.embed_tokens.num_embeddings, bias=False)
        self.register_buffer("cos_sin", torch.empty(0), persistent=False)

    @property
    def lm_head_weight(self) -> torch.Tensor:
        """``[V, H]``: the output projection (the input embedding when tied); this rank's vocabulary shard
        ``[V / N, H]`` under tensor parallelism."""
        return self.model.embed_tokens.weight if self.config.tie_word_embeddings else self.lm_head.weight

    def init_rotary(self, device: torch.device | str, num_positions: int | None = None) -> None:
        """Build the rotary table (see :func:`rotary_table`)."""
        self.cos_sin = rotary_table(self.config, device, num_positions)

    def ensure_positions(self, num_positions: int) -> None:
        """Grow the rotary table to cover positions ``< num_positions`` (a no-op when it does)."""
        if self.cos_sin.shape[0] < num_positions:
            self.init_rotary(self.cos_sin.device, num_positions)

    def fuse(self) -> None:
        """Fused projections for inference: one q|k|v and one gate|up matmul per layer (idempotent)."""
        for layer in self.model.layers:
            layer.self_attn.fuse()
            layer.mlp.fuse()

    def allocate_cache(self, batch: int, capacity: int, pool: PoolShape | None = None) -> KVCache:
        """A zeroed cache for ``batch`` sequences of up to ``capacity`` rows, in the model's dtype/device:
        contiguous, or paged as ``pool`` says (then ``capacity`` is ``pool``'s)."""
        cfg, w = self.config, self.model.embed_tokens.weight
        kv_heads = cfg.num_key_value_heads // (1 if self.tp is None else self.tp.size)  # this rank's
        return KVCache.allocate(cfg.num_hidden_layers, batch, kv_heads, capacity, cfg.head_dim, dtype=w.dtype,
                                device=w.device, **({} if pool is None else pool.kwargs()))

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache,
        tree_mask: torch.Tensor | None = None,
        aux_layers: tuple[int, ...] = (),
    ) -> ForwardOutput:
        """Run ``T`` new tokens per sequence over the cache.

        Parameters
        ----------
        input_ids, positions : int ``[B, T]``
        cache : rows ``cache.lengths[b] + t`` receive the new K/V; ``lengths`` itself is not changed
        tree_mask : packed int32 ``[B, T, ceil(T / 32)]`` (see :mod:`eagle_kernels.reference`), None = causal
        aux_layers : layer indices whose input residual stream to return (EAGLE-3 features)
        """
        h = vocab_embedding(self.model.embed_tokens, input_ids, self.tp)
        residual, aux = None, {}
        for i, layer in enumerate(self.model.layers):
            if i in aux_layers:
                aux[i] = h if residual is None else h + residual
            h, residual = layer(
                h,
                residual,
                positions,
                self.cos_sin,
                cache.data[i, 0],
                cache.data[i, 1],
                cache.lengths,
                cache.block_table,
                tree_mask,
            )
        hidden, stream = ops.add_rms_norm(h, residual, self.model.norm.weight, self.model.norm.eps)
        aux[len(self.model.layers)] = stream
        aux_cat = torch.cat([aux[i] for i in aux_layers], -1) if aux_layers else None
        return ForwardOutput(hidden, aux_cat)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[..., H]`` features -> fp32 logits ``[..., V]`` (whole on every rank under TP)."""
        return vocab_logits(hidden, self.lm_head_weight, self.tp)
