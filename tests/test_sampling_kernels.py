"""Sampling without a sort: the top-p threshold (radix select) and the in-place masked softmax, Triton against
their references (on CPU through Triton's interpreter, or on a GPU where there is one), the references against
the definition, and the engine's sampling distribution against the sort-based one it replaced."""

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: run the kernels on CPU tensors

import importlib  # noqa: E402

import pytest  # noqa: E402

from eagle_engine.speculative.sampling import SamplingParams, probs_per_row, target_probs  # noqa: E402
from eagle_kernels import reference  # noqa: E402
from eagle_kernels._triton_common import interpreted  # noqa: E402

# The modules (the package's attributes of these names are the dispatching functions).
top_p_threshold, masked_softmax = (importlib.import_module(f"eagle_kernels.{name}")
                                   for name in ("top_p_threshold", "masked_softmax"))

DEVICE = "cpu" if interpreted(top_p_threshold._top_p_threshold_kernel) else "cuda"
pytestmark = [pytest.mark.kernels, pytest.mark.usefixtures("poison_empty")]
INF = float("inf")


def gen(seed):
    return torch.Generator().manual_seed(seed)


def by_definition(row: torch.Tensor, top_p: float, floor: float) -> float:
    """The largest entry value v >= floor whose mass (softmax over the entries >= floor) reaches top_p."""
    kept = row[row >= floor]
    probs = torch.softmax(kept.double(), 0)
    for v in torch.sort(kept.unique(), descending=True).values.tolist():
        if probs[kept >= v].sum() >= top_p:
            return v
    return kept.min().item()


def random_case(shape, seed, ties=False):
    g = gen(seed)
    logits = torch.randn(*shape, generator=g) * 2.5
    if ties:
        logits = (logits * 2).round() / 2  # many exact ties
    logits[..., 3] = -INF  # a masked vocabulary entry
    rows = shape[:-1]
    top_p = torch.rand(rows, generator=g) * 0.98 + 0.01
    top_p.view(-1)[0] = 1.0
    floor = torch.full(rows, -INF)
    k = 5
    floor.view(-1)[-1] = torch.topk(logits.reshape(-1, shape[-1])[-1], k).values[-1]  # one row with top-k
    return logits, top_p, floor


def test_reference_hand_built():
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.2, 0.1]]))
    one = torch.full((1,), -INF)
    for top_p, expected in ((0.5, 0.5), (0.51, 0.2), (0.7, 0.2), (0.9, 0.2), (0.91, 0.1), (1.0, None)):
        got = reference.top_p_threshold(logits, torch.tensor([top_p]), one).item()
        assert got == (-INF if expected is None else torch.log(torch.tensor(expected)).item()), top_p
    # The two tokens tied at 0.2 are both kept (p = 0.6 reaches into the tie).
    probs = target_probs(logits[0], SamplingParams(temperature=1.0, top_p=0.6))
    torch.testing.assert_close(probs, torch.tensor([0.5, 0.2, 0.2, 0.0]) / 0.9)


@pytest.mark.parametrize("ties", [False, True])
def test_reference_matches_the_definition(ties):
    logits, top_p, floor = random_case((6, 40), seed=int(ties), ties=ties)
    got = reference.top_p_threshold(logits, top_p, floor)
    for r in range(6):
        p, f = top_p[r].item(), floor[r].item()
        assert got[r].item() == (f if p >= 1 else by_definition(logits[r], p, f)), r


def assert_same_cuts(logits, top_p, floor, got, expected):
    """Equal thresholds, or (a GPU's exp and summation order are not the CPU's) two that both sit at the
    boundary: the mass they keep is within 1e-5 of top_p."""
    rows, got, expected = logits.reshape(-1, logits.shape[-1]), got.reshape(-1), expected.reshape(-1)
    for r in torch.nonzero(got != expected).flatten().tolist():
        x = rows[r].double().masked_fill(rows[r] < floor.reshape(-1)[r], -INF)
        p = torch.softmax(x, 0)
        for t in (got[r], expected[r]):
            assert abs(p[x >= t].sum().item() - top_p.reshape(-1)[r].item()) < 1e-5, (r, got[r], expected[r])


@pytest.mark.parametrize("shape", [(1, 111), (3, 1000), (2, 5003), (2, 3, 257)], ids=str)
@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
def test_kernel_threshold_matches_reference(shape, ties):
    logits, top_p, floor = random_case(shape, seed=sum(shape), ties=ties)
    expected = reference.top_p_threshold(logits, top_p, floor)
    got = top_p_threshold.top_p_threshold(logits.to(DEVICE), top_p.to(DEVICE), floor.to(DEVICE)).cpu()
    if DEVICE == "cpu":
        assert got.tolist() == expected.tolist()
    assert_same_cuts(logits, top_p, floor, got, expected)


