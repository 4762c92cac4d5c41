"""CUDA graphs (GPU only): replayed steps give exactly what eager steps give, greedy and seeded sampling,
for every tree kind and vanilla, across batch buckets and sequences joining and leaving."""

import pytest
import torch

from eagle_engine import EagleEngine, demo_paths

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")


@pytest.mark.parametrize("tree", ["dynamic", "static", "chain"])
def test_graph_replay_equals_eager(tree):
    target, head = demo_paths()
    kwargs = dict(device="cuda", dtype="float32", tree=tree, max_batch_size=4)
    graphs = EagleEngine.from_pretrained(target, head, cuda_graphs=True, **kwargs)
    eager = EagleEngine.from_pretrained(target, head, cuda_graphs=False, **kwargs)
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
