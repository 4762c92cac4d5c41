"""Lookahead decoding: the n-gram pool against a one-by-one reference and hand-written cases, the merged
candidate tree, the window's mask and positions (every row of a round equals transformers over exactly what
it sees); greedy output equal to transformers' on every architecture with candidates accepted; several
settings, batch 1 and 3, sequences joining and moving; reused slots start clean; one host read per round;
sampling that keeps the target's exact distribution while candidates are accepted."""

import random

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

import eagle_kernels as ops
from eagle_engine import EagleEngine
from eagle_engine.engine.sequence import Sequence
from eagle_engine.speculative.lookahead import (
    LookaheadDrafter,
    pool_insert,
    pool_lookup,
    trie_parents,
    window_mask,
)
from eagle_engine.speculative.methods import LookaheadConfig
from eagle_engine.speculative.sampling import SamplingParams
from eagle_engine.tools.round_cost import step_costs

pytestmark = pytest.mark.usefixtures("reference_ops")

NEW_TOKENS = 160
LOOPING = dict(initializer_range=0.12)  # random weights narrow enough that greedy text falls into loops

# ---------------------------------------------------------------------------------------------- the pool


def empty_pool(slots=1, buckets=4, g=2, n=3):
    pool = torch.full((slots, buckets + 1, g, n), -1, dtype=torch.int32)
    return pool, torch.zeros(slots, buckets + 1, dtype=torch.int32)


def insert(pool, ptr, grams, enabled=None):
    grams = torch.tensor(grams).view(pool.shape[0], -1, pool.shape[-1])
    enabled = torch.ones(pool.shape[0], dtype=torch.bool) if enabled is None else torch.tensor(enabled)
    pool_insert(pool, ptr, grams, enabled)


def bucket_of(pool, key, slot=0):
    return [tuple(e) for e in pool[slot, key % (pool.shape[1] - 1)].tolist()]


def test_insert_then_lookup_keeps_only_entries_starting_with_the_root():
    pool, ptr = empty_pool(buckets=4)
    insert(pool, ptr, [[1, 5, 6], [5, 7, 8]])  # 1 and 5 share bucket 1
    assert bucket_of(pool, 1) == [(1, 5, 6), (5, 7, 8)]
    assert ptr[0, 1] == 0 and (ptr[0, :4].sum() == 0)  # two writes into a 2-entry ring: back at 0
    tokens, valid = pool_lookup(pool, torch.tensor([1]))
    assert valid.tolist() == [[True, False]] and tokens[0, 0].tolist() == [5, 6]
    tokens, valid = pool_lookup(pool, torch.tensor([5]))
    assert valid.tolist() == [[False, True]] and tokens[0, 1].tolist() == [7, 8]
    tokens, valid = pool_lookup(pool, torch.tensor([2]))  # an empty bucket: the root repeated, invalid
    assert not valid.any() and tokens.tolist() == [[[2, 2], [2, 2]]]


def test_duplicates_are_not_inserted_again():
    pool, ptr = empty_pool(buckets=4, g=3)
    insert(pool, ptr, [[2, 3, 4], [2, 3, 4], [6, 1, 1]])  # a repeat within one call
    assert bucket_of(pool, 2) == [(2, 3, 4), (6, 1, 1), (-1, -1, -1)] and ptr[0, 2] == 2
    insert(pool, ptr, [[6, 1, 1], [2, 3, 4]])  # both already there
    assert bucket_of(pool, 2) == [(2, 3, 4), (6, 1, 1), (-1, -1, -1)] and ptr[0, 2] == 2


def test_a_full_bucket_replaces_its_oldest_entry():
    pool, ptr = empty_pool(buckets=4, g=2)
    insert(pool, ptr, [[1, 5, 6]])
    insert(pool, ptr, [[1, 7, 7]])
    insert(pool, ptr, [[1, 9, 9]])
    assert bucket_of(pool, 1) == [(1, 9, 9), (1, 7, 7)] and ptr[0, 1] == 1
    # More than G into one bucket in one call: as if inserted one by one, so the last G remain.
    insert(pool, ptr, [[3, 1, 1], [3, 2, 2], [3, 3, 3], [0, 4, 4]])
    assert bucket_of(pool, 3) == [(3, 3, 3), (3, 2, 2)] and ptr[0, 3] == 1
    assert bucket_of(pool, 0) == [(0, 4, 4), (-1, -1, -1)]


