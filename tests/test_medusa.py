"""Medusa-1 heads: the official format (round trip, clear errors), greedy decoding identical to
transformers' on every architecture (random heads and heads trained to agree), sampling that follows the
target's exact distribution, and `eagle train-draft --method medusa`."""

import inspect
import json
import os
import random
from types import SimpleNamespace

import pytest
import torch
from sampling_oracle import CASES, PROMPT, SAMPLES, VOCAB, check_follows_target
from tiny import (
    ARCHS,
    assert_same_greedy,
    hf_greedy,
    make_hf_model,
    make_tokenizer,
    random_prompts,
    save,
    train_agreeing_head,
)

from eagle_engine import EagleEngine
from eagle_engine.errors import (
    CheckpointMismatchError,
    DraftMismatchError,
    EagleError,
    ModelLoadError,
    NonFiniteWeightsError,
    UnsupportedModelError,
)
from eagle_engine.models import load_target
from eagle_engine.models.loading import load_draft, save_draft
from eagle_engine.models.medusa import MedusaHeads, init_random_medusa, save_medusa
from eagle_engine.speculative.medusa import MedusaDrafter
from eagle_engine.speculative.methods import MEDUSA_MC_SIM_7B_63, MedusaConfig
from eagle_engine.speculative.sampling import SamplingParams
from eagle_engine.tools.cli import main

pytestmark = pytest.mark.usefixtures("reference_ops")  # the engine on the reference ops (fast)

NEW_TOKENS = 40


@pytest.fixture(scope="module")
def targets(tmp_path_factory, reference_ops):
    """Per architecture: (hf model, directory, 3 prompts of different lengths, transformers' greedy)."""
    cache = {}

    def get(arch):
        if arch not in cache:
            hf = make_hf_model(arch)
            path = save(hf, str(tmp_path_factory.mktemp(arch)))
            prompts = random_prompts([5, 17, 9], seed=3)
            cache[arch] = (hf, path, prompts, [hf_greedy(hf, p, NEW_TOKENS) for p in prompts])
        return cache[arch]

    return get


@pytest.fixture(scope="module")
def agreeing(targets):
    """Per architecture: Medusa heads trained on the target's own greedy text after 16 random prompts (they
    agree often there), and 3 prompts of different lengths on that text (prompt ``i`` plus ``5 i`` of its
    greedy tokens) with transformers' greedy output after them."""
    cache = {}

    def get(arch):
        if arch not in cache:
            hf, path, _, _ = targets(arch)
            engine = EagleEngine.from_pretrained(path)
            heads, prompts = train_agreeing_head(engine, "medusa", num_prompts=16, length=48, steps=30,
                                                 lr=1e-2, warmup_steps=5)  # fmt: skip
            starts = engine.generate_vanilla(prompts[:3], 10, stop_token_ids=[])
            prompts = [p + r.tokens[: 5 * i] for i, (p, r) in enumerate(zip(prompts, starts))]
            cache[arch] = (heads, prompts, [hf_greedy(hf, p, NEW_TOKENS) for p in prompts])
        return cache[arch]

    return get


def check_greedy(engine, hf, prompts, reference) -> list[int]:
    """Medusa's greedy output is transformers' (batch of 3); returns every round's accept length."""
    assert engine.method == "medusa"
    results = engine.generate(prompts, NEW_TOKENS, stop_token_ids=[])
    for prompt, result, expected in zip(prompts, results, reference):
        assert len(result.tokens) == NEW_TOKENS and sum(result.accept_lengths) + 1 >= NEW_TOKENS
        assert_same_greedy(hf, prompt, result.tokens, expected)
    return [n for r in results for n in r.accept_lengths]


# ------------------------------------------------------------------------------------- official format


def official_keys(num_heads: int, num_layers: int) -> set[str]:
    keys = {f"{i}.{num_layers}.weight" for i in range(num_heads)}
    for i in range(num_heads):
        keys |= {f"{i}.{j}.linear.{p}" for j in range(num_layers) for p in ("weight", "bias")}
    return keys


