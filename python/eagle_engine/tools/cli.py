"""The ``eagle`` command: ``eagle generate`` (vanilla or EAGLE), ``train-draft``, ``bench`` and ``demo``."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

from ..engine.cpu_threads import set_threads
from ..errors import EagleError
from ..speculative.methods import METHODS
from .common import (
    add_stop_arg,
    add_threads_arg,
    check_model_dir,
    load_tokenizer,
    non_negative_seconds,
    port_int,
    positive_int,
    positive_seconds,
    report,
    seed_int,
)
from .conversations import DATA_FORMATS
from .model_args import method_kwargs, naming_the_demo_target, use_demo_target

TREE_CHOICES = ("dynamic", "static", "chain", "auto")
LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")  # uvicorn's


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--base",
        default=None,
        help="target model directory (Hugging Face format, with tokenizer); omit: the embedded demo pair",
    )
    p.add_argument(
        "--draft",
        default=None,
        help="draft head directory: an EAGLE-1/2/3 head (official, SGLang or vLLM format) or Medusa-1 heads, "
        "told apart by their files; omit: vanilla (with --base), the demo's EAGLE head (without --base)",
    )
    p.add_argument(
        "--method",
        default=None,
        choices=METHODS,
        help="speculative method (default: the --draft head's, eagle or medusa); lookahead and prompt_lookup "
        "need no --draft",
    )
    p.add_argument(
        "--method-settings",
        default=None,
        metavar="JSON",
        help='settings of a medusa, lookahead or prompt_lookup method as JSON, e.g. \'{"window": 5, '
        '"ngram": 4, "guesses": 5}\' (default: the method\'s defaults)',
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--dtype", default="float32", help="float32, float16 or bfloat16 (default: float32)")


def _add_draft_vocab_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--draft-vocab-size", type=positive_int, default=None,
                   help="an EAGLE-1/2 head drafts from the N most frequent tokens only (a smaller LM head "
                   "read per draft level; lossless), with --draft-vocab-frequencies")
    p.add_argument("--draft-vocab-frequencies", default=None, metavar="FILE",
                   help="token counts choosing the draft vocabulary (eagle prepare-data --token-frequencies)")


def _add_cache_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-model-len", type=positive_int, default=None,
                   help="longest prompt + output of a request (default: the model's maximum, at most 4096); "
                   "a limit per request: nothing is reserved for it")
    p.add_argument("--kv-cache-memory", default=None, metavar="SIZE",
                   help="bytes of the paged KV cache, e.g. 8GiB or 512MiB (default: 90%% of the free memory "
                   "on CUDA, 1GiB on a CPU; a pool takes what --max-batch-size sequences of --max-model-len "
                   "need, at most that)")
    p.add_argument("--block-size", type=positive_int, default=16, help="tokens per KV cache block (16)")
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                   help="reuse the KV blocks of prompt prefixes seen before (default: on)")
    p.add_argument("--max-prefill-tokens", type=positive_int, default=2048,
                   help="prompt tokens prefilled per step at most: a long prompt joins in chunks while the "
                   "running requests keep decoding (2048)")


def _add_tensor_parallel_arg(p: argparse.ArgumentParser, usage: str) -> None:
    p.add_argument(
        "--tensor-parallel-size",
        type=positive_int,
        default=1,
        help="shard the target over N ranks: launch with torchrun --nproc-per-node N -m eagle_engine "
        f"{usage} (default: 1)",
    )


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=positive_int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=seed_int, default=None, help="sampling seed (an int64)")
    add_stop_arg(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="eagle", description="EAGLE speculative decoding engine")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="complete a prompt and report tokens/s")
    _add_model_args(gen)
    gen.add_argument("--prompt", required=True, help="prompt text")
    gen.add_argument("--compare", action="store_true", help="also run vanilla decoding and compare")
    _add_draft_vocab_args(gen)
    gen.add_argument(
        "--tree",
        default=None,
        choices=TREE_CHOICES,
        help="EAGLE draft tree: EAGLE-2 dynamic (default: 60 nodes, depth 6, top-k 10), EAGLE-1 static, "
        "chain, or auto (the size that maximises tokens/s on this device, measured once and cached); Medusa "
        "heads draft their own static tree",
    )
    _add_tensor_parallel_arg(gen, "generate ...; only rank 0 prints")
    _add_sampling_args(gen)
    add_threads_arg(gen)
    _add_train_parser(sub)
    _add_features_parser(sub)
    _add_bench_parser(sub)
    _add_demo_parser(sub)
    _add_prepare_data_parser(sub)
    _add_serve_parser(sub)
    _add_convert_parser(sub)
    return parser


def _add_train_parser(sub) -> None:
    tr = sub.add_parser("train-draft", help="train an EAGLE draft head (or Medusa heads) for a target")
    tr.add_argument("--base", required=True, help="target model directory (HF format, with tokenizer)")
    tr.add_argument(
        "--data",
        "--corpus",
        dest="data",
        nargs="+",
        default=None,
        help="training data: files or directories (their files, sorted). Conversations: ShareGPT JSON/JSONL "
        "('conversations': [{from, value}]) or OpenAI-style 'messages' JSONL, rendered with the chat "
        "template, loss on the assistant's tokens. Text: .jsonl with a 'text' field, or UTF-8 text files "
        "(one document each, or split on --doc-separator)",
    )
    tr.add_argument("--data-format", choices=DATA_FORMATS, default=None,
                    help="text, sharegpt or messages (default: detected from the first record)")
    tr.add_argument("--chat-template", default=None, metavar="FILE",
                    help="a Jinja chat template to render conversations with (default: the tokenizer's)")
    tr.add_argument("--features", default=None, metavar="DIR",
                    help="train from cached features (eagle prepare-features) instead of --data; the "
                    "target's layers are then loaded only for the evaluation")
    tr.add_argument("--doc-separator", default=None, help="split text files into documents on this string")
    tr.add_argument("--out", required=True, help="output directory: head, eval.json, checkpoint/")
    tr.add_argument(
        "--method", choices=("eagle", "medusa"), default="eagle", help="an EAGLE head or Medusa-1 heads"
    )
    tr.add_argument("--kind", choices=("eagle1", "eagle3"), default=None, help="EAGLE head kind (eagle1)")
    tr.add_argument("--medusa-heads", type=int, default=None, help="Medusa heads: tokens drafted ahead (4)")
    tr.add_argument("--medusa-layers", type=int, default=None, help="residual blocks per Medusa head (1)")
    tr.add_argument("--steps", type=int, default=1000)
    tr.add_argument("--seq-len", type=int, default=256, help="tokens per training sequence")
    tr.add_argument("--batch-size", type=int, default=8, help="rows per rank and micro-batch (default: 8)")
    tr.add_argument("--accumulation-steps", type=int, default=1,
                    help="micro-batches per rank and step; global batch = batch size x ranks x this (1)")
    tr.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (warm-up, cosine decay)")
    tr.add_argument("--checkpoint-every", type=int, default=100, help="steps between checkpoints")
    tr.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    tr.add_argument("--eval-data", "--eval-corpus", dest="eval_data", nargs="+", default=None,
                    help="held-out data for the acceptance (as --data; default: the training data)")
    tr.add_argument("--eval-prompts", type=int, default=8, help="prompts for the acceptance (0: skip)")
    tr.add_argument("--eval-every", type=int, default=0,
                    help="steps between acceptance measurements while training (0: only at the end)")
    tr.add_argument("--draft-vocab-size", type=int, default=None,
                    help="EAGLE-3: a draft vocabulary of the N most frequent trained tokens (default: all)")
    tr.add_argument("--token-frequencies", default=None, metavar="FILE",
                    help="token counts (eagle prepare-data --token-frequencies) that choose the draft "
                    "vocabulary (default: counted from --data)")
    tr.add_argument(
        "--eval-prompt-chars",
        type=int,
        default=400,
        help="characters per evaluation prompt; texts shorter than twice this are skipped (default: 400)",
    )
    tr.add_argument("--eval-new-tokens", type=int, default=64)
    tr.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    tr.add_argument("--seed", type=seed_int, default=0)
    add_threads_arg(tr)


def _add_features_parser(sub) -> None:
    pf = sub.add_parser("prepare-features", help="cache a target's features for train-draft --features")
    pf.add_argument("--base", required=True, help="target model directory (HF format, with tokenizer)")
    pf.add_argument("--data", required=True, nargs="+", help="training data, as train-draft's --data")
    pf.add_argument("--data-format", choices=DATA_FORMATS, default=None, help="default: detected")
    pf.add_argument("--chat-template", default=None, metavar="FILE", help="as train-draft's")
    pf.add_argument("--doc-separator", default=None, help="split text files into documents on this string")
    pf.add_argument("--out", required=True, help="feature directory (features.json + safetensors shards)")
    pf.add_argument("--kind", choices=("eagle1", "eagle3", "medusa"), default="eagle1",
                    help="the head the features are for: eagle1 and medusa read the top layer; eagle3 also "
                    "three inner layers (4x the disk)")
    pf.add_argument("--seq-len", type=positive_int, default=256, help="tokens per row (as train-draft's)")
    pf.add_argument("--batch-size", type=positive_int, default=8, help="rows per target forward (8)")
    pf.add_argument("--shard-rows", type=positive_int, default=256, help="rows per safetensors shard (256)")
    pf.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    pf.add_argument("--dtype", default=None,
                    help="the target's (and the features') dtype (default: bfloat16 on CUDA, else float32)")
    add_threads_arg(pf)


def _add_prepare_data_parser(sub) -> None:
    pd = sub.add_parser(
        "prepare-data",
        help="conversations rewritten by the target (--regenerate) as messages "
        "JSONL, and the frequencies of the tokens training sees",
        description="Chat data for train-draft: conversations as 'messages' JSONL, their assistant turns "
        "rewritten by the target with --regenerate (resumable), and token frequencies. A flag that would "
        "change nothing (an engine or sampling flag without --regenerate, --seq-len without "
        "--token-frequencies, ...) is an error.",
    )
    io = pd.add_argument_group("data and outputs")
    io.add_argument(
        "--base",
        default=None,
        metavar="DIR",
        help="target model directory (Hugging Face format, with tokenizer); required",
    )
    io.add_argument(
        "--data",
        required=True,
        nargs="+",
        metavar="PATH",
        help="conversations (ShareGPT or 'messages' JSON/JSONL; files or directories), or text "
        "data for --token-frequencies alone; required",
    )
    io.add_argument(
        "--data-format",
        choices=DATA_FORMATS,
        default=None,
        help="the format of --data (default: detected from the first record)",
    )
    io.add_argument(
        "--chat-template",
        default=None,
        metavar="FILE",
        help="a Jinja chat template to render the conversations with (default: the tokenizer's); used by "
        "--regenerate and --token-frequencies",
    )
    io.add_argument(
        "--out",
        default=None,
        metavar="FILE.jsonl",
        help="the conversations as 'messages' JSONL (default: none; needed with conversation data); with "
        "--regenerate, appended batch by batch and resumed, its settings in FILE.jsonl.prepare.json",
    )
    io.add_argument(
        "--limit",
        type=positive_int,
        default=None,
        metavar="N",
        help="only the first N conversations (default: all)",
    )
    io.add_argument(
        "--token-frequencies",
        default=None,
        metavar="FREQ.json",
        help="also count the tokens the training loss covers, for train-draft --token-frequencies "
        "(default: not counted)",
    )
    io.add_argument(
        "--seq-len",
        type=positive_int,
        default=None,
        metavar="N",
        help="with --token-frequencies: the training row length the counted rows are cut to, give "
        "train-draft's (default: 256)",
    )
    rg = pd.add_argument_group(
        "regeneration", "only with --regenerate; the engine is built as eagle generate builds it"
    )
    rg.add_argument(
        "--regenerate",
        action="store_true",
        help="rewrite every assistant turn with the target (default: off: a format conversion only)",
    )
    rg.add_argument(
        "--draft",
        default=None,
        metavar="DIR",
        help="draft head directory, for faster generation: an EAGLE-1/2/3 head or Medusa-1 heads "
        "(default: none, vanilla decoding)",
    )
    rg.add_argument(
        "--method",
        default=None,
        choices=METHODS,
        help="speculative method (default: the --draft head's, eagle or medusa; without --draft: vanilla); "
        "lookahead and prompt_lookup need no --draft",
    )
    rg.add_argument(
        "--method-settings",
        default=None,
        metavar="JSON",
        help="settings of a medusa, lookahead or prompt_lookup method as JSON (default: the method's)",
    )
    rg.add_argument(
        "--tree",
        default=None,
        choices=TREE_CHOICES,
        help="EAGLE draft tree, as generate's (default: dynamic)",
    )
    rg.add_argument(
        "--max-new-tokens",
        type=positive_int,
        default=None,
        metavar="N",
        help="at most N tokens per assistant turn (default: 512)",
    )
    rg.add_argument(
        "--temperature",
        type=float,
        default=None,
        metavar="T",
        help="sampling temperature (default: 0, greedy)",
    )
    rg.add_argument(
        "--top-p",
        type=float,
        default=None,
        metavar="P",
        help="sample from the most likely tokens of total probability P (default: 1, all)",
    )
    rg.add_argument(
        "--top-k",
        type=int,
        default=None,
        metavar="K",
        help="sample from the K most likely tokens (default: 0, all)",
    )
    rg.add_argument(
        "--seed",
        type=seed_int,
        default=None,
        help="sampling seed: each turn's seed derives from it, the conversation's id and the turn "
        "(default: none; sampling then draws one)",
    )
    rg.add_argument(
        "--batch-size",
        type=positive_int,
        default=None,
        metavar="N",
        help="conversations regenerated together, also the engine's batch size (default: 16)",
    )
    rg.add_argument("--device", default=None, help="cpu or cuda (default: cpu)")
    rg.add_argument("--dtype", default=None, help="float32, float16 or bfloat16 (default: float32)")
    add_threads_arg(rg)


def _add_bench_parser(sub) -> None:
    b = sub.add_parser("bench", help="EAGLE vs vanilla tokens/s and acceptance on prompts cut from a corpus")
    _add_model_args(b)
    b.set_defaults(draft=None)
    _add_draft_vocab_args(b)
    b.add_argument("--corpus", required=True, nargs="+", help="text to cut prompts from (as train-draft's)")
    b.add_argument("--doc-separator", default=None, help="split text files into documents on this string")
    b.add_argument("--trees", default="dynamic,static,chain",
                   help="comma-separated draft trees to measure, of: dynamic, static, chain, auto")
    b.add_argument("--max-new-tokens", type=positive_int, default=64)
    b.add_argument("--prompts", type=positive_int, default=8, help="prompts cut from the corpus (default: 8)")
    b.add_argument("--prompt-chars", type=positive_int, default=400, help="characters per prompt (400)")
    b.add_argument("--repeats", type=positive_int, default=3, help="interleaved repeats (default: 3)")
    b.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    b.add_argument("--seed", type=seed_int, default=0, help="prompt choice and sampling seed")
    add_stop_arg(b)
    b.add_argument("--json", default=None, metavar="OUT", help="also write the results as JSON to OUT")
    add_threads_arg(b)


def _add_demo_parser(sub) -> None:
    demo = sub.add_parser("demo", help="complete Python code with the embedded demo pair: EAGLE vs vanilla")
    demo.add_argument("--prompt", default=None, help="prompt text (default: a small Python snippet)")
    demo.add_argument("--max-new-tokens", type=positive_int, default=128)
    demo.add_argument(
        "--tree",
        default="auto",
        choices=("auto", "dynamic", "static", "chain"),
        help="draft tree; auto (default): sized to the device, measured once and cached (a short chain on a "
        "CPU, where verifying a big tree costs as much compute as decoding its tokens one by one)",
    )
    demo.add_argument(
        "--head",
        default="eagle2",
        choices=("eagle2", "eagle3"),
        help="the embedded draft head: eagle2 (default: the EAGLE-1/2 head) or eagle3 (the EAGLE-3 head)",
    )
    demo.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    demo.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        help="CPU threads for torch (default: 1: the demo model is so small that more threads cost more "
        "in hand-offs than they save)",
    )


def _add_serve_parser(sub) -> None:
    sv = sub.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching")
    _add_model_args(sv)
    _add_draft_vocab_args(sv)
    _add_cache_args(sv)
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=port_int, default=8000)
    sv.add_argument("--max-batch-size", type=positive_int, default=8, help="sequences decoded together")
    sv.add_argument("--max-queue", type=positive_int, default=256, help="requests waiting before a 503")
    sv.add_argument("--max-request-bytes", type=positive_int, default=2 * 1024 * 1024,
                    help="larger request bodies answer 413 before they are read (default: 2 MiB)")
    sv.add_argument("--queue-timeout", type=positive_seconds, default=300.0,
                    help="seconds a request may wait for a slot before it answers 503, unless the request "
                    "gives its own 'timeout' (default: 300)")
    sv.add_argument(
        "--tree",
        default="auto",
        choices=TREE_CHOICES,
        help="EAGLE draft tree; auto (default): sized to the device, measured once and cached",
    )
    sv.add_argument(
        "--shutdown-timeout",
        type=non_negative_seconds,
        default=30.0,
        help="on SIGTERM or Ctrl-C, seconds to let running requests finish before they are cancelled (30)",
    )
    sv.add_argument("--log-level", default="info", choices=LOG_LEVELS, help="uvicorn's log level (info)")
    _add_tensor_parallel_arg(sv, "serve ...; rank 0 serves HTTP and schedules, every rank runs the steps")
    add_threads_arg(sv)


def _add_convert_parser(sub) -> None:
    from ..models.head_formats import FORMATS

    cv = sub.add_parser("convert-head", help="write an EAGLE draft head in another engine's format")
    cv.add_argument("src", help="draft head directory, in any of the formats (told apart by its config.json)")
    cv.add_argument(
        "--to",
        required=True,
        choices=FORMATS,
        help="official (SafeAILab EAGLE, this engine), sglang (SGLang, as SpecForge writes it) or vllm "
        "(vLLM, as the speculators library writes it; EAGLE-3 heads only)",
    )
    cv.add_argument("--out", required=True, help="output directory (new or empty)")
    cv.add_argument(
        "--base",
        default=None,
        help="the target model directory (optional): checks the head fits it and records it as vLLM's "
        "verifier, with the target layers feeding an EAGLE-3 head",
    )


def cmd_generate(args) -> None:
    from ..engine.engine import EagleEngine

    set_threads(args.threads)
    on_demo = use_demo_target(args)
    check_model_dir(args.base)  # a missing directory or config.json is named before any tokenizer problem
    tokenizer = load_tokenizer(args.base)
    with naming_the_demo_target(on_demo):
        engine = EagleEngine.from_pretrained(
            args.base, args.draft, device=args.device, dtype=args.dtype, threads=0,  # (set above)
            tensor_parallel_size=args.tensor_parallel_size, **method_kwargs(args),
        )
    with contextlib.ExitStack() as stack:
        stack.callback(engine.close)  # every rank's engine thread ends before the process group does
        if args.tensor_parallel_size > 1 and _rank() != 0:  # only rank 0 prints
            stack.enter_context(contextlib.redirect_stdout(stack.enter_context(open(os.devnull, "w"))))
        _generate(args, engine, tokenizer)


def _rank() -> int:
    """This process's rank under torchrun (0 otherwise)."""
    return int(os.environ.get("RANK", "0"))


