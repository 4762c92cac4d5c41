"""eagle_kernels: every GPU op the engine uses, each with a pure-PyTorch reference.

Dispatch, per call, on the first tensor argument:
- CUDA tensor -> the compiled CUDA op (``eagle_kernels._C``) where one exists, else the Triton kernel;
- CPU tensor with ``TRITON_INTERPRET=1`` -> the Triton kernel through Triton's interpreter (tests);
- CPU tensor otherwise -> :mod:`eagle_kernels.reference`.
``EAGLE_KERNELS_BACKEND=reference`` forces the reference everywhere (debugging, baselines).

No silent fallbacks: :func:`backends` reports what each op ran (and why not a faster implementation); a CUDA
tensor that a kernel cannot take warns once, and ``EAGLE_KERNELS_STRICT=1`` makes it an error
(:class:`KernelFallbackError`). See :mod:`eagle_kernels._dispatch`.
"""

from __future__ import annotations

import torch

from . import reference
from ._dispatch import (
    KernelFallbackError,
    backends,
    format_backends,
    pick,
    reference_backend,
    reference_forced,
    reset_backends,
    triton_enabled,
)
from .reference import causal_tree_mask, pack_tree_mask, unpack_tree_mask

try:  # Triton kernels, loaded before the public functions below so that their names rebind to the functions
    from . import counter_uniform as _counter_uniform_triton
    from . import draft_fc as _draft_fc_triton
    from . import kv_compact as _kv_compact_triton
    from . import lm_head_topk as _lm_head_topk_triton
    from . import masked_softmax as _masked_softmax_triton
    from . import rms_norm as _rms_norm_triton
    from . import rotary_store_kv as _rotary_store_kv_triton
    from . import silu_mul as _silu_mul_triton
    from . import top_p_threshold as _top_p_threshold_triton
    from . import tree_attention as _tree_attention_triton
except ImportError:  # no triton: these ops run the reference
    _draft_fc_triton = _kv_compact_triton = _lm_head_topk_triton = _rms_norm_triton = None
    _tree_attention_triton = _counter_uniform_triton = _rotary_store_kv_triton = _silu_mul_triton = None
    _top_p_threshold_triton = _masked_softmax_triton = None

HAS_TRITON = _tree_attention_triton is not None

__version__ = "0.1.0"

_NO_TRITON = "Triton is not installed"


def _c_ops():
    """Reason the compiled CUDA ops cannot run, or None (loads them on first use, never at import)."""
    from . import _C_loader

    return None if _C_loader.available() else _C_loader.status()


def _triton(module, *conditions: tuple[bool, str]):
    """Reason the Triton kernel of ``module`` cannot take these inputs: Triton missing or the first failed
    ``(condition, reason)``; None when it can."""
    if module is None:
        return _NO_TRITON
    return next((reason for ok, reason in conditions if not ok), None)


def _same_dtype(*tensors) -> tuple[bool, str]:
    return all(t.dtype == tensors[0].dtype for t in tensors), "inputs of different dtypes"


def tree_attention(q, k_cache, v_cache, lengths, tree_mask=None, tree_len=None, scale=None, block_table=None):
    """Tree-masked attention over the KV cache: a paged pool ``[num_blocks, Hkv, block_size, D]`` read through
    ``block_table`` int32 ``[B, max_blocks]``, or the contiguous ``[B, Hkv, S, D]`` (``block_table=None``).
    Contract: :func:`eagle_kernels.reference.tree_attention`."""
    args = (q, k_cache, v_cache, lengths, tree_mask, tree_len, scale)
    unsupported = _triton(_tree_attention_triton, (q.shape[-1] <= 128, f"head_dim {q.shape[-1]} > 128"),
                          _same_dtype(q, k_cache, v_cache))
    if pick("tree_attention", q, triton=unsupported) == "triton":
        return _tree_attention_triton.tree_attention(*args, block_table=block_table)
    return reference.tree_attention(*args, block_table=block_table)


def rms_norm(x, weight, eps):
    """RMSNorm. Contract: :func:`eagle_kernels.reference.rms_norm`."""
    if pick("rms_norm", x, triton=_triton(_rms_norm_triton)) == "triton":
        return _rms_norm_triton.rms_norm(x, weight, eps)
    return reference.rms_norm(x, weight, eps)


