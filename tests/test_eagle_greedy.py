"""EAGLE greedy decoding is lossless: EAGLE == vanilla == transformers' greedy output, token for token.

Tiny random targets of each architecture; random heads of each kind saved in the official format (.bin and
.safetensors); dynamic, static and chain trees; batch 1 and 3; >= 200 new tokens. A trained head that agrees
often makes long accepted paths (and so large KV compaction moves) happen.
"""

import pytest
import torch
from tiny import (
    assert_same_greedy,
    hf_greedy,
    make_head_dir,
    model_store,
    random_prompts,
    train_agreeing_head,
)

from eagle_engine import EagleEngine
from eagle_engine.models.loading import save_draft
from eagle_engine.speculative.tree import TreeConfig

NEW_TOKENS = 200

pytestmark = pytest.mark.usefixtures("reference_ops")  # the engine on the reference ops (fast)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, reference_ops):
    return model_store(tmp_path_factory)


def check_lossless(hf, prompts, eagle_results, vanilla_results, against_hf=True):
    for prompt, eagle, vanilla in zip(prompts, eagle_results, vanilla_results):
        assert len(eagle.tokens) == NEW_TOKENS and eagle.stop_reason == "max_new_tokens"
        assert sum(eagle.accept_lengths) + 1 >= NEW_TOKENS  # every token came from a round (or the prefill)
        assert_same_greedy(hf, prompt, eagle.tokens, vanilla.tokens)
        if against_hf:
            assert_same_greedy(hf, prompt, eagle.tokens, hf_greedy(hf, prompt, NEW_TOKENS))


@pytest.mark.parametrize(
    "arch, kind, fmt",
    [
        ("llama", "eagle1", "bin"),
        ("llama3", "eagle3", "safetensors"),
        ("llama-bias", "eagle1", "safetensors"),
        ("mistral", "eagle3", "bin"),
        ("qwen2", "eagle1", "bin"),
        ("qwen3", "eagle3", "safetensors"),
    ],
)
def test_dynamic_tree_batch3_matches_vanilla_and_transformers(model_dirs, tmp_path, arch, kind, fmt):
    hf, path = model_dirs(arch)
    head_dir = make_head_dir(EagleEngine.from_pretrained(path), kind, str(tmp_path / "head"), fmt)
    engine = EagleEngine.from_pretrained(path, head_dir)
    assert engine.draft.kind == kind
    prompts = random_prompts([5, 17, 9], seed=3)
    eagle = engine.generate(prompts, NEW_TOKENS, stop_token_ids=[])
    vanilla = engine.generate_vanilla(prompts, NEW_TOKENS, stop_token_ids=[])
    check_lossless(hf, prompts, eagle, vanilla)


@pytest.mark.parametrize("tree", ["static", "chain", "dynamic"])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("arch, kind", [("llama", "eagle1"), ("qwen3", "eagle3")])
def test_tree_kinds_and_batch_sizes(model_dirs, tmp_path, tree, batch, arch, kind):
    hf, path = model_dirs(arch)
    head_dir = make_head_dir(EagleEngine.from_pretrained(path), kind, str(tmp_path / "head"))
    engine = EagleEngine.from_pretrained(path, head_dir, tree=tree)
    prompts = random_prompts([11, 4, 30][:batch], seed=4)
    eagle = engine.generate(prompts, NEW_TOKENS, stop_token_ids=[])
    vanilla = engine.generate_vanilla(prompts, NEW_TOKENS, stop_token_ids=[])
    check_lossless(hf, prompts, eagle, vanilla, against_hf=batch == 1)


@pytest.fixture(scope="module", params=["eagle1", "eagle3"])
def agreeing(request, model_dirs, tmp_path_factory, reference_ops):
    """A target with learnable greedy text and a head trained on it, reloaded from the official format."""
    hf, path = model_dirs("llama", initializer_range=0.08, logit_scale=6.0)
    head, prompts = train_agreeing_head(EagleEngine.from_pretrained(path), request.param)
    head_dir = save_draft(head, str(tmp_path_factory.mktemp("agreeing")), "bin")
    return hf, path, head_dir, prompts[:3]


@pytest.mark.parametrize("tree", ["dynamic", "static", "chain"])
def test_agreeing_head_accepts_long_paths_losslessly(agreeing, tree):
    hf, path, head_dir, prompts = agreeing
    engine = EagleEngine.from_pretrained(path, head_dir, tree=tree)
    eagle = engine.generate(prompts, NEW_TOKENS, stop_token_ids=[])
    vanilla = engine.generate_vanilla(prompts, NEW_TOKENS, stop_token_ids=[])
    check_lossless(hf, prompts, eagle, vanilla, against_hf=tree == "dynamic")
    lengths = [n for r in eagle for n in r.accept_lengths]
    assert max(lengths) >= 4, "no long path was ever accepted"
    if tree != "chain":
        assert sum(lengths) / len(lengths) > 2.0, f"mean acceptance {sum(lengths) / len(lengths):.2f}"


