"""Bring your own model: text output (incremental detokenization), corpus formats, train-draft's checks before
the first step, `eagle bench`, and the flags every command shares (--threads, --seed, --stop-token-ids)."""

import argparse
import inspect
import json
import os
import time

import pytest
import torch
from tiny import make_head_dir, make_hf_model, make_tokenizer, save

from eagle_engine import EagleEngine, EagleError, TrainingInputError
from eagle_engine.engine import cpu_threads
from eagle_engine.tools import common
from eagle_engine.tools.cli import main
from eagle_engine.tools.corpus import read_documents, token_stream
from eagle_engine.tools.detokenize import IncrementalDetokenizer, decode_new
from eagle_engine.tools.train import DraftTrainJob, TrainConfig, train_draft

pytestmark = pytest.mark.usefixtures("reference_ops")  # the engine on the reference ops (fast)

STORY = (
    "Lily wanted to go to the park. She wanted to play with her ball. Tom wanted to go home. "
    "Lily and Tom went to the park to play. The sun was warm and the ball was red. "
)


def metaspace_tokenizer(directory=None):
    """A SentencePiece-style tokenizer (Metaspace pre-tokenizer and decoder, BPE), as Llama 2's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    specials = ["<unk>", "<s>", "</s>"]
    trainer = trainers.BpeTrainer(vocab_size=150, special_tokens=specials, show_progress=False)
    tok.train_from_iterator([STORY] * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    if directory is not None:
        fast.save_pretrained(directory)
    return fast


def pushed_one_by_one(tokenizer, prompt, new, **kwargs):
    detok = IncrementalDetokenizer(tokenizer, prompt, **kwargs)
    pieces = [detok.push([t]) for t in new]
    return pieces, detok.flush()


# --------------------------------------------------------------------------------------- detokenization


def test_metaspace_text_keeps_the_space_before_the_first_new_token():
    tok = metaspace_tokenizer()
    ids = tok("Lily wanted to go to the park", add_special_tokens=False)["input_ids"]
    prompt_len = len(tok("Lily wanted to", add_special_tokens=False)["input_ids"])
    prompt, new = ids[:prompt_len], ids[prompt_len:]
    assert tok.decode(prompt) == "Lily wanted to"
    assert not tok.decode(new).startswith(" ")  # the bug: decoding new tokens alone drops the space
    assert decode_new(tok, prompt, new) == " go to the park"
    pieces, rest = pushed_one_by_one(tok, prompt, new)
    assert "".join(pieces) + rest == " go to the park" and pieces[0] == " go" and rest == ""


def test_byte_level_multibyte_characters_split_over_tokens(tmp_path):
    make_tokenizer(str(tmp_path))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    prompt = tok("print(", add_special_tokens=False)["input_ids"]
    text = "'héllo 中文 🙂 naïve'"
    new = tok(text, add_special_tokens=False)["input_ids"]
    assert any("\ufffd" in tok.decode([t]) for t in new)  # some character really is split over tokens
    pieces, rest = pushed_one_by_one(tok, prompt, new)
    assert not any("\ufffd" in p for p in pieces)  # incomplete characters are held back, never emitted
    assert "".join(pieces) + rest == text and rest == ""
    emoji = tok("🙂", add_special_tokens=False)["input_ids"]
    detok = IncrementalDetokenizer(tok, prompt)
    assert detok.push(emoji[:-1]) == ""  # held back until the last byte comes
    assert detok.push(emoji[-1:]) == "🙂"
    cut = IncrementalDetokenizer(tok, prompt)
    assert cut.push(emoji[:-1]) == "" and cut.flush().startswith("\ufffd")  # flush hands out the remainder


def test_long_streams_reanchor_and_stay_exact():
    tok = metaspace_tokenizer()
    ids = tok(STORY * 3, add_special_tokens=False)["input_ids"]
    prompt, new = ids[:3], ids[3:]
    pieces, rest = pushed_one_by_one(tok, prompt, new, context=2)
    assert "".join(pieces) + rest == tok.decode(ids)[len(tok.decode(prompt)) :]


@pytest.fixture(scope="module")
def metaspace_model(tmp_path_factory, reference_ops):
    directory = str(tmp_path_factory.mktemp("metaspace"))
    tok = metaspace_tokenizer(directory)
    save(make_hf_model("llama", vocab_size=len(tok), max_position_embeddings=128), directory)
    return directory, tok


def test_cli_generate_prints_the_text_decoding_everything_gives(metaspace_model, monkeypatch, capsys):
    directory, tok = metaspace_model
    args = ["generate", "--base", directory, "--prompt", "Lily wanted to", "--max-new-tokens", "10"]
    assert main(args + ["--stop-token-ids", ""]) == 0  # the random model's own output
    prompt = tok("Lily wanted to", add_special_tokens=True)["input_ids"]
    engine = EagleEngine.from_pretrained(directory)
    tokens = engine.generate_vanilla(prompt, 10, stop_token_ids=[]).tokens
    expected = tok.decode(prompt + tokens, skip_special_tokens=True)
    assert capsys.readouterr().out.startswith(expected + "\n[vanilla] 10 tokens")
    # A continuation that starts a new word (the case that printed "Lily wanted togo").
    from eagle_engine import GenerationResult

    words = tok("Lily wanted to go to the park", add_special_tokens=True)["input_ids"][len(prompt) :]

    def fixed(self, ids, max_new_tokens, **kwargs):
        return GenerationResult(words, "max_new_tokens", len(ids), decode_seconds=0.01)

    monkeypatch.setattr(EagleEngine, "generate_vanilla", fixed)
    assert main(args) == 0
    assert capsys.readouterr().out.startswith("Lily wanted to go to the park\n[vanilla]")


# ------------------------------------------------------------------------------------- shared CLI flags


@pytest.fixture(scope="module")
def pair(tmp_path_factory, reference_ops):
    """A tiny Llama with a byte-level BPE tokenizer and a random EAGLE-1 head for it."""
    from transformers import AutoTokenizer

    d = str(tmp_path_factory.mktemp("byom"))
    make_tokenizer(d)
    vocab = len(AutoTokenizer.from_pretrained(d))
    save(make_hf_model("llama", vocab_size=vocab, max_position_embeddings=160), d)
    head = make_head_dir(EagleEngine.from_pretrained(d), "eagle1", str(tmp_path_factory.mktemp("head")))
    return d, head


@pytest.fixture(scope="module")
def code_corpus(tmp_path_factory):
    """Two long text files of Python source in one directory."""
    d = tmp_path_factory.mktemp("corpus")
    (d / "a.py").write_text(inspect.getsource(json))
    (d / "b.py").write_text(inspect.getsource(argparse)[:20000])
    return str(d)


def test_generate_compare_says_whether_outputs_are_identical(pair, capsys):
    base, head = pair
    args = ["generate", "--base", base, "--draft", head, "--prompt", "import os", "--max-new-tokens", "8"]
    assert main(args + ["--compare", "--threads", "1"]) == 0
    assert "outputs identical: yes" in capsys.readouterr().out


def test_stop_token_ids(pair, capsys):
    base, _ = pair
    from eagle_engine.tools.common import load_tokenizer

    prompt = load_tokenizer(base)("def f(", add_special_tokens=True)["input_ids"]
    first = EagleEngine.from_pretrained(base).generate_vanilla(prompt, 1, stop_token_ids=[]).tokens[0]
    args = ["generate", "--base", base, "--prompt", "def f(", "--max-new-tokens", "8"]
    assert main(args + ["--stop-token-ids", f"{first},3"]) == 0
    out = capsys.readouterr().out
    assert "[vanilla] 1 tokens" in out and "stop: stop_token" in out
    assert common.token_id_list(" 1, 2 ") == [1, 2] and common.token_id_list("") == []
    with pytest.raises(SystemExit):
        main(args + ["--stop-token-ids", "1,x"])
    assert "--stop-token-ids" in capsys.readouterr().err


def test_compare_under_sampling_says_that_outputs_differ_by_design(pair, capsys):
    base, head = pair
    args = ["generate", "--base", base, "--draft", head, "--prompt", "import os", "--max-new-tokens", "16"]
    assert main(args + ["--compare", "--threads", "1", "--temperature", "1.5", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    assert "outputs identical: no (expected when sampling" in out, out


@pytest.mark.parametrize("flags, named", [
    (["generate", "--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["serve", "--port", "99999"], "--port"),
    (["serve", "--log-level", "bogus"], "--log-level"),
])
def test_bad_flags_fail_before_anything_loads(flags, named, monkeypatch, capsys):
    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the flags were checked")

    monkeypatch.setattr(EagleEngine, "from_pretrained", refuse)
    with pytest.raises(SystemExit) as e:
        main(flags)
    err = capsys.readouterr().err
    assert e.value.code == 2 and named in err and "Traceback" not in err


def test_a_draft_without_base_names_the_demo_target(pair, capsys):
    _, head = pair  # a head for another model than the demo's
    assert main(["generate", "--draft", head, "--prompt", "x", "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert "embedded demo model" in err and "--base" in err


def test_seed_outside_int64_is_a_clear_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", "--prompt", "x", "--seed", "99999999999999999999999"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--seed" in err and "9223372036854775807" in err and "Traceback" not in err


def test_threads_flag_and_default(monkeypatch, capsys):
    before = torch.get_num_threads()
    try:
        for cores, expected in ((1, 1), (2, 1), (4, 2), (16, 4), (None, 1)):
            monkeypatch.setattr(os, "cpu_count", lambda c=cores: c)
            assert cpu_threads.default_threads() == expected
        assert cpu_threads.set_threads(None) == 1 and torch.get_num_threads() == 1
        assert cpu_threads.set_threads(2) == 2 and torch.get_num_threads() == 2
        parser = argparse.ArgumentParser()
        common.add_threads_arg(parser)
        assert parser.parse_args(["--threads", "3"]).threads == 3
        with pytest.raises(SystemExit):
            parser.parse_args(["--threads", "0"])
    finally:
        torch.set_num_threads(before)
    for command in ("generate", "train-draft", "bench", "demo"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert "--threads" in capsys.readouterr().out, command


def test_the_api_sets_the_commands_default_threads(pair, monkeypatch, caplog):
    """from_pretrained on a CPU: threads=None sets the commands' default (and logs it), N sets N, 0 leaves
    torch's setting; a bad count is an error before anything loads."""
    import logging

    base, _ = pair
    before = torch.get_num_threads()
    monkeypatch.setattr(os, "cpu_count", lambda: 8)  # the default would be 4
    try:
        torch.set_num_threads(7)
        with caplog.at_level(logging.INFO, logger="eagle_engine"):
            EagleEngine.from_pretrained(base)
        assert torch.get_num_threads() == 4 and "torch CPU threads: 4" in caplog.text
        EagleEngine.from_pretrained(base, threads=3)
        assert torch.get_num_threads() == 3
        torch.set_num_threads(5)
        EagleEngine.from_pretrained(base, threads=0)
        assert torch.get_num_threads() == 5
        with pytest.raises(EagleError, match="threads"):
            EagleEngine.from_pretrained(base, threads=-2)
    finally:
        torch.set_num_threads(before)


