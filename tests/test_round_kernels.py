"""Triton kernels of a decoding round (rotary_store_kv, silu_mul, counter_uniform) vs their references: on
CPU through Triton's interpreter, or on a GPU where there is one.

The interpreter rounds fp32 -> bf16 by truncation (a GPU rounds to nearest even), so bf16 checks allow a few
bf16 ulps.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: run the kernels on CPU tensors

import importlib  # noqa: E402

import pytest  # noqa: E402
from paged import LAYOUTS, paginate, unpaginate, unused_rows  # noqa: E402
from scipy.stats import chisquare  # noqa: E402

import eagle_kernels  # noqa: E402
from eagle_kernels import reference  # noqa: E402
from eagle_kernels._triton_common import interpreted  # noqa: E402

# The modules (the package's attributes of these names are the dispatching functions).
rotary_store_kv, silu_mul, counter_uniform = (
    importlib.import_module(f"eagle_kernels.{name}")
    for name in ("rotary_store_kv", "silu_mul", "counter_uniform")
)

DEVICE = "cpu" if interpreted(silu_mul._silu_mul_kernel) else "cuda"
if DEVICE == "cuda" and not torch.cuda.is_available():
    pytest.skip("triton was imported without TRITON_INTERPRET=1 and there is no GPU", allow_module_level=True)

pytestmark = [pytest.mark.kernels, pytest.mark.usefixtures("poison_empty")]

BF16_ULP = 2.0**-7
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def tolerance(dtype, ulps=2):
    if dtype == torch.float32:
        return dict(atol=1e-5, rtol=1e-5)
    if dtype == torch.float16:
        return dict(atol=2e-3, rtol=2e-3)
    return dict(atol=ulps * BF16_ULP, rtol=ulps * BF16_ULP)


def gen(seed):
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------- rotary_store_kv


def rope_table(max_pos, head_dim, base=10000.0):
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.arange(max_pos, dtype=torch.float64).view(-1, 1) * inv_freq.view(1, -1)
    return torch.cat([angles.cos(), angles.sin()], -1).float()


def rotary_case(bsz, seq, hq, hkv, d, dtype, norm, seed, layers=2, cache_rows=80, device="cpu"):
    """Views as the engine makes them: q, k, v slices of one fused qkv output; caches slices of one buffer."""
    g = gen(seed)
    qkv = torch.randn(bsz, seq, (hq + 2 * hkv) * d + 5, generator=g).to(dtype).to(device)  # +5: padded rows
    q = qkv[..., : hq * d].view(bsz, seq, hq, d)
    k = qkv[..., hq * d : (hq + hkv) * d].view(bsz, seq, hkv, d)
    v = qkv[..., (hq + hkv) * d : (hq + 2 * hkv) * d].view(bsz, seq, hkv, d)
    positions = torch.randint(0, 500, (bsz, seq), generator=g)
    rows = torch.randint(0, cache_rows - seq + 1, (bsz,), generator=g, dtype=torch.int32)
    # [L, 2, B+2, Hkv, S, D] with K and V interleaved per sequence: the cache slices have non-standard strides
    buf = torch.randn(layers, bsz + 2, 2, hkv, cache_rows, d, generator=g).to(dtype).to(device)
    buf = buf.transpose(1, 2)
    weights = [(torch.rand(d, generator=g) + 0.5).to(dtype).to(device) if norm else None for _ in range(2)]
    return q, k, v, positions.to(device), rope_table(512, d).to(device), buf, rows.to(device), weights


@pytest.mark.parametrize("bsz, seq, hq, hkv, d", [(3, 1, 4, 2, 80), (3, 63, 2, 1, 24), (1, 4, 2, 2, 128)],
                         ids=["B3-T1-D80", "B3-T63-D24", "B1-T4-D128"])
@pytest.mark.parametrize("norm", [False, True], ids=["plain", "qk_norm"])
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_rotary_store_kv(bsz, seq, hq, hkv, d, norm, dtype):
    q, k, v, positions, cos_sin, buf, rows, (qw, kw) = rotary_case(bsz, seq, hq, hkv, d, dtype, norm, seq + d)
    layer = 1
    expected_buf = buf.clone()
    expected = reference.rotary_store_kv(q, k, v, positions, cos_sin, expected_buf[layer, 0, :bsz],
                                         expected_buf[layer, 1, :bsz], rows, qw, kw, 1e-6)
    q, k, v, positions, cos_sin, buf, rows_d, (qw, kw) = rotary_case(bsz, seq, hq, hkv, d, dtype, norm,
                                                                      seq + d, device=DEVICE)
    assert not q.is_contiguous() and (bsz == 1 or not buf[layer, 0, :bsz].is_contiguous())
    out = rotary_store_kv.rotary_store_kv(q, k, v, positions, cos_sin, buf[layer, 0, :bsz],
                                          buf[layer, 1, :bsz], rows_d, qw, kw, 1e-6)
    assert out.shape == q.shape and out.dtype == dtype and out.is_contiguous()
    tol = tolerance(dtype, ulps=4 if norm else 2)
    torch.testing.assert_close(out.cpu(), expected, **tol)
    # The whole buffer: written rows match, every other row (other layers, sequences, positions) untouched.
    written = torch.zeros(buf.shape, dtype=torch.bool)
    for b in range(bsz):
        written[layer, :, b, :, int(rows[b]) : int(rows[b]) + seq] = True
    torch.testing.assert_close(buf.cpu()[~written], expected_buf[~written], rtol=0, atol=0)
    torch.testing.assert_close(buf.cpu()[layer, 1], expected_buf[layer, 1], rtol=0, atol=0)  # raw v: exact
    torch.testing.assert_close(buf.cpu(), expected_buf, **tol)


def test_rotary_store_kv_int32_positions_and_k_norm_only():
    q, k, v, positions, cos_sin, buf, rows, (_, kw) = rotary_case(2, 3, 4, 2, 64, torch.float32, True, 5)
    expected_buf = buf.clone()
    expected = reference.rotary_store_kv(q, k, v, positions, cos_sin, expected_buf[0, 0, :2],
                                         expected_buf[0, 1, :2], rows.long(), None, kw)
    out = rotary_store_kv.rotary_store_kv(q, k, v, positions.int(), cos_sin, buf[0, 0, :2], buf[0, 1, :2],
                                          rows, None, kw)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(buf, expected_buf, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("block_size", [1, 16, 64])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_rotary_store_kv_paged(block_size, layout, dtype):
    """New rows through a block table into a pool of shuffled blocks (HND, or NHD as a permuted view): the
    same logical rows as the contiguous write, rows crossing block boundaries, nothing else of the pool
    touched (its unused rows stay NaN); the paged reference agrees."""
    bsz, seq, hq, hkv, d = 3, 5, 4, 2, 32
    q, k, v, positions, cos_sin, buf, _, (qw, kw) = rotary_case(bsz, seq, hq, hkv, d, dtype, True, 21,
                                                                cache_rows=80, device=DEVICE)
    rows = torch.tensor([14, 0, 61], dtype=torch.int32, device=DEVICE)  # 14..18 crosses row 16
    used = [int(r) + seq for r in rows]
    caches = torch.stack([buf[1, 0, :bsz], buf[1, 1, :bsz]]).cpu()  # [2, B, Hkv, S, D]
    expected = caches.clone()
    q_expected = reference.rotary_store_kv(q.cpu(), k.cpu(), v.cpu(), positions.cpu(), cos_sin.cpu(),
                                           expected[0], expected[1], rows.cpu(), qw.cpu(), kw.cpu())
    pool, table = paginate(caches, used, block_size, layout, seed=block_size)
    pool_ref = pool.clone()
    pool, table = pool.to(DEVICE), table.to(DEVICE)
    out = rotary_store_kv.rotary_store_kv(q, k, v, positions, cos_sin, pool[0], pool[1], rows, qw, kw,
                                          block_table=table)
    tol = tolerance(dtype, ulps=4)
    torch.testing.assert_close(out.cpu(), q_expected, **tol)
    written = unpaginate(pool, table, used, caches.shape[3])
    want = expected.clone()
    for b, n in enumerate(used):
        want[:, b, :, n:] = float("nan")  # rows the pool does not hold
    torch.testing.assert_close(written, want, equal_nan=True, **tol)
    torch.testing.assert_close(written[1], want[1], equal_nan=True, rtol=0, atol=0)  # raw v: exact
    assert torch.isnan(pool.cpu()[unused_rows(pool, table, used)]).all()
    # The reference through the same table.
    q_ref = reference.rotary_store_kv(q.cpu(), k.cpu(), v.cpu(), positions.cpu(), cos_sin.cpu(), pool_ref[0],
                                      pool_ref[1], rows.cpu(), qw.cpu(), kw.cpu(), block_table=table.cpu())
    torch.testing.assert_close(q_ref, q_expected, rtol=0, atol=0)
    torch.testing.assert_close(pool.cpu(), pool_ref, equal_nan=True, **tol)


def test_rotary_store_kv_paged_skips_negative_entries_and_rows_past_the_table():
    """A padded sequence (its table row all -1) writes nothing, nor do rows past the table's capacity."""
    q, k, v, positions, cos_sin, buf, _, _ = rotary_case(3, 4, 2, 1, 16, torch.float32, False, 22,
                                                         device=DEVICE)
    rows = torch.tensor([3, 0, 78], dtype=torch.int32, device=DEVICE)  # sequence 2: rows 78..81 of 80
    pool, table = paginate(torch.stack([buf[0, 0, :3], buf[0, 1, :3]]).cpu(), [7, 4, 80], 8, seed=3)
    table[1] = -1
    before = pool.clone()
    pool, table = pool.to(DEVICE), table.to(DEVICE)
    rotary_store_kv.rotary_store_kv(q, k, v, positions, cos_sin, pool[0], pool[1], rows, block_table=table)
    t = table.cpu()
    expected = {(int(t[0, r // 8]), r % 8) for r in range(3, 7)} | {(int(t[2, 9]), 6), (int(t[2, 9]), 7)}
    changed = (pool.cpu() != before) & ~torch.isnan(before)  # [2, num_blocks, Hkv, 8, D]
    assert {tuple(x) for x in changed.any(dim=(0, 2, 4)).nonzero().tolist()} == expected
    reference_pool = before.clone()
    reference.rotary_store_kv(q.cpu(), k.cpu(), v.cpu(), positions.cpu(), cos_sin.cpu(), reference_pool[0],
                              reference_pool[1], rows.cpu(), block_table=t)
    torch.testing.assert_close(pool.cpu(), reference_pool, equal_nan=True, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- silu_mul


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("shape", [(3, 5, 111), (1, 1, 2100), (7,)], ids=["3x5x111", "1x1x2100", "7"])
def test_silu_mul_fused_views(shape, dtype):
    inter = shape[-1]
    gate_up = (torch.randn(*shape[:-1], 2 * inter, generator=gen(inter)) * 4).to(dtype).to(DEVICE)
    gate, up = gate_up[..., :inter], gate_up[..., inter:]  # halves of one fused output, read in place
    out = silu_mul.silu_mul(gate, up)
    assert out.shape == gate.shape and out.dtype == dtype and out.is_contiguous()
    torch.testing.assert_close(out.cpu(), reference.silu_mul(gate.cpu(), up.cpu()), **tolerance(dtype))


def test_silu_mul_non_collapsible_view():
    x = torch.randn(4, 6, 2, 33, generator=gen(3)).to(DEVICE)
    gate, up = x[:, :, 0].transpose(0, 1), x[:, :, 1].transpose(0, 1)  # [6, 4, 33], leading dims do not merge
    torch.testing.assert_close(silu_mul.silu_mul(gate, up).cpu(), reference.silu_mul(gate.cpu(), up.cpu()),
                               atol=1e-6, rtol=1e-5)


# --------------------------------------------------------------------------------------- counter_uniform

# SplitMix64 with seed 0: the first outputs of the published generator (the state advances by gamma first).
SPLITMIX_SEED0 = [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F]


@pytest.mark.parametrize("impl", ["reference", "kernel"])
def test_counter_uniform_known_vector(impl):
    f = reference.counter_uniform if impl == "reference" else counter_uniform.counter_uniform
    seeds = torch.tensor([0, 0], dtype=torch.int64, device=DEVICE)
    offsets = torch.tensor([0, 1], dtype=torch.int64, device=DEVICE)
    u = f(seeds, offsets, 3).cpu()
    assert u.dtype == torch.float32 and u.shape == (2, 3)
    expected = torch.tensor([z >> 40 for z in SPLITMIX_SEED0], dtype=torch.float64) / 2**24
    assert u[0].double().tolist() == expected.tolist()
    assert u[1, :2].double().tolist() == expected[1:].tolist()  # offset 1 = the stream advanced by one


def test_counter_uniform_kernel_bit_exact():
    g = gen(9)
    seeds = torch.randint(-(2**63), 2**63 - 1, (5,), generator=g, dtype=torch.int64)
    seeds[0] = -1
    offsets = torch.randint(0, 2**62, (5,), generator=g, dtype=torch.int64)
    offsets[1] = 2**63 - 2  # the counter wraps past 2^63
    offsets[2] = 0
    for n in (1, 1000, 2500):
        expected = reference.counter_uniform(seeds, offsets, n)
        actual = counter_uniform.counter_uniform(seeds.to(DEVICE), offsets.to(DEVICE), n).cpu()
        assert torch.equal(actual, expected), n
        assert (actual >= 0).all() and (actual < 1).all()


def test_counter_uniform_dispatch_and_frequencies():
    draws = 1 << 16
    seeds = torch.tensor([12345, -77, 3, 2**40], dtype=torch.int64, device=DEVICE)
    offsets = torch.tensor([0, 100, 2**33, 7], dtype=torch.int64, device=DEVICE)
    u = eagle_kernels.counter_uniform(seeds, offsets, draws // 4).cpu()
    assert torch.equal(u, reference.counter_uniform(seeds.cpu(), offsets.cpu(), draws // 4))
    flat = u.flatten().double()
    bins = (flat * 64).long()
    assert chisquare(torch.bincount(bins, minlength=64).numpy()).pvalue > 1e-4
    # consecutive draws are independent: pairs (u[i], u[i + 1]) fill an 8 x 8 grid evenly
    pairs = (u[:, :-1] * 8).long() * 8 + (u[:, 1:] * 8).long()
    assert chisquare(torch.bincount(pairs.flatten(), minlength=64).numpy()).pvalue > 1e-4
    # offsets select a window of one stream: row b from offset o + 10 equals the tail of row b from o
    tail = eagle_kernels.counter_uniform(seeds, offsets + 10, 5).cpu()
    assert torch.equal(tail, u[:, 10:15])


def test_poison_fixture_poisons_every_dtype():
    """The poison_empty fixture (tests/conftest.py) is active here: unwritten outputs cannot pass."""
    assert torch.isnan(torch.empty(3)).all() and torch.isnan(torch.empty(2, dtype=torch.bfloat16)).all()
    assert (torch.empty(4, dtype=torch.int32) == -123456789).all()
    assert (torch.empty(4, dtype=torch.int64) == -123456789).all()
    assert (torch.empty(4, dtype=torch.int16) == -(2**15)).all() and torch.empty(2, dtype=torch.bool).all()


def test_dispatch_runs_the_kernels(monkeypatch):
    """The public ops run the Triton kernels under TRITON_INTERPRET=1 (or on a GPU)."""
    if DEVICE == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    calls = []
    modules = dict(rotary_store_kv=rotary_store_kv, silu_mul=silu_mul, counter_uniform=counter_uniform)
    for name, module in modules.items():
        spy = (lambda f, n: lambda *a, **kw: calls.append(n) or f(*a, **kw))(getattr(module, name), name)
        monkeypatch.setattr(module, name, spy)
    q, k, v, positions, cos_sin, buf, rows, _ = rotary_case(2, 2, 2, 1, 16, torch.float32, False, 1,
                                                            device=DEVICE)
    eagle_kernels.rotary_store_kv(q, k, v, positions, cos_sin, buf[0, 0, :2], buf[0, 1, :2], rows)
    x = torch.randn(3, 8, device=DEVICE)
    eagle_kernels.silu_mul(x[:, :4], x[:, 4:])
    eagle_kernels.counter_uniform(torch.zeros(2, dtype=torch.int64, device=DEVICE),
                                  torch.zeros(2, dtype=torch.int64, device=DEVICE), 4)
    assert calls == ["rotary_store_kv", "silu_mul", "counter_uniform"]
