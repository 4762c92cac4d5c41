"""Triton attention-input step: optional per-head RMSNorm of q and k (Qwen3), rotary embedding of both, and
the K/V cache write, in one launch.

One program per ``(token, head)`` over ``Hq + Hkv`` heads: a query head writes its rotated row to the new
``q_rot``; a kv head writes its rotated key and raw value straight into the caches at row ``rows[b] + t``.
Inputs are read in place from strided views (the slices of one fused qkv projection output; caches that are
slices of the engine's ``[L, 2, B, Hkv, S, D]`` buffer). Contract:
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


@triton.jit(do_not_specialize=["T", "Hq", "S", "stride_pb", "stride_pt"])
def _rotary_store_kv_kernel(
    q_ptr, k_ptr, v_ptr, pos_ptr, cs_ptr, kc_ptr, vc_ptr, rows_ptr, qw_ptr, kw_ptr, qo_ptr,
    T, Hq, S, half, eps,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_pb, stride_pt, stride_cs,
    stride_kcb, stride_kch, stride_kcs,
    stride_vcb, stride_vch, stride_vcs,
    HAS_Q_NORM: tl.constexpr, HAS_K_NORM: tl.constexpr, BLOCK_HALF: tl.constexpr,
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
        row = tl.load(rows_ptr + b).to(tl.int64) + t
        # A scalar branch, not a scalar folded into the lane mask: newer Triton interpreters (3.9) splat a
        # scalar bool to int64 lanes and refuses the result as a store mask.
        if (row >= 0) & (row < S):
            kdst = kc_ptr + b * stride_kcb + hk * stride_kch + row * stride_kcs
            kc_dtype = kc_ptr.dtype.element_ty
            tl.store(kdst + offs, y1.to(io_dtype).to(kc_dtype), mask=ok)
            tl.store(kdst + half + offs, y2.to(io_dtype).to(kc_dtype), mask=ok)
            vsrc = v_ptr + b * stride_vb + t * stride_vt + hk * stride_vh
            vdst = vc_ptr + b * stride_vcb + hk * stride_vch + row * stride_vcs
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
                    q_norm_weight=None, k_norm_weight=None, eps=1e-6):
    """Optional per-head RMSNorm of q and k, rotary embedding (rotate-half), and the K/V cache write.

    Parameters
    ----------
    q : ``[B, T, Hq, D]``; k, v : ``[B, T, Hkv, D]``, one dtype (fp16, bf16 or fp32), ``D`` even and
        ``<= 256``; any strides with a contiguous last dim (views of a fused qkv output are read in place)
    positions : int32 or int64 ``[B, T]``
    cos_sin : fp32 ``[P, D]``: ``cos`` in the first ``D/2`` columns, ``sin`` in the last ``D/2``
    k_cache, v_cache : ``[B, Hkv, S, D]``, any strides with a contiguous last dim (updated in place)
    rows : int32 or int64 ``[B]``: new row ``t`` of sequence ``b`` goes to cache row ``rows[b] + t``
    q_norm_weight, k_norm_weight : ``[D]`` or ``None``: RMSNorm over head_dim before the rotation
    eps : RMSNorm epsilon

    Returns
    -------
    rotated q, a new contiguous ``[B, T, Hq, D]`` in ``q.dtype``. One launch, no host synchronisation.
    """
    bsz, seq, hq, d = q.shape
    hkv = k.shape[2]
    if k.shape != (bsz, seq, hkv, d) or v.shape != k.shape:
        raise ValueError(f"shape mismatch: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k_cache.shape[:2] != (bsz, hkv) or k_cache.shape[3] != d or v_cache.shape != k_cache.shape:
        raise ValueError(f"caches must be [{bsz}, {hkv}, S, {d}], got {tuple(k_cache.shape)}, "
                         f"{tuple(v_cache.shape)}")
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
    _rotary_store_kv_kernel[(bsz * seq, hq + hkv)](
        q, k, v, positions, cos_sin, k_cache, v_cache, rows, qw, kw, q_out,
        seq, hq, k_cache.shape[2], d // 2, float(eps),
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        positions.stride(0), positions.stride(1), cos_sin.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        HAS_Q_NORM=q_norm_weight is not None, HAS_K_NORM=k_norm_weight is not None, BLOCK_HALF=block_half,
        num_warps=_num_warps(block_half), num_stages=1,
    )
    return q_out


__all__ = ["rotary_store_kv", "MAX_HEAD_DIM"]