def test_the_commands_keep_their_threads_through_loading(pair, monkeypatch, capsys):
    """``--threads N`` is what runs: loading the model (whose API default would be 4 here) keeps it."""
    from eagle_engine.serve.server import load
    from eagle_engine.tools.cli import build_parser

    base, head = pair
    before = torch.get_num_threads()
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    try:
        assert main(["generate", "--base", base, "--draft", head, "--prompt", "x", "--max-new-tokens", "2",
                     "--threads", "3"]) == 0
        assert torch.get_num_threads() == 3
        pytest.importorskip("fastapi")
        args = build_parser().parse_args(["serve", "--base", base, "--threads", "2", "--tree", "chain"])
        cpu_threads.set_threads(args.threads)  # what eagle serve does first
        load(args)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    capsys.readouterr()


def test_model_directory_is_checked_before_the_tokenizer(tmp_path, pair, capsys):
    assert main(["generate", "--base", str(tmp_path / "nonexistent"), "--prompt", "x"]) == 2
    assert "model directory not found" in capsys.readouterr().err
    assert main(["generate", "--base", str(tmp_path), "--prompt", "x"]) == 2  # an empty directory
    assert "config.json" in capsys.readouterr().err
    no_tok = tmp_path / "no_tokenizer"
    save(make_hf_model("llama"), str(no_tok))
    assert main(["generate", "--base", str(no_tok), "--prompt", "x"]) == 2
    assert "no tokenizer in" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ corpora


