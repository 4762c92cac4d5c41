"""Tree verification: the reference on hand-built trees (greedy and sampling), sampling invariants and
frequencies, and the CUDA ops against the reference."""

import pytest
import torch

import eagle_kernels
from eagle_kernels import _C_loader, reference

# outputs allocated with torch.empty start poisoned
pytestmark = [pytest.mark.kernels, pytest.mark.usefixtures("poison_empty")]

# ----------------------------------------------------------------------------------------------- helpers


def random_tree(num_nodes: int, vocab: int, gen: torch.Generator) -> tuple[list[int], list[int]]:
    """Random parents (``parents[i] < i``) and tokens, distinct among siblings."""
    parents, tokens = [-1], [int(torch.randint(vocab, (1,), generator=gen))]
    used: dict[int, set] = {}
    for i in range(1, num_nodes):
        parent = int(torch.randint(i, (1,), generator=gen))
        siblings = used.setdefault(parent, set())
        token = int(torch.randint(vocab, (1,), generator=gen))
        while token in siblings and len(siblings) < vocab:
            token = int(torch.randint(vocab, (1,), generator=gen))
        siblings.add(token)
        parents.append(parent)
        tokens.append(token)
    return parents, tokens


def random_probs(shape, gen: torch.Generator, zero_fraction: float = 0.3) -> torch.Tensor:
    """Peaked distributions with some exact zeros (top-k/top-p style), rows summing to 1."""
    logits = torch.randn(*shape, generator=gen) * 3
    zeros = torch.rand(*shape, generator=gen) < zero_fraction
    zeros[..., 0] = False  # keep every row non-empty
    probs = torch.softmax(logits, -1).masked_fill(zeros, 0.0)
    return probs / probs.sum(-1, keepdim=True)


def random_batch(batch, num_nodes, vocab, seed, draft_from_target=True):
    """A batch of random trees; drafts often pick high-probability tokens so that acceptance happens."""
    gen = torch.Generator().manual_seed(seed)
    parents, tokens = zip(*(random_tree(num_nodes, vocab, gen) for _ in range(batch)))
    parents = torch.tensor(parents, dtype=torch.int32)
    tokens = torch.tensor(tokens, dtype=torch.int64)
    probs = random_probs((batch, num_nodes, vocab), gen)
    if draft_from_target:
        for b in range(batch):
            for i in range(1, num_nodes):
                if torch.rand(1, generator=gen) < 0.5:  # a likely token under the parent's distribution
                    tokens[b, i] = torch.multinomial(probs[b, parents[b, i]], 1, generator=gen)
    uniforms = torch.rand(batch, num_nodes, generator=gen)
    return tokens, parents, probs, uniforms


def first_emitted(tokens, num_accepted, accepted_nodes, bonus, depth=1):
    """The token emitted at path position ``depth`` (node token if accepted that deep, else the bonus)."""
    deep = num_accepted >= depth
    node = accepted_nodes[:, depth].clamp(min=0).long()
    return torch.where(deep, tokens.gather(1, node.view(-1, 1)).view(-1), bonus)


def check_path_invariants(tokens, parents, probs, num_accepted, accepted_nodes, bonus):
    for b in range(tokens.shape[0]):
        n = int(num_accepted[b])
        path = accepted_nodes[b, : n + 1].tolist()
        assert path[0] == 0 and all(int(parents[b, path[k]]) == path[k - 1] for k in range(1, n + 1))
        assert (accepted_nodes[b, n + 1 :] == -1).all()
        last = path[-1]
        children_tokens = {int(tokens[b, c]) for c in range(1, tokens.shape[1]) if int(parents[b, c]) == last}
        assert float(probs[b, last, int(bonus[b])]) > 0, "the bonus must have positive target probability"
        assert int(bonus[b]) not in children_tokens, "a rejected child's token has zero residual probability"


# -------------------------------------------------------------------------------------- greedy reference

# node:      0   1  2  3  4  5
# parent:   -1   0  0  1  2  3
# token:    10   5  6  7  8  9
TREE_PARENTS = [-1, 0, 0, 1, 2, 3]
TREE_TOKENS = [10, 5, 6, 7, 8, 9]