def _generate(args, engine, tokenizer) -> None:
    from .detokenize import decode_new

    ids = tokenizer(args.prompt, add_special_tokens=True)["input_ids"]
    sampling = dict(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed)
    sampling["stop_token_ids"] = args.stop_token_ids
    eagle = None
    if engine.method is not None:
        eagle = engine.generate(ids, args.max_new_tokens, **sampling)
        report(engine.method, eagle, args.prompt + decode_new(tokenizer, ids, eagle.tokens))
    if engine.method is None or args.compare:
        vanilla = engine.generate_vanilla(ids, args.max_new_tokens, **sampling)
        text = args.prompt + decode_new(tokenizer, ids, vanilla.tokens)
        report("vanilla", vanilla, text if engine.method is None else None)
        if eagle is not None:
            same = eagle.tokens == vanilla.tokens
            note = ""
            if not same and args.temperature > 0:
                note = (" (expected when sampling: both follow the target's distribution but draw their "
                        "random numbers differently; greedy outputs are identical)")
            print(f"outputs identical: {'yes' if same else 'no'}{note}")
            if eagle.total_seconds > 0 and vanilla.total_seconds > 0:
                print(f"speedup: {eagle.tokens_per_second / vanilla.tokens_per_second:.2f}x")


def cmd_train_draft(args) -> None:
    from .train import DraftTrainJob, train_draft

    set_threads(args.threads)
    _check_method_flags(args)
    medusa = {"medusa_heads": args.medusa_heads, "medusa_layers": args.medusa_layers}
    job = DraftTrainJob(
        base=args.base,
        corpus=args.data,
        data_format=args.data_format,
        chat_template=args.chat_template,
        features=args.features,
        accumulation_steps=args.accumulation_steps,
        eval_every=args.eval_every,
        draft_vocab_size=args.draft_vocab_size,
        token_frequencies=args.token_frequencies,
        out=args.out,
        method=args.method,
        kind=args.kind or "eagle1",
        **{k: v for k, v in medusa.items() if v is not None},
        steps=args.steps,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        lr=args.lr,
        checkpoint_every=args.checkpoint_every,
        resume=args.resume,
        eval_corpus=args.eval_data,
        eval_prompts=args.eval_prompts,
        eval_prompt_chars=args.eval_prompt_chars,
        doc_separator=args.doc_separator,
        eval_new_tokens=args.eval_new_tokens,
        device=args.device,
        seed=args.seed,
    )
    summary = train_draft(job)
    if _rank() != 0:
        return
    print(f"head saved to {args.out} after {summary['steps']} steps (final loss {summary['final_loss']:.4f})")
    if "mean_accept_length" in summary:
        where = "held-out" if summary["held_out"] else "training"
        print(f"mean acceptance length: {summary['mean_accept_length']:.2f} ({where} text, greedy)")


