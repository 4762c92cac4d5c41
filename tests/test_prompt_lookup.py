"""Prompt-lookup decoding: the matching on hand-written histories; greedy output equal to transformers' on
every architecture (prompts and model text that repeat, so that candidates are accepted); several settings,
batch 1 and 3, sequences joining and moving between slots; one host read per round; sampling that keeps the
target's exact distribution while candidates are accepted."""

import pytest
import torch
from sampling_oracle import PROMPT, SAMPLES, VOCAB, check_follows_target
from tiny import (
    ARCHS,
    assert_same_greedy,
    check_greedy_against_transformers,
    count_moves,
    hf_greedy,
    make_hf_model,
    mean_accept_length,
    model_store,
    repeated_prompts,
    save,
)

from eagle_engine import EagleEngine
from eagle_engine.engine.sequence import Sequence
from eagle_engine.speculative.methods import PromptLookupConfig
from eagle_engine.speculative.prompt_lookup import lookup_candidates
from eagle_engine.speculative.sampling import SamplingParams
from eagle_engine.tools.round_cost import step_costs

pytestmark = pytest.mark.usefixtures("reference_ops")

NEW_TOKENS = 160
LOOPING = dict(initializer_range=0.12)  # random weights narrow enough that greedy text falls into loops


def lookup(history, length, num_tokens=5, min_ngram=1, max_ngram=2):
    h = torch.tensor([history + [0] * 4])  # columns past the root are ignored
    return lookup_candidates(h, torch.tensor([length]), num_tokens, min_ngram, max_ngram)[0].tolist()


def test_lookup_prefers_the_longest_ngram_then_the_latest_occurrence():
    seq = [1, 2, 7, 8, 9, 2, 5, 3, 1, 2]  # root 2; (1, 2) at 0..1; 2 alone last at 5
    assert lookup(seq, 9) == [7, 8, 9, 2, 5]  # the bigram wins over the later unigram
    assert lookup(seq, 9, max_ngram=1) == [5, 3, 1, 2, 5]
    seq = [1, 2, 3, 1, 2, 4, 1, 2]  # (1, 2) twice before the suffix: the latest one
    assert lookup(seq, 7, num_tokens=2) == [4, 1]
    seq = [4, 2, 6, 9, 3, 2, 6]  # (3, 2, 6) does not occur earlier; (2, 6) does
    assert lookup(seq, 6, num_tokens=3, max_ngram=3) == [9, 3, 2]


def test_short_continuations_repeat_and_no_match_gives_some_tokens():
    # Only 3 tokens follow the match (the root included): the copy continues with period 3.
    assert lookup([5, 6, 7, 5, 6], 4) == [7, 5, 6, 7, 5]
    assert lookup([8, 8], 1, num_tokens=3) == [8, 8, 8]
    # No match (nor below min_ngram): the sequence's first tokens, valid ids that are simply rejected.
    assert lookup([1, 2, 3, 4, 5, 6], 5, num_tokens=3) == [1, 2, 3]
    assert lookup([1, 9, 3, 9], 3, num_tokens=3, min_ngram=2) == [1, 9, 3]
    assert lookup([7], 0, num_tokens=2) == [7, 7]


def test_lookup_is_per_slot_and_ignores_columns_past_the_root():
    history = torch.tensor([[3, 4, 5, 3, 9, 9, 3, 4], [1, 2, 1, 2, 1, 6, 6, 6]])
    lengths = torch.tensor([3, 4])  # slot 0: [3, 4, 5, 3] (the later "3 4" is stale); slot 1: [1, 2, 1, 2, 1]
    out = lookup_candidates(history, lengths, 3, 1, 2)
    assert out.tolist() == [[4, 5, 3], [2, 1, 2]]


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, reference_ops):
    return model_store(tmp_path_factory, **LOOPING)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_greedy_equals_transformers_on_every_architecture(model_dirs, arch):
    hf, path = model_dirs(arch)
    engine = EagleEngine.from_pretrained(path, method="prompt_lookup", max_model_len=256)
    prompts = repeated_prompts([7, 4, 10], seed=7)  # a seed whose greedy texts have no near tie
    check_greedy_against_transformers(hf, engine, prompts, NEW_TOKENS, min_accept=1.2)


