"""Triton kernels of the draft head: input projection, RMSNorm (+ residual) and the top-k LM head.

- :func:`draft_fc`: ``fc(cat([embed[token_ids], features])) (+ bias)`` as one tiled matmul whose K loop runs
  over the gathered embedding rows, then over the features: the concatenation is never materialised.
- :func:`rms_norm`, :func:`add_rms_norm`: one program per row, two passes over ``H`` in ``BLOCK_H`` chunks
  (sum of squares, then normalise); the numerics follow the reference (normalised value rounded to the input
  dtype before the weight multiply; the residual sum rounded to the input dtype before its statistics).
- :func:`lm_head_topk`: each program computes the logits of a ``BLOCK_V`` slice of the vocabulary for
  ``BLOCK_R`` rows, and writes only a tile-local max, sum-exp and top-``K_PAD`` candidates; a few torch ops
  merge the ``[N, num_tiles * K_PAD]`` candidates and the log-sum-exp partials. The ``[N, V]`` logits are
  never written.

Contracts: :mod:`eagle_kernels.reference`. No host synchronisation anywhere.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton_common import dot as _dot
from ._triton_common import interpreted, interpreter_needs_fp32_dot  # noqa: F401 (re-exported)

# name -> (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages); "small" for N <= 16 rows.
FC_CONFIGS = {
    "small": (16, 32, 128, 4, 4),
    "large": (64, 64, 64, 4, 3),
}
# name -> (BLOCK_H, num_warps); "small" for H <= 1024.
RMS_CONFIGS = {
    "small": (1024, 4),
    "large": (4096, 8),
}
# name -> (BLOCK_R, BLOCK_V, BLOCK_H, num_warps, num_stages); "small" for N <= 16 rows.
LM_HEAD_CONFIGS = {
    "small": (16, 128, 64, 4, 4),
    "large": (64, 128, 64, 8, 3),
}
K_PAD_CHOICES = (1, 4, 16)  # tile-local top-K_PAD, K_PAD the smallest choice >= k
MAX_TOPK = K_PAD_CHOICES[-1]


# ------------------------------------------------------------------------------------------- draft_fc


@triton.jit
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


# --------------------------------------------------------------------------------------------- RMSNorm


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, sum_ptr,
    H, eps,
    stride_x, stride_r, stride_o, stride_s,
    HAS_RESIDUAL: tl.constexpr, BLOCK_H: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_H)
    io_dtype = x_ptr.dtype.element_ty
    sumsq = tl.zeros([BLOCK_H], dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        cols = h0 + offs
        ok = cols < H
        x = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            r = tl.load(res_ptr + row * stride_r + cols, mask=ok, other=0.0).to(tl.float32)
            x = (x + r).to(io_dtype).to(tl.float32)  # h = x + residual, in the input dtype
            tl.store(sum_ptr + row * stride_s + cols, x.to(sum_ptr.dtype.element_ty), mask=ok)
        sumsq += x * x
    rstd = tl.math.rsqrt(tl.sum(sumsq, 0) / H + eps)
    for h0 in range(0, H, BLOCK_H):
        cols = h0 + offs
        ok = cols < H
        x = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            r = tl.load(res_ptr + row * stride_r + cols, mask=ok, other=0.0).to(tl.float32)
            x = (x + r).to(io_dtype).to(tl.float32)
        normed = (x * rstd).to(io_dtype).to(tl.float32)  # the reference rounds before the weight multiply
        w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * stride_o + cols, (normed * w).to(out_ptr.dtype.element_ty), mask=ok)


def rms_config_name(hidden: int) -> str:
    return "small" if hidden <= RMS_CONFIGS["small"][0] else "large"


def _rows(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _launch_rms(x2, r2, weight, out, h_out, eps):
    rows, hidden = x2.shape
    if rows == 0:
        return
    block_h, num_warps = RMS_CONFIGS[rms_config_name(hidden)]
    has_res = r2 is not None
    r2 = r2 if has_res else x2
    h_out = h_out if has_res else out
    _rms_norm_kernel[(rows,)](
        x2, r2, weight.contiguous(), out, h_out, hidden, float(eps),
        x2.stride(0), r2.stride(0), out.stride(0), h_out.stride(0),
        HAS_RESIDUAL=has_res, BLOCK_H=block_h, num_warps=num_warps, num_stages=1,
    )


def rms_norm(x, weight, eps):
    """RMSNorm over the last dim, ``x / sqrt(mean(x^2) + eps) * weight`` (fp32 statistics).

    Parameters
    ----------
    x : ``[..., H]`` fp16, bf16 or fp32; weight : ``[H]``; eps : float

    Returns
    -------
    ``[..., H]`` in ``x.dtype`` (the normalised value is rounded to ``x.dtype`` before the weight multiply, as
    Hugging Face's Llama does).
    """
    x2 = _rows(x)
    out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    _launch_rms(x2, None, weight, out, None, eps)
    return out.view(x.shape)


def add_rms_norm(x, residual, weight, eps):
    """Residual add fused with RMSNorm: ``h = x + residual`` (in ``x.dtype``); returns ``(rms_norm(h), h)``.

    Parameters
    ----------
    x, residual : ``[..., H]`` of one dtype; weight : ``[H]``; eps : float

    Returns
    -------
    ``(normed, h)``, both ``[..., H]`` in ``x.dtype``.
    """
    if residual.shape != x.shape or residual.dtype != x.dtype:
        raise ValueError("x and residual must share shape and dtype")
    x2, r2 = _rows(x), _rows(residual)
    out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    h = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    _launch_rms(x2, r2, weight, out, h, eps)
    return out.view(x.shape), h.view(x.shape)


# ----------------------------------------------------------------------------------------- LM head top-k


@triton.jit
def _lm_head_topk_kernel(
    h_ptr, w_ptr, cand_val_ptr, cand_idx_ptr, tile_max_ptr, tile_sum_ptr,
    N, V, H, num_tiles,
    stride_h, stride_w,
    K_PAD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    FP32_DOT: tl.constexpr,
):
    pid_v = tl.program_id(0)
    pid_r = tl.program_id(1)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < N
    offs_v = tl.arange(0, BLOCK_V)
    cols = pid_v * BLOCK_V + offs_v
    col_ok = cols < V
    offs_h = tl.arange(0, BLOCK_H)
    h_rows = h_ptr + rows.to(tl.int64)[:, None] * stride_h
    w_rows = w_ptr + cols.to(tl.int64)[None, :] * stride_w
    acc = tl.zeros([BLOCK_R, BLOCK_V], dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        hh = h0 + offs_h
        h_ok = hh < H
        a = tl.load(h_rows + hh[None, :], mask=row_ok[:, None] & h_ok[None, :], other=0.0)
        w = tl.load(w_rows + hh[:, None], mask=h_ok[:, None] & col_ok[None, :], other=0.0)
        acc += _dot(a, w, FP32_DOT)
    logits = tl.where(col_ok[None, :], acc, float("-inf"))

    # Log-sum-exp partial of this tile.
    m = tl.max(logits, 1)
    s = tl.sum(tl.exp(logits - m[:, None]), 1)
    part = rows.to(tl.int64) * num_tiles + pid_v
    tl.store(tile_max_ptr + part, m, mask=row_ok)
    tl.store(tile_sum_ptr + part, s, mask=row_ok)

    # Tile-local top-K_PAD by repeated arg-max (the leftmost index on ties).
    x = logits
    for i in tl.static_range(K_PAD):
        best = tl.max(x, 1)
        arg = tl.argmax(x, 1)
        tl.store(cand_val_ptr + part * K_PAD + i, best, mask=row_ok)
        tl.store(cand_idx_ptr + part * K_PAD + i, pid_v * BLOCK_V + arg, mask=row_ok)
        x = tl.where(offs_v[None, :] == arg[:, None], float("-inf"), x)


def lm_head_config_name(n_rows: int) -> str:
    return "small" if n_rows <= 16 else "large"


def k_pad_for(k: int) -> int:
    """Tile-local candidates per row: the smallest of ``K_PAD_CHOICES`` that is ``>= k``."""
    for k_pad in K_PAD_CHOICES:
        if k <= k_pad:
            return k_pad
    raise ValueError(f"lm_head_topk supports k <= {MAX_TOPK}, got {k}")


def _lm_head_topk(hidden, weight, k, block_v=None):
    n, h = hidden.shape
    v = weight.shape[0]
    if weight.shape[1] != h:
        raise ValueError(f"shape mismatch: hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise ValueError("hidden and weight must share one dtype")
    if not 1 <= k <= v:
        raise ValueError(f"k={k} must be in [1, V={v}]")
    k_pad = k_pad_for(k)
    block_r, default_block_v, block_h, num_warps, num_stages = LM_HEAD_CONFIGS[lm_head_config_name(n)]
    block_v = default_block_v if block_v is None else block_v
    hidden = hidden if hidden.stride(-1) == 1 else hidden.contiguous()
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    dev = hidden.device
    if n == 0:
        return torch.empty((0, k), dtype=torch.float32, device=dev), torch.empty((0, k), dtype=torch.int64,
                                                                                 device=dev)
    num_tiles = triton.cdiv(v, block_v)
    cand_val = torch.empty((n, num_tiles, k_pad), dtype=torch.float32, device=dev)
    cand_idx = torch.empty((n, num_tiles, k_pad), dtype=torch.int32, device=dev)
    tile_max = torch.empty((n, num_tiles), dtype=torch.float32, device=dev)
    tile_sum = torch.empty((n, num_tiles), dtype=torch.float32, device=dev)
    _lm_head_topk_kernel[(num_tiles, triton.cdiv(n, block_r))](
        hidden, weight, cand_val, cand_idx, tile_max, tile_sum,
        n, v, h, num_tiles, hidden.stride(0), weight.stride(0),
        K_PAD=k_pad, BLOCK_R=block_r, BLOCK_V=block_v, BLOCK_H=block_h,
        FP32_DOT=interpreter_needs_fp32_dot(_lm_head_topk_kernel, hidden.dtype),
        num_warps=num_warps, num_stages=num_stages,
    )
    # Merge (small torch ops on [N, num_tiles * K_PAD]): global log-sum-exp and the top-k of the candidates.
    m = tile_max.max(dim=1, keepdim=True).values
    lse = m + torch.log((tile_sum * torch.exp(tile_max - m)).sum(dim=1, keepdim=True))
    values, pos = torch.topk(cand_val.view(n, -1), k, dim=1)
    indices = torch.gather(cand_idx.view(n, -1), 1, pos).to(torch.int64)
    return values - lse, indices


def lm_head_topk(hidden, weight, k):
    """Top-k log-probabilities of ``softmax(hidden @ weight.T)`` without writing the ``[N, V]`` logits.

    Parameters
    ----------
    hidden : ``[N, H]`` fp16, bf16 or fp32; weight : ``[V, H]`` in ``hidden.dtype``; k : ``1 <= k <= 16``

    Returns
    -------
    ``(logprobs fp32 [N, k], indices int64 [N, k])`` sorted by decreasing log-probability (logits computed in
    fp32 from the inputs, not rounded to the input dtype).
    """
    return _lm_head_topk(hidden, weight, k)


# ------------------------------------------------------------------------------------------ AOT variants


def _signature(kernel, constexprs: dict, types: dict) -> dict:
    """Triton signature for AOT compilation: ``types`` by argument name, ``i32`` for other scalars."""
    return {name: "constexpr" if name in constexprs else types.get(name, "i32") for name in kernel.arg_names}


def _variant(kernel, constexprs, types, num_warps, num_stages):
    return dict(kernel=kernel, constexprs=constexprs, signature=_signature(kernel, constexprs, types),
                num_warps=num_warps, num_stages=num_stages)


def compile_variants(dtype: str):
    """Every launch variant the dispatch can choose for ``dtype`` (``"fp16"``, ``"bf16"`` or ``"fp32"``).

    Returns dicts ``kernel, signature, constexprs, num_warps, num_stages`` (for the AOT compile test).
    """
    p = f"*{dtype}"
    out = []
    fc_types = {"tok_ptr": "*i64", "emb_ptr": p, "feat_ptr": p, "w_ptr": p, "bias_ptr": p, "out_ptr": p}
    for block_m, block_n, block_k, num_warps, num_stages in FC_CONFIGS.values():
        cx = dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, FP32_DOT=False)
        out.append(_variant(_draft_fc_kernel, cx, fc_types, num_warps, num_stages))
    rms_types = {"x_ptr": p, "res_ptr": p, "w_ptr": p, "out_ptr": p, "sum_ptr": p, "eps": "fp32"}
    for block_h, num_warps in RMS_CONFIGS.values():
        for has_res in (False, True):
            out.append(_variant(_rms_norm_kernel, dict(HAS_RESIDUAL=has_res, BLOCK_H=block_h), rms_types,
                                num_warps, 1))
    lm_types = {"h_ptr": p, "w_ptr": p, "cand_val_ptr": "*fp32", "cand_idx_ptr": "*i32",
                "tile_max_ptr": "*fp32", "tile_sum_ptr": "*fp32"}
    for block_r, block_v, block_h, num_warps, num_stages in LM_HEAD_CONFIGS.values():
        for k_pad in K_PAD_CHOICES:
            cx = dict(K_PAD=k_pad, BLOCK_R=block_r, BLOCK_V=block_v, BLOCK_H=block_h, FP32_DOT=False)
            out.append(_variant(_lm_head_topk_kernel, cx, lm_types, num_warps, num_stages))
    return out


__all__ = ["draft_fc", "rms_norm", "add_rms_norm", "lm_head_topk", "compile_variants", "MAX_TOPK"]
