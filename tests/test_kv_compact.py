"""kv_compact: the reference against a naive per-layer loop, the Triton kernel (interpreter) and the CUDA op
against the reference, and moves through a block table in paged pools against the contiguous result."""

import importlib
import os

import pytest
import torch
from paged import LAYOUTS, paginate, unpaginate, unused_rows

import eagle_kernels
from eagle_kernels import _C_loader, reference

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
# Triton runs compiled on a GPU, else through the interpreter on CPU tensors (tests/conftest.py).
pytestmark = pytest.mark.kernels
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def on_triton_device(case):
    return tuple(t.to(TRITON_DEVICE) for t in case)


def triton_kv_compact():
    """The Triton host function (the package attribute ``kv_compact`` is the dispatcher)."""
    return importlib.import_module("eagle_kernels.kv_compact").kv_compact


def naive_kv_compact(cache, lengths, src, counts):
    """What the official EAGLE code does: per layer, K and V, per sequence, an index copy (overlap-safe)."""
    for layer in range(cache.shape[0]):
        for kv in range(2):
            for b in range(cache.shape[2]):
                n = int(counts[b])
                if n == 0:
                    continue
                start = int(lengths[b])
                rows = cache[layer, kv, b, :, start + src[b, :n].long()].clone()  # [Hkv, n, D]
                cache[layer, kv, b, :, start : start + n] = rows


def make_case(
    lengths, src_rows, counts, num_layers=2, kv_heads=2, max_len=24, head_dim=8, dtype=torch.float32
):
    batch = len(lengths)
    cache = torch.randn(num_layers, 2, batch, kv_heads, max_len, head_dim).to(dtype)
    width = max((len(r) for r in src_rows), default=0)
    src = torch.zeros(batch, width, dtype=torch.int64)
    for b, rows in enumerate(src_rows):
        src[b, : len(rows)] = torch.tensor(rows, dtype=torch.int64)
    return (
        cache,
        torch.tensor(lengths, dtype=torch.int32),
        src,
        torch.tensor(counts, dtype=torch.int32),
    )