@pytest.mark.parametrize("top_p", [0.99999994, 1e-50], ids=["within-an-ulp-of-1", "underflows-to-0"])
def test_rounding_at_the_ends_of_top_p_keeps_a_distribution(top_p):
    """top_p so close to 1 that rounding lets no candidate reach it (keep everything), or so small that it
    is 0 in fp32 (keep the top): never a NaN threshold, the reference's distribution."""
    logits = torch.randn(4, 5000, generator=gen(5))
    p, floor = torch.full((4,), top_p), torch.full((4,), -INF)
    got = top_p_threshold.top_p_threshold(logits.to(DEVICE), p.to(DEVICE), floor.to(DEVICE))
    assert not torch.isnan(got).any()
    probs = masked_softmax.masked_softmax_(logits.clone().to(DEVICE), got).cpu()
    expected = reference.masked_softmax_(logits.clone(), reference.top_p_threshold(logits, p, floor))
    torch.testing.assert_close(probs, expected, rtol=1e-5, atol=1e-7)


def test_kernels_read_and_write_a_slice_of_a_bigger_buffer_in_place():
    """Candidate rows ``[:, :5]`` of a ``[2, 7, V]`` buffer (Lookahead's extra rows follow them): read and
    written in place, the extra rows untouched."""
    buffer = torch.randn(2, 7, 300, generator=gen(3)).to(DEVICE)
    before = buffer.clone()
    view = buffer[:, :5]
    top_p = torch.full((2, 5), 0.8, device=DEVICE)
    floor = torch.full((2, 5), -INF, device=DEVICE)
    threshold = top_p_threshold.top_p_threshold(view, top_p, floor)
    torch.testing.assert_close(threshold.cpu(), reference.top_p_threshold(before[:, :5].cpu(), top_p.cpu(),
                                                                           floor.cpu()), rtol=0, atol=0)
    masked_softmax.masked_softmax_(view, threshold)
    expected = before[:, :5].cpu().clone()
    reference.masked_softmax_(expected, threshold.cpu())
    torch.testing.assert_close(buffer[:, :5].cpu(), expected, rtol=1e-5, atol=1e-7)
    assert torch.equal(buffer[:, 5:], before[:, 5:])


@pytest.mark.parametrize("shape", [(1, 111), (3, 2049), (2, 3, 257)], ids=str)
def test_kernel_masked_softmax_matches_reference(shape):
    logits, top_p, floor = random_case(shape, seed=7 + sum(shape), ties=True)
    threshold = reference.top_p_threshold(logits, top_p * 0.9, floor)
    expected = reference.masked_softmax_(logits.clone(), threshold)
    got = masked_softmax.masked_softmax_(logits.clone().to(DEVICE), threshold.to(DEVICE)).cpu()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)  # a GPU's exp is not libm's
    assert (got[logits < threshold.unsqueeze(-1)] == 0).all()


def test_top_k_holds_when_the_widest_top_k_passes_the_vocabulary():
    """The runner rounds the batch's largest top_k up to a power of two; past the vocabulary, a row asking
    for a small top_k still gets it."""
    logits = torch.randn(2, 100, generator=gen(13))
    probs = probs_per_row(logits.clone(), torch.ones(2), torch.ones(2), torch.tensor([3, 0]), max_top_k=128,
                          use_top_p=False)
    assert (probs[0] > 0).sum() == 3 and (probs[1] > 0).sum() == 100


def test_sampling_distribution_equals_the_sorted_one_without_ties():
    """Where no two logits tie, the new filter gives exactly the distribution of the sort-based one it
    replaced (temperature, top-k, then top-p over a full sort), row by row with mixed settings."""
    logits = torch.randn(4, 500, generator=gen(11)) * 3
    temperature = torch.tensor([0.7, 1.0, 1.3, 0.0])
    top_p = torch.tensor([0.9, 1.0, 0.5, 0.8])
    top_k = torch.tensor([0, 20, 50, 0])
    got = probs_per_row(logits.clone(), temperature, top_p, top_k, max_top_k=64, use_top_p=True)
    for r in range(4):
        x = logits[r] / (temperature[r] if temperature[r] > 0 else 1)
        if top_k[r] > 0:
            x = x.masked_fill(x < torch.topk(x, int(top_k[r])).values[-1], -INF)
        p = torch.softmax(x, -1)
        sorted_p, order = torch.sort(p, descending=True)
        drop = (torch.cumsum(sorted_p, -1) - sorted_p) >= top_p[r]
        p = p.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), 0.0)
        p = p / p.sum()
        if temperature[r] == 0:
            p = torch.zeros_like(p).scatter(0, logits[r].argmax().view(1), 1.0)
        torch.testing.assert_close(got[r], p, rtol=1e-5, atol=1e-7)
