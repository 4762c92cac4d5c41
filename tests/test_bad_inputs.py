"""Every bad config field, weight, tree, sampling setting, stop id and seed gets a clear error naming it,
before anything is allocated (tiny saved models, edited in temporary directories)."""

import json
import math
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny import make_hf_model, save

from eagle_engine import (
    CheckpointMismatchError,
    EagleEngine,
    EagleError,
    InvalidDeviceError,
    InvalidRequestError,
    NonFiniteWeightsError,
    SamplingParams,
    TreeConfig,
    UnsupportedModelError,
)
from eagle_engine.engine.inputs import check_max_new_tokens, check_seeds, normalize_stop_ids
from eagle_engine.models.config import MAX_POSITION_EMBEDDINGS, ModelConfig
from eagle_engine.models.draft import init_random_head
from eagle_engine.models.loading import load_draft, load_target, save_draft

pytestmark = pytest.mark.usefixtures("reference_ops")

VOCAB = 256  # tiny.VOCAB


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save(make_hf_model("llama", max_position_embeddings=64), str(tmp_path_factory.mktemp("m")))


@pytest.fixture(scope="module")
def target(model_dir):
    return load_target(model_dir)


@pytest.fixture(scope="module")
def head_dirs(target, tmp_path_factory):
    """A random EAGLE-1 head saved as safetensors and as .bin, and an EAGLE-3 head (safetensors)."""
    root = tmp_path_factory.mktemp("heads")
    return {
        "eagle1": save_draft(init_random_head("eagle1", target), str(root / "e1")),
        "eagle1-bin": save_draft(init_random_head("eagle1", target), str(root / "e1bin"), "bin"),
        "eagle3": save_draft(init_random_head("eagle3", target, draft_vocab=100), str(root / "e3")),
    }


def copy_dir(src, tmp_path, name="edited"):
    dst = str(tmp_path / name)
    shutil.copytree(src, dst)
    return dst


def edit_json(directory, filename, **changes):
    path = os.path.join(directory, filename)
    cfg = json.load(open(path)) if os.path.isfile(path) else {}
    for key, value in changes.items():
        if value is DELETE:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    with open(path, "w") as f:
        json.dump(cfg, f)  # allow_nan: Python's json writes and reads NaN/Infinity
    return directory


DELETE = object()

