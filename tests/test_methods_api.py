"""One engine, every method: ``from_pretrained`` tells EAGLE and Medusa heads apart by their files, takes
``method="lookahead"`` / ``"prompt_lookup"`` without one, each with its own settings object; ``generate``,
``stream``, the CLI (``eagle generate --method``) and ``accept_lengths`` work alike for all of them; wrong
combinations are clear errors."""

import pytest
from tiny import make_head_dir, make_hf_model, random_prompts, save

from eagle_engine import EagleEngine, EagleError, InvalidRequestError
from eagle_engine.speculative.methods import LookaheadConfig, MedusaConfig, PromptLookupConfig
from eagle_engine.tools.cli import main

pytestmark = pytest.mark.usefixtures("reference_ops")


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, reference_ops):
    from tiny import make_tokenizer
    from transformers import AutoTokenizer

    from eagle_engine.models.medusa import init_random_medusa, save_medusa

    base = str(tmp_path_factory.mktemp("base"))
    make_tokenizer(base, vocab_size=300)
    save(make_hf_model("llama", vocab_size=len(AutoTokenizer.from_pretrained(base))), base)
    engine = EagleEngine.from_pretrained(base)
    eagle = make_head_dir(engine, "eagle1", str(tmp_path_factory.mktemp("eagle")))
    medusa = str(tmp_path_factory.mktemp("medusa"))
    save_medusa(init_random_medusa(engine.target, num_heads=3, num_layers=1, seed=0), medusa)
    return base, eagle, medusa


def test_the_method_follows_the_head_or_the_settings(dirs):
    base, eagle, medusa = dirs
    assert EagleEngine.from_pretrained(base).method is None
    assert EagleEngine.from_pretrained(base, eagle).method == "eagle"
    engine = EagleEngine.from_pretrained(base, medusa, medusa={"choices": [[0], [1], [0, 0], [0, 0, 0]]})
    assert engine.method == "medusa"
    assert engine.settings == MedusaConfig(choices=((0,), (1,), (0, 0), (0, 0, 0)))
    engine = EagleEngine.from_pretrained(base, lookahead=LookaheadConfig(window=3, ngram=3, guesses=2))
    assert engine.method == "lookahead" and engine.settings.window == 3
    engine = EagleEngine.from_pretrained(base, method="prompt_lookup")
    assert engine.method == "prompt_lookup" and engine.settings == PromptLookupConfig()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(method="medusa"), "needs Medusa heads"),
        (dict(method="eagle"), "needs an EAGLE head"),
        (dict(method="beam"), "unknown method"),
        (dict(method="lookahead", prompt_lookup={"num_tokens": 3}), "prompt_lookup settings are for"),
        (dict(lookahead={"window": 3}, prompt_lookup={"num_tokens": 3}), "pick one method"),
        (dict(method="lookahead", lookahead={"windows": 3}), "unknown lookahead field"),
        (dict(method="lookahead", lookahead={"window": 0}), "lookahead window must be in"),
        (dict(method="prompt_lookup", prompt_lookup={"min_ngram": 3, "max_ngram": 2}), "must not exceed"),
        (dict(method="prompt_lookup", prompt_lookup=[3]), "must be a PromptLookupConfig or a dict"),
    ],
)
def test_wrong_combinations_are_named(dirs, kwargs, match):
    base, _, _ = dirs
    with pytest.raises((EagleError, InvalidRequestError), match=match):
        EagleEngine.from_pretrained(base, **kwargs)


def test_heads_and_methods_that_do_not_go_together(dirs):
    base, eagle, medusa = dirs
    with pytest.raises(EagleError, match="needs no draft head"):
        EagleEngine.from_pretrained(base, eagle, method="lookahead")
    with pytest.raises(EagleError, match="needs Medusa heads"):
        EagleEngine.from_pretrained(base, eagle, method="medusa")
    with pytest.raises(EagleError, match="settings are for method 'medusa'"):
        EagleEngine.from_pretrained(base, eagle, medusa={"choices": [[0]]})
    with pytest.raises(EagleError, match="tree settings are for method 'eagle'"):
        EagleEngine.from_pretrained(base, medusa, tree="chain")


@pytest.mark.parametrize("method", ["eagle", "medusa", "lookahead", "prompt_lookup"])
def test_generate_stream_and_accept_lengths_alike(dirs, method):
    base, eagle, medusa = dirs
    draft = {"eagle": eagle, "medusa": medusa}.get(method)
    engine = EagleEngine.from_pretrained(base, draft, method=method, max_batch_size=2)
    prompts = [p * 3 for p in random_prompts([4, 6, 5], seed=2, vocab=engine.target.config.vocab_size)]
    vanilla = engine.generate_vanilla(prompts, 24, stop_token_ids=[])
    results = engine.generate(prompts, 24, stop_token_ids=[])  # 3 prompts, 2 slots: one joins later
    for ours, ref in zip(results, vanilla):
        assert ours.tokens == ref.tokens
        assert sum(ours.accept_lengths) == len(ours.tokens) - 1 and min(ours.accept_lengths) >= 1
    streamed = [t for chunk in engine.stream(prompts[0], 24, stop_token_ids=[]) for t in chunk]
    assert streamed == vanilla[0].tokens


@pytest.mark.parametrize("method, extra", [
    ("prompt_lookup", ["--method-settings", '{"num_tokens": 4}']),
    ("lookahead", ["--method-settings", '{"window": 3, "ngram": 3, "guesses": 3}']),
    ("medusa", []),
])
def test_cli_generate_with_each_method(dirs, capsys, method, extra):
    base, _, medusa = dirs
    args = ["generate", "--base", base, "--prompt", "def f(x): return x\ndef f(x):", "--max-new-tokens", "12",
            "--compare", "--method", method] + extra + (["--draft", medusa] if method == "medusa" else [])
    assert main(args) == 0
    out = capsys.readouterr().out
    assert f"[{method}] 12 tokens" in out and "outputs identical: yes" in out


def test_cli_bad_method_settings(dirs, capsys):
    base, _, _ = dirs
    assert main(["generate", "--base", base, "--prompt", "x", "--method", "lookahead",
                 "--method-settings", "{window"]) == 2
    assert "not valid JSON" in capsys.readouterr().err
