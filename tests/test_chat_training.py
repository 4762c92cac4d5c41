"""Training on conversations: the chat template's assistant-only loss mask, cuts at turn boundaries, masked
losses, data-parallel training on torchrun (2 gloo ranks == 1 rank, resume across rank counts), cached
features (== online), EAGLE-3 draft vocabularies from the data, and evaluation during training."""

import json
import os
import subprocess

import pytest
import torch
from launch import torchrun_command, torchrun_env
from tiny import make_hf_model, save

from eagle_engine import EagleEngine, TrainingInputError
from eagle_engine.models import load_target
from eagle_engine.models.draft import init_random_head
from eagle_engine.models.loading import load_draft
from eagle_engine.models.vocab import most_frequent
from eagle_engine.tools.cli import main
from eagle_engine.tools.conversations import read_conversations
from eagle_engine.tools.train import DraftTrainJob, train_draft
from eagle_engine.tools.train_losses import collect_features, head_loss
from eagle_engine.tools.training_data import chat_rows, read_rows, token_frequencies

pytestmark = pytest.mark.usefixtures("reference_ops")

SPECIALS = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
QUESTIONS = ["def add(a, b):", "import json", "class Point:", "for i in range(3):", "with open(path) as f:"]
ANSWERS = [
    "    return a + b\n",
    "data = json.loads(text)\n",
    "    x: int = 0\n",
    "    print(i)\n",
    "    f.read()\n",
]


def sharegpt_records(n: int = 24) -> list[dict]:
    """Conversations of one or two exchanges built from short code snippets."""
    records = []
    for i in range(n):
        q, a = QUESTIONS[i % 5], ANSWERS[i % 5]
        turns = [{"from": "system", "value": "Complete the code."}] if i % 3 == 0 else []
        turns += [{"from": "human", "value": q}, {"from": "gpt", "value": a * (1 + i % 2)}]
        if i % 2:
            q2, a2 = QUESTIONS[(i + 1) % 5], ANSWERS[(i + 1) % 5]
            turns += [{"from": "human", "value": q2}, {"from": "gpt", "value": a2}]
        records.append({"id": f"c{i}", "conversations": turns})
    return records


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """A tiny Llama whose tokenizer has chat special tokens and TEMPLATE; and a ShareGPT file."""
    import inspect
    import warnings

    from eagle_engine.tools.demo import train_tokenizer

    d = str(tmp_path_factory.mktemp("chat"))
    tok = train_tokenizer([inspect.getsource(json) + inspect.getsource(warnings)], 256)
    tok.add_special_tokens({"additional_special_tokens": SPECIALS})
    tok.chat_template = TEMPLATE
    tok.save_pretrained(d)
    save(make_hf_model("llama", vocab_size=len(tok), max_position_embeddings=128), d)
    data = os.path.join(d, "chat.json")
    with open(data, "w") as f:
        json.dump(sharegpt_records(), f)
    return d, data, tok


def test_loss_mask_covers_exactly_the_assistant_tokens(chat_model):
    _, data, tok = chat_model
    found = read_conversations([data])
    assert found.format == "sharegpt" and len(found.conversations) == 24
    messages = found.conversations[1].messages  # user, assistant, user, assistant
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    # Built by hand: each piece tokenized alone (special tokens split the text), flagged by role.
    pieces = [("<s>", False)]
    for m in messages:
        trained = m["role"] == "assistant"
        pieces += [(f"<|{m['role']}|>", False), (m["content"], trained), ("<|end|>", trained)]
    ids, flags = [], []
    for text, trained in pieces:
        piece = tok(text, add_special_tokens=False)["input_ids"]
        ids += piece
        flags += [trained] * len(piece)
    rows = chat_rows(tok, [found.conversations[1]], seq_len=len(ids) + 3)
    assert rows.ids[0, : len(ids)].tolist() == ids
    expected = flags[1:] + [False] * 4  # position j is trained when token j + 1 is the assistant's
    assert rows.loss_mask[0].tolist() == expected
    assert rows.report["conversations"] == {"whole": 1}


