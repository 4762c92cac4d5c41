"""Host cost of one decoding step: host synchronisations and kernel launches, per tree kind and batch size,
counted through the public API (:mod:`eagle_engine.tools.round_cost`), plus the vanilla per-token figures
and the Lookahead and prompt-lookup rounds (default settings).

    python benchmarks/round_cost.py                       # the embedded demo pair, CPU
    python benchmarks/round_cost.py --base DIR --draft HEAD --device cuda --dtype bf16

The counts are those of the code path the GPU takes (each eagle_kernels kernel op counted as its GPU
launches), so they can be measured anywhere; they do not depend on what the head accepts (fixed shapes).
Results: a table on stdout and records appended to ``benchmarks/results/round_cost.json``.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import append_results, format_table  # noqa: E402

from eagle_engine import EagleEngine, SamplingParams, demo_paths  # noqa: E402
from eagle_engine.engine.sequence import Sequence  # noqa: E402
from eagle_engine.tools.round_cost import step_costs  # noqa: E402


def measure(engine: EagleEngine, speculative: bool, batch: int, steps: int, params: SamplingParams) -> dict:
    runner = engine._runner(speculative)
    vocab = engine.target.config.vocab_size
    prompts = [[(11 * i + 5 * b) % (vocab - 2) + 2 for i in range(32)] for b in range(batch)]
    seqs = [Sequence(p, params, 10_000, frozenset(), b, runner.max_model_len) for b, p in enumerate(prompts)]
    runner.add(seqs)
    runner.step()  # one-off constants
    costs = step_costs(runner, steps)
    for seq in list(runner.running):
        runner.release(seq)
    worst = max(costs, key=lambda c: c.launches)
    return {"syncs": max(c.syncs for c in costs), "launches": worst.launches,
            "layers": engine.target.config.num_hidden_layers}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default=None, help="target directory (default: the demo pair)")
    ap.add_argument("--draft", default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    base, draft = (args.base, args.draft) if args.base else demo_paths()
    rows = []
    for tree in ("dynamic", "static", "chain"):
        engine = EagleEngine.from_pretrained(base, draft, device=args.device, dtype=args.dtype, tree=tree,
                                             cuda_graphs=False, threads=0)
        for batch in map(int, args.batches.split(",")):
            for label, params in (("greedy", SamplingParams()), ("sampled", SamplingParams(0.8, 0.9, 20))):
                rows.append({"method": f"eagle-{tree}", "batch": batch, "sampling": label,
                             **measure(engine, True, batch, args.steps, params)})
                if tree == "chain":
                    rows.append({"method": "vanilla", "batch": batch, "sampling": label,
                                 **measure(engine, False, batch, args.steps, params)})
    for method in ("lookahead", "prompt_lookup"):  # the weight-free methods, default settings
        engine = EagleEngine.from_pretrained(base, device=args.device, dtype=args.dtype, method=method,
                                             cuda_graphs=False, threads=0)
        for batch in map(int, args.batches.split(",")):
            rows.append({"method": method, "batch": batch, "sampling": "greedy",
                         **measure(engine, True, batch, args.steps, SamplingParams())})
    print(format_table(rows, ["method", "batch", "sampling", "syncs", "launches", "layers"]))
    print("(per step: a speculative round, or one vanilla token; launches as a GPU would issue them)")
    if not args.no_save:
        print("appended to", append_results("round_cost", rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
