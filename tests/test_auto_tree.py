"""``TreeConfig(total_tokens="auto")``: the engine measures each ladder tree's round cost and acceptance once,
picks the one with the most expected tokens per second, and caches the choice per device, dtype and model.

The choice is tested with a stubbed profile (no timing in tests); every ladder tree is run losslessly."""

import json

import pytest
from tiny import assert_same_greedy, make_head_dir, make_hf_model, random_prompts, save

import eagle_engine.speculative.auto_tree as auto
from eagle_engine import EagleEngine, InvalidRequestError, TreeConfig

pytestmark = pytest.mark.usefixtures("reference_ops")


@pytest.fixture(scope="module")
def pair(tmp_path_factory, reference_ops):
    hf = make_hf_model("llama")
    path = save(hf, str(tmp_path_factory.mktemp("auto")))
    head = make_head_dir(EagleEngine.from_pretrained(path), "eagle1", str(tmp_path_factory.mktemp("head")))
    return hf, path, head


def stub_profiles(cost):
    """Acceptance grows with the tree (as real heads do); ``cost(tree)`` is seconds per round."""

    def profile(trees):
        return [auto.TreeProfile(t, 1.0 + 0.5 * t.num_nodes ** 0.5, cost(t)) for t in trees]

    return profile


def test_the_choice_follows_the_verify_cost(pair):
    _, path, head_dir = pair
    engine = EagleEngine.from_pretrained(path, head_dir)
    target, head = engine.target, engine.draft
    flat = auto.auto_tree(target, head, profile_fn=stub_profiles(lambda t: 1.0))
    linear = auto.auto_tree(target, head, profile_fn=stub_profiles(lambda t: 1.0 + t.num_nodes))
    # A GPU-like cost (verifying 60 tokens costs what 4 do) takes the biggest tree, a CPU-like one a chain.
    assert flat.num_nodes == max(t.num_nodes for t in auto.ladder())
    assert linear.num_nodes == min(t.num_nodes for t in auto.ladder())
    assert flat != linear


def test_every_ladder_tree_is_lossless(pair):
    hf, path, head_dir = pair
    prompts = random_prompts([5, 11], seed=4)
    reference = EagleEngine.from_pretrained(path).generate_vanilla(prompts, 40, stop_token_ids=[])
    for tree in auto.ladder():
        engine = EagleEngine.from_pretrained(path, head_dir, tree=tree)
        for prompt, ours, ref in zip(prompts, engine.generate(prompts, 40, stop_token_ids=[]), reference):
            assert_same_greedy(hf, prompt, ours.tokens, ref.tokens)


def test_measured_once_then_cached(pair, tmp_path, monkeypatch):
    hf, path, head_dir = pair
    monkeypatch.setenv("EAGLE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(auto, "CALIBRATION_TOKENS", 16)  # a shorter measurement: the test is of the caching
    calls = []
    measure = auto.measure

    def counting_measure(*args, **kwargs):
        calls.append(1)
        return measure(*args, **kwargs)

    monkeypatch.setattr(auto, "measure", counting_measure)
    engine = EagleEngine.from_pretrained(path, head_dir, tree="auto")
    chosen = engine.tree
    assert not chosen.is_auto and chosen in auto.ladder() and len(calls) == 1
    entry = next(iter(json.load(open(tmp_path / "auto_tree.json"))["entries"].values()))
    assert len(entry["profiles"]) == len(auto.ladder())
    assert all(p["accept_length"] >= 1 and p["round_seconds"] > 0 for p in entry["profiles"])
    again = EagleEngine.from_pretrained(path, head_dir, tree=TreeConfig(total_tokens="auto"))
    assert again.tree == chosen and len(calls) == 1  # from the cache
    prompt = random_prompts([7], seed=9)[0]
    assert again.generate(prompt, 30).tokens == again.generate_vanilla(prompt, 30).tokens
    # A damaged cache is measured again, not trusted.
    (tmp_path / "auto_tree.json").write_text("{not json")
    EagleEngine.from_pretrained(path, head_dir, tree="auto")
    assert len(calls) == 2


def test_auto_is_for_dynamic_trees():
    with pytest.raises(InvalidRequestError, match="auto"):
        TreeConfig(kind="static", total_tokens="auto")
    assert TreeConfig(total_tokens="auto").is_auto
