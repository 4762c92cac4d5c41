"""Triton top-k LM head: top-k log-probabilities over the vocabulary without writing the logits.

Each program computes the logits of a ``BLOCK_V`` slice of the vocabulary for ``BLOCK_R`` rows, and writes
only a tile-local max, sum-exp and top-``K_PAD`` candidates; a second kernel, one program per row, merges the
log-sum-exp partials and takes the top-k of the candidates. Exactly two launches, no host synchronisation.
Contract: :func:`eagle_kernels.reference.lm_head_topk`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton_common import aot_variant, interpreter_needs_fp32_dot
from ._triton_common import dot as _dot

# name -> (BLOCK_R, BLOCK_V, BLOCK_H, num_warps, num_stages); "small" for N <= 16 rows.
LM_HEAD_CONFIGS = {
    "small": (16, 128, 64, 4, 4),
    "large": (64, 128, 64, 8, 3),
}
K_PAD_CHOICES = (1, 4, 16)  # tile-local top-K_PAD, K_PAD the smallest choice >= k
MAX_TOPK = K_PAD_CHOICES[-1]
MERGE_BLOCK = 1024  # tile partials / candidates per step of the merge kernel
MERGE_NUM_WARPS = 4


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


@triton.jit
def _lm_head_topk_merge_kernel(
    cand_val_ptr, cand_idx_ptr, tile_max_ptr, tile_sum_ptr, out_val_ptr, out_idx_ptr,
    num_tiles, num_cand, k,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    # Global log-sum-exp over the tile partials: the max, then the rescaled sum.
    m = tl.full([], float("-inf"), dtype=tl.float32)
    for t0 in range(0, num_tiles, BLOCK):
        tiles = t0 + offs
        tm = tl.load(tile_max_ptr + row * num_tiles + tiles, mask=tiles < num_tiles, other=float("-inf"))
        m = tl.maximum(m, tl.max(tm, 0))
    total = tl.zeros([BLOCK], dtype=tl.float32)
    for t0 in range(0, num_tiles, BLOCK):
        tiles = t0 + offs
        ok = tiles < num_tiles
        tm = tl.load(tile_max_ptr + row * num_tiles + tiles, mask=ok, other=float("-inf"))
        ts = tl.load(tile_sum_ptr + row * num_tiles + tiles, mask=ok, other=0.0)
        total += tl.where(ok, ts * tl.exp(tm - m), 0.0)
    lse = m + tl.log(tl.sum(total, 0))
    # Top-k of the candidates in the order (value descending, position ascending): round i takes the best
    # candidate strictly after round i-1's pick. Candidates of one tile are sorted with the leftmost index
    # first on ties and tiles are in vocabulary order, so the smallest position is the smallest vocab index.
    prev_v = tl.full([], float("inf"), dtype=tl.float32)
    prev_p = tl.full([], -1, dtype=tl.int32)
    for i in range(k):
        best_v = tl.full([], float("-inf"), dtype=tl.float32)
        best_p = tl.full([], 2147483647, dtype=tl.int32)
        for c0 in range(0, num_cand, BLOCK):
            pos = c0 + offs
            vals = tl.load(cand_val_ptr + row * num_cand + pos, mask=pos < num_cand, other=float("-inf"))
            eligible = (pos < num_cand) & ((vals < prev_v) | ((vals == prev_v) & (pos > prev_p)))
            vals = tl.where(eligible, vals, float("-inf"))
            c_v = tl.max(vals, 0)
            c_p = tl.min(tl.where(eligible & (vals == c_v), pos, 2147483647), 0)
            better = (c_v > best_v) | ((c_v == best_v) & (c_p < best_p))
            best_v = tl.where(better, c_v, best_v)
            best_p = tl.where(better, c_p, best_p)
        idx = tl.load(cand_idx_ptr + row * num_cand + best_p)
        tl.store(out_val_ptr + row * k + i, best_v - lse)
        tl.store(out_idx_ptr + row * k + i, idx.to(tl.int64))
        prev_v = best_v
        prev_p = best_p


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
    values = torch.empty((n, k), dtype=torch.float32, device=dev)
    indices = torch.empty((n, k), dtype=torch.int64, device=dev)
    _lm_head_topk_merge_kernel[(n,)](
        cand_val, cand_idx, tile_max, tile_sum, values, indices, num_tiles, num_tiles * k_pad, k,
        BLOCK=MERGE_BLOCK, num_warps=MERGE_NUM_WARPS, num_stages=1,
    )
    return values, indices


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



def compile_variants(dtype: str) -> list[dict]:
    """Every launch variant the dispatch can choose for ``dtype`` (``"fp16"``, ``"bf16"`` or ``"fp32"``)."""
    types = {"h_ptr": f"*{dtype}", "w_ptr": f"*{dtype}", "cand_val_ptr": "*fp32", "cand_idx_ptr": "*i32",
             "tile_max_ptr": "*fp32", "tile_sum_ptr": "*fp32"}
    out = []
    for block_r, block_v, block_h, num_warps, num_stages in LM_HEAD_CONFIGS.values():
        for k_pad in K_PAD_CHOICES:
            cx = dict(K_PAD=k_pad, BLOCK_R=block_r, BLOCK_V=block_v, BLOCK_H=block_h, FP32_DOT=False)
            out.append(aot_variant(_lm_head_topk_kernel, cx, types, num_warps, num_stages))
    merge_types = {"cand_val_ptr": "*fp32", "cand_idx_ptr": "*i32", "tile_max_ptr": "*fp32",
                   "tile_sum_ptr": "*fp32", "out_val_ptr": "*fp32", "out_idx_ptr": "*i64"}
    out.append(aot_variant(_lm_head_topk_merge_kernel, dict(BLOCK=MERGE_BLOCK), merge_types,
                           MERGE_NUM_WARPS, 1))
    return out


__all__ = ["lm_head_topk", "compile_variants", "MAX_TOPK"]
