"""Triton draft-head kernels (draft_fc, rms_norm, add_rms_norm, lm_head_topk) vs the reference: on CPU through
Triton's interpreter, or on a GPU where there is one.

Note: the interpreter rounds fp32 -> bf16 by truncation (a GPU rounds to nearest even), so bf16 results may
differ from torch by one bf16 ulp; bf16 checks use the error-ratio rule or a 2-ulp tolerance.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: run the kernels on CPU tensors

import importlib  # noqa: E402

import pytest  # noqa: E402

from eagle_kernels import reference  # noqa: E402
from eagle_kernels._triton_common import interpreted  # noqa: E402

# The modules (the package's attributes of these names are the dispatching functions).
draft_fc, lm_head_topk, rms_norm = (
    importlib.import_module(f"eagle_kernels.{name}") for name in ("draft_fc", "lm_head_topk", "rms_norm")
)

DEVICE = "cpu" if interpreted(rms_norm._rms_norm_kernel) else "cuda"
if DEVICE == "cuda" and not torch.cuda.is_available():
    pytest.skip("triton was imported without TRITON_INTERPRET=1 and there is no GPU", allow_module_level=True)


pytestmark = [pytest.mark.kernels, pytest.mark.usefixtures("poison_empty")]

BF16_ULP = 2.0**-7


def gen(seed):
    return torch.Generator().manual_seed(seed)


def randn(*shape, generator):
    return torch.randn(*shape, generator=generator).to(DEVICE)


def rand(*shape, generator):
    return torch.rand(*shape, generator=generator).to(DEVICE)


def randint(low, high, shape, generator, dtype=torch.int64):
    return torch.randint(low, high, shape, generator=generator, dtype=dtype).to(DEVICE)


def max_err(a, b):
    return (a.float() - b.float()).abs().max().item()


# ------------------------------------------------------------------------------------------- draft_fc


@pytest.mark.parametrize("n", [1, 5, 37], ids=lambda n: f"N{n}")
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_draft_fc(n, bias, dtype):
    g = gen(n)
    vocab, hidden = 111, 80
    ids = randint(0, vocab, (n,), generator=g)
    emb = randn(vocab, hidden, generator=g)
    feat = randn(n, hidden, generator=g)
    w = randn(hidden, 2 * hidden, generator=g) / hidden**0.5
    b = randn(hidden, generator=g) if bias else None
    ref32 = reference.draft_fc(ids, emb, feat, w, b)
    cast = [t.to(dtype) if t is not None else None for t in (emb, feat, w, b)]
    out = draft_fc.draft_fc(ids, *cast)
    assert out.shape == (n, hidden) and out.dtype == dtype and not torch.isnan(out).any()
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref32, atol=2e-5, rtol=1e-5)
    else:
        err_torch = max_err(reference.draft_fc(ids, *cast), ref32)
        # + one bf16 ulp of the largest output: the interpreter truncates where a GPU rounds
        assert max_err(out, ref32) <= 2 * err_torch + BF16_ULP * ref32.abs().max().item()


def test_draft_fc_int32_ids_and_distinct_widths():
    """int32 token ids and an embedding width different from the feature width (general E + F)."""
    g = gen(3)
    ids = randint(0, 50, (7,), generator=g, dtype=torch.int32)
    emb = randn(50, 24, generator=g)
    feat = randn(7, 40, generator=g)
    w = randn(33, 64, generator=g)
    b = randn(33, generator=g)
    expected = torch.nn.functional.linear(torch.cat([emb[ids.long()], feat], -1), w, b)
    torch.testing.assert_close(draft_fc.draft_fc(ids, emb, feat, w, b), expected, atol=2e-5, rtol=1e-5)


# -------------------------------------------------------------------------------------------- RMSNorm


@pytest.mark.parametrize("hidden", [80, 4200], ids=lambda h: f"H{h}")  # 4200: the large block, two chunks
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp32", "bf16", "fp16"])
def test_rms_norm(hidden, dtype):
    g = gen(hidden)
    x = (randn(3, 5, hidden, generator=g) * 3).to(dtype)
    residual = randn(3, 5, hidden, generator=g).to(dtype)
    weight = (rand(hidden, generator=g) + 0.5).to(dtype)
    out = rms_norm.rms_norm(x, weight, 1e-6)
    normed, h = rms_norm.add_rms_norm(x, residual, weight, 1e-6)
    ref = reference.rms_norm(x, weight, 1e-6)
    ref_normed, ref_h = reference.add_rms_norm(x, residual, weight, 1e-6)
    assert out.shape == x.shape and out.dtype == dtype and normed.dtype == dtype and h.dtype == dtype
    if dtype == torch.float32:
        tol = dict(atol=1e-5, rtol=1e-5)
    elif dtype == torch.float16:
        tol = dict(atol=1e-3, rtol=1e-3)
    else:
        tol = dict(atol=1e-2, rtol=2 * BF16_ULP)
    torch.testing.assert_close(out, ref, **tol)
    torch.testing.assert_close(h, ref_h, **tol)
    # normalised from the kernel's own h (an ulp off h would compound into the bf16 comparison)
    torch.testing.assert_close(normed, reference.rms_norm(h, weight, 1e-6), **tol)
    if dtype != torch.bfloat16:
        torch.testing.assert_close(normed, ref_normed, **tol)


def test_rms_norm_fp32_weight_strided_rows():
    """bf16 activations with an fp32 weight (the reference promotes before the final cast); a strided view."""
    g = gen(7)
    base = randn(4, 2, 64, generator=g).to(torch.bfloat16)
    x = base[:, 1]  # rows with stride 128
    weight = rand(64, generator=g) + 0.5
    torch.testing.assert_close(rms_norm.rms_norm(x, weight, 1e-5), reference.rms_norm(x, weight, 1e-5),
                               atol=1e-2, rtol=2 * BF16_ULP)


# -------------------------------------------------------------------------------------------- LM head


def check_topk(hidden, weight, k, block_v=None):
    values, indices = lm_head_topk._lm_head_topk(hidden, weight, k, block_v=block_v)
    n = hidden.shape[0]
    assert values.shape == (n, k) and values.dtype == torch.float32
    assert indices.shape == (n, k) and indices.dtype == torch.int64
    assert not torch.isnan(values).any()
    full32 = torch.log_softmax(hidden.float() @ weight.float().T, -1)  # fp32 oracle
    ref_vals, ref_idx = torch.topk(full32, k, dim=-1)
    assert (indices >= 0).all() and (indices < weight.shape[0]).all()
    # Same indices except at exact ties: the true log-prob of every returned index matches the k-th best.
    torch.testing.assert_close(torch.gather(full32, 1, indices), ref_vals, atol=1e-5, rtol=1e-5)
    distinct = torch.sort(indices, dim=1).values
    assert (distinct[:, 1:] != distinct[:, :-1]).all()
    if hidden.dtype == torch.float32:
        torch.testing.assert_close(values, ref_vals, atol=1e-5, rtol=1e-5)
        assert (indices == ref_idx).float().mean() > 0.99
    else:
        err_torch = max_err(reference.lm_head_topk(hidden, weight, k)[0], ref_vals)
        assert max_err(values, ref_vals) <= 2 * err_torch + 1e-4


@pytest.mark.parametrize("vocab,k", [(111, 1), (111, 16), (1000, 4), (1000, 10), (5003, 16)])
@pytest.mark.parametrize("n", [1, 3], ids=lambda n: f"N{n}")
def test_lm_head_topk_fp32(vocab, k, n):
    g = gen(vocab + k + n)
    hidden = randn(n, 40, generator=g)
    weight = randn(vocab, 40, generator=g)
    check_topk(hidden, weight, k)


def test_lm_head_topk_bf16_many_rows_and_small_tile():
    """bf16, the 64-row config (N=20), and a 16-wide vocabulary tile so k=16 spans a partial last tile."""
    g = gen(11)
    hidden = randn(20, 72, generator=g).to(torch.bfloat16)
    weight = randn(1000, 72, generator=g).to(torch.bfloat16)
    check_topk(hidden, weight, 4)
    check_topk(hidden[:2], weight[:999], 16, block_v=16)  # 999 = 62 * 16 + 7


@pytest.mark.parametrize("n", [17, 129], ids=lambda n: f"N{n}")
def test_lm_head_topk_row_blocks(n):
    """The 64-row config (N=17) and two 128-row blocks (N=129, the second nearly empty)."""
    g = gen(n)
    check_topk(randn(n, 24, generator=g), randn(300, 24, generator=g), 10)


@pytest.mark.parametrize("k, vocab", [(16, 1500), (1, 16400)])
def test_lm_head_topk_several_merge_groups(k, vocab):
    """16-wide tiles: 94 tiles x 16 candidates, or 1025 tiles x 1, span two groups of the parallel merge;
    the best logits sit in the second group and tie across groups (the leftmost index first)."""
    g = gen(vocab)
    weight = randn(vocab, 8, generator=g)
    hidden = randn(2, 8, generator=g)
    top = vocab - 3
    weight[top] = hidden[0] * 3
    weight[5] = weight[top]  # tied with the top logit of row 0, in the first group
    values, indices = lm_head_topk._lm_head_topk(hidden, weight, k, block_v=16)
    assert lm_head_topk.launch_plan(2, vocab, k, block_v=16)["num_groups"] == 2
    assert indices[0, :2].tolist() == ([5, top] if k > 1 else [5])
    expected = torch.topk(torch.log_softmax(hidden @ weight.T, -1), k, dim=-1)
    torch.testing.assert_close(values, expected.values, atol=1e-5, rtol=1e-5)
    assert indices[1].tolist() == expected.indices[1].tolist()  # row 1 has no ties


def test_lm_head_topk_ties():
    """Duplicate weight rows give exactly tied logits: any of the tied indices is right."""
    g = gen(12)
    weight = randn(300, 32, generator=g)
    weight[200] = weight[5]
    hidden = weight[5:6].clone() * 4  # row 5 (and its twin 200) dominate
    values, indices = lm_head_topk.lm_head_topk(hidden, weight, 2)
    assert indices[0].tolist() == [5, 200]  # the leftmost index first on ties
    torch.testing.assert_close(values[0, 0], values[0, 1])
    with pytest.raises(ValueError):
        lm_head_topk.lm_head_topk(hidden, weight, 17)


def test_dispatch_runs_the_kernels(monkeypatch):
    """The public ops of ``eagle_kernels`` run the Triton kernels under TRITON_INTERPRET=1."""
    import eagle_kernels

    if DEVICE == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    calls = []
    modules = dict(draft_fc=draft_fc, rms_norm=rms_norm, add_rms_norm=rms_norm, lm_head_topk=lm_head_topk)
    for name, module in modules.items():
        spy = (lambda f, n: lambda *a, **kw: calls.append(n) or f(*a, **kw))(getattr(module, name), name)
        monkeypatch.setattr(module, name, spy)
    g = gen(13)
    x = randn(3, 32, generator=g)
    w = rand(32, generator=g)
    eagle_kernels.rms_norm(x, w, 1e-6)
    eagle_kernels.add_rms_norm(x, x, w, 1e-6)
    eagle_kernels.draft_fc(torch.tensor([1, 2, 0], device=DEVICE), randn(5, 32, generator=g), x,
                           randn(32, 64, generator=g))
    eagle_kernels.lm_head_topk(x, randn(50, 32, generator=g), 3)
    assert calls == ["rms_norm", "add_rms_norm", "draft_fc", "lm_head_topk"]


@pytest.mark.skipif(DEVICE != "cpu", reason="counts loads in Triton's interpreter")
@pytest.mark.parametrize("n", [1, 16, 17, 80, 129, 300])
def test_lm_head_topk_programs_sharing_a_weight_tile_are_adjacent(n, monkeypatch):
    """Every weight element is loaded by the row-block programs of its vocabulary tile only, and those are
    consecutive in launch order (the fastest grid axis): the weight streams from memory once per call, the
    other row blocks of a tile reading it from L2 as they run together. (Vocabulary tiles on the fastest axis,
    as before, spread them ``num_tiles`` launches apart: every row block streamed the whole weight.)"""
    from triton.runtime import interpreter

    g = gen(n)
    hidden, weight = randn(n, 16, generator=g), randn(300, 16, generator=g)
    lo, hi = weight.data_ptr(), weight.data_ptr() + weight.numel() * weight.element_size()
    loaded = {}  # weight element -> the programs that loaded it
    original = interpreter.InterpreterBuilder.create_masked_load

    def recording_load(self, ptrs, mask, *args, **kwargs):
        addresses = ptrs.data[mask.data.astype(bool)] if mask is not None else ptrs.data.ravel()
        for address in addresses[(addresses >= lo) & (addresses < hi)].tolist():
            loaded.setdefault((address - lo) // weight.element_size(), set()).add(self.grid_idx)
        return original(self, ptrs, mask, *args, **kwargs)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_masked_load", recording_load)
    lm_head_topk.lm_head_topk(hidden, weight, 4)
    plan = lm_head_topk.launch_plan(n, 300, 4)
    row_blocks = plan["grid"][0]
    assert len(loaded) == weight.numel()
    for element, programs in loaded.items():
        tile = element // weight.shape[1] // plan["block_v"]
        launch_order = sorted(x + y * row_blocks for x, y, _ in programs)
        assert launch_order == list(range(tile * row_blocks, (tile + 1) * row_blocks)), (element, programs)