def read_weights(directory: str) -> dict:
    st = os.path.join(directory, "medusa_lm_head.safetensors")
    if os.path.isfile(st):
        from safetensors.torch import load_file

        return load_file(st)
    return torch.load(os.path.join(directory, "medusa_lm_head.pt"), weights_only=True)


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_official_format_round_trip(targets, tmp_path, fmt):
    _, path, _, _ = targets("llama")
    target = load_target(path)
    heads = init_random_medusa(target, 3, 2, seed=1, std=0.1)
    directory = save_medusa(heads, str(tmp_path / fmt), fmt)
    assert sorted(os.listdir(directory)) == ["config.json", f"medusa_lm_head.{fmt}"]
    config = json.loads(open(os.path.join(directory, "config.json")).read())
    assert config == {"medusa_num_heads": 3, "medusa_num_layers": 2}
    weights = read_weights(directory)
    assert set(weights) == official_keys(3, 2)
    assert weights["1.2.weight"].shape == (target.config.vocab_size, target.config.hidden_size)
    loaded = load_draft(directory, target)  # load_draft tells a Medusa directory apart
    assert isinstance(loaded, MedusaHeads) and (loaded.num_heads, loaded.num_layers) == (3, 2)
    hidden = torch.randn(2, 5, target.config.hidden_size)
    assert torch.equal(loaded.logits(hidden), heads.logits(hidden))
    assert loaded.logits(hidden).shape == (2, 5, 3, target.config.vocab_size)
    logprobs, ids = heads.topk(hidden, 4)
    expected = torch.log_softmax(heads.logits(hidden).float(), -1).topk(4, -1)
    torch.testing.assert_close(logprobs, expected.values)
    assert torch.equal(ids, expected.indices)
    loaded.fuse()  # stacked weights: the same heads, parameters still under the official names
    torch.testing.assert_close(loaded.logits(hidden), heads.logits(hidden), rtol=1e-5, atol=1e-5)
    assert torch.equal(loaded.topk(hidden, 4)[1], ids)
    again = load_draft(save_draft(loaded, str(tmp_path / "again"), "bin"), target)  # "bin" -> .pt
    assert os.path.isfile(tmp_path / "again" / "medusa_lm_head.pt")
    assert all(torch.equal(again.heads.state_dict()[k], v) for k, v in heads.heads.state_dict().items())


def test_bad_medusa_directories_give_clear_errors(targets, tmp_path):
    _, path, _, _ = targets("llama")
    target = load_target(path)
    good = init_random_medusa(target, 2, 1).official_state()

    def write(name, state=good, config={"medusa_num_heads": 2, "medusa_num_layers": 1}):
        d = tmp_path / name
        d.mkdir()
        if config is not None:
            (d / "config.json").write_text(json.dumps(config))
        if state is not None:
            torch.save(state, d / "medusa_lm_head.pt")
        return str(d)

    def fails(error, match, directory):
        with pytest.raises(error, match=match):
            load_draft(directory, target)

    fails(ModelLoadError, "no weights", write("no_weights", state=None))
    fails(ModelLoadError, "file not found", write("no_config", config=None))
    fails(UnsupportedModelError, "medusa_num_heads", write("no_heads", config={"medusa_num_layers": 1}))
    fails(UnsupportedModelError, "medusa_num_layers", write("bad_layers", config={"medusa_num_heads": 2,
                                                                                 "medusa_num_layers": -1}))
    fails(UnsupportedModelError, "medusa_num_heads", write("float", config={"medusa_num_heads": 2.5}))
    missing = {k: v for k, v in good.items() if k != "1.0.linear.bias"}
    fails(CheckpointMismatchError, "missing 1 tensor.*1.0.linear.bias", write("missing", missing))
    fails(CheckpointMismatchError, "unexpected.*2.0.linear.bias",
          write("extra", {**good, "2.0.linear.bias": good["0.0.linear.bias"]}))
    fails(CheckpointMismatchError, "1.0.linear.bias has shape",
          write("shape", {**good, "1.0.linear.bias": torch.zeros(65)}))
    fails(CheckpointMismatchError, "missing", write("more_heads", config={"medusa_num_heads": 3}))
    nan = {**good, "0.1.weight": good["0.1.weight"].clone().fill_(float("nan"))}
    fails(NonFiniteWeightsError, "0.1.weight", write("nan", nan))
    hf32 = make_hf_model("llama", hidden_size=32, intermediate_size=64)
    small = init_random_medusa(load_target(save(hf32, str(tmp_path / "t32"))), 2, 1).official_state()
    fails(DraftMismatchError, "hidden size 32 .*hidden_size 64", write("hidden", small))
    wide = {**good, "1.1.weight": torch.zeros(300, 64)}
    fails(DraftMismatchError, "vocabulary size 300 .*vocab_size 256", write("vocab", wide))
    with pytest.raises(EagleError, match="hidden size"):  # through the engine too
        EagleEngine.from_pretrained(path, str(tmp_path / "hidden"))


# -------------------------------------------------------------------------------------- the drafter


