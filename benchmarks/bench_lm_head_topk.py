"""Benchmark the draft head's top-k LM head: the fused Triton kernel against matmul + log_softmax + topk.

Defaults: H = 4096, V = 32000 (Llama-2) and 128256 (Llama-3), N = 1 to 640 rows, k = 10, bf16. Compared:

- ``triton``: :func:`eagle_kernels.lm_head_topk.lm_head_topk` (logits never written; per-tile top-k and
  log-sum-exp partials merged by two parallel kernels; the weight streamed once for every row count);
- ``torch``: ``torch.topk(torch.log_softmax((hidden @ weight.T).float(), -1), k)`` (what a plain head does);
- ``read_weights``: one pass over the lm_head weights (``weight.sum()``), the floor for a memory-bound head;
  ``ideal_us`` is the weight bytes over the measured copy bandwidth.

Times: median (20th/80th percentiles) of ``triton.testing.do_bench`` in microseconds. GB/s counts the weight
bytes read; ``%bw`` compares with a measured device copy. Results are appended to
``benchmarks/results/lm_head_topk.json`` with device, date and commit.

Usage: ``python benchmarks/bench_lm_head_topk.py [--vocab 32000 128256] [--rows 1 10 60] [--k 10]``
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

DEVICE = "cuda"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--vocab", type=int, nargs="+", default=[32000, 128256])
    # A draft level has top-k x batch rows: 10 at batch 1, 80 at the default max_batch_size 8, 640 at 64.
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 10, 16, 60, 64, 80, 128, 160, 320, 640])
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    parser.add_argument("--no-save", action="store_true", help="do not append results")
    return common.parse(parser, argv)


def run_case(args, vocab: int, rows: int, copy_gbs: float) -> list[dict]:
    import torch

    dh = importlib.import_module("eagle_kernels.lm_head_topk")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    hidden = torch.randn(rows, args.hidden, dtype=dtype, device=DEVICE)
    weight = torch.randn(vocab, args.hidden, dtype=dtype, device=DEVICE) * args.hidden**-0.5
    nbytes = weight.numel() * weight.element_size() + hidden.numel() * hidden.element_size()

    def torch_head():
        return torch.topk(torch.log_softmax((hidden @ weight.T).float(), -1), args.k, dim=-1)

    values, indices = dh.lm_head_topk(hidden, weight, args.k)
    ref_values, ref_indices = torch.topk(torch.log_softmax(hidden.float() @ weight.float().T, -1), args.k, -1)
    err = (values - ref_values).abs().max().item()
    same = (indices == ref_indices).float().mean().item()
    impls = {"triton": lambda: dh.lm_head_topk(hidden, weight, args.k), "torch": torch_head,
             "read_weights": lambda: weight.sum()}
    records = []
    for name, fn in impls.items():
        timing = common.bench(fn)
        record = {"vocab": vocab, "rows": rows, "k": args.k, "impl": name, **timing,
                  **common.bandwidth_fields(nbytes, timing["median_us"], copy_gbs),
                  "ideal_us": nbytes / (copy_gbs * 1e9) * 1e6,
                  "max_err": err if name == "triton" else None,
                  "same_idx": same if name == "triton" else None}
        records.append(record)
        print(f"{vocab:>7} {rows:>4} {name:>13} {timing['median_us']:>10.1f} {timing['p20_us']:>8.1f} "
              f"{timing['p80_us']:>8.1f} {record['gbs']:>8.0f} {100 * record['frac_copy_bw']:>5.1f}%",
              flush=True)
    return records


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("bench_lm_head_topk: skipped, no CUDA device")
        return 0
    copy_gbs = common.copy_bandwidth_gbs()
    print(f"device: {common.device_name()}  copy bandwidth: {copy_gbs:.0f} GB/s  H={args.hidden} k={args.k} "
          f"{args.dtype}")
    print(f"{'vocab':>7} {'rows':>4} {'impl':>13} {'median us':>10} {'p20':>8} {'p80':>8} {'GB/s':>8} "
          f"{'%bw':>6}")
    records = []
    for vocab in args.vocab:
        for rows in args.rows:
            records += run_case(args, vocab, rows, copy_gbs)
    if not args.no_save:
        for r in records:
            r.update(hidden=args.hidden, dtype=args.dtype, copy_gbs=copy_gbs)
        print(f"appended {len(records)} results to {common.append_results('lm_head_topk', records)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
