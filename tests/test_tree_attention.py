"""Triton tree attention vs the reference: on CPU through Triton's interpreter, or on a GPU if present."""

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: run the kernels on CPU tensors

import pytest  # noqa: E402
from paged import LAYOUTS, paginate  # noqa: E402

from eagle_kernels import reference  # noqa: E402
from eagle_kernels.tree_attention import (  # noqa: E402
    _tree_attention,
    _tree_attention_kernel,
    choose_num_splits,
    interpreted,
    tree_attention,
)

DEVICE = "cpu" if interpreted(_tree_attention_kernel) else "cuda"
if DEVICE == "cuda" and not torch.cuda.is_available():
    pytest.skip("triton was imported without TRITON_INTERPRET=1 and there is no GPU", allow_module_level=True)


pytestmark = [pytest.mark.kernels, pytest.mark.usefixtures("poison_empty")]


def random_tree_masks(batch: int, tree_len: int, num_queries: int, gen: torch.Generator) -> torch.Tensor:
    """Packed ancestor masks of random trees (``parent[i] < i``); rows of the last ``num_queries`` nodes."""
    full = torch.zeros(batch, tree_len, tree_len, dtype=torch.bool)
    for b in range(batch):
        for i in range(tree_len):
            full[b, i, i] = True
            if i:
                parent = int(torch.randint(0, i, (1,), generator=gen))
                full[b, i] |= full[b, parent]
    return reference.pack_tree_mask(full[:, tree_len - num_queries:]).to(DEVICE)


def make_inputs(batch, tq, hq, hkv, d, lens, tree_len, dtype, masked, seed=0):
    gen = torch.Generator().manual_seed(seed)
    cache_len = max(lens) + tree_len + 5  # S exceeds every length + tree_len
    q = torch.randn(batch, tq, hq, d, generator=gen).to(DEVICE, dtype)
    k = torch.randn(batch, hkv, cache_len, d, generator=gen).to(DEVICE, dtype)
    v = torch.randn(batch, hkv, cache_len, d, generator=gen).to(DEVICE, dtype)
    lengths = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    mask = random_tree_masks(batch, tree_len, tq, gen) if masked else None
    return q, k, v, lengths, mask


def attention_at_dtype(q, k, v, lengths, mask, tree_len):
    """The reference computation carried out in q's dtype throughout (the error yardstick for bf16)."""
    b, tq, hq, d = q.shape
    hkv, cache_len = k.shape[1], k.shape[2]
    vis_tree = (reference.causal_tree_mask(tq, tree_len, q.device).expand(b, tq, tree_len) if mask is None
                else reference.unpack_tree_mask(mask, tree_len))
    pos = torch.arange(cache_len, device=q.device).view(1, 1, -1)
    rel = pos - lengths.long().view(b, 1, 1)
    in_tree = (rel >= 0) & (rel < tree_len)
    tree_bits = torch.gather(vis_tree, 2, rel.clamp(0, tree_len - 1).expand(b, tq, cache_len))
    visible = (rel < 0) | (in_tree & tree_bits)  # [B, Tq, S]
    g = hq // hkv
    qg = q.view(b, tq, hkv, g, d).permute(0, 2, 3, 1, 4)
    s = torch.matmul(qg, k.unsqueeze(2).transpose(-1, -2)) * d**-0.5
    s = s.masked_fill(~visible.view(b, 1, 1, tq, cache_len), float("-inf"))
    p = torch.nan_to_num(torch.softmax(s, -1), nan=0.0)
    return torch.matmul(p, v.unsqueeze(2)).permute(0, 3, 1, 2, 4).reshape(b, tq, hq, d)


def check(q, k, v, lengths, mask, tree_len, num_splits):
    out = _tree_attention(q, k, v, lengths, mask, tree_len, num_splits=num_splits)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert not torch.isnan(out).any()
    ref32 = reference.tree_attention(q.float(), k.float(), v.float(), lengths, mask, tree_len)
    if q.dtype == torch.float32:
        torch.testing.assert_close(out, ref32, atol=2e-5, rtol=1e-5)
    else:
        err = (out.float() - ref32).abs().max().item()
        err_torch = (attention_at_dtype(q, k, v, lengths, mask, tree_len).float() - ref32).abs().max().item()
        assert err <= 2 * err_torch + 1e-3, (err, err_torch)


# (batch, Tq, tree_len, Hq, Hkv, D, lengths)
CASES = [
    (3, 1, 1, 4, 1, 64, [0, 17, 1000]),  # decode, GQA 4, one long sequence
    (3, 3, 3, 4, 4, 80, [1, 17, 1000]),  # tiny tree, D=80 (padded tile), MHA
    (3, 3, 7, 8, 2, 64, [0, 1, 17]),  # draft step: the last 3 of 7 tree rows
    (2, 63, 63, 4, 1, 80, [0, 17]),  # big tree
    (2, 63, 70, 2, 2, 64, [1, 0]),  # tree_len > Tq past a word boundary
    (1, 2, 2, 8, 2, 128, [300]),  # head_dim 128
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}-T{c[1]}-tl{c[2]}-H{c[3]}/{c[4]}-D{c[5]}")
@pytest.mark.parametrize("masked", [True, False], ids=["tree", "causal"])
@pytest.mark.parametrize("num_splits", [1, 3], ids=["nosplit", "split3"])
def test_tree_attention_fp32(case, masked, num_splits):
    batch, tq, tree_len, hq, hkv, d, lens = case
    q, k, v, lengths, mask = make_inputs(batch, tq, hq, hkv, d, lens, tree_len, torch.float32, masked)
    check(q, k, v, lengths, mask, tree_len, num_splits)