# (config.json changes, the field the message must name)
BAD_TARGET_CONFIGS = [
    (dict(max_position_embeddings=10**12), "max_position_embeddings"),
    (dict(max_position_embeddings=0), "max_position_embeddings"),
    (dict(max_position_embeddings=2048.0), "max_position_embeddings"),
    (dict(num_hidden_layers=4.7), "num_hidden_layers"),
    (dict(num_hidden_layers="3"), "num_hidden_layers"),
    (dict(num_hidden_layers=True), "num_hidden_layers"),
    (dict(num_hidden_layers=0), "num_hidden_layers"),
    (dict(vocab_size=0), "vocab_size"),
    (dict(vocab_size=-256), "vocab_size"),
    (dict(vocab_size=2**40), "vocab_size"),
    (dict(hidden_size=0), "hidden_size"),
    (dict(hidden_size=64.5), "hidden_size"),
    (dict(intermediate_size=10**9), "intermediate_size"),
    (dict(num_attention_heads=0), "num_attention_heads"),
    (dict(num_attention_heads=-4), "num_attention_heads"),
    (dict(num_key_value_heads=1.5), "num_key_value_heads"),
    (dict(num_key_value_heads=3), "num_key_value_heads"),
    (dict(head_dim=15), "head_dim"),
    (dict(head_dim=0), "head_dim"),
    (dict(head_dim=DELETE, hidden_size=66), "num_attention_heads"),
    (dict(rms_norm_eps=0), "rms_norm_eps"),
    (dict(rms_norm_eps=-1e-6), "rms_norm_eps"),
    (dict(rms_norm_eps=float("nan")), "rms_norm_eps"),
    (dict(rms_norm_eps=float("inf")), "rms_norm_eps"),
    (dict(rms_norm_eps="1e-6"), "rms_norm_eps"),
    (dict(rope_parameters=DELETE, rope_theta=0.0), "rope_theta"),
    (dict(rope_parameters=DELETE, rope_theta=-10000.0), "rope_theta"),
    (dict(rope_parameters=DELETE, rope_theta=float("inf")), "rope_theta"),
    (dict(rope_parameters={"rope_type": "default", "rope_theta": float("nan")}), "rope_theta"),
    (dict(rope_parameters={"rope_type": "linear", "factor": 0.0, "rope_theta": 1e4}), "factor"),
    (dict(rope_parameters={"rope_type": "linear", "factor": -2.0, "rope_theta": 1e4}), "factor"),
    (dict(rope_parameters=DELETE, rope_scaling={"type": "linear", "factor": float("inf")}), "factor"),
    (
        dict(
            rope_parameters={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 0.0, "rope_theta": 1e4}
        ),
        "low_freq_factor",
    ),
    (
        dict(
            rope_parameters={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "rope_theta": 1e4}
        ),
        "high_freq_factor",
    ),
    (
        dict(
            rope_parameters={
                "rope_type": "llama3",
                "original_max_position_embeddings": 8.5,
                "rope_theta": 1e4,
            }
        ),
        "original_max_position_embeddings",
    ),
    (dict(rope_parameters=[1, 2]), "rope_parameters"),
    # Settings given twice must agree (the loader would otherwise silently pick one of them).
    (dict(rope_theta=-1), r"rope_theta = -1 contradicts rope_parameters\.rope_theta = 10000"),
    (dict(rope_scaling={"type": "linear", "factor": 2.0}), r"scaling\.type = 'linear' contradicts rope_par"),
    (dict(rope_parameters={"rope_type": 3, "rope_theta": 1e4}), "rope_type"),
    (dict(eos_token_id=VOCAB), "eos_token_id"),
    (dict(eos_token_id=-1), "eos_token_id"),
    (dict(eos_token_id=[1, "x"]), "eos_token_id"),
    (dict(eos_token_id=2.0), "eos_token_id"),
    (dict(eos_token_id=True), "eos_token_id"),
    (dict(attention_bias="false"), "attention_bias"),
    (dict(tie_word_embeddings=1), "tie_word_embeddings"),
    (dict(mlp_bias="no"), "mlp_bias"),
    (dict(sliding_window=16.5), "sliding_window"),
    (dict(sliding_window=-1), "sliding_window"),
    (dict(vocab_size=DELETE), "vocab_size"),
]


@pytest.mark.parametrize("changes, field", BAD_TARGET_CONFIGS, ids=[f for _, f in BAD_TARGET_CONFIGS])
def test_bad_target_config_fields(model_dir, tmp_path, changes, field):
    bad = edit_json(copy_dir(model_dir, tmp_path), "config.json", **changes)
    with pytest.raises(UnsupportedModelError, match=field) as info:
        load_target(bad)
    assert "config.json" in str(info.value)


@pytest.mark.parametrize(
    "eos",
    [[1, "x"], 256, -1, [1, 2.5], "2", [True]],
    ids=["str-in-list", "vocab", "neg", "float", "str", "bool"],
)
def test_bad_generation_config_eos(model_dir, tmp_path, eos):
    bad = edit_json(copy_dir(model_dir, tmp_path), "generation_config.json", eos_token_id=eos)
    with pytest.raises(UnsupportedModelError, match="eos_token_id") as info:
        load_target(bad)
    assert "generation_config.json" in str(info.value)


def test_settings_given_twice_alike_still_load(model_dir, tmp_path):
    cfg = json.load(open(os.path.join(model_dir, "config.json")))
    theta = cfg["rope_parameters"]["rope_theta"]
    ok = edit_json(copy_dir(model_dir, tmp_path), "config.json", rope_theta=int(theta),
                   rope_scaling={"type": cfg["rope_parameters"]["rope_type"]})
    assert load_target(ok).config.rope.theta == theta


def test_good_eos_ids_still_load(model_dir, tmp_path):
    ok = edit_json(copy_dir(model_dir, tmp_path), "config.json", eos_token_id=[1, 2])
    edit_json(ok, "generation_config.json", eos_token_id=[2, 255])
    assert load_target(ok).config.eos_token_ids == (2, 255)