CASES = {
    # permutation of the first rows: every destination is also a source
    "overlap_permutation": ([3], [[2, 0, 1]], [3]),
    # sources beyond the destinations, and a destination that is a later source
    "overlap_forward": ([5], [[0, 3, 1, 6]], [4]),
    "count_zero": ([4], [[1, 2]], [0]),
    "count_one": ([4], [[5]], [1]),
    "batch3_mixed": ([2, 7, 0], [[1, 4, 5], [0, 2, 1], [3, 1, 0]], [3, 1, 2]),
    "entries_past_count_ignored": ([1, 3], [[4, 99, -7], [2, 1, 0]], [1, 3]),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_reference_matches_naive_loop(name):
    cache, lengths, src, counts = make_case(*CASES[name])
    expected = cache.clone()
    valid_src = torch.where(torch.arange(src.shape[1]) < counts.view(-1, 1).long(), src, 0)
    naive_kv_compact(expected, lengths, valid_src, counts)
    reference.kv_compact(cache, lengths, src, counts)
    torch.testing.assert_close(cache, expected, rtol=0, atol=0)


def test_reference_known_answer_overlap():
    # One layer/head/dim: row values equal their index, so the result is readable.
    cache = torch.arange(10, dtype=torch.float32).view(1, 1, 1, 1, 10, 1).repeat(1, 2, 1, 1, 1, 1)
    reference.kv_compact(
        cache,
        torch.tensor([3], dtype=torch.int32),
        torch.tensor([[2, 0, 1]]),
        torch.tensor([3], dtype=torch.int32),
    )
    assert cache[0, 0, 0, 0, :, 0].tolist() == [0, 1, 2, 5, 3, 4, 6, 7, 8, 9]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", sorted(CASES))
def test_triton_matches_reference(name, dtype):
    kv_compact_triton = triton_kv_compact()
    cache, lengths, src, counts = on_triton_device(make_case(*CASES[name], dtype=dtype))
    expected = cache.clone()
    reference.kv_compact(expected, lengths, src, counts)
    kv_compact_triton(cache, lengths, src, counts)
    torch.testing.assert_close(cache, expected, rtol=0, atol=0)


@pytest.mark.parametrize("head_dim", [80, 128])
def test_triton_odd_head_dim_many_rows(head_dim):
    kv_compact_triton = triton_kv_compact()
    gen = torch.Generator().manual_seed(0)
    lengths = [5, 0, 11]
    src_rows = [torch.randperm(63, generator=gen)[:9].tolist() for _ in lengths]
    case = make_case(
        lengths,
        src_rows,
        [9, 4, 7],
        num_layers=1,
        kv_heads=1,
        max_len=80,
        head_dim=head_dim,
        dtype=torch.bfloat16,
    )
    cache, lengths_t, src, counts = on_triton_device(case)
    expected = cache.clone()
    reference.kv_compact(expected, lengths_t, src, counts)
    kv_compact_triton(cache, lengths_t, src, counts)
    torch.testing.assert_close(cache, expected, rtol=0, atol=0)


def test_dispatch_under_interpreter_uses_triton_and_matches():
    cache, lengths, src, counts = on_triton_device(make_case(*CASES["batch3_mixed"]))
    expected = cache.clone()
    reference.kv_compact(expected, lengths, src, counts)
    eagle_kernels.kv_compact(cache, lengths, src, counts)
    torch.testing.assert_close(cache, expected, rtol=0, atol=0)
    assert callable(eagle_kernels.kv_compact) and not isinstance(eagle_kernels.kv_compact, type(os))


# ---------------------------------------------------------------------------------------------- paged


def used_rows(lengths, src, counts):
    """Logical rows each sequence holds: its prefix and the tree rows the case reads or writes."""
    used = []
    for b in range(len(lengths)):
        n = int(counts[b])
        extent = max([int(x) + 1 for x in src[b, :n]] + [n])
        used.append(int(lengths[b]) + extent)
    return used


def paged_case(name, block_size, layout, dtype=torch.float32):
    """A case's contiguous cache and the same logical rows in a pool of shuffled blocks (NaN elsewhere), with
    what the contiguous reference leaves in those rows."""
    cache, lengths, src, counts = make_case(*CASES[name], dtype=dtype)
    used = used_rows(lengths, src, counts)
    expected = cache.clone()
    reference.kv_compact(expected, lengths, src, counts)
    pool, table = paginate(cache, used, block_size, layout, seed=block_size)
    return pool, table, lengths, src, counts, used, expected


def assert_paged_result(pool, table, used, expected, before):
    max_len = expected.shape[4]
    result = unpaginate(pool, table, used, max_len)
    for b, n in enumerate(used):
        torch.testing.assert_close(result[:, :, b, :, :n], expected[:, :, b, :, :n], rtol=0, atol=0)
    free = unused_rows(pool, table, used)
    torch.testing.assert_close(pool.cpu()[free], before[free], rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("block_size", [1, 5, 64])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", sorted(CASES))
def test_paged_matches_contiguous(name, layout, block_size):
    """Rows moved through a block table (blocks shuffled, 5-row blocks: moves across block boundaries; HND and
    NHD pools) end where the contiguous move puts them; no other row of the pool changes (unused rows stay
    NaN). Triton and the paged reference."""
    pool, table, lengths, src, counts, used, expected = paged_case(name, block_size, layout)
    before = pool.clone()
    reference.kv_compact(pool, lengths, src, counts, block_table=table)
    assert_paged_result(pool, table, used, expected, before)
    pool = before.clone().to(TRITON_DEVICE)
    triton_kv_compact()(pool, *on_triton_device((lengths, src, counts)), block_table=table.to(TRITON_DEVICE))
    assert_paged_result(pool, table, used, expected, before)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_paged_16_bit_and_odd_head_dim(dtype):
    kv_compact_triton = triton_kv_compact()
    gen = torch.Generator().manual_seed(1)
    lengths = [5, 0, 11]
    src_rows = [torch.randperm(40, generator=gen)[:9].tolist() for _ in lengths]
    cache, lengths_t, src, counts = make_case(lengths, src_rows, [9, 4, 7], num_layers=1, kv_heads=3,
                                              max_len=64, head_dim=80, dtype=dtype)
    used = used_rows(lengths_t, src, counts)
    expected = cache.clone()
    reference.kv_compact(expected, lengths_t, src, counts)
    pool, table = paginate(cache, used, 16, "NHD", seed=2)
    before = pool.clone()
    pool, table_d = pool.to(TRITON_DEVICE), table.to(TRITON_DEVICE)
    kv_compact_triton(pool, *on_triton_device((lengths_t, src, counts)), block_table=table_d)
    assert_paged_result(pool, table, used, expected, before)


def test_paged_negative_destination_entry_skips():
    """A destination row in a block whose table entry is -1 is not written (kernel and reference)."""
    pool, table, lengths, src, counts, used, _ = paged_case("batch3_mixed", 4, "HND")
    table[1, 1] = -1  # sequence 1 (prefix 7): its destination row 7 lives in logical block 1
    expected = pool.clone()
    reference.kv_compact(expected, lengths, src, counts, block_table=table)
    pool = pool.to(TRITON_DEVICE)
    triton_kv_compact()(pool, *on_triton_device((lengths, src, counts, table)))
    torch.testing.assert_close(pool.cpu(), expected, rtol=0, atol=0, equal_nan=True)


def test_paged_dispatch_runs_triton_and_the_identity_table():
    """``eagle_kernels.kv_compact`` with a table runs the Triton kernel (the CUDA op takes no table); the
    identity table over the contiguous buffer is ``block_table=None``."""
    pool, table, lengths, src, counts, used, expected = paged_case("overlap_forward", 4, "NHD")
    before = pool.clone()
    pool, table_d = pool.to(TRITON_DEVICE), table.to(TRITON_DEVICE)
    eagle_kernels.kv_compact(pool, *on_triton_device((lengths, src, counts)), block_table=table_d)
    assert eagle_kernels.backends()["kv_compact"]["backend"] == "triton"
    assert_paged_result(pool, table, used, expected, before)
    cache, lengths, src, counts = on_triton_device(make_case(*CASES["batch3_mixed"]))
    identity = torch.arange(3, dtype=torch.int32, device=TRITON_DEVICE).view(3, 1)
    plain = cache.clone()
    eagle_kernels.kv_compact(plain, lengths, src, counts)
    triton_kv_compact()(cache, lengths, src, counts, block_table=identity)
    torch.testing.assert_close(cache, plain, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------ CUDA


@pytest.mark.gpu
@pytest.mark.usefixtures("cuda_ops")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_cuda_matches_reference(name, dtype, index_dtype):
    cache, lengths, src, counts = make_case(*CASES[name], dtype=dtype)
    expected = cache.clone()
    reference.kv_compact(expected, lengths, src, counts)
    cache = cache.cuda()
    _C_loader.kv_compact_cuda(cache, lengths.cuda(), src.to(index_dtype).cuda(), counts.cuda())
    torch.testing.assert_close(cache.cpu(), expected, rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.usefixtures("cuda_ops")
@pytest.mark.parametrize("head_dim", [80, 128, 3])  # 3 x 2 bytes: no 16-byte vectors, narrower accesses
@pytest.mark.parametrize("num_src", [8, 63, 700])  # 700 rows of 256 bytes: staged in column tiles
def test_cuda_large_random(head_dim, num_src):
    gen = torch.Generator().manual_seed(head_dim * 1000 + num_src)
    batch, max_len = 3, 1500
    lengths = torch.randint(0, max_len - num_src, (batch,), generator=gen, dtype=torch.int32)
    src = torch.stack([torch.randperm(num_src, generator=gen) for _ in range(batch)])
    counts = torch.randint(0, num_src + 1, (batch,), generator=gen, dtype=torch.int32)
    cache = torch.randn(4, 2, batch, 2, max_len, head_dim, generator=gen).to(torch.bfloat16)
    expected = cache.clone()
    reference.kv_compact(expected, lengths, src, counts)
    cache = cache.cuda()
    eagle_kernels.kv_compact(cache, lengths.cuda(), src.cuda(), counts.cuda())
    torch.testing.assert_close(cache.cpu(), expected, rtol=0, atol=0)