def add_rms_norm(x, residual, weight, eps):
    """Residual add + RMSNorm. Contract: :func:`eagle_kernels.reference.add_rms_norm`."""
    if pick("add_rms_norm", x, triton=_triton(_rms_norm_triton, _same_dtype(x, residual))) == "triton":
        return _rms_norm_triton.add_rms_norm(x, residual, weight, eps)
    return reference.add_rms_norm(x, residual, weight, eps)


def rotary_embedding(q, k, positions, cos_sin):
    """Rotary embedding (no kernel: the engine uses :func:`rotary_store_kv`).
    Contract: :func:`eagle_kernels.reference.rotary_embedding`."""
    pick("rotary_embedding", q)
    return reference.rotary_embedding(q, k, positions, cos_sin)


def silu_mul(gate, up):
    """SwiGLU activation. Contract: :func:`eagle_kernels.reference.silu_mul`."""
    unsupported = _triton(_silu_mul_triton, (gate.dim() > 0, "a 0-d input"),
                          (gate.shape == up.shape, "gate and up of different shapes"), _same_dtype(gate, up))
    if pick("silu_mul", gate, triton=unsupported) == "triton":
        return _silu_mul_triton.silu_mul(gate, up)
    return reference.silu_mul(gate, up)


def store_kv(k_cache, v_cache, k, v, lengths):
    """Write new K/V rows at ``lengths[b] + t`` (no kernel: the engine uses :func:`rotary_store_kv`).
    Contract: :func:`eagle_kernels.reference.store_kv`."""
    pick("store_kv", k)
    return reference.store_kv(k_cache, v_cache, k, v, lengths)


def rotary_store_kv(q, k, v, positions, cos_sin, k_cache, v_cache, rows,
                    q_norm_weight=None, k_norm_weight=None, eps=1e-6, block_table=None):
    """Optional q/k RMSNorm, rotary embedding and the K/V cache write (through ``block_table`` into a paged
    pool, or into the contiguous cache), one launch.
    Contract: :func:`eagle_kernels.reference.rotary_store_kv`."""
    args = (q, k, v, positions, cos_sin, k_cache, v_cache, rows, q_norm_weight, k_norm_weight, eps)

    def unsupported():
        d = q.shape[-1]
        return _triton(
            _rotary_store_kv_triton,
            (d <= _rotary_store_kv_triton.MAX_HEAD_DIM and d % 2 == 0, f"head_dim {d} (needs even, <= 256)"),
            _same_dtype(q, k, v),
            (cos_sin.dtype == torch.float32, "cos_sin is not fp32"),
            (all(x.stride(-1) == 1 for x in (q, k, v, k_cache, v_cache, cos_sin)), "a strided last dim"),
        )

    if pick("rotary_store_kv", q, triton=unsupported) == "triton":
        return _rotary_store_kv_triton.rotary_store_kv(*args, block_table=block_table)
    return reference.rotary_store_kv(*args, block_table=block_table)


def counter_uniform(seeds, offsets, n):
    """Counter-based (SplitMix64) uniforms ``[B, n]``.
    Contract: :func:`eagle_kernels.reference.counter_uniform`."""
    unsupported = _triton(_counter_uniform_triton,
                          (seeds.dtype == offsets.dtype == torch.int64, "seeds and offsets must be int64"))
    if pick("counter_uniform", seeds, triton=unsupported) == "triton":
        return _counter_uniform_triton.counter_uniform(seeds, offsets, n)
    return reference.counter_uniform(seeds, offsets, n)


def _rows_kernel_input(logits) -> tuple[bool, str]:
    ok = logits.dtype == torch.float32 and logits.dim() <= 3 and logits.stride(-1) == 1
    return ok, "needs fp32 [..., V] with at most 3 dims and a contiguous last dim"


def top_p_threshold(logits, top_p, floor):
    """The top-p cut of each row as a threshold on its logits, without sorting.
    Contract: :func:`eagle_kernels.reference.top_p_threshold`."""
    unsupported = _triton(_top_p_threshold_triton, _rows_kernel_input(logits))
    if pick("top_p_threshold", logits, triton=unsupported) == "triton":
        return _top_p_threshold_triton.top_p_threshold(logits, top_p, floor)
    return reference.top_p_threshold(logits, top_p, floor)


