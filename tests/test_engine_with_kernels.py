"""The engine with the Triton kernels in the loop (interpreter on CPU, compiled on a GPU): greedy EAGLE and
vanilla output equal transformers' greedy output, for both head kinds.

Small shapes and few tokens: every kernel launch is interpreted in Python here.
"""

import os

import pytest
import torch
from tiny import assert_same_greedy, hf_greedy, make_head_dir, make_hf_model, random_prompts, save

import eagle_kernels
from eagle_engine import EagleEngine
from eagle_engine.speculative.tree import TreeConfig

NEW_TOKENS = 16

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")
    or not eagle_kernels.HAS_TRITON,
    reason="needs a GPU or TRITON_INTERPRET=1, and triton",
)


@pytest.mark.parametrize("arch, kind", [("llama", "eagle1"), ("qwen3", "eagle3")])
def test_greedy_with_kernels_matches_transformers(tmp_path, arch, kind):
    hf = make_hf_model(arch)
    path = save(hf, str(tmp_path / "target"))
    with eagle_kernels.reference_backend():
        head_dir = make_head_dir(EagleEngine.from_pretrained(path), kind, str(tmp_path / "head"))
    device = "cuda" if torch.cuda.is_available() else "cpu"  # kernels compiled on a GPU, interpreted on CPU
    assert eagle_kernels.triton_enabled(torch.zeros(1, device=device))
    tree = TreeConfig(total_tokens=12, depth=2, top_k=3)
    engine = EagleEngine.from_pretrained(path, head_dir, device=device, tree=tree)
    prompts = random_prompts([5, 9], seed=6)
    eagle = engine.generate(prompts, NEW_TOKENS, stop_token_ids=[])
    vanilla = engine.generate_vanilla(prompts, NEW_TOKENS, stop_token_ids=[])
    for prompt, e, v in zip(prompts, eagle, vanilla):
        expected = hf_greedy(hf, prompt, NEW_TOKENS)
        assert_same_greedy(hf, prompt, e.tokens, expected)
        assert_same_greedy(hf, prompt, v.tokens, expected)
