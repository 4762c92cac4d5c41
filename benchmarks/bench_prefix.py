"""Prefix caching and chunked prefill, measured: time to first token with and without a shared prefix, and
the running streams' worst inter-token gap while a long prompt joins, chunked against whole.

    python benchmarks/bench_prefix.py                         # CPU: the 'tiny' preset, a 3,072-token prompt
    python benchmarks/bench_prefix.py --model llama3.1-8b --device cuda --long-prompt 16384   # a GPU

The target is a preset of ``eagle_engine.tools.shapes`` with random weights (timings do not depend on them)
and an EAGLE-1/2 head of the published shape drafting a chain.

1. TTFT: ``--requests`` requests one after another, each ``--prefix`` shared tokens and 16 of its own, one
   new token each; the first is cold either way. Reported: its TTFT and the median of the others, with
   prefix caching on and off (two engines, requests interleaved, each warmed up by an unrelated prompt).
2. Joining: ``--streams`` sequences decode while a ``--long-prompt`` prompt joins; each step's wall time is
   the running streams' gap between tokens. Reported: the median step before the prompt joins and the
   longest step until its first token, with ``--chunk``-token chunks (``max_prefill_tokens``) and whole.
Rows are appended to ``benchmarks/results/bench_prefix.json`` with the machine, date and commit.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import append_results, format_table, parse  # noqa: E402

from eagle_engine import EagleEngine  # noqa: E402
from eagle_engine.engine.sequence import Sequence  # noqa: E402
from eagle_engine.speculative.sampling import SamplingParams  # noqa: E402
from eagle_engine.tools import shapes  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny", choices=sorted(shapes.MODELS), help="preset (random weights)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on a CPU")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--prefix", type=int, default=1000, help="shared prompt tokens (1000)")
    ap.add_argument("--streams", type=int, default=4, help="sequences decoding while the long prompt joins")
    ap.add_argument("--long-prompt", type=int, default=3072, help="tokens of the joining prompt (3072)")
    ap.add_argument("--chunk", type=int, default=512, help="max_prefill_tokens of the chunked engine (512)")
    ap.add_argument("--threads", type=int, default=2)
    return parse(ap, argv)


def build(args):
    dtype = (
        getattr(torch, args.dtype)
        if args.dtype
        else (torch.bfloat16 if args.device == "cuda" else torch.float32)
    )
    target = shapes.build_target(shapes.model_config(args.model), args.device, dtype)
    shapes.randomize(target, seed=0)
    head = shapes.build_eagle_head(target, "eagle1")
    shapes.randomize(head, seed=1)
    return target, head


def engine(target, head, max_model_len: int, **settings) -> EagleEngine:
    return EagleEngine(target, head, tree="chain", max_batch_size=8, max_model_len=max_model_len, **settings)


def tokens(n: int, seed: int, vocab: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab, (n,), generator=gen).tolist()


def ttft_rows(args, target, head) -> list[dict]:
    vocab, length = target.config.vocab_size, args.prefix + 32
    engines = {on: engine(target, head, length, enable_prefix_caching=on) for on in (True, False)}
    shared = tokens(args.prefix, 0, vocab)
    for e in engines.values():  # one-time costs (first calls) out of the measurement
        e.generate(tokens(16, 99, vocab), 1, stop_token_ids=[])
        e.runner.blocks.stats.queries = e.runner.blocks.stats.hits = 0
    seconds = {True: [], False: []}
    for i in range(args.requests):
        prompt = shared + tokens(16, 100 + i, vocab)
        for on, e in engines.items():
            started = time.perf_counter()
            e.generate(prompt, 1, stop_token_ids=[])
            seconds[on].append(time.perf_counter() - started)
    rows = []
    for on, e in engines.items():
        stats = e.runner.blocks.stats
        rows.append(
            {
                "part": "ttft",
                "prefix_caching": on,
                "prefix": args.prefix,
                "requests": args.requests,
                "first_ms": 1e3 * seconds[on][0],
                "median_rest_ms": 1e3 * statistics.median(seconds[on][1:]),
                "hit_tokens": stats.hits,
                "query_tokens": stats.queries,
            }
        )
        e.close()
    return rows


def joining_rows(args, target, head) -> list[dict]:
    vocab, length = target.config.vocab_size, args.long_prompt + 64
    rows = []
    for label, budget in (("chunked", args.chunk), ("whole", args.long_prompt)):
        e = engine(target, head, length, enable_prefix_caching=False, max_prefill_tokens=budget)
        runner = e.runner
        streams = [
            Sequence(tokens(8, 200 + b, vocab), SamplingParams(), 10**6, frozenset(), 0, length)
            for b in range(args.streams)
        ]
        runner.add(streams)
        before = []
        for _ in range(5):
            started = time.perf_counter()
            runner.step()
            before.append(time.perf_counter() - started)
        joining = Sequence(tokens(args.long_prompt, 1, vocab), SamplingParams(), 4, frozenset(), 0, length)
        steps = []  # between two of the streams' steps: the join's prefill work and the next round
        started = time.perf_counter()
        runner.add([joining])  # the first chunk (or the whole prompt) runs here, between two steps
        while not steps or not joining.tokens:
            runner.step()
            steps.append(time.perf_counter() - started)
            started = time.perf_counter()
        rows.append(
            {
                "part": "joining",
                "prefill": label,
                "max_prefill_tokens": budget,
                "long_prompt": args.long_prompt,
                "streams": args.streams,
                "median_step_before_ms": 1e3 * statistics.median(before),
                "worst_gap_ms": 1e3 * max(steps),
                "steps_to_join": len(steps),
            }
        )
        for q in list(runner.running):
            runner.release(q)
        e.close()
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    target, head = build(args)
    ttft = ttft_rows(args, target, head)
    print(
        format_table(
            ttft,
            [
                "prefix_caching",
                "prefix",
                "requests",
                "first_ms",
                "median_rest_ms",
                "hit_tokens",
                "query_tokens",
            ],
        )
    )
    joining = joining_rows(args, target, head)
    print(
        format_table(
            joining,
            [
                "prefill",
                "max_prefill_tokens",
                "long_prompt",
                "streams",
                "median_step_before_ms",
                "worst_gap_ms",
                "steps_to_join",
            ],
        )
    )
    common_fields = {"model": args.model, "device": args.device, "threads": args.threads}
    append_results("bench_prefix", [{**common_fields, **r} for r in ttft + joining])
    return 0


if __name__ == "__main__":
    sys.exit(main())
