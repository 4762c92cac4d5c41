"""Triton top-k LM head: top-k log-probabilities over the vocabulary without writing the logits.

Three launches, no host synchronisation. Contract: :func:`eagle_kernels.reference.lm_head_topk`.

1. ``_lm_head_topk_kernel``: each program computes the logits of a ``BLOCK_V`` slice of the vocabulary for
   ``BLOCK_R`` rows and writes only a tile-local max, sum-exp and top-``K_PAD`` candidates. The grid is
   ``(row blocks, vocabulary tiles)`` with the row blocks on the fastest axis: the programs that read one
   weight tile are adjacent in launch order (every one of them, up to 128 rows, is a single program), so the
   ``[V, H]`` weight streams from memory once per call for any number of rows a draft level has (at
   Llama-3 shapes, 1 GB per read); the others find it in L2.
2. ``_lm_head_topk_group_kernel``, one program per (row, group of tiles), in parallel: the group's
   log-sum-exp partial and its top-``K_PAD`` candidates.
3. ``_lm_head_topk_final_kernel``, one program per row: the log-sum-exp of the groups and the top-k of their
   candidates, all in registers (at most ``FINAL_BLOCK`` candidates).

Ties: candidates stay in (value descending, vocabulary index ascending) order at every stage, so among equal
logits the smallest index comes first, as ``torch.topk`` usually gives.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton_common import dot as _dot
from ._triton_common import interpreter_needs_fp32_dot

# name -> (BLOCK_R, BLOCK_V, BLOCK_H, num_warps, num_stages), by the rows of a call (see config_for_rows).
LM_HEAD_CONFIGS = {
    "small": (16, 128, 64, 4, 4),  # N <= 16: decode, a draft level at batch 1
    "medium": (64, 128, 64, 8, 3),  # N <= 64
    "large": (128, 128, 64, 8, 3),  # N > 64: blocks of 128 rows, adjacent in launch order
}
K_PAD_CHOICES = (1, 4, 16)  # tile-local top-K_PAD, K_PAD the smallest choice >= k
MAX_TOPK = K_PAD_CHOICES[-1]
GROUP_CANDIDATES = 1024  # candidates one group program reduces: GROUP_CANDIDATES // K_PAD tiles
FINAL_BLOCK = 1024  # candidates the final program holds: groups * K_PAD <= FINAL_BLOCK
MAX_VOCAB = (FINAL_BLOCK // MAX_TOPK) * (GROUP_CANDIDATES // MAX_TOPK) * 128  # groups x tiles x BLOCK_V
MERGE_NUM_WARPS = 4


@triton.jit(do_not_specialize=["N", "num_tiles"])
def _lm_head_topk_kernel(
    h_ptr, w_ptr, cand_val_ptr, cand_idx_ptr, tile_max_ptr, tile_sum_ptr,
    N, V, H, num_tiles,
    stride_h, stride_w,
    K_PAD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    FP32_DOT: tl.constexpr,
):
    pid_r = tl.program_id(0)  # fastest: the row blocks sharing this program's weight tile run together
    pid_v = tl.program_id(1)
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
def _take_best(vals, ok, offs, BLOCK: tl.constexpr):
    """The best remaining candidate (the smallest position among equal values: candidates are kept in
    vocabulary order) and the candidates without it: ``(value, position, vals, ok)``."""
    best = tl.max(vals, 0)
    at = tl.min(tl.where(ok & (vals == best), offs, BLOCK), 0)
    return best, at, tl.where(offs == at, float("-inf"), vals), ok & (offs != at)


@triton.jit(do_not_specialize=["num_tiles", "num_groups"])
def _lm_head_topk_group_kernel(
    cand_val_ptr, cand_idx_ptr, tile_max_ptr, tile_sum_ptr,
    grp_val_ptr, grp_idx_ptr, grp_max_ptr, grp_sum_ptr,
    num_tiles, num_groups,
    K_PAD: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1)
    tiles_per_group = BLOCK // K_PAD
    offs = tl.arange(0, BLOCK)
    # Log-sum-exp partial over this group's tiles (the first tiles_per_group lanes).
    tile = g * tiles_per_group + offs
    tile_ok = (offs < tiles_per_group) & (tile < num_tiles)
    tm = tl.load(tile_max_ptr + row * num_tiles + tile, mask=tile_ok, other=float("-inf"))
    ts = tl.load(tile_sum_ptr + row * num_tiles + tile, mask=tile_ok, other=0.0)
    gm = tl.max(tm, 0)
    gs = tl.sum(tl.where(tile_ok, ts * tl.exp(tm - gm), 0.0), 0)
    out = row * num_groups + g
    tl.store(grp_max_ptr + out, gm)
    tl.store(grp_sum_ptr + out, gs)
    # Top-K_PAD of the group's candidates: the best value, the smallest position among equals.
    pos = g * BLOCK + offs
    ok = pos < num_tiles * K_PAD
    vals = tl.load(cand_val_ptr + row * num_tiles * K_PAD + pos, mask=ok, other=float("-inf"))
    for i in tl.static_range(K_PAD):
        best, at, vals, ok = _take_best(vals, ok, offs, BLOCK)
        idx = tl.load(cand_idx_ptr + row * num_tiles * K_PAD + g * BLOCK + at, mask=at < BLOCK, other=0)
        tl.store(grp_val_ptr + out * K_PAD + i, best)
        tl.store(grp_idx_ptr + out * K_PAD + i, idx)


@triton.jit(do_not_specialize=["num_groups", "k"])
def _lm_head_topk_final_kernel(
    grp_val_ptr, grp_idx_ptr, grp_max_ptr, grp_sum_ptr, out_val_ptr, out_idx_ptr,
    num_groups, k,
    K_PAD: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    g_ok = offs < num_groups
    gm = tl.load(grp_max_ptr + row * num_groups + offs, mask=g_ok, other=float("-inf"))
    gs = tl.load(grp_sum_ptr + row * num_groups + offs, mask=g_ok, other=0.0)
    m = tl.max(gm, 0)
    lse = m + tl.log(tl.sum(tl.where(g_ok, gs * tl.exp(gm - m), 0.0), 0))
    ok = offs < num_groups * K_PAD
    vals = tl.load(grp_val_ptr + row * num_groups * K_PAD + offs, mask=ok, other=float("-inf"))
    for i in range(k):
        best, at, vals, ok = _take_best(vals, ok, offs, BLOCK)
        idx = tl.load(grp_idx_ptr + row * num_groups * K_PAD + at, mask=at < BLOCK, other=0)
        tl.store(out_val_ptr + row * k + i, best - lse)
        tl.store(out_idx_ptr + row * k + i, idx.to(tl.int64))


def config_for_rows(n_rows: int) -> str:
    """The tile config for ``n_rows`` rows: ``"small"`` (<= 16), ``"medium"`` (<= 64), else ``"large"``."""
    if n_rows <= 16:
        return "small"
    return "medium" if n_rows <= 64 else "large"


def k_pad_for(k: int) -> int:
    """Tile-local candidates per row: the smallest of ``K_PAD_CHOICES`` that is ``>= k``."""
    for k_pad in K_PAD_CHOICES:
        if k <= k_pad:
            return k_pad
    raise ValueError(f"lm_head_topk supports k <= {MAX_TOPK}, got {k}")


def launch_plan(n_rows: int, vocab: int, k: int, block_v: int | None = None) -> dict:
    """The grids and tiles a call uses: ``config``, ``grid`` of the logits kernel ``(row blocks, tiles)``,
    ``num_tiles``, ``k_pad``, ``num_groups``; and ``weight_reads``, the times the ``[V, H]`` weight streams
    from device memory *modelled* as 1: one program per weight tile up to 128 rows; beyond, the programs
    sharing a tile are adjacent in launch order (a test checks it) and the model assumes that L2 keeps the
    tile for that run of at most 5 programs (640 rows). ``bench_lm_head_topk.py`` measures it on a GPU."""
    block_r, default_block_v, *_ = LM_HEAD_CONFIGS[config_for_rows(n_rows)]
    block_v = default_block_v if block_v is None else block_v
    k_pad = k_pad_for(k)
    num_tiles = triton.cdiv(vocab, block_v)
    num_groups = triton.cdiv(num_tiles * k_pad, GROUP_CANDIDATES)
    return dict(config=config_for_rows(n_rows), grid=(triton.cdiv(n_rows, block_r), num_tiles),
                num_tiles=num_tiles, k_pad=k_pad, num_groups=num_groups, block_v=block_v, weight_reads=1)


def _lm_head_topk(hidden, weight, k, block_v=None):
    n, h = hidden.shape
    v = weight.shape[0]
    if weight.shape[1] != h:
        raise ValueError(f"shape mismatch: hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise ValueError("hidden and weight must share one dtype")
    if not 1 <= k <= v:
        raise ValueError(f"k={k} must be in [1, V={v}]")
    plan = launch_plan(n, v, k, block_v)
    k_pad, num_tiles, num_groups = plan["k_pad"], plan["num_tiles"], plan["num_groups"]
    if num_groups * k_pad > FINAL_BLOCK:
        raise ValueError(f"lm_head_topk supports a vocabulary of at most {MAX_VOCAB} with k <= 16, got {v}")
    block_r, _, block_h, num_warps, num_stages = LM_HEAD_CONFIGS[plan["config"]]
    hidden = hidden if hidden.stride(-1) == 1 else hidden.contiguous()
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    dev = hidden.device
    values = torch.empty((n, k), dtype=torch.float32, device=dev)
    indices = torch.empty((n, k), dtype=torch.int64, device=dev)
    if n == 0:
        return values, indices
    f32, i32 = dict(dtype=torch.float32, device=dev), dict(dtype=torch.int32, device=dev)
    cand_val, cand_idx = torch.empty((n, num_tiles, k_pad), **f32), torch.empty((n, num_tiles, k_pad), **i32)
    tile_max, tile_sum = torch.empty((n, num_tiles), **f32), torch.empty((n, num_tiles), **f32)
    _lm_head_topk_kernel[plan["grid"]](
        hidden, weight, cand_val, cand_idx, tile_max, tile_sum,
        n, v, h, num_tiles, hidden.stride(0), weight.stride(0),
        K_PAD=k_pad, BLOCK_R=block_r, BLOCK_V=plan["block_v"], BLOCK_H=block_h,
        FP32_DOT=interpreter_needs_fp32_dot(_lm_head_topk_kernel, hidden.dtype),
        num_warps=num_warps, num_stages=num_stages,
    )
    grp_val, grp_idx = torch.empty((n, num_groups, k_pad), **f32), torch.empty((n, num_groups, k_pad), **i32)
    grp_max, grp_sum = torch.empty((n, num_groups), **f32), torch.empty((n, num_groups), **f32)
    _lm_head_topk_group_kernel[(n, num_groups)](
        cand_val, cand_idx, tile_max, tile_sum, grp_val, grp_idx, grp_max, grp_sum, num_tiles, num_groups,
        K_PAD=k_pad, BLOCK=GROUP_CANDIDATES, num_warps=MERGE_NUM_WARPS, num_stages=1,
    )
    _lm_head_topk_final_kernel[(n,)](
        grp_val, grp_idx, grp_max, grp_sum, values, indices, num_groups, k,
        K_PAD=k_pad, BLOCK=FINAL_BLOCK, num_warps=MERGE_NUM_WARPS, num_stages=1,
    )
    return values, indices


def lm_head_topk(hidden, weight, k):
    """Top-k log-probabilities of ``softmax(hidden @ weight.T)`` without writing the ``[N, V]`` logits.

    Parameters
    ----------
    hidden : ``[N, H]`` fp16, bf16 or fp32; weight : ``[V, H]`` in ``hidden.dtype``, ``V <= 524288``;
    k : ``1 <= k <= 16``

    Returns
    -------
    ``(logprobs fp32 [N, k], indices int64 [N, k])`` sorted by decreasing log-probability (logits computed in
    fp32 from the inputs, not rounded to the input dtype). Three launches; the weight is read from device
    memory once per call for any ``N`` (see the module).
    """
    return _lm_head_topk(hidden, weight, k)


__all__ = ["lm_head_topk", "launch_plan", "MAX_TOPK", "MAX_VOCAB"]