def test_long_conversations_are_cut_at_turn_boundaries_and_counted(chat_model):
    from eagle_engine.tools.conversations import Conversation

    _, data, tok = chat_model
    two_exchanges = read_conversations([data]).conversations[1]
    text = tok.apply_chat_template(two_exchanges.messages, tokenize=False)
    n_tokens = len(tok(text, add_special_tokens=False)["input_ids"])
    cut = chat_rows(tok, [two_exchanges], n_tokens - 2)  # the second exchange does not fit
    assert cut.report["conversations"] == {"cut at a turn boundary": 1}
    last = int(cut.loss_mask[0].nonzero().max())  # the last trained position predicts the first <|end|>
    assert cut.ids[0, last + 1].item() == tok.convert_tokens_to_ids("<|end|>")
    assert cut.ids[0, last + 2 :].eq(tok.eos_token_id).all()  # then padding
    answer = {"role": "assistant", "content": "y = 2\n" * 30}
    inside = Conversation([{"role": "user", "content": "a"}, answer], "i")
    skipped = Conversation([{"role": "user", "content": "x = 1\n" * 40}, answer], "s")
    rows = chat_rows(tok, [inside, skipped], 40)
    assert rows.report["conversations"] == {
        "cut inside a turn": 1,
        "skipped: no assistant token within --seq-len": 1,
    }
    assert len(rows) == 1 and rows.loss_mask[0, -2] and not rows.loss_mask[0, -1]


def test_conversations_need_a_chat_template(chat_model, tmp_path):
    d, data, _ = chat_model
    from transformers import AutoTokenizer

    plain = AutoTokenizer.from_pretrained(d)
    plain.chat_template = None
    with pytest.raises(TrainingInputError, match="--chat-template"):
        read_rows(plain, [data], 64, model_dir=d)
    template = tmp_path / "t.jinja"
    template.write_text(TEMPLATE)
    rows = read_rows(plain, [data], 64, chat_template=str(template), model_dir=d)
    assert rows.report["format"] == "sharegpt" and len(rows) == 24
    messages = tmp_path / "m.jsonl"
    messages.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(TrainingInputError, match="no usable conversation.*1 no assistant message"):
        read_rows(plain, [str(messages)], 64, chat_template=str(template), model_dir=d)


@pytest.mark.parametrize("kind", ["eagle1", "eagle3"])
def test_masked_loss_is_the_mean_of_the_trained_rows(chat_model, kind):
    d, data, tok = chat_model
    target = load_target(d)
    head = init_random_head(kind, target, seed=1, std=0.05)
    rows = read_rows(tok, [data], 48, model_dir=d)
    batch = collect_features(target, rows.ids[:3], head.aux_layers(3), True, rows.loss_mask[:3])
    head.requires_grad_(False)
    full = head_loss(head, target.lm_head_weight, batch, 0.0, 1)
    trained = batch.loss_mask[:, 1:].nonzero().tolist()
    assert 0 < len(trained) < batch.loss_mask[:, 1:].numel()
    singles = []
    for b, j in trained:  # each trained position alone
        one = torch.zeros_like(batch.loss_mask)
        one[b, j + 1] = True
        batch.loss_mask = one
        singles.append(float(head_loss(head, target.lm_head_weight, batch, 0.0, 1)))
    assert abs(float(full) - sum(singles) / len(singles)) < 1e-5


# ------------------------------------------------------------------------------- data-parallel training


def train_args(d, data, out, *extra):
    args = ["train-draft", "--base", d, "--data", data, "--out", str(out), "--seq-len", "48", "--lr", "3e-3"]
    return args + ["--eval-prompts", "0", "--checkpoint-every", "2", "--seed", "5", *extra]


def head_state(d, out):
    return load_draft(str(out), load_target(d)).state_dict()


