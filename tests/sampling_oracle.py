"""The exact-distribution oracle of the sampling tests: on a 16-token vocabulary, the marginals of the 2nd
and 3rd generated tokens (the first to pass through tree verification) are computed by summing over the
earlier tokens, and thousands of seeded samples are fitted to them by chi-square."""

from __future__ import annotations

import torch
from scipy.stats import chisquare

from eagle_engine.speculative.sampling import SamplingParams, target_probs

VOCAB = 16
SAMPLES = 3000
PROMPT = [3, 1, 4, 1, 5]

# (drafter, settings) of each method's test: a random and an agreeing drafter, two temperatures, filters.
CASES = [
    ("random", SamplingParams(temperature=1.0)),
    ("random", SamplingParams(temperature=0.7)),
    ("agreeing", SamplingParams(temperature=1.0)),
    ("agreeing", SamplingParams(temperature=0.7)),
    ("random", SamplingParams(temperature=0.9, top_p=0.8, top_k=6)),
]


def exact_marginals(hf, params: SamplingParams, prompt: list[int] = PROMPT) -> tuple[torch.Tensor, ...]:
    """P(x2) and P(x3) after ``prompt``, summing over x1 (and x2), under the processed target distribution."""
    pairs = torch.cartesian_prod(torch.arange(VOCAB), torch.arange(VOCAB))  # (x1, x2)
    ids = torch.cat([torch.tensor(prompt).expand(len(pairs), -1), pairs], 1)
    with torch.no_grad():
        logits = hf(ids).logits[:, -3:].float()  # after the prompt, after x1, after x2
    p1 = target_probs(logits[0, 0], params)
    p2_given_1 = target_probs(logits[::VOCAB, 1], params)  # [x1, x2]
    p3_given_12 = target_probs(logits[:, 2], params).view(VOCAB, VOCAB, VOCAB)  # [x1, x2, x3]
    joint12 = p1[:, None] * p2_given_1
    return joint12.sum(0), (joint12[:, :, None] * p3_given_12).sum((0, 1))


def fit_pvalue(samples: list[int], probs: torch.Tensor) -> float:
    """Chi-square p-value of ``samples`` against ``probs``, bins with expected count < 5 pooled."""
    observed = torch.bincount(torch.tensor(samples), minlength=VOCAB).double()
    expected = probs.double() * len(samples)
    if bool((observed[probs == 0] > 0).any()):
        return 0.0  # a sample where the distribution has no mass: impossible
    small = expected < 5
    obs = torch.cat([observed[~small], observed[small].sum().view(1)])
    exp = torch.cat([expected[~small], expected[small].sum().view(1)])
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    exp = exp * obs.sum() / exp.sum()
    return float(chisquare(obs.numpy(), exp.numpy()).pvalue)


def sample_results(engine, params: SamplingParams, eagle: bool, prompt: list[int] = PROMPT) -> list:
    """``SAMPLES`` seeded generations of 3 tokens after ``prompt``: speculative (``eagle``, the engine's
    method) or vanilla."""
    prompts = [prompt] * SAMPLES
    kwargs = dict(
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=params.top_k,
        seed=list(range(SAMPLES)),
        stop_token_ids=[],
    )
    generate = engine.generate if eagle else engine.generate_vanilla
    results = generate(prompts, 3, **kwargs)
    assert all(len(r.tokens) == 3 for r in results)
    return results


def sample_tokens(engine, params: SamplingParams, eagle: bool) -> tuple[list[int], list[int]]:
    """The 2nd and 3rd tokens of :func:`sample_results` after PROMPT."""
    results = sample_results(engine, params, eagle)
    return [r.tokens[1] for r in results], [r.tokens[2] for r in results]


def check_follows_target(hf, engine, params: SamplingParams, prompt: list[int] = PROMPT) -> list:
    """The 2nd and 3rd tokens of the engine's speculative method after ``prompt`` fit the target's exact
    marginals, and the test has power: the same samples are far from a plausible wrong answer (x3 drawn like
    x2). Returns the generations (their ``accept_lengths`` tell whether candidates were accepted)."""
    p2, p3 = exact_marginals(hf, params, prompt)
    results = sample_results(engine, params, True, prompt)
    x2, x3 = [r.tokens[1] for r in results], [r.tokens[2] for r in results]
    assert fit_pvalue(x2, p2) > 1e-3 and fit_pvalue(x3, p3) > 1e-3
    assert fit_pvalue(x3, p2) < 1e-6 or fit_pvalue(x2, p3) < 1e-6
    return results