def test_disabled_slots_insert_nothing_and_slots_are_independent():
    pool, ptr = empty_pool(slots=2, buckets=4)
    insert(pool, ptr, [[[1, 2, 3]], [[1, 2, 3]]], enabled=[False, True])
    assert bucket_of(pool, 1, slot=0) == [(-1, -1, -1)] * 2 and ptr[0].sum() == 0
    assert bucket_of(pool, 1, slot=1) == [(1, 2, 3), (-1, -1, -1)]


def test_pool_equals_a_one_by_one_reference_on_random_insertions():
    """Random calls with collisions, repeats and overflowing buckets against the documented semantics:
    n-grams already in the bucket before the call, or repeated earlier in it, are skipped; the others go
    one by one into a ring of G per bucket."""
    rng = random.Random(0)
    buckets, g, n = 3, 2, 3
    pool, ptr = empty_pool(buckets=buckets, g=g, n=n)
    ref = {b: [(-1,) * n] * g for b in range(buckets)}
    ref_ptr = [0] * buckets
    for _ in range(60):
        grams = [tuple(rng.randrange(5) for _ in range(n)) for _ in range(5)]
        before = {b: list(entries) for b, entries in ref.items()}
        seen = set()
        for gram in grams:
            b = gram[0] % buckets
            if gram in before[b] or gram in seen:
                continue
            seen.add(gram)
            ref[b][ref_ptr[b]] = gram
            ref_ptr[b] = (ref_ptr[b] + 1) % g
        insert(pool, ptr, [list(x) for x in grams])
        assert {b: bucket_of(pool, b) for b in range(buckets)} == ref
        assert ptr[0, :buckets].tolist() == ref_ptr


# ---------------------------------------------------------------------------------- tree, mask, memory


def test_candidates_sharing_a_prefix_merge_into_a_trie():
    a, b, c, d, e, f, x, y = range(10, 18)
    chains = torch.tensor([[[a, b, c], [a, b, d], [e, f, f], [a, x, y]]])
    parents = trie_parents(chains)
    # node 1 + 3 * chain + j; a repeated prefix's node becomes a same-token sibling of the first one.
    assert parents.tolist() == [[-1, 0, 1, 2, 0, 1, 2, 0, 7, 8, 0, 1, 11]]
    tokens = torch.cat([torch.tensor([[1]]), chains.view(1, -1)], 1)
    argmax = torch.full_like(tokens, 0)
    argmax[0, 0], argmax[0, 1], argmax[0, 2] = a, b, d  # the target continues a, b, d
    num, nodes, _ = ops.tree_verify_greedy(tokens, parents, argmax)
    assert num.tolist() == [3] and nodes[0, :4].tolist() == [0, 1, 2, 6]


def test_window_mask_and_offsets_by_hand():
    mask, offsets = window_mask(window=2, levels=3, tree_rows=3)
    rows = {(level, i): 3 + level * 2 + i for level in range(3) for i in range(2)}
    seen = lambda r: [j for j in range(9) if mask[r, j]]  # noqa: E731
    assert seen(rows[0, 0]) == [0, 3] and seen(rows[0, 1]) == [0, 3, 4]
    assert seen(rows[1, 0]) == [0, 3, 5] and seen(rows[2, 1]) == [0, 3, 4, 6, 8]
    assert not mask[:3].any()  # tree rows: their bits come from the tree
    assert offsets.tolist() == [1, 2, 2, 3, 3, 4]


def test_per_slot_memory_is_the_documented_size():
    class Target:
        lm_head_weight = torch.zeros(1)

    sizes = []
    for cfg in [LookaheadConfig(), LookaheadConfig(window=3, ngram=2, guesses=5, pool_buckets=10)]:
        drafter = LookaheadDrafter(cfg)
        drafter.bind(Target(), 2, 64)
        sizes.append(sum(t.nbytes for t in drafter.per_slot()) // 2)
        b, g, n, w = cfg.pool_buckets, cfg.guesses, cfg.ngram, cfg.window
        assert sizes[-1] == 4 * (b + 1) * (g * n + 1) + 8 * (n - 1) * w + 8
    assert sizes[0] == 590_200 and "590,200 bytes" in " ".join(LookaheadDrafter.__doc__.split())


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, reference_ops):
    return model_store(tmp_path_factory, **LOOPING)


