"""Pure-PyTorch reference of every op: the specification, the CPU path and the test oracle.

Conventions shared by all ops (see DESIGN.md):
- KV cache, paged (the layout of vLLM, SGLang and FlashInfer): one pool per layer, ``k_cache``/``v_cache``
  ``[num_blocks, Hkv, block_size, D]``, e.g. ``cache[layer, 0|1]`` of an engine buffer
  ``[num_layers, 2, num_blocks, Hkv, block_size, D]``. The kernels take the pool's strides (block, head, row;
  the last dim contiguous), so a ``[num_blocks, block_size, Hkv, D]`` ("NHD") pool is passed as the view
  ``pool.permute(0, 2, 1, 3)``.
- ``block_table`` int32 ``[B, max_blocks]``: logical row ``r`` of sequence ``b`` is row ``r % block_size`` of
  block ``block_table[b, r // block_size]``. Entries past a sequence's last used block are ignored (``-1`` or
  anything). Blocks holding a sequence's tree rows must be its own (not shared with another sequence). Writes
  through a negative entry are skipped (padding, like vLLM's slot ``-1``); reads through one read block 0.
- ``lengths[b]`` (int32 ``[B]``) counts the committed prefix; a round's new ("tree") tokens live at logical
  rows ``lengths[b] .. lengths[b] + tree_len - 1``, through the table (they may cross block boundaries).
- ``block_table=None``: the contiguous layout, ``k_cache``/``v_cache`` ``[B, Hkv, S, D]`` (a slice
  ``cache[layer, 0|1]`` of ``[num_layers, 2, B, Hkv, S, D]``), which is exactly a pool of ``num_blocks = B``
  blocks of ``block_size = S`` rows with the identity table ``[[0], [1], ..., [B - 1]]``.
- Tree masks are packed bits: ``int32 [B, Tq, ceil(tree_len / 32)]``; bit ``j % 32`` of word ``j // 32`` in
  row ``i`` says query ``i`` sees tree key ``j``. ``None`` means causal (query ``i`` of the last ``Tq`` tree
  rows sees tree keys ``<= i + tree_len - Tq``).
"""

from __future__ import annotations

import torch

# ----------------------------------------------------------------------------------------------- masks


def pack_tree_mask(mask: torch.Tensor) -> torch.Tensor:
    """Pack a boolean tree mask into 32-bit words.

    Parameters
    ----------
    mask : bool ``[B, Tq, Tk]`` (or ``[Tq, Tk]``, broadcast to batch 1)

    Returns
    -------
    int32 ``[B, Tq, ceil(Tk / 32)]``: bit ``j % 32`` of word ``j // 32`` is ``mask[..., j]``.
    """
    if mask.dim() == 2:
        mask = mask.unsqueeze(0)
    b, tq, tk = mask.shape
    words = (tk + 31) // 32
    padded = torch.zeros(b, tq, words * 32, dtype=torch.int64, device=mask.device)
    padded[..., :tk] = mask.to(torch.int64)
    weights = torch.bitwise_left_shift(
        torch.ones(32, dtype=torch.int64, device=mask.device), torch.arange(32, device=mask.device)
    )
    packed = (padded.view(b, tq, words, 32) * weights).sum(-1)
    # Reinterpret the low 32 bits as signed int32 (two's complement).
    packed = torch.where(packed >= 2**31, packed - 2**32, packed)
    return packed.to(torch.int32)


def unpack_tree_mask(packed: torch.Tensor, tree_len: int) -> torch.Tensor:
    """Inverse of :func:`pack_tree_mask`: int32 ``[B, Tq, W]`` -> bool ``[B, Tq, tree_len]``."""
    bits = torch.arange(32, device=packed.device, dtype=torch.int64)
    words = packed.to(torch.int64) & 0xFFFFFFFF
    unpacked = ((words.unsqueeze(-1) >> bits) & 1).bool()
    return unpacked.flatten(-2)[..., :tree_len]


def causal_tree_mask(num_queries: int, tree_len: int, device=None) -> torch.Tensor:
    """Boolean ``[num_queries, tree_len]`` mask of the causal rule used when ``tree_mask is None``."""
    q = torch.arange(num_queries, device=device).unsqueeze(1) + (tree_len - num_queries)
    return torch.arange(tree_len, device=device).unsqueeze(0) <= q


