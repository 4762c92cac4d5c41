"""eagle_kernels: every GPU op the engine uses, each with a pure-PyTorch reference.

Dispatch, per call, on the first tensor argument:
- CUDA tensor -> the compiled CUDA op (``eagle_kernels._C``) where one exists, else the Triton kernel;
- CPU tensor with ``TRITON_INTERPRET=1`` -> the Triton kernel through Triton's interpreter (tests);
- CPU tensor otherwise -> :mod:`eagle_kernels.reference`.
``EAGLE_KERNELS_BACKEND=reference`` forces the reference everywhere (debugging, baselines).
"""

from __future__ import annotations

import contextlib
import os
import threading

import torch

from . import reference
from .reference import causal_tree_mask, pack_tree_mask, unpack_tree_mask

try:  # Triton kernels, loaded before the public functions below so that their names rebind to the functions
    from . import counter_uniform as _counter_uniform_triton
    from . import draft_fc as _draft_fc_triton
    from . import kv_compact as _kv_compact_triton
    from . import lm_head_topk as _lm_head_topk_triton
    from . import rms_norm as _rms_norm_triton
    from . import rotary_store_kv as _rotary_store_kv_triton
    from . import silu_mul as _silu_mul_triton
    from . import tree_attention as _tree_attention_triton
except ImportError:  # no triton: these ops run the reference
    _draft_fc_triton = _kv_compact_triton = _lm_head_topk_triton = _rms_norm_triton = None
    _tree_attention_triton = _counter_uniform_triton = _rotary_store_kv_triton = _silu_mul_triton = None

HAS_TRITON = _tree_attention_triton is not None

__version__ = "0.1.0"


_state = threading.local()


@contextlib.contextmanager
def reference_backend():
    """Run every op through :mod:`eagle_kernels.reference` inside the block, e.g. for autograd (training):
    the kernels have no backward."""
    depth = getattr(_state, "reference_depth", 0)
    _state.reference_depth = depth + 1
    try:
        yield
    finally:
        _state.reference_depth = depth


def _force_reference() -> bool:
    forced = getattr(_state, "reference_depth", 0) > 0
    return forced or os.environ.get("EAGLE_KERNELS_BACKEND", "") == "reference"


def triton_enabled(x: torch.Tensor) -> bool:
    """Whether Triton kernels should run for tensors like ``x`` (CUDA, or CPU under TRITON_INTERPRET=1)."""
    if _force_reference():
        return False
    return x.is_cuda or os.environ.get("TRITON_INTERPRET", "0") == "1"


def tree_attention(q, k_cache, v_cache, lengths, tree_mask=None, tree_len=None, scale=None):
    """Tree-masked attention over the KV cache. Contract: :func:`eagle_kernels.reference.tree_attention`."""
    if (_tree_attention_triton is not None and triton_enabled(q) and q.shape[-1] <= 128
            and k_cache.dtype == q.dtype == v_cache.dtype):
        return _tree_attention_triton.tree_attention(q, k_cache, v_cache, lengths, tree_mask, tree_len, scale)
    return reference.tree_attention(q, k_cache, v_cache, lengths, tree_mask, tree_len, scale)


def rms_norm(x, weight, eps):
    """RMSNorm. Contract: :func:`eagle_kernels.reference.rms_norm`."""
    if _rms_norm_triton is not None and triton_enabled(x):
        return _rms_norm_triton.rms_norm(x, weight, eps)
    return reference.rms_norm(x, weight, eps)


def add_rms_norm(x, residual, weight, eps):
    """Residual add + RMSNorm. Contract: :func:`eagle_kernels.reference.add_rms_norm`."""
    if _rms_norm_triton is not None and triton_enabled(x) and residual.dtype == x.dtype:
        return _rms_norm_triton.add_rms_norm(x, residual, weight, eps)
    return reference.add_rms_norm(x, residual, weight, eps)


def rotary_embedding(q, k, positions, cos_sin):
    """Rotary embedding. Contract: :func:`eagle_kernels.reference.rotary_embedding`."""
    return reference.rotary_embedding(q, k, positions, cos_sin)


def silu_mul(gate, up):
    """SwiGLU activation. Contract: :func:`eagle_kernels.reference.silu_mul`."""
    if (_silu_mul_triton is not None and triton_enabled(gate) and gate.dim() > 0 and gate.shape == up.shape
            and gate.dtype == up.dtype):
        return _silu_mul_triton.silu_mul(gate, up)
    return reference.silu_mul(gate, up)


def store_kv(k_cache, v_cache, k, v, lengths):
    """Write new K/V rows at ``lengths[b] + t``. Contract: :func:`eagle_kernels.reference.store_kv`."""
    return reference.store_kv(k_cache, v_cache, k, v, lengths)