@pytest.mark.parametrize(
    "argmax, expected_path, expected_bonus",
    [
        ([6, 0, 8, 0, 3, 0], [0, 2, 4], 3),  # second child, then its child; leaf -> bonus at node 4
        ([99, 0, 0, 0, 0, 0], [0], 99),  # nothing accepted
        ([5, 7, 0, 9, 0, 42], [0, 1, 3, 5], 42),  # the deepest path, bonus after the leaf
        ([5, 1, 0, 0, 0, 0], [0, 1], 1),  # node 1 accepted, its child's token differs
    ],
)
def test_greedy_reference_known_answers(argmax, expected_path, expected_bonus):
    num_accepted, accepted_nodes, bonus = reference.tree_verify_greedy(
        torch.tensor([TREE_TOKENS]), torch.tensor([TREE_PARENTS], dtype=torch.int32), torch.tensor([argmax])
    )
    assert int(num_accepted[0]) == len(expected_path) - 1
    assert accepted_nodes[0].tolist() == expected_path + [-1] * (6 - len(expected_path))
    assert int(bonus[0]) == expected_bonus
    assert (num_accepted.dtype, accepted_nodes.dtype, bonus.dtype) == (torch.int32, torch.int32, torch.int64)


def test_greedy_reference_batch_and_single_node():
    tokens = torch.tensor([TREE_TOKENS, [1, 2, 3, 4, 5, 6]])
    parents = torch.tensor([TREE_PARENTS, [-1, 0, 1, 2, 3, 4]], dtype=torch.int32)  # second: a chain
    argmax = torch.tensor([[6, 0, 8, 0, 3, 0], [2, 3, 4, 0, 0, 0]])
    num_accepted, accepted_nodes, bonus = reference.tree_verify_greedy(tokens, parents, argmax)
    assert num_accepted.tolist() == [2, 3]
    assert accepted_nodes.tolist() == [[0, 2, 4, -1, -1, -1], [0, 1, 2, 3, -1, -1]]
    assert bonus.tolist() == [3, 0]
    single = reference.tree_verify_greedy(torch.tensor([[7]]), torch.tensor([[-1]]), torch.tensor([[11]]))
    assert [t.tolist() for t in single] == [[0], [[0]], [11]]


# ------------------------------------------------------------------------------------ sampling reference


def test_sampling_reference_exact_case():
    # node 0 (root) -> 1 (token 2), 2 (token 1); node 2 -> 3 (token 0); V = 4
    tokens = torch.tensor([[3, 2, 1, 0]])
    parents = torch.tensor([[-1, 0, 0, 2]], dtype=torch.int32)
    probs = torch.full((1, 4, 4), 0.25)
    probs[0, 0] = torch.tensor([0.1, 0.2, 0.3, 0.4])
    probs[0, 2] = torch.tensor([0.5, 0.25, 0.125, 0.125])
    # u[1]=0.9: 0.9 * 1.0 >= p[2]=0.3 -> reject node 1, residual [.1, .2, 0, .4] (sum .7)
    # u[2]=0.2: 0.2 * 0.7 = 0.14 < p[1]=0.2 -> accept node 2; fresh p = [.5, .25, .125, .125]
    # u[3]=0.95: 0.95 >= p[0]=0.5 -> reject node 3, residual [0, .25, .125, .125] (sum .5)
    # bonus: u[0]=0.6 -> threshold 0.3; cumsum [0, .25, .375, .5] -> first > 0.3 is token 2
    uniforms = torch.tensor([[0.6, 0.9, 0.2, 0.95]])
    num_accepted, accepted_nodes, bonus = reference.tree_verify_sampling(tokens, parents, probs, uniforms)
    assert num_accepted.tolist() == [1]
    assert accepted_nodes.tolist() == [[0, 2, -1, -1]]
    assert bonus.tolist() == [2]


def test_sampling_reference_inverse_cdf_skips_zeros():
    p = torch.tensor([0.0, 0.5, 0.0, 0.0, 0.5, 0.0])
    assert reference.sample_inverse_cdf(p, 0.0) == 1
    assert reference.sample_inverse_cdf(p, 0.49) == 1
    assert reference.sample_inverse_cdf(p, 0.5) == 4
    assert reference.sample_inverse_cdf(p, 0.999999) == 4