def test_every_row_sees_exactly_its_context(model_dirs):
    """Each row of a round (tree and window) gives transformers' logits over the committed tokens followed
    by the rows its mask shows, in position order: the positions are contiguous and nothing else leaks."""
    hf, path = model_dirs("qwen3")
    settings = LookaheadConfig(window=3, ngram=4, guesses=2, pool_buckets=64)
    engine = EagleEngine.from_pretrained(path, method="lookahead", lookahead=settings, max_batch_size=2,
                                         max_model_len=128)
    runner, target = engine.runner, engine.target
    seqs = [Sequence(p, SamplingParams(), 60, frozenset(), 0, 128) for p in repeated_prompts([5, 8], seed=3)]
    runner.add(seqs)
    for _ in range(6):  # past the warm-up: the pool holds n-grams
        runner.step()
    state = runner.state
    proposal = runner.drafter.propose(state, 2)
    tcache = state.tcache.slots(0, 2)
    out = target(proposal.tokens, tcache.lengths.view(2, 1).long() + proposal.offsets, tcache,
                 proposal.packed_mask)
    logits = target.logits(out.hidden)
    t = proposal.tokens.shape[1]
    mask = ops.unpack_tree_mask(proposal.packed_mask, t)
    assert proposal.tree.tokens.shape[1] == 1 + 2 * 3 and t == 7 + 3 * 3
    for b, seq in enumerate(seqs):
        committed = seq.prompt + seq.tokens[:-1]  # the root (last token) is row 0
        for row in range(t):
            seen = sorted((int(proposal.offsets[b, j]), j) for j in range(t) if mask[b, row, j])
            assert [o for o, _ in seen] == list(range(int(proposal.offsets[b, row]) + 1)), (row, seen)
            ids = committed + [int(proposal.tokens[b, j]) for _, j in seen]
            with torch.no_grad():
                expected = hf(torch.tensor([ids])).logits[0, -1]
            torch.testing.assert_close(logits[b, row], expected, rtol=1e-4, atol=1e-4)
    for seq in seqs:
        runner.release(seq)


def test_window_shifts_and_its_ngrams_enter_the_pool_after_the_warm_up(model_dirs):
    """The window starts from the prompt; each round every level moves down one and the last level takes
    the outputs; no n-gram is pooled in the first N - 2 rounds, then each column's n-gram is."""
    _, path = model_dirs("llama")
    settings = LookaheadConfig(window=3, ngram=4, guesses=4, pool_buckets=512)
    engine = EagleEngine.from_pretrained(path, method="lookahead", lookahead=settings, max_batch_size=1,
                                         max_model_len=128)
    runner, drafter = engine.runner, engine.runner.drafter
    prompt = list(range(40, 45))
    runner.add([Sequence(prompt, SamplingParams(), 60, frozenset(), 0, 128)])
    assert drafter.window[0].flatten().tolist() == [prompt[i % 5] for i in range(9)]
    for round_ in range(1, 5):
        before = drafter.window[0].clone()
        runner.step()
        after = drafter.window[0]
        assert torch.equal(after[:-1], before[1:])
        stored = {tuple(e) for e in drafter.pool[0, :-1].reshape(-1, 4).tolist() if e[0] >= 0}
        grams = {tuple(before[:, i].tolist() + [int(after[-1, i])]) for i in range(3)}
        if round_ <= 2:
            assert not stored
        else:
            assert grams <= stored
    runner.release(runner.running[0])


# ------------------------------------------------------------------------------------------ greedy


@pytest.mark.parametrize("arch", list(ARCHS))
def test_greedy_equals_transformers_on_every_architecture(model_dirs, arch):
    hf, path = model_dirs(arch)
    engine = EagleEngine.from_pretrained(path, method="lookahead", max_model_len=256)
    prompts = repeated_prompts([7, 4, 10], seed=7)  # a seed whose greedy texts have no near tie
    check_greedy_against_transformers(hf, engine, prompts, NEW_TOKENS, min_accept=1.2)


