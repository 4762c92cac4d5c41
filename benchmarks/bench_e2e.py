"""End to end: EAGLE and vanilla decoding, with and without CUDA graphs, side by side in one run.

    python benchmarks/bench_e2e.py                                  # the demo pair on the GPU (CPU if none)
    python benchmarks/bench_e2e.py --base DIR --draft HEAD --dtype bf16 --batch 4

Runs greedy decoding of the same prompts with each configuration, interleaved and repeated, and reports
tokens/s (median, min, max), mean acceptance length, and whether the outputs equal the first configuration's
(in fp16/bf16 a near-tie can flip a token between differently shaped computations: see README). Results
appended to ``benchmarks/results/bench_e2e.json`` with the device name.
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

from eagle_engine import EagleEngine, demo_paths  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default=None)
    ap.add_argument("--draft", default=None)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on a CPU")
    ap.add_argument("--tree", default="dynamic")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    args = parse(ap, argv)
    if args.dtype is None:
        args.dtype = "bfloat16" if str(args.device).startswith("cuda") else "float32"
    if args.device == "cpu":
        torch.set_num_threads(1)
    base, draft = (args.base, args.draft) if args.base else demo_paths()
    graphs = [True, False] if str(args.device).startswith("cuda") else [False]
    engines = {
        (method, g): EagleEngine.from_pretrained(base, draft, device=args.device, dtype=args.dtype,
                                                 tree=args.tree, cuda_graphs=g, threads=0)
        for method in ("eagle", "vanilla") for g in graphs
    }
    vocab = next(iter(engines.values())).target.config.vocab_size
    prompts = [[(13 * i + 7 * b) % (vocab - 2) + 2 for i in range(64)] for b in range(args.batch)]
    speeds = {key: [] for key in engines}
    outputs, accept = {}, {}
    for key, engine in engines.items():  # warm-up: compile kernels, capture graphs
        run = engine.generate if key[0] == "eagle" else engine.generate_vanilla
        run(prompts, 16, stop_token_ids=[])
        run(prompts, 16, stop_token_ids=[])
    for _ in range(args.repeats):
        for key, engine in engines.items():
            run = engine.generate if key[0] == "eagle" else engine.generate_vanilla
            if str(args.device).startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            results = run(prompts, args.new_tokens, stop_token_ids=[])
            seconds = time.perf_counter() - t0
            speeds[key].append(sum(len(r.tokens) for r in results) / seconds)
            outputs[key] = [r.tokens for r in results]
            if key[0] == "eagle":
                accept[key] = statistics.mean(n for r in results for n in r.accept_lengths)
    first = outputs[next(iter(engines))]
    base_speed = statistics.median(speeds[("vanilla", graphs[0])])
    rows = []
    for key in engines:
        med = statistics.median(speeds[key])
        rows.append({
            "method": key[0], "cuda_graphs": key[1], "batch": args.batch, "tokens_per_s": round(med, 1),
            "min": round(min(speeds[key]), 1), "max": round(max(speeds[key]), 1),
            "speedup_vs_vanilla": round(med / base_speed, 2), "mean_accept": round(accept.get(key, 1.0), 2),
            "same_as_first": outputs[key] == first, "dtype": args.dtype, "tree": args.tree,
        })
    print(format_table(rows, list(rows[0])))
    print("appended to", append_results("bench_e2e", rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