@pytest.mark.parametrize("seed", range(4))
def test_sampling_reference_invariants(seed):
    tokens, parents, probs, uniforms = random_batch(16, 12, 9, seed)
    outputs = reference.tree_verify_sampling(tokens, parents, probs, uniforms)
    check_path_invariants(tokens, parents, probs, *outputs)


# root (token 0) -> 1 (token 0), 2 (token 2); node 1 -> 3 (token 1), 4 (token 3); V = 5
FREQ_TOKENS = [0, 0, 2, 1, 3]
FREQ_PARENTS = [-1, 0, 0, 1, 1]
FREQ_PROBS = torch.tensor(
    [
        [0.35, 0.05, 0.3, 0.0, 0.3],  # at the root: drafts 0 and 2 carry most mass, token 3 impossible
        [0.1, 0.4, 0.0, 0.2, 0.3],  # after node 1
        [0.2, 0.2, 0.2, 0.2, 0.2],
        [0.5, 0.5, 0.0, 0.0, 0.0],
        [0.0, 0.0, 0.0, 0.0, 1.0],
    ]
)


def frequency_case(draws: int, device="cpu"):
    tokens = torch.tensor([FREQ_TOKENS], device=device).expand(draws, -1).contiguous()
    parents = torch.tensor([FREQ_PARENTS], dtype=torch.int32, device=device).expand(draws, -1).contiguous()
    probs = FREQ_PROBS.to(device).expand(draws, -1, -1).contiguous()
    gen = torch.Generator(device=device).manual_seed(1234)
    uniforms = torch.rand(draws, len(FREQ_TOKENS), generator=gen, device=device)
    return tokens, parents, probs, uniforms


def check_frequencies(tokens, outputs, draws, sigmas=5.0):
    num_accepted, accepted_nodes, bonus = outputs
    # The first emitted token follows the target's distribution at the root, whatever was drafted.
    first = first_emitted(tokens, num_accepted, accepted_nodes, bonus, depth=1).cpu()
    observed = torch.bincount(first, minlength=5).double() / draws
    tolerance = sigmas * (0.25 / draws) ** 0.5
    torch.testing.assert_close(observed, FREQ_PROBS[0].double(), atol=tolerance, rtol=0)
    # Given node 1 accepted, the next emitted token follows the target's distribution after node 1.
    through_1 = (num_accepted >= 1) & (accepted_nodes[:, 1] == 1)
    second = first_emitted(tokens, num_accepted, accepted_nodes, bonus, depth=2)[through_1].cpu()
    observed = torch.bincount(second, minlength=5).double() / second.numel()
    tolerance = sigmas * (0.25 / second.numel()) ** 0.5
    torch.testing.assert_close(observed, FREQ_PROBS[1].double(), atol=tolerance, rtol=0)


def test_sampling_reference_frequencies():
    draws = 20000
    tokens, parents, probs, uniforms = frequency_case(draws)
    outputs = reference.tree_verify_sampling(tokens, parents, probs, uniforms)
    check_frequencies(tokens, outputs, draws)


# ------------------------------------------------------------- the vectorised references vs the old loops


VERIFY_SHAPES = [(1, 1, 5), (3, 2, 3), (16, 12, 4), (8, 63, 111), (4, 33, 7)]


def loop_greedy(tokens, parents, target_argmax):
    """The former reference: a Python walk per sequence (host syncs), kept as an independent oracle."""
    b, t = tokens.shape
    num_accepted = torch.zeros(b, dtype=torch.int32)
    accepted_nodes = torch.full((b, t), -1, dtype=torch.int32)
    bonus = torch.zeros(b, dtype=torch.int64)
    toks, pars, amax = tokens.tolist(), parents.tolist(), target_argmax.tolist()
    for s in range(b):
        path = [0]
        for i in range(1, t):
            if pars[s][i] == path[-1] and toks[s][i] == amax[s][path[-1]]:
                path.append(i)
        num_accepted[s] = len(path) - 1
        accepted_nodes[s, : len(path)] = torch.tensor(path, dtype=torch.int32)
        bonus[s] = amax[s][path[-1]]
    return num_accepted, accepted_nodes, bonus