def _check_method_flags(args) -> None:
    """Flags of the other method are errors, not silently ignored."""
    from .train import TrainingInputError

    if args.method == "medusa" and args.kind is not None:
        raise TrainingInputError("--kind is for --method eagle (Medusa: --medusa-heads, --medusa-layers)")
    given = [f for f in ("medusa_heads", "medusa_layers") if getattr(args, f) is not None]
    if args.method == "eagle" and given:
        raise TrainingInputError(f"--{given[0].replace('_', '-')} is for --method medusa")


def cmd_prepare_features(args) -> None:
    from .prepare_features import prepare_features

    set_threads(args.threads)
    manifest = prepare_features(args)
    print(f"{manifest['rows']} rows of {args.kind} features written to {args.out}")


def cmd_prepare_data(args) -> None:
    from .prepare_data import describe, job_from_args, run_prepare_data

    job = job_from_args(args)  # a flag that would change nothing fails here, before anything is set
    set_threads(args.threads)
    for line in describe(run_prepare_data(job)):
        print(line)


def cmd_demo(args) -> None:
    from .demo import run_demo

    run_demo(args.prompt, args.max_new_tokens, args.tree, args.device, threads=args.threads, head=args.head)


def cmd_bench(args) -> None:
    from .bench import run_bench

    if args.draft is None:
        raise EagleError("eagle bench needs --draft: the EAGLE head measured against vanilla decoding")
    if args.base is None:
        raise EagleError("eagle bench needs --base: the target model the --draft head was trained for")
    if args.method not in (None, "eagle"):
        raise EagleError("eagle bench measures EAGLE trees; benchmarks/methods.py compares the methods")
    run_bench(args)


def cmd_serve(args) -> None:
    from ..serve.server import serve

    serve(args)


def cmd_convert_head(args) -> None:
    from .convert_head import convert_head

    done = convert_head(args.src, args.to, args.out, base=args.base)
    print(f"{done['kind']} head converted from the {done['from']} to the {done['to']} format: {args.out}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"generate": cmd_generate, "train-draft": cmd_train_draft, "bench": cmd_bench}
    commands["demo"] = cmd_demo
    commands["prepare-data"] = cmd_prepare_data
    commands["prepare-features"] = cmd_prepare_features
    commands["serve"] = cmd_serve
    commands["convert-head"] = cmd_convert_head
    try:
        commands[args.command](args)
    except EagleError as e:
        rank = f" (rank {_rank()})" if _rank() else ""  # every rank raises alike under torchrun
        print(f"eagle: error{rank}: {e}", file=sys.stderr)
        return 2
    finally:
        from ..models.parallel import shutdown

        shutdown()  # a tensor-parallel run leaves the process group the engine joined
    return 0


if __name__ == "__main__":
    sys.exit(main())
