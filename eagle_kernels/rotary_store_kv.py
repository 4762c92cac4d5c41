"""Triton attention-input step: optional per-head RMSNorm of q and k (Qwen3), rotary embedding of both, and
the K/V cache write, in one launch.

One program per ``(token, head)`` over ``Hq + Hkv`` heads: a query head writes its rotated row to the new
``q_rot``; a kv head writes its rotated key and raw value straight into the caches at logical row
``rows[b] + t``: through the block table into a pool ``[num_blocks, Hkv, block_size, D]`` (any strides: a
``[num_blocks, block_size, Hkv, D]`` pool as a permuted view), or, without a table, row ``rows[b] + t`` of
``[B, Hkv, S, D]`` (the identity table; ``PAGED`` is a constexpr, so that variant loads no table). Inputs are
read in place from strided views (the slices of one fused qkv projection output; caches that are slices of
the engine's ``[L, 2, num_blocks, Hkv, block_size, D]`` buffer). Contract:
:func:`eagle_kernels.reference.rotary_store_kv`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

HALF_CHOICES = (16, 32, 64, 128)  # BLOCK_HALF: the smallest >= head_dim / 2 (head_dim <= 256, even)
MAX_HEAD_DIM = 2 * HALF_CHOICES[-1]


def _num_warps(block_half: int) -> int:
    return 1 if block_half <= 32 else (2 if block_half == 64 else 4)


@triton.jit(do_not_specialize=["T", "Hq", "S", "stride_pb", "stride_pt", "block_size", "stride_tab"])
def _rotary_store_kv_kernel(
    q_ptr, k_ptr, v_ptr, pos_ptr, cs_ptr, kc_ptr, vc_ptr, rows_ptr, tab_ptr, qw_ptr, kw_ptr, qo_ptr,
    T, Hq, S, half, eps, block_size, stride_tab,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_pb, stride_pt, stride_cs,
    stride_kcb, stride_kch, stride_kcs,
    stride_vcb, stride_vch, stride_vcs,
    HAS_Q_NORM: tl.constexpr, HAS_K_NORM: tl.constexpr, BLOCK_HALF: tl.constexpr, PAGED: tl.constexpr,
):
    bt = tl.program_id(0)
    head = tl.program_id(1)
    b = (bt // T).to(tl.int64)
    t = bt % T
    offs = tl.arange(0, BLOCK_HALF)
    ok = offs < half
    pos = tl.load(pos_ptr + b * stride_pb + t * stride_pt).to(tl.int64)
    cos = tl.load(cs_ptr + pos * stride_cs + offs, mask=ok, other=0.0).to(tl.float32)
    sin = tl.load(cs_ptr + pos * stride_cs + half + offs, mask=ok, other=0.0).to(tl.float32)
    is_q = head < Hq
    hk = head - Hq  # the kv head, for head >= Hq
    if is_q:
        src = q_ptr + b * stride_qb + t * stride_qt + head * stride_qh
        w_ptr = qw_ptr
    else:
        src = k_ptr + b * stride_kb + t * stride_kt + hk * stride_kh
        w_ptr = kw_ptr
    io_dtype = q_ptr.dtype.element_ty
    x1 = tl.load(src + offs, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(src + half + offs, mask=ok, other=0.0).to(tl.float32)
    if (HAS_Q_NORM and is_q) or (HAS_K_NORM and not is_q):
        # reference.rms_norm: fp32 statistics, normalised value rounded to the input dtype, then the weight
        rstd = tl.math.rsqrt((tl.sum(x1 * x1, 0) + tl.sum(x2 * x2, 0)) / (2 * half) + eps)
        w1 = tl.load(w_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        w2 = tl.load(w_ptr + half + offs, mask=ok, other=0.0).to(tl.float32)
        x1 = (w1 * (x1 * rstd).to(io_dtype).to(tl.float32)).to(io_dtype).to(tl.float32)
        x2 = (w2 * (x2 * rstd).to(io_dtype).to(tl.float32)).to(io_dtype).to(tl.float32)
    y1 = x1 * cos - x2 * sin
    y2 = x2 * cos + x1 * sin
    if is_q:
        dst = qo_ptr + ((b * T + t) * Hq + head) * (2 * half)
        tl.store(dst + offs, y1.to(io_dtype), mask=ok)
        tl.store(dst + half + offs, y2.to(io_dtype), mask=ok)
    else:
        row = tl.load(rows_ptr + b).to(tl.int64) + t  # logical row; S: the capacity
        # A scalar branch, not a scalar folded into the lane mask: newer Triton interpreters (3.9) splat a
        # scalar bool to int64 lanes and refuses the result as a store mask.
        if (row >= 0) & (row < S):
            if PAGED:
                blk = tl.load(tab_ptr + b * stride_tab + row // block_size).to(tl.int64)
                slot = row % block_size
            else:  # the identity table
                blk = b
                slot = row
            if blk >= 0:  # a negative table entry: padding, nothing written
                kdst = kc_ptr + blk * stride_kcb + hk * stride_kch + slot * stride_kcs
                kc_dtype = kc_ptr.dtype.element_ty
                tl.store(kdst + offs, y1.to(io_dtype).to(kc_dtype), mask=ok)
                tl.store(kdst + half + offs, y2.to(io_dtype).to(kc_dtype), mask=ok)
                vsrc = v_ptr + b * stride_vb + t * stride_vt + hk * stride_vh
                vdst = vc_ptr + blk * stride_vcb + hk * stride_vch + slot * stride_vcs
                v1 = tl.load(vsrc + offs, mask=ok, other=0.0)
                v2 = tl.load(vsrc + half + offs, mask=ok, other=0.0)
                tl.store(vdst + offs, v1.to(vc_ptr.dtype.element_ty), mask=ok)
                tl.store(vdst + half + offs, v2.to(vc_ptr.dtype.element_ty), mask=ok)


def block_half_for(head_dim: int) -> int:
    """Half-row tile: the smallest of ``HALF_CHOICES`` that is ``>= head_dim / 2``."""
    for block_half in HALF_CHOICES:
        if head_dim // 2 <= block_half:
            return block_half
    raise ValueError(f"rotary_store_kv supports head_dim <= {MAX_HEAD_DIM}, got {head_dim}")


def rotary_store_kv(q, k, v, positions, cos_sin, k_cache, v_cache, rows,
                    q_norm_weight=None, k_norm_weight=None, eps=1e-6, block_table=None):
    """Optional per-head RMSNorm of q and k, rotary embedding (rotate-half), and the K/V cache write.

    Parameters
    ----------
    q : ``[B, T, Hq, D]``; k, v : ``[B, T, Hkv, D]``, one dtype (fp16, bf16 or fp32), ``D`` even and
        ``<= 256``; any strides with a contiguous last dim (views of a fused qkv output are read in place)
    positions : int32 or int64 ``[B, T]``
    cos_sin : fp32 ``[P, D]``: ``cos`` in the first ``D/2`` columns, ``sin`` in the last ``D/2``
    k_cache, v_cache : any strides with a contiguous last dim (updated in place): with ``block_table``, one
        layer's pool ``[num_blocks, Hkv, block_size, D]`` (a ``[num_blocks, block_size, Hkv, D]`` pool as
        ``pool.permute(0, 2, 1, 3)``); without, ``[B, Hkv, S, D]``
    rows : int32 or int64 ``[B]``: new row ``t`` of sequence ``b`` goes to logical row ``rows[b] + t``; rows
        outside ``[0, S)`` (``S = max_blocks * block_size`` paged) are not written
    q_norm_weight, k_norm_weight : ``[D]`` or ``None``: RMSNorm over head_dim before the rotation
    eps : RMSNorm epsilon
    block_table : int32 ``[B, max_blocks]`` or ``None``: logical row ``r`` of sequence ``b`` is row
        ``r % block_size`` of block ``block_table[b, r // block_size]`` (a negative entry: not written);
        ``None``: the identity table (block ``b`` of ``S`` rows)

    Returns
    -------
    rotated q, a new contiguous ``[B, T, Hq, D]`` in ``q.dtype``. One launch, no host synchronisation.
    """
    bsz, seq, hq, d = q.shape
    hkv = k.shape[2]
    if k.shape != (bsz, seq, hkv, d) or v.shape != k.shape:
        raise ValueError(f"shape mismatch: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    paged = block_table is not None
    if (k_cache.dim() != 4 or k_cache.shape[1] != hkv or k_cache.shape[3] != d
            or v_cache.shape != k_cache.shape or (not paged and k_cache.shape[0] != bsz)):
        want = f"[num_blocks, {hkv}, block_size, {d}]" if paged else f"[{bsz}, {hkv}, S, {d}]"
        raise ValueError(f"caches must be {want}, got {tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    if paged and (block_table.dim() != 2 or block_table.shape[0] != bsz
                  or block_table.dtype.is_floating_point):
        raise ValueError(f"block_table must be int32 [{bsz}, max_blocks], got {block_table.dtype} "
                         f"{tuple(block_table.shape)}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError("q, k and v must share one dtype")
    if d % 2 or tuple(cos_sin.shape[1:]) != (d,) or positions.shape != (bsz, seq) or rows.shape != (bsz,):
        raise ValueError(f"need an even head_dim, cos_sin [P, {d}], positions [{bsz}, {seq}], rows [{bsz}]")
    for name, x in (("q", q), ("k", k), ("v", v), ("k_cache", k_cache), ("v_cache", v_cache),
                    ("cos_sin", cos_sin)):
        if x.stride(-1) != 1:
            raise ValueError(f"rotary_store_kv: {name} needs a contiguous last dim")
    for w in (q_norm_weight, k_norm_weight):
        if w is not None and (w.shape != (d,) or w.stride(0) != 1):
            raise ValueError(f"norm weights must be contiguous [{d}]")
    block_half = block_half_for(d)
    q_out = torch.empty((bsz, seq, hq, d), dtype=q.dtype, device=q.device)
    if bsz * seq == 0:
        return q_out
    qw = q_norm_weight if q_norm_weight is not None else cos_sin  # unused pointers when absent
    kw = k_norm_weight if k_norm_weight is not None else cos_sin
    block_size = k_cache.shape[2]
    if paged:
        table = block_table.to(torch.int32)
        table = table if table.stride(-1) == 1 else table.contiguous()
        capacity, stride_tab = table.shape[1] * block_size, table.stride(0)
    else:
        table, capacity, stride_tab = rows, block_size, 0  # unused pointer: the identity table
    _rotary_store_kv_kernel[(bsz * seq, hq + hkv)](
        q, k, v, positions, cos_sin, k_cache, v_cache, rows, table, qw, kw, q_out,
        seq, hq, capacity, d // 2, float(eps), block_size, stride_tab,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        positions.stride(0), positions.stride(1), cos_sin.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        HAS_Q_NORM=q_norm_weight is not None, HAS_K_NORM=k_norm_weight is not None, BLOCK_HALF=block_half,
        PAGED=paged, num_warps=_num_warps(block_half), num_stages=1,
    )
    return q_out


__all__ = ["rotary_store_kv", "MAX_HEAD_DIM"]
