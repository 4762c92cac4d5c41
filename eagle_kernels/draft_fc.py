"""Triton kernel of the EAGLE-1/2 head's input projection.

:func:`draft_fc` computes ``fc(cat([embed[token_ids], features])) (+ bias)`` as one tiled matmul whose K loop
runs over the gathered embedding rows, then over the features: the concatenation is never materialised.
Contract: :func:`eagle_kernels.reference.draft_fc`. No host synchronisation.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton_common import dot as _dot
from ._triton_common import interpreter_needs_fp32_dot

# name -> (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages); "small" for N <= 16 rows.
FC_CONFIGS = {
    "small": (16, 32, 128, 4, 4),
    "large": (64, 64, 64, 4, 3),
}


@triton.jit(do_not_specialize=["N", "has_bias"])
def _draft_fc_kernel(
    tok_ptr, emb_ptr, feat_ptr, w_ptr, bias_ptr, out_ptr,
    N, E, F, H_out, has_bias,
    stride_emb, stride_feat, stride_w, stride_out,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    FP32_DOT: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < H_out
    offs_k = tl.arange(0, BLOCK_K)
    tok = tl.load(tok_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    w_rows = w_ptr + cols.to(tl.int64)[None, :] * stride_w  # [1, BLOCK_N]: weight row per output column
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    # K loop, first half: embedding rows gathered by token id against fc_weight[:, :E].
    for k0 in range(0, E, BLOCK_K):
        kk = k0 + offs_k
        k_ok = kk < E
        a = tl.load(emb_ptr + tok[:, None] * stride_emb + kk[None, :], mask=row_ok[:, None] & k_ok[None, :],
                    other=0.0)
        w = tl.load(w_rows + kk[:, None], mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc += _dot(a, w, FP32_DOT)
    # Second half: features against fc_weight[:, E:].
    feat_rows = feat_ptr + rows.to(tl.int64)[:, None] * stride_feat
    for k0 in range(0, F, BLOCK_K):
        kk = k0 + offs_k
        k_ok = kk < F
        a = tl.load(feat_rows + kk[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_rows + E + kk[:, None], mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc += _dot(a, w, FP32_DOT)
    if has_bias != 0:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + rows.to(tl.int64)[:, None] * stride_out + cols[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def fc_config_name(n_rows: int) -> str:
    return "small" if n_rows <= 16 else "large"


def draft_fc(token_ids, embed_weight, features, fc_weight, fc_bias=None):
    """EAGLE-1/2 input projection ``fc(cat([embed[token_ids], features], -1)) (+ bias)`` in one kernel.

    Parameters
    ----------
    token_ids : int ``[N]`` (int64 or int32)
    embed_weight : ``[V, E]``; features : ``[N, F]``; fc_weight : ``[H, E + F]``
    fc_bias : ``[H]`` or ``None``
        (all of one float dtype: fp16, bf16 or fp32; in the EAGLE head ``E = F = H``)

    Returns
    -------
    ``[N, H]`` in ``features.dtype`` (fp32 accumulation, bias added in fp32).
    """
    n = token_ids.shape[0]
    e = embed_weight.shape[1]
    f = features.shape[1]
    h_out = fc_weight.shape[0]
    if fc_weight.shape[1] != e + f or features.shape[0] != n:
        raise ValueError(f"shape mismatch: ids {tuple(token_ids.shape)}, embed {tuple(embed_weight.shape)}, "
                         f"features {tuple(features.shape)}, fc {tuple(fc_weight.shape)}")
    dtype = features.dtype
    if embed_weight.dtype != dtype or fc_weight.dtype != dtype:
        raise ValueError("embed_weight, features and fc_weight must share one dtype")
    embed_weight, features, fc_weight = (t if t.stride(-1) == 1 else t.contiguous()
                                         for t in (embed_weight, features, fc_weight))
    token_ids = token_ids.to(torch.int64).contiguous()
    out = torch.empty((n, h_out), dtype=dtype, device=features.device)
    if out.numel() == 0:
        return out
    has_bias = fc_bias is not None
    bias = fc_bias.contiguous() if has_bias else out
    block_m, block_n, block_k, num_warps, num_stages = FC_CONFIGS[fc_config_name(n)]
    grid = (triton.cdiv(n, block_m), triton.cdiv(h_out, block_n))
    _draft_fc_kernel[grid](
        token_ids, embed_weight, features, fc_weight, bias, out,
        n, e, f, h_out, int(has_bias),
        embed_weight.stride(0), features.stride(0), fc_weight.stride(0), out.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        FP32_DOT=interpreter_needs_fp32_dot(_draft_fc_kernel, dtype),
        num_warps=num_warps, num_stages=num_stages,
    )
    return out


__all__ = ["draft_fc"]