def test_proposal_takes_each_heads_ranks(targets):
    """Node ``c`` (a path of ranks) holds rank ``c[-1]`` of head ``len(c) - 1``; parents and depths follow
    the paths; the tree's rows are the nodes; the root comes first."""
    _, path, _, _ = targets("llama")
    target = load_target(path)
    heads = init_random_medusa(target, 3, 1, seed=4, std=0.1)
    choices = ((0,), (1,), (0, 0), (0, 1), (1, 0), (0, 0, 0), (0, 0, 3))
    drafter = MedusaDrafter(heads, MedusaConfig(choices=choices))
    drafter.bind(target, 2, 64)
    drafter.root_hidden.normal_()
    proposal = drafter.propose(SimpleNamespace(root_token=torch.tensor([7, 9])), 2)
    tree = proposal.tree
    assert (drafter.width, drafter.rows) == (4, 8) and tree.tokens.shape == (2, 8)
    _, ids = heads.topk(drafter.root_hidden[:2], 4)  # [2, K, 4]
    order = sorted(choices, key=lambda c: (len(c), c))
    for b in range(2):
        assert tree.tokens[b, 0] == [7, 9][b]
        for node, c in enumerate(order, start=1):
            assert tree.tokens[b, node] == ids[b, len(c) - 1, c[-1]]
            parent = order.index(c[:-1]) + 1 if len(c) > 1 else 0
            assert tree.parents[b, node] == parent and tree.depths[b, node] == len(c)
        assert len(tree.paths(b)) == 4  # leaves (0, 1), (1, 0), (0, 0, 0), (0, 0, 3)
    assert torch.equal(tree.mask[0, 6], torch.tensor([1, 1, 0, 1, 0, 0, 1, 0], dtype=torch.bool))


def test_root_feature_is_the_targets_after_every_round(targets, agreeing):
    """After the prefill and each round the drafter holds the target's feature at the last committed
    position (from a fresh forward over the committed tokens): observe picked the right row."""
    from eagle_engine.engine.sequence import Sequence

    engine = EagleEngine.from_pretrained(targets("llama")[1])
    engine.draft, prompts, _ = agreeing("llama")
    runner = engine.runner
    drafter = runner.drafter
    seqs = [Sequence(p, SamplingParams(), 40, frozenset(), 0, runner.max_model_len) for p in prompts[:2]]
    runner.add(seqs)
    longest = 0
    for _ in range(6):
        for b, s in enumerate(seqs):
            committed = s.prompt + s.tokens[:-1]
            n = len(committed)
            out = engine.target(torch.tensor([committed]), torch.arange(n).view(1, -1),
                                engine.target.allocate_cache(1, n))  # fmt: skip
            torch.testing.assert_close(drafter.root_hidden[b], out.hidden[0, -1], rtol=1e-4, atol=1e-4)
        runner.step()
        longest = max([longest] + [s.accept_lengths[-1] for s in seqs])
    assert longest >= 3
    for s in seqs:
        runner.release(s)


# ------------------------------------------------------------------------------------------ greedy


@pytest.mark.parametrize("arch", list(ARCHS))
def test_random_heads_greedy_equals_transformers(targets, tmp_path, arch):
    hf, path, prompts, reference = targets(arch)
    fmt = "pt" if arch in ("llama", "mistral", "qwen3") else "safetensors"
    heads = init_random_medusa(load_target(path), 4, 1, seed=2, std=0.1)
    engine = EagleEngine.from_pretrained(path, save_medusa(heads, str(tmp_path / "m"), fmt))
    check_greedy(engine, hf, prompts, reference)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_agreeing_heads_greedy_equals_transformers(targets, agreeing, tmp_path, arch):
    hf, path, _, _ = targets(arch)
    heads, prompts, reference = agreeing(arch)
    engine = EagleEngine.from_pretrained(path, save_draft(heads, str(tmp_path / "m"), "bin"))
    lengths = check_greedy(engine, hf, prompts, reference)
    mean = sum(lengths) / len(lengths)
    print(f"\n{arch}: mean accept length {mean:.2f}, longest {max(lengths)}")  # seen with pytest -s
    assert mean > 1.3 and max(lengths) >= 3


def test_custom_choices(targets, tmp_path):
    hf, path, prompts, reference = targets("qwen3")
    heads_dir = save_medusa(init_random_medusa(load_target(path), 2, 0, seed=5, std=0.2), str(tmp_path / "m"))
    for medusa, nodes in [
        (MedusaConfig(choices=((0,),)), 2),
        (MedusaConfig(choices=((0,), (1,), (0, 0), (2,), (0, 1))), 6),
        ({"choices": [[0], [0, 0], [0, 0, 0], [0, 0, 0, 0]]}, 3),  # cut to the 2 heads
        (None, 1 + sum(1 for c in MedusaConfig().choices if len(c) <= 2)),
    ]:
        engine = EagleEngine.from_pretrained(path, heads_dir, medusa=medusa)
        assert engine.runner.drafter.rows == nodes
        check_greedy(engine, hf, prompts, reference)
    with pytest.raises(EagleError, match="tree settings are for method 'eagle'"):
        EagleEngine.from_pretrained(path, heads_dir, tree="static")


# ---------------------------------------------------------------------------------------- sampling