def test_stop_token_mid_round_and_max_length(model_dirs, tmp_path):
    hf, path = model_dirs("llama", initializer_range=0.08, logit_scale=6.0, max_position_embeddings=120)
    head, prompts = train_agreeing_head(EagleEngine.from_pretrained(path), "eagle1", length=60, steps=150)
    engine = EagleEngine.from_pretrained(path, save_draft(head, str(tmp_path / "h")))
    prompts = [prompts[0], prompts[1] + prompts[2]]
    free = engine.generate_vanilla(prompts, 1000, stop_token_ids=[])
    eagle_free = engine.generate(prompts, 1000, stop_token_ids=[])
    for v, e, p in zip(free, eagle_free, prompts):
        assert e.stop_reason == v.stop_reason == "max_length" and len(e.tokens) == 120 - len(p)
        assert e.tokens == v.tokens
    stop = free[0].tokens[30]
    stopped = engine.generate(prompts, 1000, stop_token_ids=[stop])
    for v, e in zip(free, stopped):
        cut = v.tokens.index(stop) + 1 if stop in v.tokens else len(v.tokens)
        assert e.tokens == v.tokens[:cut]
        assert e.stop_reason == ("stop_token" if stop in v.tokens else "max_length")


def test_stream_yields_the_same_tokens(model_dirs, tmp_path):
    _, path = model_dirs("qwen2")
    engine = EagleEngine.from_pretrained(
        path, make_head_dir(EagleEngine.from_pretrained(path), "eagle1", str(tmp_path / "h"))
    )
    prompts = random_prompts([6, 13], seed=9)
    full = engine.generate(prompts, 40, stop_token_ids=[])
    chunks = list(engine.stream(prompts[0], 40, stop_token_ids=[]))
    assert len(chunks) > 1 and all(chunks) and sum(chunks, []) == full[0].tokens
    batch_chunks = list(engine.stream(prompts, 40, stop_token_ids=[]))
    for i in range(2):
        assert sum((c[i] for c in batch_chunks), []) == full[i].tokens


def test_custom_tree_configs(model_dirs, tmp_path):
    hf, path = model_dirs("llama")
    head_dir = make_head_dir(EagleEngine.from_pretrained(path), "eagle1", str(tmp_path / "h"))
    prompt = random_prompts([8], seed=2)[0]
    expected = EagleEngine.from_pretrained(path).generate_vanilla(prompt, 60, stop_token_ids=[]).tokens
    for tree in [
        TreeConfig(total_tokens=2, depth=0, top_k=1),
        TreeConfig(total_tokens=17, depth=3, top_k=4),
        TreeConfig(kind="static", choices=((0,), (1,), (0, 0), (0, 0, 0))),
        {"kind": "chain", "depth": 9},
    ]:
        engine = EagleEngine.from_pretrained(path, head_dir, tree=tree)
        assert engine.generate(prompt, 60, stop_token_ids=[]).tokens == expected, tree


def test_caches_equal_a_recompute_from_scratch_after_every_round(agreeing):
    """After the prefill and every round: the target cache holds a fresh prefill's K/V of the committed tokens
    (compaction moved the right rows), and the draft's state equals the head run from scratch over the
    committed pairs (its cache is in step with the target's)."""
    from eagle_engine.engine.sequence import Sequence
    from eagle_engine.speculative.sampling import SamplingParams

    _, path, head_dir, prompts = agreeing
    engine = EagleEngine.from_pretrained(path, head_dir)
    target, head, runner = engine.target, engine.draft, engine.runner
    state, drafter = runner.state, runner.drafter
    prompts = [prompts[0], prompts[1] + prompts[2]]
    seqs = [Sequence(p, SamplingParams(), 60, frozenset(), 0, runner.max_model_len) for p in prompts]
    runner.add(seqs)
    aux_layers = head.aux_layers(target.config.num_hidden_layers)
    longest_path = 0
    for _ in range(8):
        for b, s in enumerate(seqs):
            committed = s.prompt + s.tokens[:-1]  # the last emitted token is the root: no KV yet
            n = len(committed)
            assert int(state.tcache.lengths[b]) == int(drafter.dcache.lengths[b]) == n
            assert int(state.root_token[b]) == s.tokens[-1]
            ids = torch.tensor([committed])
            fresh = target.allocate_cache(1, n)
            out = target(ids, torch.arange(n).view(1, -1), fresh, None, aux_layers)
            torch.testing.assert_close(
                state.tcache.rows(b, n), fresh.rows(0, n), rtol=1e-4, atol=1e-4
            )
            draft_ids = torch.tensor([committed[1:] + [s.tokens[-1]]])
            draft_cache = head.allocate_cache(1, n)
            hidden = head.step(draft_ids, head.target_features(out), torch.arange(n).view(1, -1), draft_cache)
            torch.testing.assert_close(drafter.root_hidden[b], hidden[0, -1], rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(
                drafter.dcache.rows(b, n), draft_cache.rows(0, n), rtol=1e-4, atol=1e-4
            )
        runner.step()
        longest_path = max([longest_path] + [s.accept_lengths[-1] for s in seqs])
    assert longest_path >= 3  # compaction really moved rows
    for s in seqs:
        runner.release(s)
