"""Draft heads in the official, SGLang and vLLM (speculators) formats: round trips (tensors, drafts, greedy
tokens in the engine), the fields each engine reads, pinned target layers, refusals, `eagle convert-head`."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny import make_hf_model, save

from eagle_engine import (
    CheckpointMismatchError,
    DraftMismatchError,
    EagleEngine,
    EagleError,
    ModelLoadError,
    UnsupportedModelError,
)
from eagle_engine.models import load_target
from eagle_engine.models.draft import eagle3_aux_layers, init_random_head
from eagle_engine.models.head_formats import detect_format
from eagle_engine.models.loading import load_draft, save_draft
from eagle_engine.models.medusa import init_random_medusa
from eagle_engine.tools.cli import main
from eagle_engine.tools.convert_head import convert_head

pytestmark = pytest.mark.usefixtures("reference_ops")

VOCAB, DRAFT_VOCAB = 256, 40


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory):
    # four layers: the EAGLE-3 default layers (2, 2, 1) are all expressible in SGLang's numbering too
    return save(make_hf_model("llama", num_hidden_layers=4), str(tmp_path_factory.mktemp("target")))


@pytest.fixture(scope="module")
def target(target_dir):
    return load_target(target_dir)


def eagle3_head(target, *, seed=3):
    """An EAGLE-3 head over a reduced vocabulary with a non-trivial map: draft id i -> target id 6 i + 1."""
    head = init_random_head("eagle3", target, seed=seed, std=0.1, draft_vocab=DRAFT_VOCAB)
    ids = torch.arange(DRAFT_VOCAB) * 6 + 1
    head.d2t.copy_(ids - torch.arange(DRAFT_VOCAB))  # offsets, as every format stores them
    head.t2d.zero_()
    head.t2d[ids] = True
    return head


def weights(directory):
    return load_file(os.path.join(directory, "model.safetensors"))


def config(directory):
    with open(os.path.join(directory, "config.json")) as f:
        return json.load(f)


def write_config(directory, cfg):
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(cfg, f)


def assert_same_head(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert sa[name].dtype == sb[name].dtype, name
        assert torch.equal(sa[name], sb[name]), name


def test_official_sglang_vllm_official_round_trip(target, tmp_path):
    head = eagle3_head(target)
    official = save_draft(head, str(tmp_path / "official"))
    sglang, vllm, back = (str(tmp_path / name) for name in ("sglang", "vllm", "back"))
    assert convert_head(official, "sglang", sglang)["from"] == "official"
    done = convert_head(sglang, "vllm", vllm)
    assert done == {"from": "sglang", "to": "vllm", "kind": "eagle3", "out": vllm}
    assert convert_head(vllm, "official", back)["from"] == "vllm"
    formats = [detect_format(d) for d in (official, sglang, vllm, back)]
    assert formats == ["official", "sglang", "vllm", "official"]

    # SGLang: the official names and config, its architecture; vLLM: layers.0.*, a speculators config
    assert weights(sglang).keys() == weights(official).keys()
    assert config(sglang)["architectures"] == ["LlamaForCausalLMEagle3"]
    assert config(sglang)["draft_vocab_size"] == DRAFT_VOCAB
    assert config(sglang)["tie_word_embeddings"] is False  # SGLang ties lm_head to the embedding otherwise
    vllm_weights = weights(vllm)
    assert {k.replace("layers.0.", "midlayer.") for k in vllm_weights} == weights(official).keys()
    assert any(k.startswith("layers.0.self_attn.") for k in vllm_weights)
    cfg = config(vllm)
    assert cfg["speculators_model_type"] == "eagle3" and cfg["architectures"] == ["Eagle3Speculator"]
    assert cfg["speculators_config"]["algorithm"] == "eagle3"
    assert cfg["speculators_config"]["proposal_methods"][0]["speculative_tokens"] > 0
    assert cfg["norm_before_residual"] is False and cfg["draft_vocab_size"] == DRAFT_VOCAB
    layer = cfg["transformer_layer_config"]
    assert layer["model_type"] == "llama" and layer["num_hidden_layers"] == 1 and layer["vocab_size"] == VOCAB
    assert layer["attention_bias"] is False and layer["tie_word_embeddings"] is False
    # d2t: offsets (int64) in every format
    for d in (official, sglang, vllm, back):
        assert weights(d)["d2t"].dtype == torch.int64
        assert torch.equal(weights(d)["d2t"], head.d2t) and torch.equal(weights(d)["t2d"], head.t2d)

    heads = [load_draft(d, target) for d in (official, sglang, vllm, back)]
    features = torch.randn(5, target.config.hidden_size, generator=torch.Generator().manual_seed(0))
    expected = heads[0].topk(features, 4)
    assert bool((expected[1] % 6 == 1).all())  # target ids through the map
    for loaded in heads[1:]:
        assert_same_head(heads[0], loaded)
        for got, want in zip(loaded.topk(features, 4), expected):
            assert torch.equal(got, want)
    assert config(back) == config(official)


def test_formats_draft_alike_in_the_engine(tmp_path, capsys):
    """The demo's trained EAGLE-3 head through `eagle convert-head`: every copy drafts alike (same tokens,
    same acceptance per round) and the tokens are the target's greedy ones."""
    from eagle_engine.tools.common import load_tokenizer
    from eagle_engine.tools.demo import demo_paths

    target_dir, head_dir = demo_paths("eagle3")
    sglang, vllm, back = (str(tmp_path / name) for name in ("sglang", "vllm", "back"))
    assert main(["convert-head", head_dir, "--to", "sglang", "--out", sglang]) == 0
    assert "eagle3 head converted from the official to the sglang format" in capsys.readouterr().out
    assert main(["convert-head", sglang, "--to", "vllm", "--out", vllm, "--base", target_dir]) == 0
    assert main(["convert-head", vllm, "--to", "official", "--out", back]) == 0
    cfg = config(vllm)
    assert cfg["eagle_aux_hidden_state_layer_ids"] == [2, 2, 1]  # pinned for the 4-layer target
    verifier = {"name_or_path": target_dir, "architectures": ["LlamaForCausalLM"]}
    assert cfg["speculators_config"]["verifier"] == verifier
    assert "d2t" not in weights(vllm) and "t2d" not in weights(vllm)  # as speculators: no reduced vocabulary

    ids = load_tokenizer(target_dir)("import os\n\ndef main(", add_special_tokens=False)["input_ids"]
    results = []
    for directory in (head_dir, sglang, vllm, back):
        engine = EagleEngine.from_pretrained(target_dir, directory)
        try:
            results.append(engine.generate(ids, 40, stop_token_ids=[]))
            if directory == head_dir:
                vanilla = engine.generate_vanilla(ids, 40, stop_token_ids=[]).tokens
        finally:
            engine.close()
    assert results[0].tokens == vanilla and results[0].mean_accept_length > 1.0
    for result in results[1:]:
        assert result.tokens == results[0].tokens
        assert result.accept_lengths == results[0].accept_lengths