def loop_sampling(tokens, parents, target_probs, uniforms):
    """The former sampling reference (a walk with a residual distribution); also returns, per sequence, the
    smallest gap between a tested ``u * sum(p)`` and its threshold ``p[x]`` (near-ties may flip)."""
    b, t = tokens.shape
    num_accepted = torch.zeros(b, dtype=torch.int32)
    accepted_nodes = torch.full((b, t), -1, dtype=torch.int32)
    bonus = torch.zeros(b, dtype=torch.int64)
    margins = []
    toks, pars = tokens.tolist(), parents.tolist()
    for s in range(b):
        children = [[] for _ in range(t)]
        for i in range(1, t):
            children[pars[s][i]].append(i)
        node, path, margin = 0, [0], float("inf")
        p = target_probs[s, 0].clone()
        while True:
            moved = False
            for c in children[node]:
                x = toks[s][c]
                lhs, rhs = float(uniforms[s, c]) * float(p.sum()), float(p[x])
                margin = min(margin, abs(lhs - rhs))
                if lhs < rhs:
                    node, moved = c, True
                    path.append(c)
                    p = target_probs[s, c].clone()
                    break
                p[x] = 0.0
            if not moved:
                break
        cdf = torch.cumsum(p.double(), 0)
        threshold = float(uniforms[s, 0]) * float(cdf[-1])
        margin = min([margin] + [abs(threshold - float(c)) for c in cdf])
        num_accepted[s] = len(path) - 1
        accepted_nodes[s, : len(path)] = torch.tensor(path, dtype=torch.int32)
        bonus[s] = reference.sample_inverse_cdf(p, float(uniforms[s, 0]))
        margins.append(margin)
    return (num_accepted, accepted_nodes, bonus), torch.tensor(margins)


@pytest.mark.parametrize("batch, num_nodes, vocab", VERIFY_SHAPES)
def test_greedy_reference_matches_loop(batch, num_nodes, vocab):
    for seed in range(3):
        tokens, parents, probs, _ = random_batch(batch, num_nodes, vocab, seed=seed * 100 + num_nodes)
        argmax = probs.argmax(-1)
        assert_same_outputs(reference.tree_verify_greedy(tokens, parents, argmax),
                            loop_greedy(tokens, parents, argmax))
        assert_same_outputs(reference.tree_verify_greedy(tokens.int(), parents, argmax.int()),
                            loop_greedy(tokens, parents, argmax))


@pytest.mark.parametrize("batch, num_nodes, vocab", VERIFY_SHAPES)
def test_sampling_reference_matches_loop(batch, num_nodes, vocab):
    checked = 0
    for seed in range(3):
        tokens, parents, probs, uniforms = random_batch(batch, num_nodes, vocab, seed=seed * 100 + vocab)
        actual = reference.tree_verify_sampling(tokens, parents, probs, uniforms)
        expected, margins = loop_sampling(tokens, parents, probs, uniforms)
        clear = margins > 1e-6  # a float comparison this close to its threshold may round either way
        for a, e in zip(actual, expected):
            assert a.dtype == e.dtype
            assert torch.equal(a[clear], e[clear])
        checked += int(clear.sum())
    assert checked >= 3 * batch - 1


@pytest.mark.parametrize("batch, num_nodes, vocab", [(1, 1, 5), (6, 12, 4), (4, 63, 111)])
def test_greedy_equals_sampling_with_one_hot_probabilities(batch, num_nodes, vocab):
    tokens, parents, probs, uniforms = random_batch(batch, num_nodes, vocab, seed=num_nodes)
    argmax = probs.argmax(-1)
    one_hot = torch.nn.functional.one_hot(argmax, vocab).float()
    uniforms[:, 0] = 0.0  # the extremes of [0, 1)
    uniforms[::2, 1:] = uniforms[::2, 1:].clamp(min=0.999999)
    assert_same_outputs(reference.tree_verify_sampling(tokens, parents, one_hot, uniforms),
                        reference.tree_verify_greedy(tokens, parents, argmax))


