"""Training heads (loss, official-format round trip, checkpoint + resume, `eagle train-draft`) and the
embedded demo pair (lossless greedy EAGLE, `eagle demo`)."""

import inspect
import json
import os
import random

import pytest
import torch
from tiny import make_hf_model, make_tokenizer, save

from eagle_engine import EagleEngine, EagleError
from eagle_engine.models import load_target
from eagle_engine.models.draft import init_random_head
from eagle_engine.models.loading import load_draft, save_draft
from eagle_engine.tools.cli import main
from eagle_engine.tools.train import (
    DraftTrainJob,
    TrainConfig,
    TrainingInputError,
    train_draft,
    train_head,
)

pytestmark = pytest.mark.usefixtures("reference_ops")  # the engine on the reference ops (fast)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny Llama with a tiny byte-level BPE tokenizer, in one Hugging Face directory."""
    d = str(tmp_path_factory.mktemp("tiny"))
    make_tokenizer(d)
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(d))
    return save(make_hf_model("llama", vocab_size=vocab, max_position_embeddings=128), d)


@pytest.fixture(scope="module")
def target(model_dir):
    return load_target(model_dir)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "code.py"
    path.write_text(inspect.getsource(json) + inspect.getsource(random))
    return str(path)


@pytest.fixture(scope="module")
def trained(target, reference_ops):
    """A head trained for a few steps on random sequences: (head, losses)."""
    gen = torch.Generator().manual_seed(0)
    sequences = torch.randint(0, target.config.vocab_size, (16, 24), generator=gen)
    head = init_random_head("eagle1", target, seed=1, std=0.05)
    cfg = TrainConfig(steps=40, lr=3e-3, batch_size=4, warmup_steps=5, seed=0)
    losses, _ = train_head(head, target, sequences, cfg)
    return head, losses


def test_training_lowers_the_loss(trained):
    _, losses = trained
    assert len(losses) == 40
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, losses


def test_saved_head_loads_back_identical(trained, target, tmp_path):
    head, _ = trained
    for fmt in ("safetensors", "bin"):
        loaded = load_draft(save_draft(head, str(tmp_path / fmt), fmt), target)
        mine, theirs = head.state_dict(), loaded.state_dict()
        assert set(mine) == set(theirs)
        for k in mine:
            assert torch.equal(mine[k], theirs[k]), k


def tiny_job(model_dir, corpus, out, **changes):
    settings = dict(steps=4, seq_len=32, batch_size=2, checkpoint_every=2, eval_prompts=0)
    settings["show_progress"] = False
    return DraftTrainJob(base=model_dir, corpus=[corpus], out=str(out), **{**settings, **changes})


def test_checkpoint_and_resume_continue_the_run(model_dir, corpus, tmp_path):
    out = tmp_path / "run"
    train_draft(tiny_job(model_dir, corpus, out))
    state = torch.load(out / "checkpoint" / "trainer_state.pt")
    assert state["step"] == 4 and len(state["losses"]) == 4
    adam_steps = {float(s["step"]) for s in state["optimizer"]["state"].values()}
    assert adam_steps == {4.0}
    summary = train_draft(tiny_job(model_dir, corpus, out, steps=6, resume=True))
    state = torch.load(out / "checkpoint" / "trainer_state.pt")
    assert state["step"] == 6 and len(state["losses"]) == 6 and summary["steps"] == 6
    assert {float(s["step"]) for s in state["optimizer"]["state"].values()} == {6.0}  # Adam state continued
    # The checkpointed head is the final head.
    target = load_target(model_dir)
    final, ckpt = load_draft(str(out), target).state_dict(), load_draft(str(out / "checkpoint"), target)
    assert all(torch.equal(v, ckpt.state_dict()[k]) for k, v in final.items())
    # A finished run resumed with the same step count trains no further.
    again = train_draft(tiny_job(model_dir, corpus, out, steps=6, resume=True))
    assert again["final_loss"] == summary["final_loss"]


def test_train_draft_eagle3(model_dir, corpus, target, tmp_path):
    job = tiny_job(model_dir, corpus, tmp_path / "e3", kind="eagle3", steps=2, eval_prompts=1)
    summary = train_draft(job)
    assert summary["mean_accept_length"] >= 1.0
    head = load_draft(str(tmp_path / "e3"), target)
    assert type(head).__name__ == "Eagle3Head"


def test_bad_training_input(model_dir, corpus, tmp_path):
    with pytest.raises(TrainingInputError, match="not found"):
        tiny_job(model_dir, str(tmp_path / "missing.txt"), tmp_path / "o")
    with pytest.raises(TrainingInputError, match="steps"):
        tiny_job(model_dir, corpus, tmp_path / "o", steps=0)
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(TrainingInputError, match="empty"):
        train_draft(tiny_job(model_dir, str(empty), tmp_path / "o"))
    short = tmp_path / "short.txt"
    short.write_text("x = 1\n")
    with pytest.raises(TrainingInputError, match="fewer than one sequence"):
        train_draft(tiny_job(model_dir, str(short), tmp_path / "o"))
    assert main(["train-draft", "--base", model_dir, "--corpus", "nope.txt", "--out", str(tmp_path)]) == 2