def test_eagle1_heads(target, tmp_path):
    head = init_random_head("eagle1", target, seed=2, std=0.1)
    official = save_draft(head, str(tmp_path / "official"))
    sglang = str(tmp_path / "sglang")
    convert_head(official, "sglang", sglang)
    cfg = config(sglang)
    # SGLang reads "bias" as attention biases; its fc always has one
    assert cfg["architectures"] == ["LlamaForCausalLMEagle"] and cfg["bias"] is False
    assert weights(sglang).keys() == weights(official).keys()
    assert detect_format(sglang) == "sglang"
    assert_same_head(load_draft(sglang, target), load_draft(official, target))
    convert_head(sglang, "official", str(tmp_path / "back"))
    assert config(tmp_path / "back")["bias"] is True
    assert_same_head(load_draft(str(tmp_path / "back"), target), load_draft(official, target))

    # a head without an fc bias: a zero one for SGLang, none again in the official format
    state = weights(official)
    del state["fc.bias"]
    save_file(state, os.path.join(official, "model.safetensors"))
    write_config(official, {**config(official), "bias": False})
    convert_head(official, "sglang", str(tmp_path / "sglang0"))
    assert not bool(weights(tmp_path / "sglang0")["fc.bias"].any())
    assert load_draft(str(tmp_path / "sglang0"), target).fc.bias is None
    convert_head(str(tmp_path / "sglang0"), "official", str(tmp_path / "back0"))
    assert "fc.bias" not in weights(tmp_path / "back0") and config(tmp_path / "back0")["bias"] is False

    with pytest.raises(UnsupportedModelError, match="EAGLE-3 heads only.*--to official"):
        convert_head(official, "vllm", str(tmp_path / "vllm"))
    assert not os.path.exists(tmp_path / "vllm")


