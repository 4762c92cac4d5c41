"""Benchmark tree verification: the CUDA kernels against the PyTorch reference.

A 60-node EAGLE-2-style draft tree (depth 6, drafts are likely tokens of the parent's distribution),
Llama-3 vocabulary (V = 128256), batch 1 and 8. Greedy verification reads ``target_argmax`` only; sampling
verification reads the target distributions of the visited nodes (fp32 ``[B, 60, V]``) and draws the bonus
token by a block-parallel inverse CDF. The reference walks the tree in Python on the host (it synchronises):
the baseline an engine without the kernels would pay.

Times are medians (20th/80th percentiles) of ``triton.testing.do_bench`` in microseconds; results are
appended as JSON lines with the device, date and commit.

Usage: ``python benchmarks/bench_tree_verify.py [--batch 1 8] [--nodes 60] [--vocab 128256]``
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import append_results, bench, device_name, parse  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="batch sizes")
    parser.add_argument("--nodes", type=int, default=60, help="tree nodes, root included")
    parser.add_argument("--depth", type=int, default=6, help="tree depth below the root")
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--skip-reference", action="store_true", help="time the kernels only")
    return parse(parser, argv)




def layered_parents(nodes: int, depth: int, gen: torch.Generator) -> list[int]:
    """Parents of a tree whose levels hold about equal numbers of nodes, each under the previous level."""
    per_level = max(1, (nodes - 1) // depth)
    parents, previous, current = [-1], [0], []
    for i in range(1, nodes):
        parents.append(previous[int(torch.randint(len(previous), (1,), generator=gen))])
        current.append(i)
        if len(current) == per_level and i < nodes - 1:
            previous, current = current, []
    return parents


def make_case(batch: int, nodes: int, depth: int, vocab: int, device):
    """Tokens, parents, target probabilities (peaked), their argmax and uniforms for ``batch`` trees."""
    gen = torch.Generator().manual_seed(batch * 1000 + nodes)
    probs = torch.softmax(torch.randn(batch, nodes, vocab, generator=gen) * 4, dim=-1)
    parents = torch.tensor([layered_parents(nodes, depth, gen) for _ in range(batch)], dtype=torch.int32)
    tokens = torch.zeros(batch, nodes, dtype=torch.int64)
    for b in range(batch):  # the k-th child of a node drafts the parent's k-th most likely token
        rank: dict[int, int] = {}
        top = torch.topk(probs[b], 16, dim=-1).indices
        for i in range(1, nodes):
            parent = int(parents[b, i])
            rank[parent] = rank.get(parent, -1) + 1
            tokens[b, i] = top[parent, min(rank[parent], 15)]
    uniforms = torch.rand(batch, nodes, generator=gen)
    argmax = probs.argmax(-1)
    return [t.to(device) for t in (tokens, parents, probs, argmax, uniforms)]


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_tree_verify: skipped, no CUDA device")
        return 0
    from eagle_kernels import _C_loader, reference

    print(f"device: {device_name()}  CUDA op: {_C_loader.status()}")
    print(f"{'batch':>5} {'mode':>9} {'impl':>10} {'median us':>10} {'p20':>9} {'p80':>9} {'speedup':>8}")
    records = []
    for batch in args.batch:
        tokens, parents, probs, argmax, uniforms = make_case(
            batch, args.nodes, args.depth, args.vocab, "cuda"
        )
        impls = {
            "greedy": {
                "reference": lambda: reference.tree_verify_greedy(tokens, parents, argmax),
                "cuda": lambda: _C_loader.tree_verify_greedy_cuda(tokens, parents, argmax),
            },
            "sampling": {
                "reference": lambda: reference.tree_verify_sampling(tokens, parents, probs, uniforms),
                "cuda": lambda: _C_loader.tree_verify_sampling_cuda(tokens, parents, probs, uniforms),
            },
        }
        for mode, by_impl in impls.items():
            times = {}
            for name, fn in by_impl.items():
                if (name == "cuda" and not _C_loader.available()) or (
                    name == "reference" and args.skip_reference
                ):
                    continue
                t = bench(fn)
                times[name] = (t["median_us"], t["p20_us"], t["p80_us"])
            for name, (median, low, high) in times.items():
                speedup = times["reference"][0] / median if "reference" in times else float("nan")
                print(
                    f"{batch:>5} {mode:>9} {name:>10} {median:>10.1f} {low:>9.1f} {high:>9.1f} "
                    f"{speedup:>7.1f}x"
                )
                records.append(
                    dict(batch=batch, mode=mode, impl=name, median_us=median, p20_us=low, p80_us=high,
                         speedup_vs_reference=speedup)
                )  # fmt: skip
    meta = dict(nodes=args.nodes, depth=args.depth, vocab=args.vocab)
    path = append_results("tree_verify", [{**meta, **record} for record in records])
    print(f"appended {len(records)} results to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