def rotary_store_kv(q, k, v, positions, cos_sin, k_cache, v_cache, rows,
                    q_norm_weight=None, k_norm_weight=None, eps=1e-6):
    """Optional q/k RMSNorm, rotary embedding and the K/V cache write, one launch.
    Contract: :func:`eagle_kernels.reference.rotary_store_kv`."""
    args = (q, k, v, positions, cos_sin, k_cache, v_cache, rows, q_norm_weight, k_norm_weight, eps)
    if (_rotary_store_kv_triton is not None and triton_enabled(q)
            and q.shape[-1] <= _rotary_store_kv_triton.MAX_HEAD_DIM and q.shape[-1] % 2 == 0
            and q.dtype == k.dtype == v.dtype and cos_sin.dtype == torch.float32
            and all(x.stride(-1) == 1 for x in (q, k, v, k_cache, v_cache, cos_sin))):
        return _rotary_store_kv_triton.rotary_store_kv(*args)
    return reference.rotary_store_kv(*args)


def counter_uniform(seeds, offsets, n):
    """Counter-based (SplitMix64) uniforms ``[B, n]``.
    Contract: :func:`eagle_kernels.reference.counter_uniform`."""
    if (_counter_uniform_triton is not None and triton_enabled(seeds) and seeds.dtype == torch.int64
            and offsets.dtype == torch.int64):
        return _counter_uniform_triton.counter_uniform(seeds, offsets, n)
    return reference.counter_uniform(seeds, offsets, n)


def kv_compact(cache, lengths, src, counts):
    """Move accepted tree rows, all layers, in place. Contract: :func:`eagle_kernels.reference.kv_compact`."""
    from . import _C_loader

    if cache.is_cuda and not _force_reference() and _C_loader.available():
        return _C_loader.kv_compact_cuda(cache, lengths, src, counts)
    if _kv_compact_triton is not None and triton_enabled(cache):
        return _kv_compact_triton.kv_compact(cache, lengths, src, counts)
    return reference.kv_compact(cache, lengths, src, counts)


def draft_fc(token_ids, embed_weight, features, fc_weight, fc_bias=None):
    """EAGLE-1/2 head input projection. Contract: :func:`eagle_kernels.reference.draft_fc`."""
    if (_draft_fc_triton is not None and triton_enabled(features)
            and embed_weight.dtype == features.dtype == fc_weight.dtype):
        return _draft_fc_triton.draft_fc(token_ids, embed_weight, features, fc_weight, fc_bias)
    return reference.draft_fc(token_ids, embed_weight, features, fc_weight, fc_bias)


def lm_head_topk(hidden, weight, k):
    """Top-k log-probs over the vocabulary. Contract: :func:`eagle_kernels.reference.lm_head_topk`."""
    if (_lm_head_topk_triton is not None and triton_enabled(hidden) and k <= _lm_head_topk_triton.MAX_TOPK
            and weight.dtype == hidden.dtype):
        return _lm_head_topk_triton.lm_head_topk(hidden, weight, k)
    return reference.lm_head_topk(hidden, weight, k)


def tree_verify_greedy(tokens, parents, target_argmax):
    """Greedy tree verification. Contract: :func:`eagle_kernels.reference.tree_verify_greedy`."""
    from . import _C_loader

    if tokens.is_cuda and not _force_reference() and _C_loader.available():
        return _C_loader.tree_verify_greedy_cuda(tokens, parents, target_argmax)
    return reference.tree_verify_greedy(tokens, parents, target_argmax)


def tree_verify_sampling(tokens, parents, target_probs, uniforms):
    """Sampling tree verification. Contract: :func:`eagle_kernels.reference.tree_verify_sampling`."""
    from . import _C_loader

    if tokens.is_cuda and not _force_reference() and _C_loader.available():
        return _C_loader.tree_verify_sampling_cuda(tokens, parents, target_probs, uniforms)
    return reference.tree_verify_sampling(tokens, parents, target_probs, uniforms)


__all__ = [
    "reference",
    "HAS_TRITON",
    "triton_enabled",
    "reference_backend",
    "pack_tree_mask",
    "unpack_tree_mask",
    "causal_tree_mask",
    "tree_attention",
    "rms_norm",
    "add_rms_norm",
    "rotary_embedding",
    "silu_mul",
    "store_kv",
    "rotary_store_kv",
    "counter_uniform",
    "kv_compact",
    "draft_fc",
    "lm_head_topk",
    "tree_verify_greedy",
    "tree_verify_sampling",
]