def masked_softmax_(logits, threshold):
    """In place: softmax over each row's entries ``>= threshold``, 0 elsewhere.
    Contract: :func:`eagle_kernels.reference.masked_softmax_`."""
    unsupported = _triton(_masked_softmax_triton, _rows_kernel_input(logits))
    if pick("masked_softmax_", logits, triton=unsupported) == "triton":
        return _masked_softmax_triton.masked_softmax_(logits, threshold)
    return reference.masked_softmax_(logits, threshold)


def kv_compact(cache, lengths, src, counts, block_table=None):
    """Move accepted tree rows, all layers, in place: ``cache`` ``[L, 2, num_blocks, Hkv, block_size, D]``
    through ``block_table`` int32 ``[B, max_blocks]``, or ``[L, 2, B, Hkv, S, D]`` (``block_table=None``).
    Contract: :func:`eagle_kernels.reference.kv_compact`.

    The CUDA op serves the contiguous buffer (no table); a paged or strided cache runs the Triton kernel (the
    CUDA op is not offered for it, so that is no fallback; without Triton on a CUDA tensor it is, and
    ``EAGLE_KERNELS_STRICT=1`` raises)."""
    args = (cache, lengths, src, counts)
    if block_table is None and cache.is_contiguous():
        backend = pick("kv_compact", cache, cuda=_c_ops, triton=_triton(_kv_compact_triton))
    else:
        backend = pick("kv_compact", cache, triton=_triton(_kv_compact_triton))
    if backend == "cuda":
        from . import _C_loader

        return _C_loader.kv_compact_cuda(*args)
    if backend == "triton":
        return _kv_compact_triton.kv_compact(*args, block_table=block_table)
    return reference.kv_compact(*args, block_table=block_table)


def draft_fc(token_ids, embed_weight, features, fc_weight, fc_bias=None):
    """EAGLE-1/2 head input projection. Contract: :func:`eagle_kernels.reference.draft_fc`."""
    args = (token_ids, embed_weight, features, fc_weight, fc_bias)
    unsupported = _triton(_draft_fc_triton, _same_dtype(embed_weight, features, fc_weight))
    if pick("draft_fc", features, triton=unsupported) == "triton":
        return _draft_fc_triton.draft_fc(*args)
    return reference.draft_fc(*args)


def lm_head_topk(hidden, weight, k):
    """Top-k log-probs over the vocabulary. Contract: :func:`eagle_kernels.reference.lm_head_topk`."""
    kernel = _lm_head_topk_triton
    unsupported = _triton(kernel, _same_dtype(hidden, weight), (k <= kernel.MAX_TOPK, f"k={k} > 16"),
                          (weight.shape[0] <= kernel.MAX_VOCAB, f"vocabulary {weight.shape[0]} > 524288")) \
        if kernel is not None else _NO_TRITON
    if pick("lm_head_topk", hidden, triton=unsupported) == "triton":
        return _lm_head_topk_triton.lm_head_topk(hidden, weight, k)
    return reference.lm_head_topk(hidden, weight, k)


def tree_verify_greedy(tokens, parents, target_argmax):
    """Greedy tree verification. Contract: :func:`eagle_kernels.reference.tree_verify_greedy`."""
    if pick("tree_verify_greedy", tokens, cuda=_c_ops) == "cuda":
        from . import _C_loader

        return _C_loader.tree_verify_greedy_cuda(tokens, parents, target_argmax)
    return reference.tree_verify_greedy(tokens, parents, target_argmax)


def tree_verify_sampling(tokens, parents, target_probs, uniforms):
    """Sampling tree verification. Contract: :func:`eagle_kernels.reference.tree_verify_sampling`."""
    if pick("tree_verify_sampling", tokens, cuda=_c_ops) == "cuda":
        from . import _C_loader

        return _C_loader.tree_verify_sampling_cuda(tokens, parents, target_probs, uniforms)
    return reference.tree_verify_sampling(tokens, parents, target_probs, uniforms)


__all__ = [
    "reference",
    "HAS_TRITON",
    "triton_enabled",
    "reference_backend",
    "reference_forced",
    "backends",
    "format_backends",
    "reset_backends",
    "KernelFallbackError",
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
    "top_p_threshold",
    "masked_softmax_",
    "draft_fc",
    "lm_head_topk",
    "tree_verify_greedy",
    "tree_verify_sampling",
]