def max_difference(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def torchrun_train(args: list[str]) -> str:
    """``torchrun -m eagle_engine ARGS`` on 2 gloo ranks; returns their stdout."""
    cmd = torchrun_command(2, "-m", "eagle_engine", *args)
    proc = subprocess.run(cmd, env=torchrun_env(), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


def test_two_ranks_train_the_same_head_as_one_and_resume_on_one(chat_model, tmp_path):
    d, data, _ = chat_model
    two = tmp_path / "two"
    stdout = torchrun_train(
        train_args(d, data, two, "--steps", "2", "--batch-size", "1", "--accumulation-steps", "2")
    )
    assert stdout.count("head saved to") == 1  # only rank 0 prints
    assert json.loads((two / "eval.json").read_text())["global_batch"] == 4
    one = tmp_path / "one"
    assert main(train_args(d, data, one, "--steps", "2", "--batch-size", "4")) == 0
    accum = tmp_path / "accum"
    assert (
        main(train_args(d, data, accum, "--steps", "2", "--batch-size", "2", "--accumulation-steps", "2"))
        == 0
    )
    # Same global batch, same rows, same noise: the same weights up to the order of float sums.
    assert max_difference(head_state(d, two), head_state(d, one)) < 1e-5
    assert max_difference(head_state(d, accum), head_state(d, one)) < 1e-5
    # Resume the 2-rank run on 1 rank; it continues as a 1-rank run of 4 steps would.
    assert main(train_args(d, data, two, "--steps", "4", "--batch-size", "4", "--resume")) == 0
    assert main(train_args(d, data, one, "--steps", "4", "--batch-size", "4", "--resume")) == 0
    assert max_difference(head_state(d, two), head_state(d, one)) < 1e-5
    log = [json.loads(line) for line in (two / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]


def test_two_ranks_train_the_same_eagle3_head_as_one(chat_model, tmp_path):
    d, data, _ = chat_model
    common = ["--steps", "2", "--kind", "eagle3"]
    torchrun_train(train_args(d, data, tmp_path / "two", *common, "--batch-size", "2"))
    assert main(train_args(d, data, tmp_path / "one", *common, "--batch-size", "4")) == 0
    assert max_difference(head_state(d, tmp_path / "two"), head_state(d, tmp_path / "one")) < 1e-5


def test_resume_log_checkpoint_and_frozen_embedding(chat_model, tmp_path, capsys):
    d, data, _ = chat_model
    out = tmp_path / "run"
    args = train_args(d, data, out, "--steps", "2", "--batch-size", "2")
    assert main(args + ["--resume"]) == 0  # nothing to resume: says so, starts at step 0
    assert "--resume: no checkpoint in" in capsys.readouterr().err
    assert main(args) == 0  # a fresh run starts the log afresh
    assert [json.loads(x)["step"] for x in (out / "train_log.jsonl").read_text().splitlines()] == [1, 2]
    # A run killed while replacing its checkpoint left only the previous one, moved aside: it resumes.
    os.replace(out / "checkpoint", out / "checkpoint.old")
    more = train_args(d, data, out, "--steps", "3", "--batch-size", "2", "--resume")
    assert main(more) == 0
    assert [json.loads(x)["step"] for x in (out / "train_log.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert not (out / "checkpoint.old").exists() and not (out / "eval-head.tmp").exists()
    # The borrowed embedding is neither trained nor given gradients (nor DDP traffic).
    from eagle_engine.tools.train_loop import TrainConfig, train_head

    target = load_target(d)
    head = init_random_head("eagle1", target, seed=1)
    before = head.embed_tokens.weight.clone()
    train_head(
        head, target, torch.randint(0, 200, (4, 16)), TrainConfig(steps=1, batch_size=2, warmup_steps=0)
    )
    assert head.embed_tokens.weight.grad is None and torch.equal(head.embed_tokens.weight, before)


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"eval_every": 2, "eval_prompts": 0}, "--eval-every needs evaluation prompts"),
        ({"kind": "eagle1", "draft_vocab_size": 10}, "--draft-vocab-size is for EAGLE-3"),
        ({"accumulation_steps": 0}, r"accumulation_steps \(--accumulation-steps\) must be >= 1"),
    ],
)
def test_bad_training_flags_are_named(chat_model, tmp_path, changes, match):
    d, data, _ = chat_model
    with pytest.raises(TrainingInputError, match=match):
        DraftTrainJob(base=d, corpus=[data], out=str(tmp_path), **changes)


def test_checks_before_training(chat_model, tmp_path):
    d, data, _ = chat_model
    job = DraftTrainJob(
        base=d,
        corpus=[data],
        out=str(tmp_path),
        kind="eagle3",
        draft_vocab_size=10**6,
        seq_len=48,
        show_progress=False,
    )
    with pytest.raises(TrainingInputError, match="--draft-vocab-size 1000000 exceeds the model's vocabulary"):
        train_draft(job)
    with pytest.raises(TrainingInputError, match="--data-format reads --data or --eval-data"):
        DraftTrainJob(base=d, corpus=None, features=str(tmp_path), out=str(tmp_path), data_format="messages")


# ------------------------------------------------------------------------------------- cached features


@pytest.mark.parametrize("kind", ["eagle1", "eagle3"])
def test_cached_features_train_the_same_head_as_online(chat_model, tmp_path, capsys, kind):
    d, data, _ = chat_model
    feats = tmp_path / "feats"
    args = ["prepare-features", "--base", d, "--data", data, "--out", str(feats), "--seq-len", "48"]
    assert main(args + ["--kind", kind, "--batch-size", "5", "--shard-rows", "7"]) == 0
    err = capsys.readouterr().err
    assert "GiB on disk" in err
    manifest = json.loads((feats / "features.json").read_text())
    assert manifest["rows"] == 24 and manifest["kind"] == kind
    assert [s["rows"] for s in manifest["shards"]] == [10, 10, 4]  # batches of 5 until a shard holds >= 7
    common = ["--steps", "3", "--batch-size", "3", "--kind", kind]
    online, cached = tmp_path / "online", tmp_path / "cached"
    assert main(train_args(d, data, online, *common)) == 0
    cached_args = train_args(d, data, cached, *common)
    cached_args[cached_args.index("--data") : cached_args.index("--data") + 2] = ["--features", str(feats)]
    assert main(cached_args) == 0
    assert max_difference(head_state(d, online), head_state(d, cached)) == 0.0
    assert main(args + ["--kind", kind]) == 2  # a non-empty --out is refused


def test_cached_features_load_no_decoder_layer(chat_model):
    from eagle_engine.models.loading import load_output_layers

    model = load_output_layers(chat_model[0])
    assert model.model.layers[0].self_attn.o_proj.weight.is_meta
    full = load_target(chat_model[0])
    assert torch.equal(model.lm_head_weight, full.lm_head_weight)


# ------------------------------------------------------------------------ vocabularies and evaluation


def test_eagle3_draft_vocabulary_from_the_data_is_lossless(chat_model, tmp_path):
    d, data, tok = chat_model
    out = tmp_path / "e3"
    job = DraftTrainJob(
        base=d,
        corpus=[data],
        out=str(out),
        kind="eagle3",
        steps=4,
        seq_len=48,
        batch_size=4,
        draft_vocab_size=40,
        eval_prompts=2,
        eval_every=2,
        eval_new_tokens=8,
        checkpoint_every=2,
        show_progress=False,
    )
    summary = train_draft(job)
    target = load_target(d)
    head = load_draft(str(out), target)
    rows = read_rows(tok, [data], 48, model_dir=d)
    chosen = most_frequent(token_frequencies(rows, target.config.vocab_size), 40)
    assert torch.equal(torch.arange(40) + head.d2t, chosen) and int(head.t2d.sum()) == 40
    assert torch.equal(head.t2d.nonzero().flatten(), chosen)
    # Evaluation during training and at the end, in the log and eval.json.
    assert [e["step"] for e in summary["during_training"]] == [2]
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert "eval" in log[1] and "eval" not in log[0]
    final = log[-1]["eval"]
    assert final["rounds"] > 0 and final["new_tokens"] == 2 * 8 and final["prompts"] == 2
    engine = EagleEngine(target, head)
    prompt = tok(
        tok.apply_chat_template(
            [{"role": "user", "content": "import json"}], tokenize=False, add_generation_prompt=True
        ),
        add_special_tokens=False,
    )["input_ids"]
    eagle = engine.generate(prompt, 20, stop_token_ids=[])
    assert eagle.tokens == engine.generate_vanilla(prompt, 20, stop_token_ids=[]).tokens
    engine.close()


def test_templates_that_refuse_a_conversation_and_unknown_records_are_reported(chat_model, tmp_path):
    d, data, tok = chat_model
    from transformers import AutoTokenizer

    strict = AutoTokenizer.from_pretrained(d)
    refusing = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
    strict.chat_template = refusing + TEMPLATE
    rows = read_rows(strict, [data], 64, model_dir=d)
    assert rows.report["conversations"]["skipped: the chat template refused it"] == 8  # every third has one
    assert len(rows) == 16
    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(json.dumps([{"instruction": "add", "input": "1, 2", "output": "3"}]))
    with pytest.raises(TrainingInputError, match="neither 'conversations'.*instruction"):
        read_rows(tok, [str(alpaca)], 64, model_dir=d)
    texts = tmp_path / "texts.json"  # a .json list of text records is text data, read record by record
    texts.write_text(json.dumps([{"text": "x = 1\n" * 30}, {"text": "y = 2\n" * 30}, {"other": 1}]))
    rows = read_rows(tok, [str(texts)], 16, model_dir=d)
    assert rows.report["format"] == "text" and "2 document(s)" in rows.report["corpus"]