@pytest.mark.parametrize(
    "settings, batch, max_batch_size",
    [
        (LookaheadConfig(window=1, ngram=2, guesses=1, pool_buckets=256), 3, 3),
        (LookaheadConfig(window=3, ngram=3, guesses=2, pool_buckets=1), 3, 4),  # every key in one bucket
        (LookaheadConfig(window=4, ngram=4, guesses=3, pool_buckets=16), 1, 1),
        (LookaheadConfig(window=5, ngram=3, guesses=4, pool_buckets=64), 5, 2),  # sequences join and move
    ],
)
def test_settings_batches_and_joining_equal_vanilla(model_dirs, monkeypatch, settings, batch, max_batch_size):
    hf, path = model_dirs("llama")
    engine = EagleEngine.from_pretrained(path, method="lookahead", lookahead=settings,
                                         max_batch_size=max_batch_size, max_model_len=200)
    prompts = repeated_prompts([6, 3, 11, 5, 8][:batch], repeats=2, seed=7)
    moves = count_moves(engine.runner, monkeypatch)
    together = engine.generate(prompts, NEW_TOKENS, stop_token_ids=[])
    vanilla = engine.generate_vanilla(prompts, NEW_TOKENS, stop_token_ids=[])
    for prompt, r, v in zip(prompts, together, vanilla):
        assert_same_greedy(hf, prompt, r.tokens, v.tokens)
    assert mean_accept_length(together) > 1.2
    assert max(n for r in together for n in r.accept_lengths) <= settings.ngram
    if batch > max_batch_size:
        assert moves, "no sequence changed slot"


def test_a_reused_slot_starts_clean(model_dirs):
    """The pool, window and warm-up are reset by the prefill: a second request on a used engine drafts
    exactly as on a fresh one (same tokens and same accepted lengths)."""
    _, path = model_dirs("llama3")
    args = dict(method="lookahead", lookahead=LookaheadConfig(window=4, ngram=3, guesses=3, pool_buckets=32),
                max_batch_size=2, max_model_len=200)
    used = EagleEngine.from_pretrained(path, **args)
    first, second = repeated_prompts([9, 5], seed=11)
    used.generate([first, second], 80, stop_token_ids=[])
    used.generate(second, 80, stop_token_ids=[])  # slot 0's pool fills with second's n-grams
    again = used.generate(second, 80, stop_token_ids=[])  # in slot 0 again
    fresh = EagleEngine.from_pretrained(path, **args).generate(second, 80, stop_token_ids=[])
    assert again.tokens == fresh.tokens and again.accept_lengths == fresh.accept_lengths


def test_round_reads_the_host_once_with_fixed_launches(model_dirs):
    _, path = model_dirs("qwen2")
    settings = LookaheadConfig(window=3, ngram=3, guesses=2, pool_buckets=64)
    engine = EagleEngine.from_pretrained(path, method="lookahead", lookahead=settings, max_batch_size=2,
                                         max_model_len=128)
    runner = engine.runner
    seqs = [Sequence(p, SamplingParams(), 40, frozenset(), 0, 128) for p in repeated_prompts([5, 9], seed=2)]
    runner.add(seqs)
    runner.step()
    costs = step_costs(runner, 4)
    for seq in list(runner.running):
        runner.release(seq)
    assert all(c.syncs <= 1 for c in costs), costs
    assert len({c.launches for c in costs}) == 1


# ------------------------------------------------------------------------------------------------ sampling


def seed_pool_with_prompt(drafter: LookaheadDrafter) -> None:
    """Test hook: after the drafter's prefill, also put the prompt's n-grams into the slot's pool (with the
    rounds' own :func:`pool_insert`), so that the first round already verifies real candidates."""
    prefill = drafter.prefill

    def prefill_and_seed(s, sl, ids, prompt_lens, starts, out, first):
        prefill(s, sl, ids, prompt_lens, starts, out, first)
        grams = ids.unfold(1, drafter.settings.ngram, 1)  # [k, P - N + 1, N] (equal prompts: no padding)
        enabled = torch.ones(ids.shape[0], dtype=torch.bool, device=ids.device)
        pool_insert(drafter.pool[sl], drafter.ptr[sl], grams, enabled)

    drafter.prefill = prefill_and_seed


@pytest.fixture(scope="module")
def sampling_setup(tmp_path_factory, reference_ops):
    """A peaked 16-token model and a prompt that ends with the model's own greedy text: its n-grams, seeded
    into the pool, are candidates of high probability, so they are accepted often."""
    hf = make_hf_model("llama", vocab_size=VOCAB, initializer_range=0.1, logit_scale=3.0)
    path = save(hf, str(tmp_path_factory.mktemp("v16")))
    prompt = PROMPT + hf_greedy(hf, PROMPT, 12)
    settings = LookaheadConfig(window=2, ngram=3, guesses=2, pool_buckets=16)
    engine = EagleEngine.from_pretrained(path, method="lookahead", lookahead=settings, max_batch_size=1000,
                                         max_model_len=32)
    seed_pool_with_prompt(engine.runner.drafter)
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