def test_huge_max_position_embeddings_fails_while_parsing(model_dir):
    """By construction: the bound is checked by the config parser, which allocates nothing."""
    cfg = json.load(open(os.path.join(model_dir, "config.json")))
    cfg["max_position_embeddings"] = 10**12
    with pytest.raises(UnsupportedModelError, match="max_position_embeddings") as info:
        ModelConfig.from_dict(cfg)
    assert str(MAX_POSITION_EMBEDDINGS) in str(info.value) and "limit" in str(info.value)
    cfg["max_position_embeddings"] = MAX_POSITION_EMBEDDINGS  # the bound itself parses
    assert ModelConfig.from_dict(cfg).max_position_embeddings == MAX_POSITION_EMBEDDINGS


def test_huge_max_position_embeddings_fails_before_any_large_allocation(model_dir, tmp_path):
    """Loading under an address-space limit of (what is mapped after the imports) + 4 GiB: the error must be
    the config's, not an allocation failure. The limit is shown to bite on a 5 GiB tensor."""
    bad = edit_json(copy_dir(model_dir, tmp_path), "config.json", max_position_embeddings=10**12)
    script = textwrap.dedent(
        f"""
        import resource, sys
        import torch
        from eagle_engine import UnsupportedModelError
        from eagle_engine.models.loading import load_target
        mapped_kb = int(open("/proc/self/status").read().split("VmSize:")[1].split()[0])
        limit = mapped_kb * 1024 + 4 * 2**30
        resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
        try:
            torch.empty(5 * 2**30, dtype=torch.uint8)
            sys.exit("the address-space limit does not bite")
        except (RuntimeError, MemoryError):
            pass
        try:
            load_target({bad!r})
        except UnsupportedModelError as e:
            print("OK", e)
        """
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.join(root, "python"), root]))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("OK") and "max_position_embeddings" in out.stdout, out.stdout + out.stderr


BAD_HEAD_CONFIGS = [
    (dict(bias="yes"), "bias"),
    (dict(qkv_bias=1), "qkv_bias"),
    (dict(intermediate_size=2.5), "intermediate_size"),
    (dict(num_attention_heads=0), "num_attention_heads"),
    (dict(rms_norm_eps=float("nan")), "rms_norm_eps"),
    (dict(rope_theta=-1.0), "rope_theta"),
    (dict(max_position_embeddings=10**12), "max_position_embeddings"),
    (dict(head_dim=15), "head_dim"),
]


@pytest.mark.parametrize("changes, field", BAD_HEAD_CONFIGS, ids=[f for _, f in BAD_HEAD_CONFIGS])
def test_bad_head_config_fields(target, head_dirs, tmp_path, changes, field):
    bad = edit_json(copy_dir(head_dirs["eagle1"], tmp_path), "config.json", **changes)
    with pytest.raises(UnsupportedModelError, match=field) as info:
        load_draft(bad, target)
    assert "draft head config.json" in str(info.value)


@pytest.mark.parametrize(
    "changes, field",
    [
        (dict(draft_vocab_size=12.5), "draft_vocab_size"),
        (dict(target_hidden_size="64"), "target_hidden_size"),
    ],
)
def test_bad_eagle3_head_config_fields(target, head_dirs, tmp_path, changes, field):
    bad = edit_json(copy_dir(head_dirs["eagle3"], tmp_path), "config.json", **changes)
    with pytest.raises(UnsupportedModelError, match=field):
        load_draft(bad, target)


def test_head_eos_ids_are_not_checked_against_the_head_vocabulary(target, head_dirs, tmp_path):
    """EAGLE-3 configs may list target eos ids beyond the draft vocabulary: heads do not use them."""
    ok = edit_json(copy_dir(head_dirs["eagle3"], tmp_path), "config.json", eos_token_id=[VOCAB + 5])
    load_draft(ok, target)