def test_corpus_formats(tmp_path, pair):
    d = tmp_path / "docs"
    (d / "sub").mkdir(parents=True)
    (d / "b.txt").write_text("second file")
    (d / "a.txt").write_text("one<SEP>two<SEP>  <SEP>three")
    (d / "sub" / "c.jsonl").write_text(
        '{"text": "from jsonl"}\n\n{"title": "no text"}\n{"text": ""}\n{"text": "again"}\n'
    )
    (d / ".hidden").write_text("never read")
    corpus = read_documents([str(d)], doc_separator="<SEP>")
    assert corpus.documents == ["one", "two", "three", "second file", "from jsonl", "again"]
    assert [os.path.basename(f) for f in corpus.files] == ["a.txt", "b.txt", "c.jsonl"]
    assert corpus.skipped == {"empty document(s)": 2, "JSON record(s) without a string 'text' field": 1}
    assert "6 document(s) from 3 file(s)" in corpus.describe() and "skipped" in corpus.describe()
    assert read_documents([str(d / "a.txt")]).documents == ["one<SEP>two<SEP>  <SEP>three"]
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(TrainingInputError, match="bad.jsonl line 2 is not JSON"):
        read_documents([str(tmp_path / "bad.jsonl")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(TrainingInputError, match="holds no files"):
        read_documents([str(tmp_path / "empty")])
    from eagle_engine.tools.common import load_tokenizer

    tok = load_tokenizer(pair[0])
    stream = token_stream(tok, ["ab", "cd"])
    bos = tok.bos_token_id
    assert bos is not None and stream.count(bos) == 2 and stream[0] == bos


# ---------------------------------------------------------------------------- train-draft fails fast


def job(base, corpus, out, **changes):
    settings = dict(steps=2, seq_len=32, batch_size=2, checkpoint_every=1, eval_prompts=1, eval_new_tokens=8)
    settings["show_progress"] = False
    return DraftTrainJob(base=base, corpus=[corpus], out=str(out), **{**settings, **changes})


@pytest.fixture
def no_training(monkeypatch):
    """Any training step or target load fails the test: the checks must come first."""
    import eagle_engine.tools.train as train

    def forbidden(*args, **kwargs):
        raise AssertionError("training started before the inputs were checked")

    monkeypatch.setattr(train, "train_head", forbidden)


def test_short_evaluation_corpus_fails_before_the_first_step(pair, code_corpus, tmp_path, no_training):
    short = tmp_path / "short.txt"
    short.write_text("x = 1\n" * 50)  # 300 characters: no 800-character text to cut 400-character prompts
    out = tmp_path / "out"
    started = time.perf_counter()
    with pytest.raises(TrainingInputError, match="--eval-prompt-chars") as e:
        train_draft(job(pair[0], code_corpus, out, eval_corpus=[str(short)]))
    assert time.perf_counter() - started < 10
    assert "--eval-data" in str(e.value) and "800" in str(e.value) and "--eval-prompts 0" in str(e.value)
    assert not os.path.exists(out / "checkpoint") and not os.path.exists(out / "config.json")


def test_seq_len_beyond_the_model_fails_before_the_first_step(
    pair, code_corpus, tmp_path, no_training, capsys
):
    out = tmp_path / "out"
    for seq_len in (1024, 200):  # 160 positions: a raw IndexError, and silently training past the range
        started = time.perf_counter()
        with pytest.raises(TrainingInputError, match="--seq-len") as e:
            train_draft(job(pair[0], code_corpus, out, seq_len=seq_len))
        assert "max_position_embeddings 160" in str(e.value)
        assert time.perf_counter() - started < 10
    assert not os.path.exists(out / "checkpoint")
    args = ["train-draft", "--base", pair[0], "--corpus", code_corpus, "--out", str(out), "--seq-len", "1024"]
    assert main(args) == 2
    assert "max_position_embeddings" in capsys.readouterr().err


def test_unwritable_output_fails_before_the_first_step(pair, code_corpus, tmp_path, no_training):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(TrainingInputError, match="--out"):
        train_draft(job(pair[0], code_corpus, blocker / "out"))


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("lr", float("nan"), r"lr \(--lr\) must be a finite number"),
        ("lr", 0.0, r"lr \(--lr\) must be > 0"),
        ("batch_size", 0, r"batch_size \(--batch-size\) must be >= 1"),
        ("eval_prompt_chars", 0, r"--eval-prompt-chars"),
        ("steps", 2.5, r"steps \(--steps\) must be a whole number"),
    ],
)
def test_each_bad_setting_is_named(pair, code_corpus, tmp_path, field, value, match):
    with pytest.raises(TrainingInputError, match=match) as e:
        job(pair[0], code_corpus, tmp_path, **{field: value})
    assert "DraftTrainJob(" not in str(e.value)
    with pytest.raises(TrainingInputError, match=r"noise \(--noise\) must be a finite number"):
        TrainConfig(noise=float("inf"))