def test_references_need_no_host_values():
    """On the ``meta`` device (shapes without data) any host read (``.tolist()``, ``int()``, data-dependent
    shapes) would raise: the references are capturable in a CUDA graph."""
    meta = dict(device="meta")
    tokens = torch.empty(3, 7, dtype=torch.int64, **meta)
    parents = torch.empty(3, 7, dtype=torch.int32, **meta)
    greedy = reference.tree_verify_greedy(tokens, parents, tokens)
    sampling = reference.tree_verify_sampling(tokens, parents, torch.empty(3, 7, 11, **meta),
                                              torch.empty(3, 7, **meta))
    for outputs in (greedy, sampling):
        assert [(o.shape, o.dtype) for o in outputs] == [((3,), torch.int32), ((3, 7), torch.int32),
                                                         ((3,), torch.int64)]


# ------------------------------------------------------------------------------------------------ CUDA


def to_cuda(*tensors):
    return [t.cuda() for t in tensors]


def assert_same_outputs(actual, expected):
    for a, e, name in zip(actual, expected, ("num_accepted", "accepted_nodes", "bonus")):
        assert a.dtype == e.dtype, name
        torch.testing.assert_close(a.cpu(), e.cpu(), rtol=0, atol=0, msg=lambda m: f"{name}: {m}")


@pytest.mark.gpu
@pytest.mark.usefixtures("cuda_ops")
@pytest.mark.parametrize("batch, num_nodes", [(1, 1), (3, 6), (8, 63), (2, 300)])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_cuda_greedy_matches_reference(batch, num_nodes, index_dtype):
    tokens, parents, probs, _ = random_batch(batch, num_nodes, 7, seed=batch * 1000 + num_nodes)
    argmax = probs.argmax(-1)
    expected = reference.tree_verify_greedy(tokens, parents, argmax)
    inputs = to_cuda(tokens.to(index_dtype), parents, argmax.to(index_dtype))
    actual = _C_loader.tree_verify_greedy_cuda(*inputs)
    assert_same_outputs(actual, expected)
    assert_same_outputs(eagle_kernels.tree_verify_greedy(*to_cuda(tokens, parents, argmax)), expected)


@pytest.mark.gpu
@pytest.mark.usefixtures("cuda_ops")
@pytest.mark.parametrize("batch, num_nodes, vocab", [(1, 1, 111), (3, 6, 111), (8, 63, 111), (4, 60, 32000)])
def test_cuda_sampling_matches_reference(batch, num_nodes, vocab):
    tokens, parents, probs, uniforms = random_batch(batch, num_nodes, vocab, seed=vocab + num_nodes)
    expected = reference.tree_verify_sampling(tokens, parents, probs, uniforms)
    actual = eagle_kernels.tree_verify_sampling(*to_cuda(tokens, parents, probs, uniforms))
    assert_same_outputs(actual, expected)
    check_path_invariants(tokens, parents, probs, *[t.cpu() for t in actual])


@pytest.mark.gpu
@pytest.mark.usefixtures("cuda_ops")
def test_cuda_sampling_frequencies_million_draws():
    draws = 1 << 20
    tokens, parents, probs, uniforms = frequency_case(draws, device="cuda")
    outputs = _C_loader.tree_verify_sampling_cuda(tokens, parents, probs, uniforms)
    check_frequencies(tokens, outputs, draws)


@pytest.mark.gpu
@pytest.mark.usefixtures("cuda_ops")
def test_cuda_sampling_large_vocab_bonus_frequencies():
    # A leaf root: the bonus alone is drawn, by a block-parallel inverse CDF over 128256 entries.
    draws, vocab = 1024, 128256
    gen = torch.Generator().manual_seed(7)
    probs = random_probs((1, 1, vocab), gen, zero_fraction=0.5)
    hot = torch.topk(probs[0, 0], 8).indices
    probs[0, 0, hot] += 0.1  # a few heavy tokens whose frequencies are measurable
    probs /= probs.sum()
    uniforms = torch.rand(draws, 1, generator=gen)
    tokens = torch.zeros(draws, 1, dtype=torch.int64)
    parents = torch.full((draws, 1), -1, dtype=torch.int32)
    _, _, bonus = _C_loader.tree_verify_sampling_cuda(
        *to_cuda(tokens, parents, probs.expand(draws, -1, -1).contiguous(), uniforms)
    )
    expected = torch.tensor([reference.sample_inverse_cdf(probs[0, 0], float(u)) for u in uniforms[:256, 0]])
    assert bonus[:256].cpu().tolist() == expected.tolist()
    assert (probs[0, 0, bonus.cpu()] > 0).all()