def test_train_draft_command_end_to_end(model_dir, corpus, tmp_path, capsys):
    out = tmp_path / "head"
    args = ["train-draft", "--base", model_dir, "--corpus", corpus, "--out", str(out), "--steps", "3"]
    args += ["--seq-len", "32", "--batch-size", "2", "--checkpoint-every", "2"]
    args += ["--eval-corpus", corpus, "--eval-prompts", "1", "--eval-new-tokens", "8"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "mean acceptance length: " in printed and "held-out" in printed
    assert os.path.isfile(out / "config.json") and os.path.isfile(out / "model.safetensors")
    assert os.path.isfile(out / "checkpoint" / "trainer_state.pt")
    summary = json.loads((out / "eval.json").read_text())
    assert summary["steps"] == 3 and summary["held_out"] and summary["mean_accept_length"] >= 1.0
    engine = EagleEngine.from_pretrained(model_dir, str(out))  # the official format loads in the engine
    assert len(engine.generate([5, 6, 7], 8).tokens) == 8


# ------------------------------------------------------------------------------------------ the demo pair


@pytest.fixture(scope="module")
def demo(reference_ops):
    from eagle_engine.tools.demo import demo_paths

    target_dir, head_dir = demo_paths()
    from eagle_engine.tools.common import load_tokenizer

    return EagleEngine.from_pretrained(target_dir, head_dir), load_tokenizer(target_dir)


def test_demo_pair_is_lossless(demo):
    engine, tokenizer = demo
    prompts = ["import os\n\ndef main(", "class Stack:\n    def __init__(self):\n", "for i in range(10):\n"]
    for text in prompts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        eagle = engine.generate(ids, 64, stop_token_ids=[])
        assert eagle.tokens == engine.generate_vanilla(ids, 64, stop_token_ids=[]).tokens
        assert eagle.mean_accept_length > 1.0


@pytest.fixture(scope="module")
def demo3(reference_ops):
    from eagle_engine.tools.common import load_tokenizer
    from eagle_engine.tools.demo import demo_paths

    target_dir, head_dir = demo_paths("eagle3")
    return EagleEngine.from_pretrained(target_dir, head_dir), load_tokenizer(target_dir)


def test_demo_eagle3_head_fits_the_demo_target_and_is_lossless(demo3):
    from eagle_engine import demo_head_path, demo_paths

    engine, tokenizer = demo3
    assert type(engine.draft).__name__ == "Eagle3Head"
    assert demo_paths("eagle3") == (demo_paths()[0], demo_head_path("eagle3"))
    assert demo_paths() == demo_paths("eagle2")  # the default stays the EAGLE-1/2 head
    for text in ["import os\n\ndef main(", "class Stack:\n    def __init__(self):\n"]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        eagle = engine.generate(ids, 48, stop_token_ids=[])
        assert eagle.tokens == engine.generate_vanilla(ids, 48, stop_token_ids=[]).tokens
        assert eagle.mean_accept_length > 1.0  # a trained head: it drafts tokens the target keeps


def test_demo_command(capsys):
    assert main(["demo", "--max-new-tokens", "24"]) == 0
    out = capsys.readouterr().out
    assert "mean acceptance length: " in out and "tokens/s" in out and "vanilla" in out
    assert "head: eagle2 (EAGLE-1/2 head)" in out
    assert main(["generate", "--prompt", "import os\n", "--max-new-tokens", "8"]) == 0  # no --base: the demo
    assert "mean acceptance length: " in capsys.readouterr().out


def test_demo_command_eagle3_head(capsys):
    assert main(["demo", "--head", "eagle3", "--max-new-tokens", "16"]) == 0
    out = capsys.readouterr().out
    assert "head: eagle3 (EAGLE-3 head)" in out
    assert "mean acceptance length: " in out and "outputs identical: yes" in out


def test_demo_bad_head_is_a_clear_error(capsys):
    from eagle_engine.tools.demo import demo_head_path, run_demo

    with pytest.raises(SystemExit) as exc:
        main(["demo", "--head", "eagle4"])
    assert exc.value.code == 2
    assert "invalid choice: 'eagle4'" in capsys.readouterr().err
    with pytest.raises(EagleError, match="unknown demo head 'eagle1': choose one of eagle2, eagle3"):
        demo_head_path("eagle1")
    with pytest.raises(EagleError, match="unknown demo head"):
        run_demo(max_new_tokens=4, head="EAGLE3")


def test_demo_paths_name_missing_data(monkeypatch, tmp_path):
    import eagle_engine.tools.demo as demo_module

    monkeypatch.setattr(demo_module.resources, "files", lambda _: tmp_path)
    with pytest.raises(EagleError, match="demo model is missing"):
        demo_module.demo_paths()
    target = tmp_path / "data" / "demo" / "target"  # a target without its EAGLE-3 head
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")
    (target / "tokenizer.json").write_text("{}")
    with pytest.raises(EagleError, match=r"head3.config\.json not found.*--stages head3"):
        demo_module.demo_paths("eagle3")
    with pytest.raises(EagleError, match="--stages head3"):
        demo_module.demo_head_path("eagle3")
