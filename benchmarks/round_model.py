"""A model of a round at real shapes, runnable on any CPU: the engine's own step code on ``meta`` tensors,
every launch recorded with its bytes and FLOPs, the time each would take on an H100 predicted, summed per
phase and held against the floor (the bytes a step must read). See :mod:`eagle_engine.tools.round_model`.

Everything it prints is a prediction, not a measurement; ``benchmarks/bench_round.py`` measures the same steps
on a GPU (the GPU suite prints the two side by side).

Usage::

    python benchmarks/round_model.py --model llama3.1-8b            # a table
    python benchmarks/round_model.py --model llama3.1-8b --json     # one JSON object

JSON: ``{"model", "device", "context", "rows": [{"step", "batch", "launches", "predicted_ms",
"predicted_eager_ms", "floor_ms", "compute_ms", "ratio", "phases_ms", "draft_levels",
"draft_lm_head_weight_reads"}], "memory": [{"batch", "max_model_len", "peak_bytes", "round_peak_bytes",
"prefill_peak_bytes"}]}``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    from eagle_engine.tools import shapes
    from eagle_engine.tools.round_model import STEPS

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="llama3.1-8b", choices=sorted(shapes.MODELS))
    ap.add_argument("--steps", default="vanilla,eagle2_dynamic,eagle1_static",
                    help=f"comma-separated, of: {', '.join(STEPS)}")
    ap.add_argument("--batches", default="1,8,32,64", help="batch sizes of the rows (comma-separated)")
    ap.add_argument("--context", type=int, default=1024, help="committed tokens per sequence in the rows")
    ap.add_argument("--memory-batches", default="1,8,64", help="batch sizes of the memory table")
    ap.add_argument("--max-model-len", type=int, default=8192, help="cache length of the memory table")
    ap.add_argument("--bandwidth", type=float, default=3.0e12, help="bytes/s (H100: 3.0e12 measured copy)")
    ap.add_argument("--tflops", type=float, default=790.0, help="bf16 matrix TFLOP/s (H100: 790 measured)")
    ap.add_argument("--draft-vocab", type=int, default=None,
                    help="EAGLE-1/2 steps: a reduced draft vocabulary of N tokens (default: the whole)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    return common.parse(ap, argv)


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def run(args) -> dict:
    from eagle_engine.tools import round_model as rm

    device = rm.Device(bandwidth=args.bandwidth, flops=args.tflops * 1e12)
    rows = []
    for step in args.steps.split(","):
        for b in ints(args.batches):
            m = rm.model_step(args.model, step, b, context=args.context, draft_vocab=args.draft_vocab)
            row = rm.summary_row(m, device)
            row["compute_ms"] = 1e3 * sum(x.flops for x in m.record.launches) / device.flops
            row["ratio"] = row["predicted_ms"] / row["floor_ms"]
            rows.append(row)
    memory = []
    for b in ints(args.memory_batches):
        context = args.max_model_len // 2  # the round's caches are sized for max_model_len either way
        round_peak = rm.model_step(args.model, "eagle2_dynamic", b, context=context,
                                   max_model_len=args.max_model_len).record.peak_bytes
        prefill_peak = rm.model_prefill(args.model, args.max_model_len - 1, args.max_model_len, b).peak_bytes
        memory.append({"batch": b, "max_model_len": args.max_model_len,
                       "peak_bytes": max(round_peak, prefill_peak), "round_peak_bytes": round_peak,
                       "prefill_peak_bytes": prefill_peak})
    return {"model": args.model, "device": device.name, "context": args.context, "rows": rows,
            "memory": memory, "draft_vocab": args.draft_vocab}


def print_tables(result: dict) -> None:
    print(f"{result['model']}: PREDICTED times on an {result['device']} (a model, not a measurement), "
          f"{result['context']} committed tokens per sequence, steps replayed from CUDA graphs")
    rows = [{**r, **{f"{p}_ms": v for p, v in r["phases_ms"].items()}} for r in result["rows"]]
    print(common.format_table(rows, ["step", "batch", "launches", "predicted_ms", "floor_ms", "ratio",
                                     "compute_ms", "target_ms", "draft_ms", "verify_ms", "bookkeeping_ms",
                                     "draft_levels", "draft_lm_head_weight_reads"]))
    print("\npeak device memory (weights, caches for every slot, the step's temporaries; prefill: one prompt "
          "of max_model_len - 1 tokens)")
    mem = [{**m, **{k.replace("_bytes", "_GB"): m[k] / 1e9 for k in m if k.endswith("_bytes")}}
           for m in result["memory"]]
    print(common.format_table(mem, ["batch", "max_model_len", "peak_GB", "round_peak_GB", "prefill_peak_GB"]))


def main(argv=None) -> int:
    args = parse_args(argv)
    result = run(args)
    if args.json:
        print(json.dumps(result))
    else:
        print_tables(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
