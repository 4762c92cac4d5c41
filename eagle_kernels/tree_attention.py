"""Tree attention over the KV cache: one Triton flash-attention kernel for decode, trees and prefill.

Queries ``[B, Tq, Hq, D]`` attend to every committed prefix row ``< lengths[b]`` of the cache and to the tree
rows ``lengths[b] .. lengths[b] + tree_len - 1`` through a packed bit mask (or causally). The cache is a pool
of blocks read through a block table (``[num_blocks, Hkv, block_size, D]`` with any strides, so a
``[num_blocks, block_size, Hkv, D]`` pool passes as a permuted view), or the contiguous ``[B, Hkv, S, D]``
layout, the special case of ``B`` blocks of ``S`` rows with the identity table. Contract:
:func:`eagle_kernels.reference.tree_attention`.

Design
------
- GQA by grouping: one program owns one ``(batch, kv head)`` pair and a tile of ``BLOCK_M`` flattened
  ``(query, head-in-group)`` rows, so K/V are read once per group and never repeated in memory.
- Online softmax in the log2 domain, fp32 accumulation; the key loop has an unmasked phase over whole prefix
  blocks and a masked phase over the boundary block and the tree rows.
- Loop bounds come from ``lengths`` loaded on the device (no host synchronisation); the grid depends only on
  shapes, and programs whose key range is empty write zeros (or an empty partial).
- Split-KV (flash-decoding): when the grid under-fills the GPU and the cache is long, the key range of each
  program is cut into ``num_splits`` chunks, each written as a normalised partial with its log-sum-exp, then
  merged by ``_tree_attention_reduce_kernel``. Chosen by :func:`choose_num_splits`.
- The mask mode (packed bits or causal) and split/no-split are runtime scalars (uniform branches) that the
  JIT never specialises (``do_not_specialize``, like every integer that can be 1), so each dtype compiles to
  3 block configs x 2 head-dim tiles (x partial outputs or not), plus the reduction.
- Causal tiles (prefill) run the blocks below their diagonal unmasked: only the boundary blocks are masked.
- Paged: a key tile is ``BLOCK_N`` logical rows; each row's physical address is computed from its own table
  entry (a tile may span several blocks, or lie inside one). ``PAGED`` is a constexpr: ``False`` is the
  identity table (block ``b``, row ``r``), compiled without any table load, so the contiguous variants are
  what they were; ``True`` doubles the compiled variants (``tests/jit_sweep.py`` sweeps both). The number of
  key tiles is still bounded on the host by shapes only (``max_blocks * block_size``, the table's capacity).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._triton_common import (  # noqa: F401 (re-exported)
    HOPPER_MAX_SHARED,
    HOPPER_TWO_BLOCKS_SHARED,
    interpreted,
    interpreter_needs_fp32_dot,
)
from ._triton_common import dot as _dot

# (BLOCK_M, BLOCK_N, num_warps, num_stages) by the number of flattened query rows per kv head, for 16-bit
# inputs; fp32 inputs take half the key tile and two stages so that K/V buffers fit Hopper's 227 KiB of smem.
# Shared memory of what the JIT compiles for sm_90 at the engine's launches (tests/jit_sweep.py), BLOCK_D =
# 128, 16-bit / fp32: small 104448 / 77888 B, medium 86016 / 73984 B, large 139264 / 115200 B. Decode and
# draft steps (small, medium) stay within two blocks per SM (HOPPER_TWO_BLOCKS_SHARED, 115712 B); the former
# medium (64, 64, 4, 3) took 118784 B: one block per SM.
ATTN_CONFIGS = {
    "small": (16, 64, 4, 4),  # Tq * group <= 16: decode, small trees
    "medium": (64, 64, 4, 2),  # Tq * group <= 64: draft steps (top-k 10 x group 4)
    "large": (128, 64, 8, 3),  # prefill, big trees
}
ATTN_CONFIGS_FP32 = {
    "small": (16, 64, 4, 2),
    "medium": (64, 32, 4, 2),
    "large": (128, 32, 8, 2),
}
BLOCK_D_CHOICES = (64, 128)  # head_dim <= 64 -> 64, <= 128 -> 128 (80 is padded and masked)
SPLIT_MIN_KEYS = 1024  # no split below this cache capacity
SPLIT_MIN_CHUNK = 256  # keys per split at least
MAX_SPLITS = 32
DEFAULT_NUM_SMS = 132  # H100 SXM; used when the device cannot be asked (interpreter)
LOG2E = 1.4426950408889634
REDUCE_NUM_WARPS = 1


@triton.jit
def _kv_offsets(tab_ptr, pos, key_ok, block_size, stride_kb, stride_ks, stride_vb, stride_vs,
                PAGED: tl.constexpr):
    """Element offsets of the K and V rows of logical keys ``pos`` from their (pool or sequence, kv head)
    bases: through the sequence's block-table row ``tab_ptr`` when ``PAGED`` (one table load per key; a
    negative entry reads block 0, never out of bounds), else row ``pos`` of the sequence's own slab (the
    identity table, no load)."""
    if PAGED:
        blk = tl.maximum(tl.load(tab_ptr + pos // block_size, mask=key_ok, other=0), 0).to(tl.int64)
        row = pos % block_size
        return blk * stride_kb + row * stride_ks, blk * stride_vb + row * stride_vs
    else:
        return pos * stride_ks, pos * stride_vs


# Integers that can be 1 are not specialised by the JIT: one compiled variant per block config (the value 1
# would otherwise get code, and shared memory, of its own).
@triton.jit(do_not_specialize=["Tq", "Hq", "Hkv", "group", "tree_len", "num_splits", "has_mask", "stride_mb",
                               "stride_mt", "block_size", "stride_tab"])
def _tree_attention_kernel(
    q_ptr, k_ptr, v_ptr, len_ptr, mask_ptr, tab_ptr, out_ptr, part_o_ptr, part_lse_ptr,
    qk_scale,  # softmax scale * log2(e)
    Tq, Hq, Hkv, group, tree_len, D, num_splits, has_mask, block_size,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kh, stride_ks,  # (block, head, row) of the pool; (sequence, head, row) unpaged
    stride_vb, stride_vh, stride_vs,
    stride_mb, stride_mt, stride_tab,
    stride_ob, stride_ot, stride_oh,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, FP32_DOT: tl.constexpr,
    PAGED: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_s = tl.program_id(2)
    b = pid_bh // Hkv
    hk = pid_bh % Hkv
    prefix = tl.load(len_ptr + b).to(tl.int32)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # flattened (query, head in group)
    row_ok = rows < Tq * group
    t = rows // group
    h = hk * group + rows % group
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    offs_n = tl.arange(0, BLOCK_N)

    b64 = b.to(tl.int64)
    q_ptrs = q_ptr + b64 * stride_qb + t[:, None] * stride_qt + h[:, None] * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if PAGED:  # rows through the table: the block offset is per row
        k_base = k_ptr + hk.to(tl.int64) * stride_kh
        v_base = v_ptr + hk.to(tl.int64) * stride_vh
        tab_ptr = tab_ptr + b64 * stride_tab
    else:  # the identity table: block b, row r
        k_base = k_ptr + b64 * stride_kb + hk.to(tl.int64) * stride_kh
        v_base = v_ptr + b64 * stride_vb + hk.to(tl.int64) * stride_vh

    # Key range [0, kv_end): prefix, then tree rows (causally cut for this tile's last query). Keys before
    # full_end are visible to every query of the tile: the prefix, and causally also the tree rows up to the
    # tile's first query (a prefill chunk's blocks below the diagonal skip the masked path).
    if has_mask != 0:
        tree_end = tree_len
        full_end = prefix
    else:
        t_last = tl.minimum((pid_m * BLOCK_M + BLOCK_M - 1) // group, Tq - 1)
        tree_end = tl.maximum(tl.minimum(tree_len, t_last + tree_len - Tq + 1), 0)
        t_first = (pid_m * BLOCK_M) // group
        full_end = prefix + tl.maximum(tl.minimum(tree_len, t_first + tree_len - Tq + 1), 0)
    kv_end = prefix + tree_end
    n_blocks = tl.cdiv(kv_end, BLOCK_N)
    per_split = tl.cdiv(n_blocks, num_splits)
    blk_lo = tl.minimum(pid_s * per_split, n_blocks)
    blk_hi = tl.minimum(blk_lo + per_split, n_blocks)
    lo = blk_lo * BLOCK_N
    hi = blk_hi * BLOCK_N
    mid = tl.minimum(tl.maximum((full_end // BLOCK_N) * BLOCK_N, lo), hi)  # end of whole visible blocks

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # Phase 1: whole blocks every query of the tile sees.
    for start in range(lo, mid, BLOCK_N):
        pos = start + offs_n
        k_off, v_off = _kv_offsets(tab_ptr, pos, pos < kv_end, block_size, stride_kb, stride_ks, stride_vb,
                                   stride_vs, PAGED)
        k = tl.load(k_base + k_off[:, None] + offs_d[None, :], mask=d_ok[None, :], other=0.0)
        v = tl.load(v_base + v_off[:, None] + offs_d[None, :], mask=d_ok[None, :], other=0.0)
        s = _dot(q, tl.trans(k), FP32_DOT) * qk_scale
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, FP32_DOT)
        m_i = m_new

    # Phase 2: the boundary block and the remaining tree rows, masked per query.
    for start in range(mid, hi, BLOCK_N):
        pos = start + offs_n
        key_ok = pos < kv_end
        k_off, v_off = _kv_offsets(tab_ptr, pos, key_ok, block_size, stride_kb, stride_ks, stride_vb,
                                   stride_vs, PAGED)
        kv_ok = key_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + k_off[:, None] + offs_d[None, :], mask=kv_ok, other=0.0)
        v = tl.load(v_base + v_off[:, None] + offs_d[None, :], mask=kv_ok, other=0.0)
        s = _dot(q, tl.trans(k), FP32_DOT) * qk_scale
        j = pos - prefix  # tree-relative key index
        in_tree = (j >= 0) & (j < tree_len)
        if has_mask != 0:
            words = tl.load(mask_ptr + b64 * stride_mb + t[:, None] * stride_mt + (j // 32)[None, :],
                            mask=row_ok[:, None] & in_tree[None, :], other=0)
            tree_vis = ((words >> (j % 32)[None, :]) & 1) != 0
        else:
            tree_vis = j[None, :] <= (t + (tree_len - Tq))[:, None]
        visible = (pos < prefix)[None, :] | (in_tree[None, :] & tree_vis)
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, FP32_DOT)
        m_i = m_new

    seen = l_i > 0.0
    o = acc / tl.where(seen, l_i, 1.0)[:, None]  # a query that sees nothing has acc == 0
    if num_splits > 1:
        # partials: row r = (b * Tq + t) * Hq + h; part_o [R, num_splits, BLOCK_D], part_lse [R, num_splits]
        r = (b64 * Tq + t) * Hq + h
        slot = r * num_splits + pid_s
        lse = tl.where(seen, m_i + tl.log2(tl.where(seen, l_i, 1.0)), float("-inf"))
        tl.store(part_lse_ptr + slot, lse, mask=row_ok)
        tl.store(part_o_ptr + slot[:, None] * BLOCK_D + offs_d[None, :], o, mask=row_ok[:, None])
    else:
        o_ptrs = out_ptr + b64 * stride_ob + t[:, None] * stride_ot + h[:, None] * stride_oh + offs_d[None, :]
        tl.store(o_ptrs, o.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


@triton.jit(do_not_specialize=["Tq", "Hq", "num_splits"])
def _tree_attention_reduce_kernel(
    part_o_ptr, part_lse_ptr, out_ptr,
    Tq, Hq, D, num_splits,
    stride_ob, stride_ot, stride_oh,
    BLOCK_D: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)  # (b * Tq + t) * Hq + h
    b = r // (Tq * Hq)
    t = (r // Hq) % Tq
    h = r % Hq
    offs_d = tl.arange(0, BLOCK_D)
    m = tl.full([], float("-inf"), dtype=tl.float32)
    l_sum = tl.zeros([], dtype=tl.float32)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for s in range(num_splits):
        lse = tl.load(part_lse_ptr + r * num_splits + s)
        o = tl.load(part_o_ptr + (r * num_splits + s) * BLOCK_D + offs_d)
        m_new = tl.maximum(m, lse)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        w_old = tl.exp2(m - m_safe)
        w = tl.exp2(lse - m_safe)
        acc = acc * w_old + o * w
        l_sum = l_sum * w_old + w
        m = m_new
    res = acc / tl.where(l_sum > 0.0, l_sum, 1.0)
    tl.store(out_ptr + b * stride_ob + t * stride_ot + h * stride_oh + offs_d,
             res.to(out_ptr.dtype.element_ty), mask=offs_d < D)


# ------------------------------------------------------------------------------------------ host side


def shared_memory_budget(kernel_name: str, constexprs: dict) -> int:
    """Bytes of shared memory a compiled variant may use on Hopper: decode and draft-step tiles (the
    ``small`` and ``medium`` configs) leave room for two blocks per SM; the rest may take a whole block's."""
    small_tiles = {cfg[0] for name, cfg in ATTN_CONFIGS.items() if name != "large"}
    if kernel_name == "_tree_attention_kernel" and constexprs.get("BLOCK_M") in small_tiles:
        return HOPPER_TWO_BLOCKS_SHARED
    return HOPPER_MAX_SHARED