def test_pinned_target_layers(target, target_dir, tmp_path):
    assert eagle3_aux_layers(4) == init_random_head("eagle3", target).aux_layers(4) == (2, 2, 1)
    official = save_draft(eagle3_head(target), str(tmp_path / "official"))
    vllm = str(tmp_path / "vllm")
    convert_head(official, "vllm", vllm)
    assert config(vllm)["eagle_aux_hidden_state_layer_ids"] is None  # no --base: the engines' defaults

    write_config(vllm, {**config(vllm), "eagle_aux_hidden_state_layer_ids": [2, 2, 1]})
    load_draft(vllm, target)  # vLLM numbers layers as this engine does
    write_config(vllm, {**config(vllm), "eagle_aux_hidden_state_layer_ids": [3, 2, 1]})
    with pytest.raises(DraftMismatchError, match=r"pins .* to \[3, 2, 1\].*layers \[2, 2, 1\]"):
        load_draft(vllm, target)
    # carried to SGLang, one less (the layer whose output is taken); refused where it cannot be recorded
    convert_head(vllm, "sglang", str(tmp_path / "sglang"))
    assert config(tmp_path / "sglang")["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [2, 1, 0]
    with pytest.raises(DraftMismatchError, match=r"to \[3, 2, 1\]"):
        load_draft(str(tmp_path / "sglang"), target)
    with pytest.raises(UnsupportedModelError, match="official format cannot record them: pass --base"):
        convert_head(vllm, "official", str(tmp_path / "official2"))
    with pytest.raises(DraftMismatchError, match=r"to \[3, 2, 1\]"):
        convert_head(vllm, "official", str(tmp_path / "official2"), base=target_dir)

    sglang = str(tmp_path / "sglang")
    write_config(sglang, {**config(sglang), "eagle_config": {"eagle_aux_hidden_state_layer_ids": [1, 1, 0]}})
    load_draft(sglang, target)  # SGLang's numbers for the defaults
    convert_head(sglang, "official", str(tmp_path / "official3"), base=target_dir)  # the defaults: dropped
    assert "eagle_config" not in config(tmp_path / "official3")


def test_what_the_engines_assume_when_a_field_is_absent(target, tmp_path):
    """speculators saves transformer_layer_config as a diff against LlamaConfig's defaults and no vocabulary
    maps without a reduced vocabulary; SGLang and vLLM read only d2t (t2d is rebuilt from it)."""
    head = init_random_head("eagle3", target, seed=4, std=0.1)  # the full vocabulary, identity map
    vllm = str(tmp_path / "vllm")
    convert_head(save_draft(head, str(tmp_path / "official")), "vllm", vllm)
    assert "d2t" not in weights(vllm)
    cfg = config(vllm)
    layer = cfg["transformer_layer_config"]
    del layer["hidden_act"], layer["rms_norm_eps"]  # LlamaConfig defaults: silu, 1e-6 (as the head's)
    write_config(vllm, cfg)
    loaded = load_draft(vllm, target)
    assert_same_head(loaded, head)
    assert not bool(loaded.d2t.any()) and bool(loaded.t2d.all())

    sglang = str(tmp_path / "sglang")
    convert_head(save_draft(eagle3_head(target), str(tmp_path / "official3")), "sglang", sglang)
    state = weights(sglang)
    t2d = state.pop("t2d")
    save_file(state, os.path.join(sglang, "model.safetensors"))
    assert torch.equal(load_draft(sglang, target).t2d, t2d)


def test_a_specforge_config_means_llama_config_defaults(tmp_path):
    """SpecForge's configs leave out rope_theta (SGLang then runs LlamaConfig's 10000), where an official
    config without one means the target's; writing such an official head elsewhere needs --base."""
    target_dir = save(make_hf_model("llama3"), str(tmp_path / "llama3"))  # rope_theta 500000
    target = load_target(target_dir)
    official = save_draft(eagle3_head(target), str(tmp_path / "official"))
    sglang = str(tmp_path / "sglang")
    convert_head(official, "sglang", sglang)
    cfg = {k: v for k, v in config(sglang).items() if k not in ("rope_theta", "target_hidden_size")}
    cfg.update(
        bos_token_id=0, eos_token_id=[1, 2], pad_token_id=0, torch_dtype="float32", initializer_range=0.02
    )
    write_config(sglang, cfg)
    assert load_draft(sglang, target).config.rope.theta == 10000.0

    write_config(official, {k: v for k, v in config(official).items() if k != "rope_theta"})
    assert load_draft(official, target).config.rope.theta == 500000.0
    with pytest.raises(UnsupportedModelError, match="no rope_theta .* pass --base"):
        convert_head(official, "vllm", str(tmp_path / "vllm"))
    convert_head(official, "vllm", str(tmp_path / "vllm"), base=target_dir)
    assert config(tmp_path / "vllm")["transformer_layer_config"]["rope_theta"] == 500000.0
    assert load_draft(str(tmp_path / "vllm"), target).config.rope.theta == 500000.0


@pytest.mark.parametrize(
    "fmt, change, match",
    [
        ("vllm", {"norm_before_residual": True}, "'norm_before_residual' is true"),
        ("vllm", {"norm_before_residual": None}, "'norm_before_residual' is true"),  # vLLM's default
        ("vllm", {"speculators_model_type": "dflash"}, "speculators_model_type"),
        ("vllm", {"norm_before_fc": True}, "norm_before_fc"),
        ("vllm", {"transformer_layer_config": {"num_hidden_layers": 2}}, "num_hidden_layers.*one-layer"),
        ("vllm", {"transformer_layer_config": {"model_type": "qwen3"}}, "llama layers"),
        ("vllm", {"transformer_layer_config": {"attention_bias": True}}, "attention_bias"),
        ("sglang", {"tie_word_embeddings": True}, "tie_word_embeddings"),
        ("sglang", {"fc_norm": True}, "fc_norm"),
        ("sglang", {"num_hidden_layers": 2}, "one-layer"),
        ("sglang", {"draft_vocab_size": None}, "draft_vocab_size"),
        ("sglang", {"eagle_config": {"eagle_aux_hidden_state_layer_ids": [1, 2]}}, "three target layers"),
    ],
)
def test_heads_the_engine_cannot_run_are_refused(target, tmp_path, fmt, change, match):
    directory = str(tmp_path / fmt)
    convert_head(save_draft(eagle3_head(target), str(tmp_path / "official")), fmt, directory)
    cfg = config(directory)
    for key, value in change.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key].update(value)
        elif value is None:
            cfg.pop(key)
        else:
            cfg[key] = value
    write_config(directory, cfg)
    with pytest.raises(UnsupportedModelError, match=match):
        load_draft(directory, target)
    with pytest.raises(UnsupportedModelError, match=match):
        convert_head(directory, "official", str(tmp_path / "out"))


