"""EAGLE sampling is lossless: the 2nd and 3rd generated tokens (the first to pass through tree verification)
follow the target's exact distribution, computed by summing over the earlier tokens on a 16-token vocabulary.

Goodness of fit by chi-square over thousands of samples (one batch, one seed per sequence: deterministic),
at temperature 1.0 and 0.7, with a random head and with a trained head that agrees often. The oracle is
shared with the other methods' sampling tests: tests/sampling_oracle.py.
"""

import pytest
import torch
from sampling_oracle import (
    CASES,
    PROMPT,
    VOCAB,
    check_follows_target,
    exact_marginals,
    fit_pvalue,
    sample_tokens,
)
from tiny import make_hf_model, save, train_agreeing_head

from eagle_engine import EagleEngine
from eagle_engine.models.draft import init_random_head
from eagle_engine.speculative.sampling import SamplingParams, target_probs

pytestmark = pytest.mark.usefixtures("reference_ops")


@pytest.fixture(scope="module")
def setup(tmp_path_factory, reference_ops):
    hf = make_hf_model("llama", vocab_size=VOCAB, initializer_range=0.1, logit_scale=3.0)
    path = save(hf, str(tmp_path_factory.mktemp("v16")))
    engine = EagleEngine.from_pretrained(path)
    heads = {
        "random": init_random_head("eagle1", engine.target, seed=1, std=0.1),
        "agreeing": train_agreeing_head(engine, "eagle1", num_prompts=32, length=48, steps=150)[0],
    }
    return hf, engine, heads


@pytest.mark.parametrize("head, params", CASES)
def test_second_and_third_tokens_follow_the_target_distribution(setup, head, params):
    hf, engine, heads = setup
    engine.draft = heads[head]
    check_follows_target(hf, engine, params)


def test_vanilla_sampling_follows_the_same_distribution(setup):
    """Checks the oracle itself: plain sampling from the target fits the computed marginals."""
    hf, engine, _ = setup
    params = SamplingParams(temperature=0.7)
    p2, p3 = exact_marginals(hf, params)
    x2, x3 = sample_tokens(engine, params, eagle=False)
    assert fit_pvalue(x2, p2) > 1e-3 and fit_pvalue(x3, p3) > 1e-3


def test_agreeing_head_accepts_drafts_when_sampling(setup):
    _, engine, heads = setup
    engine.draft = heads["agreeing"]
    results = engine.generate([PROMPT] * 8, 40, temperature=0.7, seed=list(range(8)), stop_token_ids=[])
    lengths = [n for r in results for n in r.accept_lengths]
    assert sum(lengths) / len(lengths) > 1.5


def test_seeded_sampling_reproduces(setup):
    _, engine, heads = setup
    engine.draft = heads["random"]
    a = engine.generate(PROMPT, 30, temperature=1.0, seed=5, stop_token_ids=[])
    b = engine.generate(PROMPT, 30, temperature=1.0, seed=5, stop_token_ids=[])
    c = engine.generate([PROMPT, PROMPT], 30, temperature=1.0, seed=5, stop_token_ids=[])
    assert a.tokens == b.tokens == c[0].tokens == c[1].tokens


def test_target_probs_filters():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    full = torch.softmax(logits, -1)[0]
    top2 = target_probs(logits, SamplingParams(temperature=1.0, top_k=2))[0]
    torch.testing.assert_close(top2, torch.tensor([full[0], full[1], 0, 0]) / (full[0] + full[1]))
    # top_p = 0.7: the best token alone has 0.64 < 0.7, so the second joins; the rest go.
    nucleus = target_probs(logits, SamplingParams(temperature=1.0, top_p=0.7))[0]
    torch.testing.assert_close(nucleus, top2)
    cold = target_probs(logits, SamplingParams(temperature=0.5))[0]
    torch.testing.assert_close(cold, torch.softmax(logits[0] / 0.5, -1))
