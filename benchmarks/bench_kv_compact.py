"""Benchmark KV-cache compaction: the one-launch op against a per-layer loop of index copies.

Llama-3-8B geometry (8 KV heads, head_dim 128, bf16) with 32-layer and 80-layer caches, batch 1 and 8, 1 to 8
accepted tokens. Compared:

- ``cuda``: the compiled op (``eagle_kernels._C``), every layer, K and V, every sequence in one launch;
- ``triton``: the Triton kernel (:mod:`eagle_kernels.kv_compact`), also one launch;
- ``torch_loop``: what the official EAGLE code does after verification: per layer, gather the accepted rows
  with advanced indexing and copy them to the front of the tree region (two kernels per layer).

Times are medians (20th/80th percentiles) of ``triton.testing.do_bench`` in microseconds; GB/s counts the
accepted rows read and written; ``%bw`` compares with a measured large device-to-device copy. Results are
appended as JSON lines to ``benchmarks/results/kv_compact.json`` with the device, date and commit.

Usage: ``python benchmarks/bench_kv_compact.py [--layers 32 80] [--batch 1 8] [--accepted 1 2 4 8]``
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import append_results, bench, copy_bandwidth_gbs, device_name, parse  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[32, 80], help="cache depths (layers)")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="batch sizes")
    parser.add_argument("--accepted", type=int, nargs="+", default=[1, 2, 4, 8], help="accepted tokens")
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--max-len", type=int, default=2048, help="cache rows per sequence")
    parser.add_argument("--tree", type=int, default=60, help="tree rows after the prefix")
    return parse(parser, argv)





def torch_loop_kv_compact(cache, lengths, src, counts_host: list[int]):
    """Per layer: gather the accepted rows of every sequence, then copy them to the tree region's front."""
    batch = cache.shape[2]
    n = max(counts_host)
    batch_idx = torch.arange(batch, device=cache.device).view(batch, 1).expand(batch, n)
    src_rows = lengths.long().view(batch, 1) + src[:, :n].long()
    dst_rows = lengths.long().view(batch, 1) + torch.arange(n, device=cache.device).view(1, n)
    for layer in range(cache.shape[0]):
        layer_cache = cache[layer]  # [2, B, H, S, D]
        rows = layer_cache[:, batch_idx, :, src_rows]  # [B, n, 2, H, D]: a copy (advanced indexing)
        layer_cache[:, batch_idx, :, dst_rows] = rows


def make_case(args, layers: int, batch: int, accepted: int, device):
    gen = torch.Generator(device="cpu").manual_seed(layers * 100 + batch * 10 + accepted)
    shape = (layers, 2, batch, args.kv_heads, args.max_len, args.head_dim)
    cache = torch.randn(shape, dtype=torch.bfloat16, device=device)
    lengths = torch.randint(0, args.max_len - args.tree, (batch,), generator=gen, dtype=torch.int32)
    # An accepted path visits increasing tree rows; the first is the root (row 0).
    paths = []
    for _ in range(batch):
        below_root = torch.randperm(args.tree - 1, generator=gen)[: accepted - 1].sort().values + 1
        paths.append(torch.cat([torch.zeros(1, dtype=torch.long), below_root]))
    counts = torch.full((batch,), accepted, dtype=torch.int32)
    return cache, lengths.to(device), torch.stack(paths).to(device), counts.to(device)


def run_case(args, layers: int, batch: int, accepted: int, copy_gbs: float) -> list[dict]:
    from eagle_kernels import _C_loader
    from eagle_kernels.kv_compact import kv_compact as kv_compact_triton

    cache, lengths, src, counts = make_case(args, layers, batch, accepted, torch.device("cuda"))
    impls = {
        "torch_loop": lambda: torch_loop_kv_compact(cache, lengths, src, [accepted] * batch),
        "triton": lambda: kv_compact_triton(cache, lengths, src, counts),
    }
    if _C_loader.available():
        impls["cuda"] = lambda: _C_loader.kv_compact_cuda(cache, lengths, src, counts)
    moved = 2 * layers * 2 * batch * args.kv_heads * accepted * args.head_dim * cache.element_size()
    records, baseline_us = [], None
    for name, fn in impls.items():
        t = bench(fn)
        median, low, high = t["median_us"], t["p20_us"], t["p80_us"]
        baseline_us = baseline_us or median
        gbs = moved / (median * 1e-6) / 1e9
        print(
            f"{layers:>6} {batch:>5} {accepted:>3} {name:>10} {median:>10.1f} {low:>8.1f} {high:>8.1f} "
            f"{gbs:>8.1f} {100 * gbs / copy_gbs:>5.1f} {baseline_us / median:>6.1f}x"
        )
        records.append(
            dict(layers=layers, batch=batch, accepted=accepted, impl=name, median_us=median, p20_us=low,
                 p80_us=high, gbs=gbs, speedup_vs_torch_loop=baseline_us / median)
        )  # fmt: skip
    return records


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_kv_compact: skipped, no CUDA device")
        return 0
    from eagle_kernels import _C_loader

    copy_gbs = copy_bandwidth_gbs()
    print(f"device: {device_name()}  copy bandwidth: {copy_gbs:.0f} GB/s  CUDA op: {_C_loader.status()}")
    print(f"{'layers':>6} {'batch':>5} {'acc':>3} {'impl':>10} {'median us':>10} {'p20':>8} {'p80':>8} "
          f"{'GB/s':>8} {'%bw':>5} {'speedup':>7}")  # fmt: skip
    records = []
    for layers in args.layers:
        for batch in args.batch:
            for accepted in args.accepted:
                records += run_case(args, layers, batch, accepted, copy_gbs)
                torch.cuda.empty_cache()
    meta = dict(copy_gbs=copy_gbs, dtype="bfloat16", kv_heads=args.kv_heads, head_dim=args.head_dim,
                max_len=args.max_len)
    path = append_results("kv_compact", [{**meta, **record} for record in records])
    print(f"appended {len(records)} results to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