# ------------------------------------------------------------------------------------------- attention


def _physical_rows(
    block_table: torch.Tensor | None, rows: torch.Tensor, block_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(block, row in block)`` (int64 ``[B, N]``) of the logical rows ``rows`` (int64 ``[B, N]``) through
    ``block_table``; ``None`` is the identity table (block ``b``, row ``rows[b, i]``). Rows past the table
    take its last column (callers mask them)."""
    b = rows.shape[0]
    if block_table is None:
        return torch.arange(b, device=rows.device).view(b, 1).expand_as(rows), rows
    table = block_table.to(torch.long)
    column = (rows.clamp(min=0) // block_size).clamp(max=max(table.shape[1] - 1, 0))
    return torch.gather(table, 1, column), rows % block_size


def _logical_rows(cache: torch.Tensor, block_table: torch.Tensor | None, num_rows: int) -> torch.Tensor:
    """Logical rows ``0 .. num_rows - 1`` of every sequence, ``[B, Hkv, num_rows, D]``: a view of the
    contiguous cache, or the blocks gathered through the table (any entry is clamped into the pool: rows past
    a sequence's used blocks are garbage the callers mask)."""
    if block_table is None:
        return cache[:, :, :num_rows]
    block_size = cache.shape[2]
    n_blocks = -(-num_rows // block_size)
    blocks = block_table[:, :n_blocks].to(torch.long).clamp(0, cache.shape[0] - 1)  # [B, n_blocks]
    gathered = cache[blocks]  # [B, n_blocks, Hkv, block_size, D]
    b, _, hkv, _, d = gathered.shape
    return gathered.transpose(1, 2).reshape(b, hkv, n_blocks * block_size, d)[:, :, :num_rows]


def tree_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    lengths: torch.Tensor,
    tree_mask: torch.Tensor | None = None,
    tree_len: int | None = None,
    scale: float | None = None,
    block_table: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of new queries over a committed prefix plus masked tree keys in the cache.

    Parameters
    ----------
    q : ``[B, Tq, Hq, D]``
    k_cache, v_cache : the pool ``[num_blocks, Hkv, block_size, D]`` read through ``block_table``, or with
        ``block_table=None`` the contiguous ``[B, Hkv, S, D]``; ``Hq % Hkv == 0`` (GQA by head grouping)
    lengths : int32 ``[B]``: logical rows ``< lengths[b]`` are visible to every query
    tree_mask : int32 ``[B, Tq, ceil(tree_len / 32)]`` packed bits, or ``None`` for causal (a prefill chunk
        is ``Tq = tree_len`` queries, causal, over the committed prefix and the chunk)
    tree_len : number of tree rows after the prefix (default ``Tq``), logical rows
        ``lengths[b] .. lengths[b] + tree_len - 1``; ``lengths[b] + tree_len <= S`` (paged:
        ``S = max_blocks * block_size``)
    scale : softmax scale (default ``D ** -0.5``)
    block_table : int32 ``[B, max_blocks]`` or ``None`` (see the module's conventions)

    Returns
    -------
    ``[B, Tq, Hq, D]`` in ``q.dtype`` (computed in fp32). Rows no query may see (past ``lengths[b] +
    tree_len``, or another sequence's tree rows below the longest prefix) never reach the output, NaN or not.
    """
    b, tq, hq, d = q.shape
    hkv = k_cache.shape[1]
    tree_len = tq if tree_len is None else tree_len
    scale = d**-0.5 if scale is None else scale
    group = hq // hkv
    if tree_mask is None:
        tree_visible = causal_tree_mask(tq, tree_len, q.device).expand(b, tq, tree_len)
    else:
        tree_visible = unpack_tree_mask(tree_mask, tree_len)
    prefix_len = int(lengths.max()) if b else 0
    lengths_l = lengths.to(torch.long)
    # The logical rows of every sequence up to the longest prefix + tree, gathered through the table.
    k_log = _logical_rows(k_cache, block_table, prefix_len + tree_len)
    v_log = _logical_rows(v_cache, block_table, prefix_len + tree_len)
    # Keys: the first prefix_len rows (masked per sequence) then each sequence's tree rows.
    tree_rows = lengths_l.view(b, 1) + torch.arange(tree_len, device=q.device).view(1, -1)  # [B, tree_len]
    gather_idx = tree_rows.view(b, 1, tree_len, 1).expand(b, hkv, tree_len, d)
    k_tree = torch.gather(k_log, 2, gather_idx)
    v_tree = torch.gather(v_log, 2, gather_idx)
    prefix_visible = torch.arange(prefix_len, device=q.device).view(1, -1) < lengths_l.view(b, 1)
    # Invisible prefix rows get zero weight; zeroing their values too keeps NaN garbage there out of 0 * NaN.
    v_prefix = v_log[:, :, :prefix_len].masked_fill(~prefix_visible.view(b, 1, prefix_len, 1), 0)
    k_all = torch.cat([k_log[:, :, :prefix_len], k_tree], dim=2).float()  # [B, Hkv, P+tree_len, D]
    v_all = torch.cat([v_prefix, v_tree], dim=2).float()
    visible = torch.cat([prefix_visible.view(b, 1, prefix_len).expand(b, tq, prefix_len), tree_visible], -1)
    qg = q.float().view(b, tq, hkv, group, d).permute(0, 2, 3, 1, 4)  # [B, Hkv, G, Tq, D]
    scores = torch.matmul(qg, k_all.unsqueeze(2).transpose(-1, -2)) * scale  # [B, Hkv, G, Tq, K]
    scores = scores.masked_fill(~visible.view(b, 1, 1, tq, -1), float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    probs = torch.nan_to_num(probs, nan=0.0)  # a query that sees nothing outputs zeros
    out = torch.matmul(probs, v_all.unsqueeze(2))  # [B, Hkv, G, Tq, D]
    return out.permute(0, 3, 1, 2, 4).reshape(b, tq, hq, d).to(q.dtype)


# ------------------------------------------------------------------------------------ normalisation etc.


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim: ``x / sqrt(mean(x^2) + eps) * weight``, computed in fp32.

    ``x`` ``[..., H]``, ``weight`` ``[H]``; returns ``x.dtype``.
    """
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (weight * normed.to(x.dtype)).to(x.dtype)  # the order Hugging Face's Llama uses


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual add fused with RMSNorm: ``h = x + residual``; returns ``(rms_norm(h), h)``.

    ``x``, ``residual`` ``[..., H]`` of one dtype; ``weight`` ``[H]``.
    """
    h = x + residual
    return rms_norm(h, weight, eps), h


def rotary_embedding(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary position embedding, rotate-half (GPT-NeoX / Llama) layout.

    Parameters
    ----------
    q : ``[B, T, Hq, D]``; k : ``[B, T, Hk, D]``
    positions : int ``[B, T]``
    cos_sin : fp32 ``[max_pos, D]``: ``cos`` in the first ``D/2`` columns, ``sin`` in the last ``D/2``

    Returns
    -------
    ``(q_rot, k_rot)`` in the inputs' dtypes (rotation computed in fp32).
    """
    half = cos_sin.shape[-1] // 2
    table = cos_sin[positions.long()]  # [B, T, D]
    cos = table[..., :half].unsqueeze(2)
    sin = table[..., half:].unsqueeze(2)

    def rotate(x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        x1, x2 = xf[..., :half], xf[..., half:]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)

    return rotate(q), rotate(k)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU activation ``silu(gate) * up`` (fp32 inside); ``[..., I]`` -> ``[..., I]``."""
    return (torch.nn.functional.silu(gate.float()) * up.float()).to(gate.dtype)


# ------------------------------------------------------------------------------------------- KV cache


def store_kv(
    k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor
) -> None:
    """Write new keys/values into the cache in place at rows ``lengths[b] + t``.

    ``k_cache``/``v_cache`` ``[B, Hkv, S, D]``; ``k``/``v`` ``[B, T, Hkv, D]``; ``lengths`` int32 ``[B]``.
    """
    b, t = k.shape[0], k.shape[1]
    rows = lengths.to(torch.long).view(b, 1) + torch.arange(t, device=k.device).view(1, t)  # [B, T]
    batch_idx = torch.arange(b, device=k.device).view(b, 1).expand(b, t)
    # advanced indexing [b, :, row] -> layout [B, T, Hkv, D]
    k_cache.permute(0, 2, 1, 3)[batch_idx, rows] = k.to(k_cache.dtype)
    v_cache.permute(0, 2, 1, 3)[batch_idx, rows] = v.to(v_cache.dtype)


def kv_compact(
    cache: torch.Tensor,
    lengths: torch.Tensor,
    src: torch.Tensor,
    counts: torch.Tensor,
    block_table: torch.Tensor | None = None,
) -> None:
    """Move each sequence's accepted tree rows to the front of its tree region, in place, for all layers.

    Parameters
    ----------
    cache : ``[num_layers, 2, num_blocks, Hkv, block_size, D]`` (any strides) read through ``block_table``,
        or with ``block_table=None`` ``[num_layers, 2, B, Hkv, S, D]``
    lengths : int32 ``[B]``: committed prefix; tree rows start at logical row ``lengths[b]`` (not modified)
    src : int ``[B, N]``: tree-relative rows; logical row ``lengths[b] + src[b, i]`` moves to logical row
        ``lengths[b] + i`` for ``i < counts[b]`` (entries past ``counts[b]`` are ignored)
    counts : int32 ``[B]``, ``0 <= counts[b] <= N``
    block_table : int32 ``[B, max_blocks]`` or ``None`` (the identity table): see the module's conventions

    Sources and destinations may overlap: all accepted rows are read before any is written. Source rows are
    clamped into ``[0, S)`` (``S = max_blocks * block_size`` paged); destinations at or past ``S``, or in a
    block whose table entry is negative, are skipped.
    """
    b, n = src.shape
    if n == 0:
        return
    block_size = cache.shape[4]
    capacity = block_size if block_table is None else block_table.shape[1] * block_size
    base = lengths.to(torch.long).view(b, 1)
    arange = torch.arange(n, device=src.device).view(1, n)
    src_rows = (base + src.to(torch.long)).clamp(0, capacity - 1)
    dst_rows = base + arange
    src_blk, src_off = _physical_rows(block_table, src_rows, block_size)
    dst_blk, dst_off = _physical_rows(block_table, dst_rows, block_size)
    valid = (arange < counts.to(torch.long).view(b, 1)) & (dst_rows < capacity) & (dst_blk >= 0)
    view = cache.permute(2, 4, 0, 1, 3, 5)  # [num_blocks, block_size, L, 2, Hkv, D]
    rows = view[src_blk.clamp(0, cache.shape[2] - 1), src_off].clone()  # read everything first: overlap-safe
    view[dst_blk[valid], dst_off[valid]] = rows[valid]


def rotary_store_kv(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cos_sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    rows: torch.Tensor,
    q_norm_weight: torch.Tensor | None = None,
    k_norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    block_table: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention input step: optional per-head RMSNorm of q and k (Qwen3), rotary embedding, K/V cache write.

    Parameters
    ----------
    q : ``[B, T, Hq, D]``; k, v : ``[B, T, Hkv, D]`` (views of one fused qkv output are fine)
    positions : int ``[B, T]``; cos_sin : fp32 ``[P, D]`` as in :func:`rotary_embedding`
    k_cache, v_cache : the pool ``[num_blocks, Hkv, block_size, D]`` written through ``block_table``, or with
        ``block_table=None`` ``[B, Hkv, S, D]`` (strided views are fine)
    rows : int ``[B]``: new row ``t`` of sequence ``b`` goes to logical row ``rows[b] + t`` (through the
        table)
    q_norm_weight, k_norm_weight : ``[D]`` or ``None``: :func:`rms_norm` over head_dim before the rotation
    eps : the RMSNorm epsilon
    block_table : int32 ``[B, max_blocks]`` or ``None`` (the identity table): see the module's conventions

    Returns
    -------
    the rotated q, a new contiguous ``[B, T, Hq, D]`` in ``q.dtype``; the rotated k and the raw v are written
    into the caches in place. Logical rows outside ``[0, S)`` (``S = max_blocks * block_size`` paged), or in
    a block whose table entry is negative, are not written.
    """
    if q_norm_weight is not None:
        q = rms_norm(q, q_norm_weight, eps)
    if k_norm_weight is not None:
        k = rms_norm(k, k_norm_weight, eps)
    q_rot, k_rot = rotary_embedding(q, k, positions, cos_sin)
    if block_table is None:
        store_kv(k_cache, v_cache, k_rot, v, rows)
        return q_rot.contiguous()
    b, t = k.shape[0], k.shape[1]
    block_size = k_cache.shape[2]
    logical = rows.to(torch.long).view(b, 1) + torch.arange(t, device=k.device).view(1, t)  # [B, T]
    blk, off = _physical_rows(block_table, logical, block_size)
    ok = (logical >= 0) & (logical < block_table.shape[1] * block_size) & (blk >= 0)
    # advanced indexing [block, :, row] -> layout [n, Hkv, D]
    k_cache.permute(0, 2, 1, 3)[blk[ok], off[ok]] = k_rot[ok].to(k_cache.dtype)
    v_cache.permute(0, 2, 1, 3)[blk[ok], off[ok]] = v[ok].to(v_cache.dtype)
    return q_rot.contiguous()


# ------------------------------------------------------------------------------------------- sampling

_SPLITMIX_GAMMA = 0x9E3779B97F4A7C15
_SPLITMIX_M1 = 0xBF58476D1CE4E5B9
_SPLITMIX_M2 = 0x94D049BB133111EB


def _as_int64(c: int) -> int:
    """An unsigned 64-bit constant as the signed int64 with the same bits."""
    return c - (1 << 64) if c >= 1 << 63 else c


def _shr(z: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 bits (torch's ``>>`` is arithmetic: mask off the copied sign bits)."""
    return (z >> s) & ((1 << (64 - s)) - 1)


def counter_uniform(seeds: torch.Tensor, offsets: torch.Tensor, n: int) -> torch.Tensor:
    """Counter-based uniforms in ``[0, 1)`` (SplitMix64); no generator state, bit-exact with the kernel.

    Element ``(b, i)``: ``z = seeds[b] + (offsets[b] + i + 1) * 0x9E3779B97F4A7C15`` (mod 2^64), then
    ``z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9``, ``z = (z ^ (z >> 27)) * 0x94D049BB133111EB``,
    ``z = z ^ (z >> 31)`` (logical shifts, mod 2^64), and ``u = (z >> 40) * 2^-24``.

    Parameters
    ----------
    seeds, offsets : int64 ``[B]``; n : draws per row

    Returns
    -------
    fp32 ``[B, n]``.
    """
    i = torch.arange(int(n), dtype=torch.int64, device=seeds.device).view(1, -1)
    counter = offsets.to(torch.int64).view(-1, 1) + i + 1
    z = seeds.to(torch.int64).view(-1, 1) + counter * _as_int64(_SPLITMIX_GAMMA)  # int64 multiply wraps
    z = (z ^ _shr(z, 30)) * _as_int64(_SPLITMIX_M1)
    z = (z ^ _shr(z, 27)) * _as_int64(_SPLITMIX_M2)
    z = z ^ _shr(z, 31)
    return _shr(z, 40).to(torch.float32) * 2.0**-24


# ---------------------------------------------------------------------------------------- draft head


def draft_fc(
    token_ids: torch.Tensor,
    embed_weight: torch.Tensor,
    features: torch.Tensor,
    fc_weight: torch.Tensor,
    fc_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """EAGLE-1/2 input projection ``fc(cat([embed[token_ids], features], -1)) (+ bias)``.

    ``token_ids`` int ``[N]``; ``embed_weight`` ``[V, H]``; ``features`` ``[N, H]``;
    ``fc_weight`` ``[H, 2H]``; ``fc_bias`` ``[H]`` or ``None``. Returns ``[N, H]`` in ``features.dtype``.
    """
    x = torch.cat([embed_weight[token_ids.long()], features], dim=-1)
    return torch.nn.functional.linear(x, fc_weight, fc_bias)


def lm_head_topk(hidden: torch.Tensor, weight: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k log-probabilities of ``softmax(hidden @ weight.T)`` without keeping the logits.

    ``hidden`` ``[N, H]``; ``weight`` ``[V, H]``; returns ``(logprobs fp32 [N, k], indices int64 [N, k])``,
    sorted by decreasing log-probability.
    """
    logits = torch.nn.functional.linear(hidden, weight).float()
    logprobs = torch.log_softmax(logits, dim=-1)
    values, indices = torch.topk(logprobs, k, dim=-1)
    return values, indices


# ------------------------------------------------------------------------------------------- sampling


def top_p_threshold(logits: torch.Tensor, top_p: torch.Tensor, floor: torch.Tensor) -> torch.Tensor:
    """The top-p (nucleus) cut of each row as a threshold on its logits, without changing them.

    Among a row's entries ``>= floor`` (the top-k cut; ``-inf`` keeps all), with probabilities
    ``softmax`` over those entries: the largest entry value ``v`` whose mass ``sum p[x >= v]`` reaches
    ``top_p``. Keeping ``x >= v`` keeps the smallest set of most likely entries whose mass reaches ``top_p``
    (always at least one), and every entry tied with the last kept one. Rows with ``top_p >= 1`` get
    ``floor``.

    Parameters
    ----------
    logits : fp32 ``[..., V]`` (already divided by the temperature)
    top_p, floor : fp32 ``logits.shape[:-1]``

    Returns
    -------
    fp32 ``logits.shape[:-1]``.
    """
    x = logits.float()
    kept = x >= floor.unsqueeze(-1)
    x = x.masked_fill(~kept, float("-inf"))
    e = torch.exp(x - x.amax(-1, keepdim=True))
    values, order = torch.sort(x, dim=-1, descending=True)
    cumulative = torch.gather(e, -1, order).cumsum(-1)
    # The mass of x >= values[j]: the cumulative mass at the last entry tied with values[j].
    flat = values.reshape(-1, values.shape[-1])
    last = torch.searchsorted(-flat, -flat, right=True).view(values.shape) - 1
    mass_ge = torch.gather(cumulative, -1, last)
    reaches = mass_ge >= top_p.unsqueeze(-1) * cumulative[..., -1:]
    first = reaches.to(torch.int8).argmax(-1, keepdim=True)  # the largest value that reaches top_p
    threshold = torch.gather(values, -1, first).squeeze(-1)
    return torch.where(top_p >= 1, floor.float(), threshold)


def masked_softmax_(logits: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """In place: each row becomes the softmax over its entries ``>= threshold``, 0 elsewhere.

    Parameters
    ----------
    logits : fp32 ``[..., V]``, updated in place (a view with a contiguous last dim is fine)
    threshold : fp32 ``logits.shape[:-1]`` (``-inf``: a plain softmax); at most the row's maximum

    Returns
    -------
    ``logits``, now the probabilities.
    """
    kept = logits >= threshold.unsqueeze(-1)
    probs = torch.softmax(logits.masked_fill(~kept, float("-inf")), dim=-1)
    return logits.copy_(probs)


# -------------------------------------------------------------------------------------- verification


def _tree_structure(parents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(par, earlier_sibling)`` for parents int ``[B, T]`` (parents preceding children): ``par`` int64
    with the root pointing at itself; ``earlier_sibling[b, c, j]`` (bool ``[B, T, T]``) when ``j < c`` share a
    parent."""
    t = parents.shape[1]
    idx = torch.arange(t, device=parents.device)
    par = torch.where(idx.view(1, t) == 0, 0, parents.long().clamp(min=0))
    same = (par.unsqueeze(2) == par.unsqueeze(1)) & (idx.view(1, 1, t) < idx.view(1, t, 1))
    return par, same & (idx.view(1, 1, t) > 0)


def _path_closed(taken: torch.Tensor, par: torch.Tensor) -> torch.Tensor:
    """``accepted[b, i]``: ``taken`` holds at ``i`` and at every ancestor of ``i`` (the root's ``taken`` must
    be True). Pointer doubling: after ``s`` steps each node has AND-ed the ``2^s`` nodes above it."""
    acc, anc = taken, par
    for _ in range(max(par.shape[1] - 1, 0).bit_length()):  # ceil(log2(T)) steps, from the shape only
        acc = acc & torch.gather(acc, 1, anc)
        anc = torch.gather(anc, 1, anc)
    return acc


def _first_among_siblings(ok: torch.Tensor, earlier_sibling: torch.Tensor) -> torch.Tensor:
    """``ok[b, c]`` and no earlier sibling of ``c`` is ``ok`` (the first passing child of each node)."""
    blocked = (earlier_sibling & ok.unsqueeze(1)).any(-1)
    return ok & ~blocked


def _accepted_outputs(accepted: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(num_accepted, accepted_nodes, deepest)`` from the accepted set (bool ``[B, T]``, one root path)."""
    b, t = accepted.shape
    idx = torch.arange(t, device=accepted.device).view(1, t).expand(b, t)
    slot = torch.where(accepted, accepted.long().cumsum(1) - 1, t)  # column t: a dump for the others
    nodes = torch.full((b, t + 1), -1, dtype=torch.int32, device=accepted.device)
    nodes.scatter_(1, slot, torch.where(accepted, idx, -1).to(torch.int32))
    num_accepted = (accepted.sum(1) - 1).to(torch.int32)
    deepest = torch.where(accepted, idx, 0).amax(1, keepdim=True)  # the path is in increasing node order
    return num_accepted, nodes[:, :t].contiguous(), deepest


def tree_verify_greedy(
    tokens: torch.Tensor, parents: torch.Tensor, target_argmax: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Greedy verification of one draft tree per sequence.

    Parameters
    ----------
    tokens : int ``[B, T]``: node tokens; node 0 is the root (already accepted, its token already emitted)
    parents : int32 ``[B, T]``: ``parents[b, 0] = -1``; ``0 <= parents[b, i] < i`` otherwise
    target_argmax : int ``[B, T]``: the target's greedy next token after each node

    A node is accepted when its parent is accepted and its token equals ``target_argmax`` at its parent.
    Siblings carry distinct tokens, so the accepted nodes form one root-to-node path (were two siblings to
    match, the earlier one would be taken).

    Returns
    -------
    num_accepted : int32 ``[B]``: accepted nodes after the root (emitted tokens this round = this + 1)
    accepted_nodes : int32 ``[B, T]``: the path from the root (``accepted_nodes[b, 0] = 0``), -1 padded
    bonus : int64 ``[B]``: ``target_argmax`` at the last accepted node

    Vectorised torch with shapes fixed by ``[B, T]``: no host synchronisation (CUDA-graph capturable).
    """
    par, earlier_sibling = _tree_structure(parents)
    amax = target_argmax.long()
    match = tokens.long() == torch.gather(amax, 1, par)
    match[:, 0] = True
    accepted = _path_closed(_first_among_siblings(match, earlier_sibling), par)
    num_accepted, accepted_nodes, deepest = _accepted_outputs(accepted)
    return num_accepted, accepted_nodes, torch.gather(amax, 1, deepest).view(-1)


def tree_verify_sampling(
    tokens: torch.Tensor, parents: torch.Tensor, target_probs: torch.Tensor, uniforms: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Lossless sampling verification of a tree of deterministic (top-k) drafts.

    Walk from the root. At the current node with residual distribution ``p`` (initially
    ``target_probs[b, node]``), test its children in increasing node order: child ``c`` with token ``x`` is
    accepted when ``uniforms[b, c] * sum(p) < p[x]``; on acceptance move to ``c`` with a fresh ``p``; on
    rejection set ``p[x] = 0`` and test the next child. When no child is accepted (or the node is a leaf) the
    bonus token is drawn from ``p`` by inverse CDF with ``uniforms[b, 0]``: the smallest ``v`` with
    ``cumsum(p)[v] > uniforms[b, 0] * sum(p)``.

    Parameters
    ----------
    tokens, parents : as in :func:`tree_verify_greedy`
    target_probs : fp32 ``[B, T, V]``: the target's next-token distribution after each node (temperature,
        top-p and top-k already applied)
    uniforms : fp32 ``[B, T]`` in ``[0, 1)``: ``uniforms[b, i]`` tests node ``i > 0``; ``uniforms[b, 0]``
        draws the bonus token

    Returns
    -------
    ``(num_accepted, accepted_nodes, bonus)`` as in :func:`tree_verify_greedy`.

    Vectorised (no host synchronisation): every child ``c`` of ``n`` is tested at once against
    ``uniforms[c] * (sum(p_n) - sum of p_n[x_j] over earlier siblings j) < p_n[x_c]``; a child is taken when
    it passes and no earlier sibling does; a node is accepted when it and all its ancestors are taken.
    """
    b, t = tokens.shape
    v = target_probs.shape[-1]
    par, earlier_sibling = _tree_structure(parents)
    probs = target_probs.float()
    tok = tokens.long()
    p_tok = torch.gather(probs.reshape(b, t * v), 1, par * v + tok)  # p_parent[x_c], [B, T]
    # A token repeated among siblings was zeroed by its first rejection: it can neither pass nor count twice.
    repeated = (earlier_sibling & (tok.unsqueeze(2) == tok.unsqueeze(1))).any(-1)
    p_tok = p_tok.masked_fill(repeated, 0.0)
    total = torch.gather(probs.sum(-1), 1, par)  # sum(p_parent)
    residual = total - (earlier_sibling.float() * p_tok.unsqueeze(1)).sum(-1)
    passes = (uniforms.float() * residual < p_tok) & (p_tok > 0)
    passes[:, 0] = True
    accepted = _path_closed(_first_among_siblings(passes, earlier_sibling), par)
    num_accepted, accepted_nodes, deepest = _accepted_outputs(accepted)
    # Bonus: p at the deepest accepted node with its children's tokens (all rejected) zeroed.
    p = torch.gather(probs, 1, deepest.view(b, 1, 1).expand(b, 1, v)).view(b, v)
    is_child = (par == deepest) & (torch.arange(t, device=tokens.device).view(1, t) > 0)
    zeroed = torch.zeros(b, v + 1, dtype=torch.bool, device=tokens.device)
    zeroed.scatter_(1, torch.where(is_child, tok, v), True)  # column v: a dump for non-children
    p = p.masked_fill(zeroed[:, :v], 0.0)
    return num_accepted, accepted_nodes, sample_inverse_cdf_batched(p, uniforms[:, 0])


def sample_inverse_cdf_batched(p: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Row-wise :func:`sample_inverse_cdf` without host synchronisation: p ``[B, V]``, u ``[B]`` -> int64
    ``[B]``."""
    cdf = torch.cumsum(p.double(), 1)
    threshold = u.double().view(-1, 1) * cdf[:, -1:]
    idx = torch.searchsorted(cdf, threshold, right=True).clamp(max=p.shape[1] - 1)
    # rounding at the top end: the last non-zero entry at or before idx (index 0 when there is none)
    positions = torch.arange(p.shape[1], device=p.device).view(1, -1)
    last_nonzero = torch.where(p > 0, positions, 0).cummax(1).values
    return torch.gather(last_nonzero, 1, idx).view(-1)


def sample_inverse_cdf(p: torch.Tensor, u: float) -> int:
    """Index ``v`` of the first ``cumsum(p)[v] > u * sum(p)`` over an unnormalised ``p`` ``[V]``.

    Zero entries are never returned (rounding at the top end falls back to the last non-zero entry)."""
    cdf = torch.cumsum(p.double(), 0)
    threshold = u * float(cdf[-1])
    idx = int(torch.searchsorted(cdf, torch.tensor([threshold], dtype=cdf.dtype), right=True)[0])
    idx = min(idx, p.numel() - 1)
    while p[idx] <= 0 and idx > 0:  # rounding at the top end: fall back to the last non-zero entry
        idx -= 1
    return idx


__all__ = [
    "top_p_threshold",
    "masked_softmax_",
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
    "sample_inverse_cdf",
    "sample_inverse_cdf_batched",
]