def test_cli_names_a_nan_lr(pair, code_corpus, tmp_path, capsys):
    args = ["train-draft", "--base", pair[0], "--corpus", code_corpus, "--out", str(tmp_path), "--lr", "nan"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "lr (--lr) must be a finite number" in err and "DraftTrainJob" not in err


def test_train_draft_on_jsonl_with_prompt_chars_flag_reports_inputs(pair, tmp_path, capsys):
    records = [{"text": inspect.getsource(json)}, {"text": "tiny"}, {"x": 1}]
    lines = [json.dumps(r) for r in records]
    (tmp_path / "c.jsonl").write_text("\n".join(lines))
    out = tmp_path / "head"
    args = ["train-draft", "--base", pair[0], "--corpus", str(tmp_path / "c.jsonl"), "--out", str(out)]
    args += ["--steps", "1", "--seq-len", "32", "--batch-size", "2", "--eval-prompts", "1"]
    args += ["--eval-new-tokens", "8", "--eval-prompt-chars", "60", "--threads", "1"]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "2 document(s) from 1 file(s); skipped: 1 JSON record(s) without a string 'text' field" in err
    assert "evaluation prompts: cut from 1 of 2 document(s) (1 shorter than 120 characters skipped" in err
    summary = json.loads((out / "eval.json").read_text())
    assert summary["inputs"]["eval_texts"] == 1 and summary["mean_accept_length"] >= 1.0


# ------------------------------------------------------------------------------------------- eagle bench


def test_eagle_bench_end_to_end(pair, code_corpus, tmp_path, capsys):
    base, head = pair
    out = tmp_path / "bench.json"
    args = ["bench", "--base", base, "--draft", head, "--corpus", code_corpus, "--prompts", "2"]
    args += ["--max-new-tokens", "8", "--repeats", "1", "--json", str(out), "--threads", "1"]
    args += ["--prompt-chars", "200"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "EAGLE tok/s min/med/max" in printed and "chain" in printed and "load average" in printed
    result = json.loads(out.read_text())
    assert [r["tree"] for r in result["rows"]] == ["dynamic", "static", "chain"]
    for row in result["rows"]:
        assert row["identical"] == "2/2" and row["mean_accept_length"] >= 1.0
        assert set(row["eagle_tok_s"]) == {"min", "median", "max"} and row["speedup"] > 0
    assert result["threads"] == 1 and result["machine"] and result["command"].startswith("eagle bench")


def test_eagle_bench_takes_the_auto_tree(pair, code_corpus, monkeypatch, capsys):
    from eagle_engine.tools import bench

    measured = []
    monkeypatch.setattr(bench, "measure_trees", lambda engine, prompts, trees, *a, **k: measured.extend(trees)
                        or [])
    base, head = pair
    args = ["bench", "--base", base, "--draft", head, "--corpus", code_corpus, "--prompts", "1"]
    assert main(args + ["--trees", "auto,chain", "--prompt-chars", "200", "--threads", "1"]) == 0
    assert measured == ["auto", "chain"]


def test_eagle_bench_repeats_and_bad_input(pair, code_corpus, tmp_path, capsys):
    from eagle_engine.tools.bench import measure_tree

    base, head = pair
    engine = EagleEngine.from_pretrained(base, head, tree="chain")
    row = measure_tree(engine, [[5, 6, 7], [8, 9]], 4, repeats=3, stop_token_ids=[])
    spread = row["vanilla_tok_s"]
    assert spread["min"] <= spread["median"] <= spread["max"] and row["identical"] == "2/2"
    args = ["bench", "--base", base, "--corpus", code_corpus]
    assert main(args) == 2 and "--draft" in capsys.readouterr().err
    assert main(args + ["--draft", head, "--trees", "chain,bushy"]) == 2
    assert "bushy" in capsys.readouterr().err
    assert main(["bench", "--draft", head, "--corpus", code_corpus]) == 2  # no --base: said so
    assert "--base" in capsys.readouterr().err
    short = tmp_path / "short.txt"
    short.write_text("x = 1\n")
    assert main(["bench", "--base", base, "--draft", head, "--corpus", str(short)]) == 2
    assert "--prompt-chars" in capsys.readouterr().err