def test_multi_layer_vllm_weights_are_refused(target, tmp_path):
    vllm = str(tmp_path / "vllm")
    convert_head(save_draft(eagle3_head(target), str(tmp_path / "official")), "vllm", vllm)
    state = weights(vllm)
    state["layers.1.input_layernorm.weight"] = state["layers.0.input_layernorm.weight"].clone()
    save_file(state, os.path.join(vllm, "model.safetensors"))
    with pytest.raises(UnsupportedModelError, match=r"layers\.1\.input_layernorm\.weight: .* one-layer"):
        load_draft(vllm, target)


def test_convert_head_bad_inputs(target, target_dir, tmp_path, capsys):
    official = save_draft(eagle3_head(target), str(tmp_path / "official"))
    out = str(tmp_path / "o")
    assert main(["convert-head", str(tmp_path / "missing"), "--to", "vllm", "--out", out]) == 2
    assert "eagle: error: draft head directory not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: an unknown format, naming the choices
        main(["convert-head", official, "--to", "tensorrt", "--out", str(tmp_path / "o")])
    assert "invalid choice: 'tensorrt'" in capsys.readouterr().err
    with pytest.raises(UnsupportedModelError, match="unknown head format 'tensorrt': choose one of official"):
        convert_head(official, "tensorrt", str(tmp_path / "o"))

    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    assert main(["convert-head", official, "--to", "sglang", "--out", str(busy)]) == 2
    assert "is not empty" in capsys.readouterr().err
    assert os.listdir(busy) == ["keep.txt"]
    with pytest.raises(EagleError, match="exists and is not a directory"):
        convert_head(official, "sglang", str(busy / "keep.txt"))
    (tmp_path / "empty").mkdir()
    convert_head(official, "sglang", str(tmp_path / "empty"))  # an empty --out is fine

    medusa = save_draft(init_random_medusa(target, num_heads=2), str(tmp_path / "medusa"))
    with pytest.raises(UnsupportedModelError, match="Medusa"):
        convert_head(medusa, "vllm", str(tmp_path / "o"))
    other = save(make_hf_model("llama", hidden_size=32, num_attention_heads=2), str(tmp_path / "other"))
    with pytest.raises(DraftMismatchError, match="hidden_size"):
        convert_head(official, "vllm", str(tmp_path / "o"), base=other)
    with pytest.raises(ModelLoadError, match="not found"):
        convert_head(official, "vllm", str(tmp_path / "o"), base=str(tmp_path / "nowhere"))

    state = weights(official)
    del state["norm.weight"]
    state["fc.weight"] = state["fc.weight"][:, :-1].contiguous()
    save_file(state, os.path.join(official, "model.safetensors"))
    with pytest.raises(CheckpointMismatchError, match=r"missing: norm\.weight; .*misshapen: fc\.weight"):
        convert_head(official, "vllm", str(tmp_path / "o"))
    assert not os.path.exists(tmp_path / "o")  # nothing is written for a head that would not load