@pytest.mark.parametrize(
    "settings, batch, max_batch_size",
    [
        (PromptLookupConfig(num_tokens=1, max_ngram=1), 3, 3),
        (PromptLookupConfig(num_tokens=4, max_ngram=3, min_ngram=2), 1, 1),
        (PromptLookupConfig(num_tokens=7, max_ngram=4, min_ngram=1), 3, 4),
        (PromptLookupConfig(), 5, 2),  # more prompts than slots: sequences join and move mid-way
    ],
)
def test_settings_batches_and_joining_equal_vanilla(model_dirs, monkeypatch, settings, batch, max_batch_size):
    hf, path = model_dirs("llama")
    engine = EagleEngine.from_pretrained(path, method="prompt_lookup", prompt_lookup=settings,
                                         max_batch_size=max_batch_size, max_model_len=200)
    prompts = repeated_prompts([6, 3, 11, 5, 8][:batch], repeats=2, seed=7)
    moves = count_moves(engine.runner, monkeypatch)
    together = engine.generate(prompts, NEW_TOKENS, stop_token_ids=[])
    vanilla = engine.generate_vanilla(prompts, NEW_TOKENS, stop_token_ids=[])
    for prompt, r, v in zip(prompts, together, vanilla):
        assert_same_greedy(hf, prompt, r.tokens, v.tokens)
    assert mean_accept_length(together) > 1.2
    assert max(n for r in together for n in r.accept_lengths) <= settings.num_tokens + 1
    if batch > max_batch_size:
        assert moves, "no sequence changed slot"


def test_round_reads_the_host_once_with_fixed_launches(model_dirs):
    _, path = model_dirs("qwen2")
    engine = EagleEngine.from_pretrained(path, method="prompt_lookup", max_batch_size=2, max_model_len=128)
    runner = engine.runner
    prompts = repeated_prompts([5, 9], seed=2)
    seqs = [Sequence(p, SamplingParams(), 40, frozenset(), 0, 128) for p in prompts]
    runner.add(seqs)
    runner.step()  # the first round builds constants (the chain's structure)
    costs = step_costs(runner, 4)
    for seq in list(runner.running):
        runner.release(seq)
    assert all(c.syncs <= 1 for c in costs), costs
    assert len({c.launches for c in costs}) == 1


# ------------------------------------------------------------------------------------------------ sampling


@pytest.fixture(scope="module")
def sampling_setup(tmp_path_factory, reference_ops):
    """A peaked 16-token model and a prompt that ends with the model's own greedy text: prompt lookup then
    proposes tokens of high probability, so candidates are accepted often."""
    hf = make_hf_model("llama", vocab_size=VOCAB, initializer_range=0.1, logit_scale=3.0)
    path = save(hf, str(tmp_path_factory.mktemp("v16")))
    prompt = PROMPT + hf_greedy(hf, PROMPT, 12)
    engine = EagleEngine.from_pretrained(path, method="prompt_lookup", prompt_lookup={"num_tokens": 3},
                                         max_batch_size=1000, max_model_len=32)
    return hf, engine, prompt


@pytest.mark.parametrize(
    "params",
    [SamplingParams(temperature=1.0), SamplingParams(temperature=0.7),
     SamplingParams(temperature=0.9, top_p=0.8, top_k=6)],
)
def test_second_and_third_tokens_follow_the_target_distribution(sampling_setup, params):
    hf, engine, prompt = sampling_setup
    results = check_follows_target(hf, engine, params, prompt)
    # Power: candidates were accepted (the first round kept both x2 and x3) in many of the samples.
    accepted = sum(r.accept_lengths[0] == 2 for r in results)
    assert accepted > SAMPLES // 10, accepted