def block_d_for(head_dim: int) -> int:
    """Padded head-dim tile: 64 for ``D <= 64``, 128 for ``D <= 128``."""
    for block_d in BLOCK_D_CHOICES:
        if head_dim <= block_d:
            return block_d
    raise ValueError(f"tree_attention supports head_dim <= {BLOCK_D_CHOICES[-1]}, got {head_dim}")


def attn_configs(fp32: bool) -> dict:
    """The block-config table for fp32 or 16-bit inputs."""
    return ATTN_CONFIGS_FP32 if fp32 else ATTN_CONFIGS


def config_name_for(rows_per_kv_head: int) -> str:
    """Block config for ``Tq * group`` flattened query rows per kv head (see ``ATTN_CONFIGS``)."""
    if rows_per_kv_head <= 16:
        return "small"
    if rows_per_kv_head <= 64:
        return "medium"
    return "large"


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (``DEFAULT_NUM_SMS`` off-GPU)."""
    if device.type == "cuda":
        return _num_sms(device.index if device.index is not None else torch.cuda.current_device())
    return DEFAULT_NUM_SMS


def choose_num_splits(num_programs: int, cache_len: int, sms: int) -> int:
    """Split-KV heuristic (host-only arithmetic on shapes, no device values).

    Split only when the un-split grid (``B * Hkv * ceil(Tq * group / BLOCK_M)`` programs) under-fills the GPU
    (``num_programs < sms``) and the cache capacity ``S`` is long (``>= SPLIT_MIN_KEYS``). Then aim for about
    two waves of programs, ``ceil(2 * sms / num_programs)`` splits, with at least ``SPLIT_MIN_CHUNK`` keys of
    capacity per split and at most ``MAX_SPLITS``. Each split takes an equal share of its sequence's real key
    range (``lengths[b] + tree_len``, read on the device), so short sequences in a long cache still balance.
    """
    if cache_len < SPLIT_MIN_KEYS or num_programs >= sms:
        return 1
    want = triton.cdiv(2 * sms, max(num_programs, 1))
    return max(1, min(want, cache_len // SPLIT_MIN_CHUNK, MAX_SPLITS))


def launch_plan(bsz: int, tq: int, hq: int, hkv: int, cache_len: int, dtype: torch.dtype, device):
    """``(BLOCK_M, BLOCK_N, num_warps, num_stages, m_blocks, num_splits)`` the dispatch picks for a shape."""
    rows = tq * (hq // hkv)
    block_m, block_n, num_warps, num_stages = attn_configs(dtype == torch.float32)[config_name_for(rows)]
    m_blocks = triton.cdiv(rows, block_m)
    num_splits = choose_num_splits(m_blocks * bsz * hkv, cache_len, num_sms(torch.device(device)))
    return block_m, block_n, num_warps, num_stages, m_blocks, num_splits


def paged_geometry(k_cache, v_cache, block_table, batch: int) -> tuple[int, int, int]:
    """``(Hkv, block_size, capacity)`` of a cache and its block table, checked: ``k_cache``/``v_cache`` a pool
    ``[num_blocks, Hkv, block_size, D]`` read through ``block_table`` int ``[B, max_blocks]`` (capacity
    ``max_blocks * block_size`` logical rows per sequence), or with ``block_table=None`` the contiguous
    ``[B, Hkv, S, D]`` (``B`` blocks of ``S`` rows, the identity table: capacity ``S``)."""
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(f"k_cache and v_cache must be one 4-d shape, got {tuple(k_cache.shape)}, "
                         f"{tuple(v_cache.shape)}")
    _, hkv, block_size, _ = k_cache.shape
    if block_table is None:
        if k_cache.shape[0] != batch:
            raise ValueError(f"contiguous caches must be [B={batch}, Hkv, S, D], got {tuple(k_cache.shape)}")
        return hkv, block_size, block_size
    if block_table.dim() != 2 or block_table.shape[0] != batch or block_table.dtype.is_floating_point:
        raise ValueError(f"block_table must be int32 [B={batch}, max_blocks], got {block_table.dtype} "
                         f"{tuple(block_table.shape)}")
    return hkv, block_size, block_table.shape[1] * block_size


def _tree_attention(q, k_cache, v_cache, lengths, tree_mask=None, tree_len=None, scale=None, num_splits=None,
                    block_table=None):
    """:func:`tree_attention` with ``num_splits`` exposed (``None``: heuristic; 1: no split) for tests."""
    bsz, tq, hq, d = q.shape
    hkv, block_size, cache_len = paged_geometry(k_cache, v_cache, block_table, bsz)
    if k_cache.shape[-1] != d:
        raise ValueError(f"shape mismatch: q {tuple(q.shape)}, k {tuple(k_cache.shape)}, "
                         f"v {tuple(v_cache.shape)}")
    if hq % hkv != 0:
        raise ValueError(f"Hq={hq} is not a multiple of Hkv={hkv}")
    if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise ValueError("q, k_cache and v_cache must share one dtype")
    tree_len = tq if tree_len is None else int(tree_len)
    if tree_len < tq:
        raise ValueError(f"tree_len={tree_len} < Tq={tq}")
    scale = d**-0.5 if scale is None else float(scale)
    group = hq // hkv
    block_d = block_d_for(d)

    if q.stride(-1) != 1:
        q = q.contiguous()
    if k_cache.stride(-1) != 1:
        k_cache = k_cache.contiguous()
    if v_cache.stride(-1) != 1:
        v_cache = v_cache.contiguous()
    lengths = lengths.to(torch.int32)
    paged = block_table is not None
    if paged:
        table = block_table.to(torch.int32)
        table = table if table.stride(-1) == 1 else table.contiguous()
        stride_tab = table.stride(0)
    else:
        table, stride_tab = lengths, 0  # unused pointer: the identity table is computed, not loaded
    out = torch.empty((bsz, tq, hq, d), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    has_mask = tree_mask is not None
    if has_mask:
        words = triton.cdiv(tree_len, 32)
        if tuple(tree_mask.shape) != (bsz, tq, words) or tree_mask.dtype != torch.int32:
            raise ValueError(f"tree_mask must be int32 [{bsz}, {tq}, {words}], got {tree_mask.dtype} "
                             f"{tuple(tree_mask.shape)}")
        mask = tree_mask if tree_mask.stride(-1) == 1 else tree_mask.contiguous()
        stride_mb, stride_mt = mask.stride(0), mask.stride(1)
    else:
        mask, stride_mb, stride_mt = lengths, 0, 0  # unused pointer

    block_m, block_n, num_warps, num_stages, m_blocks, heuristic_splits = launch_plan(
        bsz, tq, hq, hkv, cache_len, q.dtype, q.device)
    num_splits = heuristic_splits if num_splits is None else max(1, int(num_splits))
    split = num_splits > 1
    if split:
        part_o = torch.empty((bsz * tq * hq, num_splits, block_d), dtype=torch.float32, device=q.device)
        part_lse = torch.empty((bsz * tq * hq, num_splits), dtype=torch.float32, device=q.device)
    else:
        part_o = part_lse = out  # unused pointers

    _tree_attention_kernel[(m_blocks, bsz * hkv, num_splits)](
        q, k_cache, v_cache, lengths, mask, table, out, part_o, part_lse,
        scale * LOG2E,
        tq, hq, hkv, group, tree_len, d, num_splits, int(has_mask), block_size,
        q.stride(0), q.stride(1), q.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        stride_mb, stride_mt, stride_tab,
        out.stride(0), out.stride(1), out.stride(2),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        FP32_DOT=interpreter_needs_fp32_dot(_tree_attention_kernel, q.dtype), PAGED=paged,
        num_warps=num_warps, num_stages=num_stages,
    )
    if split:
        _tree_attention_reduce_kernel[(bsz * tq * hq,)](
            part_o, part_lse, out, tq, hq, d, num_splits,
            out.stride(0), out.stride(1), out.stride(2),
            BLOCK_D=block_d, num_warps=REDUCE_NUM_WARPS, num_stages=1,
        )
    return out


def tree_attention(q, k_cache, v_cache, lengths, tree_mask=None, tree_len=None, scale=None, block_table=None):
    """Attention of new queries over a committed prefix plus masked tree keys in the cache (Triton).

    Parameters
    ----------
    q : ``[B, Tq, Hq, D]`` fp16, bf16 or fp32, ``D <= 128`` (any stride; last dim made contiguous)
    k_cache, v_cache : in ``q.dtype``, ``Hq % Hkv == 0``, any strides with a contiguous last dim:
        with ``block_table``, one layer's pool ``[num_blocks, Hkv, block_size, D]`` (a
        ``[num_blocks, block_size, Hkv, D]`` pool passes as ``pool.permute(0, 2, 1, 3)``); without, the
        contiguous cache ``[B, Hkv, S, D]``
    lengths : int32 ``[B]`` on ``q.device``: logical rows ``< lengths[b]`` are visible to every query
    tree_mask : int32 ``[B, Tq, ceil(tree_len / 32)]`` packed bits, or ``None`` for causal (a prefill chunk:
        ``Tq = tree_len``)
    tree_len : number of tree rows after the prefix (default ``Tq``, must be ``>= Tq``); the tree occupies
        logical rows ``lengths[b] .. lengths[b] + tree_len - 1``, ``lengths[b] + tree_len <= S`` (or
        ``<= max_blocks * block_size``)
    scale : softmax scale (default ``D ** -0.5``)
    block_table : int32 ``[B, max_blocks]`` or ``None``: logical row ``r`` of sequence ``b`` is row
        ``r % block_size`` of block ``block_table[b, r // block_size]``; entries past the blocks holding rows
        ``< lengths[b] + tree_len`` are never read (``-1`` or anything). ``None``: the identity table.

    Returns
    -------
    ``[B, Tq, Hq, D]`` in ``q.dtype``; a query that sees no key gets zeros. Never synchronises with the host.
    """
    return _tree_attention(q, k_cache, v_cache, lengths, tree_mask, tree_len, scale, block_table=block_table)


__all__ = ["tree_attention", "choose_num_splits", "shared_memory_budget", "ATTN_CONFIGS"]
