"""A round at real shapes on a GPU, without weights: the target and its EAGLE heads are built from published
configs (``eagle_engine/tools/shapes.py``) with random bf16 weights, and the engine's runner decodes with CUDA
graphs. Round cost does not depend on the weights; acceptance does, so it is taken from published figures.

Measured, per batch size: a vanilla step (ms per token) and an EAGLE round (ms: static EAGLE-1 tree, dynamic
EAGLE-2 60/6/10 tree) as the runner runs it (graph replay, the one host read, bookkeeping), median with
20th/80th percentiles over the timed steps; beside each, the floor (the bytes the step must read, at the
measured copy bandwidth) and the round model's prediction (``benchmarks/round_model.py``); and the speedup
those imply at published acceptance lengths (:data:`PUBLISHED_ACCEPTANCE`, sources named).

    python benchmarks/bench_round.py --model llama3.1-8b                   # on a GPU
    python benchmarks/bench_round.py --model tiny --device cpu --batches 1,2 --steps-timed 2   # a dry run

Results are appended to ``benchmarks/results/bench_round.json`` (``$EAGLE_BENCH_RESULTS`` overrides the
folder), stamped with device, date and commit.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

# Mean tokens per round (accepted drafts + the bonus token) published for a 7B target of the same size class:
# Spec-Bench on Vicuna-7B, greedy (EAGLE-2 paper, as listed in ../shared/reference/eagle-facts.md). No figure
# for Llama-3.1-8B is used here; pass --accept STEP=TAU for another.
PUBLISHED_ACCEPTANCE = {
    "eagle2_dynamic": (4.35, "EAGLE-2, Vicuna-7B, Spec-Bench"),
    "eagle1_static": (3.57, "EAGLE-1, Vicuna-7B, Spec-Bench"),
}


def parse_args(argv=None) -> argparse.Namespace:
    import torch

    from eagle_engine.tools import shapes

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="llama3.1-8b", choices=sorted(shapes.MODELS))
    ap.add_argument("--steps", default="vanilla,eagle2_dynamic,eagle1_static", help="comma-separated")
    ap.add_argument("--batches", default="1,8,32", help="batch sizes (comma-separated)")
    ap.add_argument("--context", type=int, default=1024, help="prompt tokens per sequence (committed rows)")
    ap.add_argument("--steps-timed", type=int, default=20, help="timed steps per configuration")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--accept", action="append", default=[], metavar="STEP=TAU",
                    help="acceptance length to imply a speedup with (default: PUBLISHED_ACCEPTANCE)")
    ap.add_argument("--draft-vocab", type=int, default=None,
                    help="EAGLE-1/2 steps: a reduced draft vocabulary of N tokens (default: the whole)")
    ap.add_argument("--no-save", action="store_true", help="print only")
    return common.parse(ap, argv)


def build(model: str, step: str, device, dtype, draft_vocab: int | None = None):
    """Target (and drafter) with random weights for ``step``; an EAGLE-1/2 head over ``draft_vocab`` tokens
    (which ones does not change the cost: the first ones)."""
    import torch

    from eagle_engine.speculative.methods import make_drafter
    from eagle_engine.tools import shapes
    from eagle_engine.tools.round_model import STEPS

    target = shapes.build_target(shapes.model_config(model), device, dtype)
    shapes.randomize(target, seed=0)
    if STEPS[step] is None:
        return target, None
    kind, tree = STEPS[step]
    head = shapes.build_eagle_head(target, kind)
    shapes.randomize(head, seed=1)
    if draft_vocab is not None and kind == "eagle1":
        head.reduce_vocab(torch.arange(draft_vocab))
    return target, make_drafter("eagle", target, head, tree)


def time_steps(target, drafter, batch: int, context: int, steps: int, device) -> list[float]:
    """Seconds of each timed ``runner.step()`` (after two untimed: compilation, then graph capture)."""
    import torch

    from eagle_engine.engine.runner import Runner
    from eagle_engine.engine.sequence import Sequence
    from eagle_engine.speculative.sampling import SamplingParams

    total = steps + 2
    width = drafter.width if drafter is not None else 1
    new_tokens = (total + 1) * width + 1  # room for every step at its widest: nobody finishes early
    max_len = context + new_tokens + 1
    runner = Runner(target, drafter, max_batch_size=batch, max_model_len=max_len,
                    cuda_graphs=device.type == "cuda")
    vocab = target.config.vocab_size
    seqs = [Sequence([(7 * i + 13 * b) % (vocab - 1) + 1 for i in range(context)], SamplingParams(),
                     max_new_tokens=new_tokens, stop_ids=frozenset(), max_length=max_len)
            for b in range(batch)]
    runner.add(seqs)
    times = []
    for i in range(total):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        runner.step()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    if len(runner.running) != batch:
        raise RuntimeError("a sequence finished early: the timed steps would not be at full batch")
    return times


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from eagle_engine.models.weights import resolve_dtype
    from eagle_engine.tools import round_model as rm

    device, dtype = torch.device(args.device), resolve_dtype(args.dtype)
    if device.type == "cpu":
        torch.set_num_threads(1)
    bandwidth = common.copy_bandwidth_gbs() * 1e9 if device.type == "cuda" else None
    accept = {k: (float(v), "--accept") for k, v in (a.split("=") for a in args.accept)}
    accept = {**PUBLISHED_ACCEPTANCE, **accept}
    rows, vanilla = [], {}
    for step in args.steps.split(","):  # vanilla first (the default order): each row's speedup comes at once
        target, drafter = build(args.model, step, device, dtype, args.draft_vocab)
        for b in (int(x) for x in args.batches.split(",")):
            times = time_steps(target, drafter, b, args.context, args.steps_timed, device)
            model = rm.model_step(args.model, step, b, context=args.context, dtype=dtype,
                                  draft_vocab=args.draft_vocab)
            q20, q50, q80 = (statistics.quantiles(times, n=10)[i] for i in (1, 4, 7)) if len(times) > 2 else \
                (min(times), statistics.median(times), max(times))
            row = {"model": args.model, "step": step, "batch": b, "context": args.context,
                   "draft_vocab": args.draft_vocab,
                   "median_ms": 1e3 * q50, "p20_ms": 1e3 * q20, "p80_ms": 1e3 * q80,
                   "predicted_ms": 1e3 * model.record.seconds(rm.H100),
                   "floor_ms": 1e3 * model.floor_bytes / bandwidth if bandwidth else None,
                   "copy_gbs": bandwidth / 1e9 if bandwidth else None, "launches": model.record.count()}
            if step == "vanilla":
                vanilla[b] = row["median_ms"]
            elif step in accept and b in vanilla:
                tau, source = accept[step]
                row.update(accept_length=tau, accept_source=source,
                           implied_speedup=tau * vanilla[b] / row["median_ms"])
            rows.append(row)
            if not args.no_save:  # row by row: a run cut short by its time limit keeps what it measured
                common.append_results("bench_round", [row])
        del target, drafter
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(f"{args.model} on {common.device_name()}, random {args.dtype} weights, {args.context} committed "
          f"tokens per sequence; predicted = the round model's H100 figure")
    print(common.format_table(rows, ["step", "batch", "median_ms", "p20_ms", "p80_ms", "predicted_ms",
                                     "floor_ms", "launches", "accept_length", "implied_speedup"]))
    import eagle_kernels

    print(eagle_kernels.format_backends())
    return 0


if __name__ == "__main__":
    sys.exit(main())