@pytest.fixture(scope="module")
def sampling_setup(tmp_path_factory, reference_ops):
    hf = make_hf_model("llama", vocab_size=VOCAB, initializer_range=0.1, logit_scale=3.0)
    path = save(hf, str(tmp_path_factory.mktemp("v16")))
    base = EagleEngine.from_pretrained(path)
    heads = {
        "random": init_random_medusa(base.target, 4, 1, seed=1, std=0.3),
        "agreeing": train_agreeing_head(base, "medusa", num_prompts=32, length=48, steps=60, lr=1e-2,
                                        warmup_steps=5)[0],  # fmt: skip
    }
    # Every sample in one batch (a prefill and a round or two), over a 16-node tree: the first 15 paths of
    # Medusa's default (up to 5 siblings, 3 levels).
    settings = dict(medusa=MedusaConfig(choices=MEDUSA_MC_SIM_7B_63[:15]), max_batch_size=SAMPLES,
                    max_model_len=16)  # fmt: skip
    return hf, {name: EagleEngine(base.target, h, **settings) for name, h in heads.items()}, heads


@pytest.mark.parametrize("head, params", CASES)
def test_second_and_third_tokens_follow_the_target_distribution(sampling_setup, head, params):
    hf, engines, _ = sampling_setup
    assert engines[head].method == "medusa" and engines[head].runner.drafter.rows == 16
    check_follows_target(hf, engines[head], params)


def test_agreeing_heads_accept_drafts_when_sampling(sampling_setup):
    _, engines, _ = sampling_setup
    results = engines["agreeing"].generate([PROMPT] * 8, 10, temperature=0.7, seed=list(range(8)),
                              stop_token_ids=[])  # fmt: skip
    lengths = [n for r in results for n in r.accept_lengths]
    assert sum(lengths) / len(lengths) > 1.3


def test_choices_beyond_the_vocabulary(sampling_setup):
    _, _, heads = sampling_setup
    with pytest.raises(EagleError, match=f"top-20, but the vocabulary has {VOCAB}"):
        MedusaDrafter(heads["random"], MedusaConfig(choices=((19,),)))


# -------------------------------------------------------------------------- eagle train-draft --method medusa


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    """A tiny Llama with a tiny BPE tokenizer, and a corpus of Python sources."""
    d = str(tmp_path_factory.mktemp("tok"))
    make_tokenizer(d)
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(d))
    corpus = tmp_path_factory.mktemp("corpus") / "code.py"
    corpus.write_text(inspect.getsource(json) + inspect.getsource(random))
    return save(make_hf_model("llama", vocab_size=vocab, max_position_embeddings=128), d), str(corpus)


def test_train_draft_medusa_writes_official_heads(text_model, tmp_path, capsys):
    model_dir, corpus = text_model
    out = tmp_path / "medusa"
    common = ["train-draft", "--base", model_dir, "--corpus", corpus, "--out", str(out), "--seq-len", "32"]
    common += ["--batch-size", "2", "--checkpoint-every", "2"]
    medusa = ["--method", "medusa", "--medusa-heads", "3", "--medusa-layers", "2"]
    assert main(common + medusa + ["--steps", "3", "--eval-prompts", "1", "--eval-new-tokens", "8"]) == 0
    assert "mean acceptance length: " in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["medusa_num_heads"] == 3
    assert set(read_weights(str(out))) == official_keys(3, 2)
    summary = json.loads((out / "eval.json").read_text())
    assert summary["method"] == "medusa" and summary["medusa"]["heads"] == 3
    assert summary["steps"] == 3 and summary["mean_accept_length"] >= 1.0
    state = torch.load(out / "checkpoint" / "trainer_state.pt")
    assert state["step"] == 3 and len(state["losses"]) == 3
    # Resume continues the same heads; asking for other heads, or for an EAGLE kind, is an error.
    resume = ["--steps", "4", "--eval-prompts", "0", "--resume"]
    assert main(common + medusa + resume) == 0
    assert torch.load(out / "checkpoint" / "trainer_state.pt")["step"] == 4
    assert main(common + ["--method", "medusa", "--medusa-heads", "2", "--medusa-layers", "2"] + resume) == 2
    assert "holds a medusa (3 heads, 2 layers) head" in capsys.readouterr().err
    assert main(common + medusa + ["--kind", "eagle3"]) == 2
    assert "--kind is for --method eagle" in capsys.readouterr().err
    # The official directory loads in the engine and decodes losslessly.
    engine = EagleEngine.from_pretrained(model_dir, str(out))
    assert engine.method == "medusa"
    prompt = [5, 6, 7, 8]
    assert engine.generate(prompt, 24).tokens == engine.generate_vanilla(prompt, 24).tokens
    generate = ["generate", "--base", model_dir, "--draft", str(out), "--prompt", "import os\n"]
    assert main(generate + ["--max-new-tokens", "12", "--compare"]) == 0
    assert "outputs identical: yes" in capsys.readouterr().out