@pytest.mark.parametrize("case", [CASES[0], CASES[2], CASES[3]], ids=["decode", "draft", "tree63"])
@pytest.mark.parametrize("num_splits", [1, 4], ids=["nosplit", "split4"])
def test_tree_attention_bf16(case, num_splits):
    batch, tq, tree_len, hq, hkv, d, lens = case
    q, k, v, lengths, mask = make_inputs(batch, tq, hq, hkv, d, lens, tree_len, torch.bfloat16, True, seed=1)
    check(q, k, v, lengths, mask, tree_len, num_splits)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_like(dtype):
    """T=200 causal over a short prefix: the large config, several query tiles, causal block skipping."""
    q, k, v, lengths, _ = make_inputs(1, 200, 4, 1, 64, [0], 200, dtype, False, seed=2)
    check(q, k, v, lengths, None, 200, 1)
    q, k, v, lengths, _ = make_inputs(2, 200, 2, 2, 80, [17, 0], 200, dtype, False, seed=3)
    check(q, k, v, lengths, None, 200, 1)


def test_fp16_and_heuristic_split():
    """fp16 through the public function; the heuristic picks a split for a long cache and few programs."""
    q, k, v, lengths, mask = make_inputs(1, 1, 8, 1, 64, [1100], 1, torch.float16, True, seed=4)
    assert choose_num_splits(1, k.shape[2], 132) > 1
    out = tree_attention(q, k, v, lengths, mask, 1)
    ref32 = reference.tree_attention(q.float(), k.float(), v.float(), lengths, mask, 1)
    err_torch = (attention_at_dtype(q, k, v, lengths, mask, 1).float() - ref32).abs().max().item()
    assert (out.float() - ref32).abs().max().item() <= 2 * err_torch + 1e-3


def test_query_seeing_nothing_is_zero():
    """A query whose tree row is empty over an empty prefix outputs zeros (split and not)."""
    q, k, v, lengths, _ = make_inputs(2, 3, 2, 1, 64, [0, 5], 3, torch.float32, False, seed=5)
    full = torch.tril(torch.ones(3, 3, dtype=torch.bool)).expand(2, 3, 3).clone()
    full[:, 1] = False  # query 1 sees no tree key
    mask = reference.pack_tree_mask(full).to(DEVICE)
    for splits in (1, 2):
        out = _tree_attention(q, k, v, lengths, mask, 3, num_splits=splits)
        ref = reference.tree_attention(q, k, v, lengths, mask, 3)
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)
        assert out[0, 1].abs().max() == 0  # nothing visible in sequence 0
        assert out[1, 1].abs().max() > 0  # the prefix is still visible in sequence 1


def test_strided_query_and_scale():
    """q as a view of a fused qkv tensor (non-contiguous heads) and an explicit scale."""
    gen = torch.Generator().manual_seed(6)
    qkv = torch.randn(2, 5, 12, 64, generator=gen).to(DEVICE)
    q = qkv[:, :, :8]
    k = torch.randn(2, 2, 40, 64, generator=gen).to(DEVICE)
    v = torch.randn(2, 2, 40, 64, generator=gen).to(DEVICE)
    lengths = torch.tensor([17, 3], dtype=torch.int32, device=DEVICE)
    out = tree_attention(q, k, v, lengths, None, 5, 0.3)
    ref = reference.tree_attention(q, k, v, lengths, None, 5, 0.3)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)


def test_split_heuristic():
    assert choose_num_splits(256, 32768, 132) == 1  # the grid already fills the GPU (prefill)
    assert choose_num_splits(8, 512, 132) == 1  # short cache
    assert choose_num_splits(8, 32768, 132) == 32  # decode, 8 kv heads: capped at MAX_SPLITS
    assert choose_num_splits(16, 32768, 132) == 17  # ceil(2 * 132 / 16): about two waves
    assert choose_num_splits(8, 1024, 132) == 4  # at least 256 keys of capacity per split