def poison_safetensors(path, name, value, dtype=None):
    tensors = load_file(path)
    t = tensors[name].clone()
    t.view(-1)[t.numel() // 2] = value
    tensors[name] = t if dtype is None else t.to(dtype)
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("name", ["model.layers.1.mlp.up_proj.weight", "model.norm.weight"])
def test_non_finite_target_weights(model_dir, tmp_path, name, value):
    bad = copy_dir(model_dir, tmp_path)
    poison_safetensors(os.path.join(bad, "model.safetensors"), name, value)
    with pytest.raises(NonFiniteWeightsError, match=name.replace(".", r"\.")) as info:
        load_target(bad)
    assert isinstance(info.value, CheckpointMismatchError) and "NaN or infinite" in str(info.value)


def test_weight_that_overflows_the_model_dtype(model_dir, tmp_path):
    name = "model.layers.0.self_attn.q_proj.weight"
    bad = copy_dir(model_dir, tmp_path)
    poison_safetensors(os.path.join(bad, "model.safetensors"), name, 1e30)
    load_target(bad)  # finite in fp32
    with pytest.raises(NonFiniteWeightsError, match=f"{name} overflows torch.float16"):
        load_target(bad, dtype="fp16")


@pytest.mark.parametrize("kind", ["eagle1", "eagle3"])
def test_non_finite_head_weights_safetensors(target, head_dirs, tmp_path, kind):
    bad = copy_dir(head_dirs[kind], tmp_path)
    poison_safetensors(os.path.join(bad, "model.safetensors"), "fc.weight", float("nan"))
    with pytest.raises(NonFiniteWeightsError, match=r"fc\.weight"):
        load_draft(bad, target)


def test_non_finite_head_weights_bin(target, head_dirs, tmp_path):
    bad = copy_dir(head_dirs["eagle1-bin"], tmp_path)
    path = os.path.join(bad, "pytorch_model.bin")
    state = torch.load(path, weights_only=True)
    state["layers.0.self_attn.k_proj.weight"][0, 0] = float("inf")
    torch.save(state, path)
    with pytest.raises(NonFiniteWeightsError, match=r"layers\.0\.self_attn\.k_proj\.weight"):
        load_draft(bad, target)


# (TreeConfig kwargs, the field the message must name)
BAD_TREES = [
    (dict(kind="chain", depth=2.5), "depth"),
    (dict(depth=True), "depth"),
    (dict(depth="6"), "depth"),
    (dict(depth=-1), "depth"),
    (dict(depth=128), "depth"),
    (dict(top_k=65, total_tokens=60), "top_k"),
    (dict(top_k=0), "top_k"),
    (dict(top_k=4.0), "top_k"),
    (dict(top_k=np.float64(4)), "top_k"),
    (dict(total_tokens=1025, depth=10, top_k=20), "total_tokens"),
    (dict(total_tokens=60.0), "total_tokens"),
    (dict(total_tokens=1), "total_tokens"),
    (dict(kind="beam"), "kind"),
    (dict(kind=["chain"]), "kind"),
    (dict(kind="static", choices=[]), "choices"),
    (dict(kind="static", choices="0,1"), "choices"),
    (dict(kind="static", choices=[0, 1]), "choices"),
    (dict(kind="static", choices=[[0], [0, "1"]]), "choices"),
    (dict(kind="static", choices=[[0], [0, 1.0]]), "choices"),
    (dict(kind="static", choices=[[0], [True]]), "choices"),
    (dict(kind="static", choices=[[0], []]), "choices"),
    (dict(kind="static", choices=[[-1]]), "choices"),
    (dict(kind="static", choices=[[64]]), "choices"),
    (dict(kind="static", choices=[[0]] + [[0] * i for i in range(2, 130)]), "choices"),
    (dict(kind="static", choices=[[i % 64] * (1 + i // 64) for i in range(1024)]), "choices"),
    (dict(kind="static", choices=[[0], [0]]), "choices"),
    (dict(kind="static", choices=[[0, 0]]), "parent"),
    (dict(kind="dynamic", choices=5), "choices"),
]


@pytest.mark.parametrize("kwargs, field", BAD_TREES, ids=[f"{f}-{i}" for i, (_, f) in enumerate(BAD_TREES)])
def test_bad_tree_configs(kwargs, field):
    with pytest.raises(InvalidRequestError, match=field):
        TreeConfig(**kwargs)
    with pytest.raises(InvalidRequestError, match=field):  # the same through from_dict
        TreeConfig.from_dict(kwargs)


@pytest.mark.parametrize(
    "d, names", [({"depht": 3}, "'depht'"), ({"kind": "chain", "x": 1, "y": 2}, "'x', 'y'")]
)
def test_tree_from_dict_names_unknown_keys(d, names):
    with pytest.raises(InvalidRequestError, match=f"unknown tree field.*{names}"):
        TreeConfig.from_dict(d)


def test_tree_from_dict_needs_a_dict():
    with pytest.raises(InvalidRequestError, match="dict"):
        TreeConfig.from_dict([("kind", "chain")])


def test_good_trees_normalise_types():
    t = TreeConfig.from_dict(
        {"kind": "dynamic", "total_tokens": np.int64(40), "depth": np.int32(5), "top_k": 8}
    )
    assert (t.total_tokens, t.depth, t.top_k) == (40, 5, 8) and type(t.depth) is int
    assert TreeConfig(top_k=64, total_tokens=1024, depth=1).top_k == 64  # the bounds themselves are fine
    s = TreeConfig(kind="static", choices=[[0], [np.int64(1)], (0, 0)])
    assert s.choices == ((0,), (1,), (0, 0)) and s.num_nodes == 4
    assert TreeConfig(kind="chain", depth=np.int64(127)).total_tokens == 129


BAD_SAMPLING = [
    (dict(temperature=float("inf")), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(temperature=-0.1), "temperature"),
    (dict(temperature=True), "temperature"),
    (dict(temperature="0.7"), "temperature"),
    (dict(temperature=10**400), "temperature"),
    (dict(top_p=float("inf")), "top_p"),
    (dict(top_p=float("nan")), "top_p"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.01), "top_p"),
    (dict(top_p=None), "top_p"),
    (dict(top_k=True), "top_k"),
    (dict(top_k=5.0), "top_k"),
    (dict(top_k=-1), "top_k"),
    (dict(top_k="5"), "top_k"),
]


@pytest.mark.parametrize(
    "kwargs, field", BAD_SAMPLING, ids=[f"{f}-{i}" for i, (_, f) in enumerate(BAD_SAMPLING)]
)
def test_bad_sampling_params(kwargs, field):
    with pytest.raises(InvalidRequestError, match=field):
        SamplingParams(**kwargs)


def test_good_sampling_params_accept_numpy():
    p = SamplingParams(np.float32(0.5), np.float64(0.9), np.int64(7))
    assert (p.temperature, p.top_p, p.top_k) == (0.5, pytest.approx(0.9), 7) and type(p.top_k) is int
    assert SamplingParams(1, 1, 0).top_p == 1.0


BAD_STOP_IDS = [
    "x",
    [1, "x"],
    [1, 2.0],
    2.0,
    [True],
    True,
    [VOCAB],
    [-1],
    VOCAB,
    [1, None],
    object(),
]


@pytest.mark.parametrize("stop", BAD_STOP_IDS, ids=[f"stop-{i}" for i in range(len(BAD_STOP_IDS))])
def test_bad_stop_token_ids(stop):
    with pytest.raises(InvalidRequestError, match="stop_token_ids") as info:
        normalize_stop_ids(stop, (1,), VOCAB)
    assert f"[0, {VOCAB})" in str(info.value)


def test_good_stop_token_ids():
    assert normalize_stop_ids(None, (1, 2), VOCAB) == {1, 2}
    assert normalize_stop_ids(np.int64(3), (), VOCAB) == {3}
    assert normalize_stop_ids([np.int32(4), 5], (), VOCAB) == {4, 5}
    assert normalize_stop_ids(torch.tensor([6, 7]), (), VOCAB) == {6, 7}
    assert normalize_stop_ids((), (1,), VOCAB) == frozenset()
    assert normalize_stop_ids([10**6], (1,)) == {10**6}  # no vocab_size: no range check (the old call)
    with pytest.raises(InvalidRequestError, match="stop_token_ids"):
        normalize_stop_ids([1.5], (1,))


@pytest.mark.parametrize(
    "seed",
    [
        True,
        1.0,
        "1",
        2**63,
        -(2**63) - 1,
        [1],
        [1, 2, 3],
        [1, 2.0],
        [1, True],
        [1, 2**64],
        {1, 2},
        np.float64(1),
    ],
    ids=lambda s: repr(s)[:20],
)
def test_bad_seeds(seed):
    with pytest.raises(InvalidRequestError, match=r"seed must be .*2\*\*63"):
        check_seeds(seed, 2)


def test_good_seeds():
    assert check_seeds(5, 3) == [5, 5, 5]
    assert check_seeds(np.int64(-5), 2) == [-5, -5]
    assert check_seeds([np.uint32(1), 2**63 - 1], 2) == [1, 2**63 - 1]
    assert check_seeds((-(2**63), 0), 2) == [-(2**63), 0]
    drawn = check_seeds(None, 3)
    assert len(set(drawn)) == 1 and 0 <= drawn[0] < 2**63 and type(drawn[0]) is int
    for s in check_seeds([3, -(2**63)], 2):  # every accepted seed seeds a torch.Generator
        torch.Generator().manual_seed(s)


@pytest.mark.parametrize("n", [True, 1.0, -1, "3", None, np.float64(3)], ids=repr)
def test_bad_max_new_tokens(n):
    with pytest.raises(InvalidRequestError, match="max_new_tokens"):
        check_max_new_tokens(n)


def test_good_max_new_tokens():
    assert check_max_new_tokens(np.int64(3)) == 3 and type(check_max_new_tokens(np.int32(0))) is int


def test_invalid_device_error_class():
    assert issubclass(InvalidDeviceError, EagleError) and issubclass(InvalidDeviceError, ValueError)
    assert issubclass(NonFiniteWeightsError, CheckpointMismatchError)
    import eagle_engine

    assert "InvalidDeviceError" in eagle_engine.__all__ and "NonFiniteWeightsError" in eagle_engine.__all__


@pytest.fixture(scope="module")
def engine(model_dir, reference_ops):
    return EagleEngine.from_pretrained(model_dir)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(temperature=float("inf")), "temperature"),
        (dict(temperature=0.5, top_p=float("nan")), "top_p"),
        (dict(temperature=0.5, top_k=2.0), "top_k"),
        (dict(stop_token_ids="x"), "stop_token_ids"),
        (dict(max_new_tokens=2.0), "max_new_tokens"),
    ],
)
def test_bad_settings_through_the_engine(engine, kwargs, field):
    request = dict(input_ids=[1, 2, 3], max_new_tokens=2)
    request.update(kwargs)
    with pytest.raises(InvalidRequestError, match=field):
        engine.generate_vanilla(**request)


def test_numpy_settings_through_the_engine(engine):
    out = engine.generate_vanilla(
        [1, 2, 3], np.int64(3), temperature=np.float32(0.8), top_k=np.int64(5), seed=0, stop_token_ids=[]
    )
    assert len(out.tokens) == 3 and not any(math.isnan(t) for t in out.tokens)


# ------------------------------------------------------------------------------- sizes and the result


def test_large_config_maximum_does_not_size_tables_or_caches(model_dir, tmp_path):
    """max_position_embeddings 10**6 loads small: rotary tables and caches follow max_model_len."""
    from eagle_engine import EagleEngine

    edited = copy_dir(model_dir, tmp_path)
    edit_json(edited, "config.json", max_position_embeddings=10**6)
    engine = EagleEngine.from_pretrained(edited, max_model_len=256)
    assert engine.target.cos_sin.shape[0] <= 2 * (4096 + 512)  # bounded, whatever the config says
    # A table row addresses twice a sequence's rows (a batched prefill's padding); the pool holds the rest.
    assert engine.runner.state.tcache.capacity <= 2 * (256 + 64)
    assert engine.runner.blocks.num_blocks * 16 <= 8 * (256 + 64)
    assert len(engine.generate_vanilla([1, 2, 3], 8, stop_token_ids=[]).tokens) == 8
    default = EagleEngine.from_pretrained(edited)
    assert default.max_length == 4096 and default.runner.state.tcache.capacity < 2 * 4200


def test_accept_lengths_count_only_kept_tokens(target, head_dirs):
    from eagle_engine import EagleEngine

    engine = EagleEngine(target, load_draft(head_dirs["eagle1"], target), tree="chain")
    for n in (1, 2, 5):
        result = engine.generate([1, 2, 3], n, stop_token_ids=[])
        assert len(result.tokens) == n
        assert sum(result.accept_lengths) == n - 1 and all(a >= 1 for a in result.accept_lengths)


def test_stream_validates_before_returning_the_iterator(target, head_dirs):
    from eagle_engine import EagleEngine

    engine = EagleEngine(target, load_draft(head_dirs["eagle1"], target))
    with pytest.raises(InvalidRequestError):
        engine.stream([], 5)  # no next(): the error comes from the call itself
    with pytest.raises(InvalidRequestError, match="stop_token_ids"):
        engine.stream([1, 2], 5, stop_token_ids=[-5])
