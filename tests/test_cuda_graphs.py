"""CUDA graphs (GPU only): replayed steps give exactly what eager steps give, greedy and seeded sampling,
for every tree kind and vanilla, across batch buckets and sequences joining and leaving."""

import pytest
import torch

from eagle_engine import EagleEngine, demo_paths

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("tree", ["dynamic", "static", "chain"])
def test_graph_replay_equals_eager(tree):
    target, head = demo_paths()
    kwargs = dict(device="cuda", dtype="float32", tree=tree, max_batch_size=4)
    graphs = EagleEngine.from_pretrained(target, head, cuda_graphs=True, **kwargs)
    eager = EagleEngine.from_pretrained(target, head, cuda_graphs=False, **kwargs)
    # The eager runners pad to the graphs' batch buckets (3 running -> 4 rows): the same GEMM shapes, so a
    # last-bit difference cannot flip a draft top-k between the two.
    for speculative in (True, False):
        eager._runner(speculative).buckets = graphs._runner(speculative).buckets
    prompts = [list(range(10 + 3 * i, 50 + 5 * i)) for i in range(6)]  # 6 > 4 slots: joins and leaves
    lengths = dict(max_new_tokens=64, stop_token_ids=[])
    for sampling in (dict(), dict(temperature=0.8, top_p=0.9, seed=list(range(6)))):
        a = graphs.generate(prompts, **lengths, **sampling)
        b = eager.generate(prompts, **lengths, **sampling)
        assert [r.tokens for r in a] == [r.tokens for r in b]
        va = graphs.generate_vanilla(prompts, **lengths, **sampling)
        vb = eager.generate_vanilla(prompts, **lengths, **sampling)
        assert [r.tokens for r in va] == [r.tokens for r in vb]
    assert graphs.runner.graphs.graphs and not graphs.runner.graphs.failed


def test_a_step_that_cannot_be_captured_runs_eagerly_on_the_callers_stream():
    from eagle_engine.engine.graphs import GraphCache

    cache = GraphCache(torch.device("cuda"), enabled=True)
    x = torch.zeros(4, device="cuda")
    calls = []

    def syncing_step():
        calls.append(1)
        x.add_(1)
        if x.sum().item() < 0:  # a host read: invalidates a capture
            raise AssertionError("unreachable")

    stream = torch.cuda.current_stream()
    for _ in range(4):
        cache.run("key", syncing_step)  # warm-up, failed capture (then eager), eager, eager
    assert torch.cuda.current_stream() == stream  # the capture's side stream is not left current
    assert "key" in cache.failed and not cache.graphs
    # Every call ran the step's effect exactly once (the failed capture ran nothing, then it ran eagerly).
    assert x.tolist() == [4.0] * 4


def test_reference_backend_turns_graphs_off(monkeypatch):
    monkeypatch.setenv("EAGLE_KERNELS_BACKEND", "reference")
    target, head = demo_paths()
    with pytest.warns(UserWarning, match="CUDA graphs are off"):
        engine = EagleEngine.from_pretrained(target, head, device="cuda", cuda_graphs=True, max_batch_size=2)
    assert not engine.runner.graphs.enabled
    assert engine.generate([list(range(10, 40))], max_new_tokens=16)[0].tokens