def test_dispatch_runs_the_kernel(monkeypatch):
    """``eagle_kernels.tree_attention`` (the function, not the submodule) runs Triton when interpreting."""
    import sys

    import eagle_kernels

    kernels = sys.modules["eagle_kernels.tree_attention"]
    if DEVICE == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert callable(eagle_kernels.tree_attention) and eagle_kernels._tree_attention_triton is kernels
    calls = []

    def spy(*args, **kwargs):
        calls.append(1)
        return _tree_attention(*args, **kwargs)

    monkeypatch.setattr(kernels, "_tree_attention", spy)
    q, k, v, lengths, mask = make_inputs(2, 3, 2, 1, 64, [4, 0], 3, torch.float32, True, seed=8)
    out = eagle_kernels.tree_attention(q, k, v, lengths, mask, 3)
    assert calls == [1]
    torch.testing.assert_close(out, reference.tree_attention(q, k, v, lengths, mask, 3), atol=2e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------- paged caches


def paged_inputs(case, block_size, layout, dtype, masked, seed):
    """A case's contiguous inputs and the same logical rows in a shuffled pool: rows past each sequence's
    ``lengths[b] + tree_len`` (the rest of its last block, spare blocks) are NaN, table entries past its used
    blocks -1 or garbage."""
    batch, tq, tree_len, hq, hkv, d, lens = case
    q, k, v, lengths, mask = make_inputs(batch, tq, hq, hkv, d, lens, tree_len, dtype, masked, seed)
    used = [n + tree_len for n in lens]
    k_pool, table = paginate(k.cpu(), used, block_size, layout, seed=seed)
    v_pool, _ = paginate(v.cpu(), used, block_size, layout, seed=seed)  # the same table
    return q, k, v, lengths, mask, k_pool.to(DEVICE), v_pool.to(DEVICE), table.to(DEVICE)


# (batch, Tq, tree_len, Hq, Hkv, D, lengths)
PAGED_CASES = [
    (3, 3, 7, 8, 2, 64, [0, 13, 37]),  # draft step, GQA 4; with 16-row blocks sequence 1's tree crosses one
    (3, 1, 1, 4, 1, 80, [17, 0, 130]),  # decode, D=80, a prefix over several 64-row blocks
]


@pytest.mark.parametrize("case", PAGED_CASES, ids=["draft", "decode"])
@pytest.mark.parametrize("block_size", [1, 16, 64])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_paged_matches_contiguous(case, block_size, layout):
    """Shuffled blocks, partial last blocks, NaN in every row no query may see: the paged kernel gives exactly
    the contiguous kernel's output (tree mask and causal, split and not), and the paged reference the
    contiguous reference's."""
    tree_len = case[2]
    for masked in (True, False):
        q, k, v, lengths, mask, k_pool, v_pool, table = paged_inputs(case, block_size, layout, torch.float32,
                                                                     masked, seed=block_size)
        assert k_pool.stride(1 if layout == "NHD" else 2) == case[5]  # heads (NHD) or rows (HND) adjacent
        for splits in (1, 3):
            out = _tree_attention(q, k_pool, v_pool, lengths, mask, tree_len, num_splits=splits,
                                  block_table=table)
            expected = _tree_attention(q, k, v, lengths, mask, tree_len, num_splits=splits)
            assert torch.equal(out, expected), (masked, splits, (out - expected).abs().max())
        ref = reference.tree_attention(q, k_pool, v_pool, lengths, mask, tree_len, block_table=table)
        assert torch.equal(ref, reference.tree_attention(q, k, v, lengths, mask, tree_len))
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_paged_prefill_chunk_and_bf16(layout):
    """A causal prefill chunk (``Tq = tree_len = 40``, 80 rows per kv head: the large config) after prefixes
    of 0 and 23 rows in 16-row blocks, fp32 and bf16."""
    case = (2, 40, 40, 4, 2, 64, [0, 23])
    for dtype in (torch.float32, torch.bfloat16):
        q, k, v, lengths, _, k_pool, v_pool, table = paged_inputs(case, 16, layout, dtype, False, seed=11)
        out = tree_attention(q, k_pool, v_pool, lengths, None, 40, block_table=table)
        assert torch.equal(out, tree_attention(q, k, v, lengths, None, 40))
        check(q, k, v, lengths, None, 40, 1)  # the contiguous kernel itself against the fp32 reference


def test_identity_table_is_the_contiguous_layout():
    """``block_table=None`` is the pool of B blocks of S rows with the identity table ``[[0], [1], ...]``."""
    q, k, v, lengths, mask = make_inputs(3, 3, 4, 1, 64, [0, 17, 40], 7, torch.float32, True, seed=12)
    identity = torch.arange(3, dtype=torch.int32, device=DEVICE).view(3, 1)
    for splits in (1, 2):
        out = _tree_attention(q, k, v, lengths, mask, 7, num_splits=splits, block_table=identity)
        assert torch.equal(out, _tree_attention(q, k, v, lengths, mask, 7, num_splits=splits))
    assert torch.equal(reference.tree_attention(q, k, v, lengths, mask, 7, block_table=identity),
                       reference.tree_attention(q, k, v, lengths, mask, 7))


def test_paged_padding_row_reads_in_bounds():
    """A padded sequence whose table row is all -1 reads block 0 (never out of bounds); the others are
    unaffected."""
    case = (3, 2, 2, 2, 1, 64, [5, 0, 30])
    q, k, v, lengths, mask, k_pool, v_pool, table = paged_inputs(case, 16, "HND", torch.float32, True, 13)
    table[1] = -1
    out = tree_attention(q, k_pool, v_pool, lengths, mask, 2, block_table=table)
    expected = tree_attention(q, k, v, lengths, mask, 2)
    assert torch.equal(out[[0, 2]], expected[[0, 2]])
