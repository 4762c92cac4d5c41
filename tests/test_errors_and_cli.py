"""Every bad input gets the engine's own exception naming the problem; the `eagle` command works."""

import json
import os
import shutil

import pytest
import torch
from tiny import make_hf_model, make_tokenizer, save

from eagle_engine import (
    CheckpointMismatchError,
    EagleEngine,
    EagleError,
    InvalidRequestError,
    ModelLoadError,
    UnsupportedModelError,
)
from eagle_engine.tools.cli import main

pytestmark = pytest.mark.usefixtures("reference_ops")  # the engine on the reference ops (fast)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save(make_hf_model("llama", max_position_embeddings=64), str(tmp_path_factory.mktemp("m")))


@pytest.fixture(scope="module")
def engine(model_dir, reference_ops):
    return EagleEngine.from_pretrained(model_dir)


def edited_copy(model_dir, tmp_path, **config_changes):
    dst = str(tmp_path / "edited")
    shutil.copytree(model_dir, dst)
    path = os.path.join(dst, "config.json")
    cfg = json.load(open(path))
    cfg.update(config_changes)
    json.dump(cfg, open(path, "w"))
    return dst


def test_missing_directory_and_files(tmp_path, model_dir):
    with pytest.raises(ModelLoadError, match="directory not found"):
        EagleEngine.from_pretrained(str(tmp_path / "nope"))
    with pytest.raises(ModelLoadError, match="config.json"):
        EagleEngine.from_pretrained(str(tmp_path))
    no_weights = str(tmp_path / "noweights")
    os.makedirs(no_weights)
    shutil.copy(os.path.join(model_dir, "config.json"), no_weights)
    with pytest.raises(ModelLoadError, match="no weights"):
        EagleEngine.from_pretrained(no_weights)


def test_corrupt_weights(tmp_path, model_dir):
    dst = edited_copy(model_dir, tmp_path)
    with open(os.path.join(dst, "model.safetensors"), "wb") as f:
        f.write(b"not a safetensors file")
    with pytest.raises(ModelLoadError, match="cannot read weights"):
        EagleEngine.from_pretrained(dst)


def test_unsupported_architecture(tmp_path, model_dir):
    with pytest.raises(UnsupportedModelError, match="gpt2"):
        EagleEngine.from_pretrained(edited_copy(model_dir, tmp_path, model_type="gpt2"))


def test_unsupported_rope_scaling(tmp_path, model_dir):
    rope = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}
    with pytest.raises(UnsupportedModelError, match="yarn"):
        EagleEngine.from_pretrained(edited_copy(model_dir, tmp_path, rope_parameters=rope))


def test_shapes_that_do_not_fit_config(tmp_path, model_dir):
    with pytest.raises(CheckpointMismatchError, match="shape"):
        EagleEngine.from_pretrained(edited_copy(model_dir, tmp_path, intermediate_size=96))


def test_missing_and_unexpected_keys(tmp_path, model_dir):
    fewer_layers = edited_copy(model_dir, tmp_path, num_hidden_layers=2)
    with pytest.raises(CheckpointMismatchError, match="unexpected"):
        EagleEngine.from_pretrained(fewer_layers)
    more_layers = str(tmp_path / "more")
    shutil.copytree(model_dir, more_layers)
    cfg = json.load(open(os.path.join(more_layers, "config.json")))
    cfg["num_hidden_layers"] = 4
    json.dump(cfg, open(os.path.join(more_layers, "config.json"), "w"))
    with pytest.raises(CheckpointMismatchError, match="missing"):
        EagleEngine.from_pretrained(more_layers)


def test_bad_dtype_and_device(model_dir):
    with pytest.raises(EagleError, match="dtype"):
        EagleEngine.from_pretrained(model_dir, dtype="int8")
    if not torch.cuda.is_available():
        with pytest.raises(EagleError, match="no CUDA GPU"):
            EagleEngine.from_pretrained(model_dir, device="cuda")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(input_ids=[]), "empty"),
        (dict(input_ids=[[1, 2], []]), "prompt 1 is empty"),
        (dict(input_ids=[1, 256]), "outside the vocabulary"),
        (dict(input_ids=[1, -3]), "outside the vocabulary"),
        (dict(input_ids=list(range(64))), "maximum length is 64"),
        (dict(temperature=-0.5), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-1), "top_k"),
        (dict(max_new_tokens=-1), "max_new_tokens"),
        (dict(input_ids=torch.tensor([[0.5]])), "integer tensor"),
        (dict(input_ids=[1, 2.0]), "must be integers"),
        (dict(input_ids=[1, True]), "must be integers"),
        (dict(input_ids=[[1], ["a"]]), "must be integers"),
    ],
)
def test_bad_requests(engine, kwargs, match):
    request = dict(input_ids=[1, 2, 3], max_new_tokens=4, **{})
    request.update(kwargs)
    with pytest.raises(InvalidRequestError, match=match):
        engine.generate_vanilla(**request)


@pytest.fixture(scope="module")
def cli_model(tmp_path_factory, reference_ops):
    """A tiny model directory with its own tokenizer, and a random EAGLE head for it."""
    from tiny import make_head_dir
    from transformers import AutoTokenizer

    directory = str(tmp_path_factory.mktemp("cli"))
    make_tokenizer(directory, vocab_size=300)
    save(make_hf_model("qwen2", vocab_size=len(AutoTokenizer.from_pretrained(directory))), directory)
    head = make_head_dir(
        EagleEngine.from_pretrained(directory), "eagle1", str(tmp_path_factory.mktemp("head"))
    )
    return directory, head


def test_cli_generate(cli_model, capsys):
    directory, _ = cli_model
    assert main(["generate", "--base", directory, "--prompt", "def main(", "--max-new-tokens", "12"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("def main(") and "tokens/s" in out and "[vanilla] 12 tokens" in out


def test_cli_generate_eagle_compare(cli_model, capsys):
    directory, head = cli_model
    args = [
        "generate",
        "--base",
        directory,
        "--draft",
        head,
        "--prompt",
        "import os",
        "--max-new-tokens",
        "12",
    ]
    assert main(args + ["--compare"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("import os") and "[eagle] 12 tokens" in out and "[vanilla] 12 tokens" in out
    assert "mean acceptance length: " in out


def test_integer_like_token_ids_are_accepted(engine):
    import numpy as np

    expected = engine.generate_vanilla([1, 2, 3], 4, stop_token_ids=[]).tokens
    assert engine.generate_vanilla(np.array([1, 2, 3]), 4, stop_token_ids=[]).tokens == expected
    assert engine.generate_vanilla([np.int64(1), 2, torch.tensor(3)], 4, stop_token_ids=[]).tokens == expected
    assert engine.generate_vanilla((1, 2, 3), 4, stop_token_ids=[]).tokens == expected


def test_cli_reports_errors(tmp_path, capsys):
    assert main(["generate", "--base", str(tmp_path / "missing"), "--prompt", "x"]) == 2
    assert "eagle: error:" in capsys.readouterr().err
