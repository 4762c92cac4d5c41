"""Benchmark tree attention: the Triton kernel against torch SDPA with a materialised mask and the reference.

Llama-3-8B attention geometry by default: 32 query heads, 8 KV heads, head_dim 128, bf16; committed prefixes
of 512, 2k, 8k and 32k tokens; T = 1 (decode), 16 and 64 tree queries with a random tree mask. Compared:

- ``triton``: :func:`eagle_kernels.tree_attention.tree_attention` (split-KV chosen by its heuristic);
- ``triton_nosplit``: the same kernel with split-KV off (only where the heuristic splits);
- ``triton_paged`` (with ``--block-size N``): the same kernel over the same K/V laid out in a pool of
  ``N``-row blocks in shuffled order, read through a block table (``[num_blocks, Hkv, N, D]``, the layout of
  vLLM and FlashInfer's HND pools);
- ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` over the cache prefix + tree rows with a
  materialised boolean ``[B, 1, T, L + T]`` mask (``enable_gqa``, K/V not repeated);
- ``reference``: :func:`eagle_kernels.reference.tree_attention` (fp32 math; skipped above ``--ref-max``);
- ``flash_attn``: ``flash_attn_with_kvcache`` (causal, not tree-masked) where ``flash_attn`` imports.

Times: median (20th/80th percentiles) of ``triton.testing.do_bench`` in microseconds. GB/s counts the K/V rows
read (prefix + tree) plus q and the output; ``%bw`` compares with a measured device copy. Results are appended
to ``benchmarks/results/tree_attention.json`` with device, date and commit.

Usage: ``python benchmarks/bench_tree_attention.py [--prefix 512 2048 8192 32768] [--tq 1 16 64] [--batch 1]
[--block-size 16]``
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
    parser.add_argument("--prefix", type=int, nargs="+", default=[512, 2048, 8192, 32768],
                        help="prefix lengths")
    parser.add_argument("--tq", type=int, nargs="+", default=[1, 16, 64], help="tree queries per sequence")
    parser.add_argument("--batch", type=int, nargs="+", default=[1])
    parser.add_argument("--heads", type=int, default=32, help="query heads")
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    parser.add_argument("--ref-max", type=int, default=8192, help="largest prefix timed with the reference")
    parser.add_argument("--block-size", type=int, default=0,
                        help="also time the kernel over a paged pool of this many rows per block (0: off)")
    parser.add_argument("--no-save", action="store_true", help="do not append results")
    return common.parse(parser, argv)


def random_tree_mask(batch: int, t: int, device):
    """Packed ancestor masks of random trees (parent[i] < i)."""
    import torch

    from eagle_kernels import reference

    gen = torch.Generator().manual_seed(t)
    full = torch.zeros(batch, t, t, dtype=torch.bool)
    for b in range(batch):
        for i in range(t):
            full[b, i, i] = True
            if i:
                full[b, i] |= full[b, int(torch.randint(0, i, (1,), generator=gen))]
    return full.to(device), reference.pack_tree_mask(full).to(device)


def make_case(args, batch: int, prefix: int, t: int):
    import torch

    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    dev = DEVICE
    cache_len = prefix + t + 64
    q = torch.randn(batch, t, args.heads, args.head_dim, dtype=dtype, device=dev)
    k = torch.randn(batch, args.kv_heads, cache_len, args.head_dim, dtype=dtype, device=dev)
    v = torch.randn_like(k)
    lengths = torch.full((batch,), prefix, dtype=torch.int32, device=dev)
    full, packed = random_tree_mask(batch, t, dev)
    # SDPA's view: keys 0 .. prefix + t - 1, a materialised boolean mask [B, 1, T, prefix + T].
    dense = torch.cat([torch.ones(batch, t, prefix, dtype=torch.bool, device=dev), full], -1).unsqueeze(1)
    return q, k, v, lengths, packed, dense


def paged_copy(k, v, block_size: int):
    """``k``, ``v`` ``[B, Hkv, S, D]`` as pools ``[num_blocks, Hkv, block_size, D]`` of blocks in shuffled
    order, and the int32 block table ``[B, ceil(S / block_size)]`` that reads the same logical rows."""
    import torch

    b, hkv, s, d = k.shape
    max_blocks = -(-s // block_size)
    perm = torch.randperm(b * max_blocks, generator=torch.Generator().manual_seed(0)).to(k.device)
    pools = []
    for x in (k, v):
        padded = torch.nn.functional.pad(x, (0, 0, 0, max_blocks * block_size - s))
        blocks = padded.view(b, hkv, max_blocks, block_size, d).transpose(1, 2)
        blocks = blocks.reshape(-1, hkv, block_size, d)
        pool = torch.empty_like(blocks)
        pool[perm] = blocks  # logical block i of the flattened order lives at perm[i]
        pools.append(pool)
    return pools[0], pools[1], perm.view(b, max_blocks).to(torch.int32)


def run_case(args, batch: int, prefix: int, t: int, copy_gbs: float) -> list[dict]:
    import torch.nn.functional as F

    from eagle_kernels import reference

    ta = importlib.import_module("eagle_kernels.tree_attention")  # the module
    q, k, v, lengths, packed, dense = make_case(args, batch, prefix, t)
    keys = prefix + t
    elem = q.element_size()
    nbytes = 2 * batch * args.kv_heads * keys * args.head_dim * elem + 2 * q.numel() * elem
    q_sdpa = q.transpose(1, 2)  # [B, Hq, T, D]
    k_sdpa, v_sdpa = k[:, :, :keys], v[:, :, :keys]

    def sdpa():
        return F.scaled_dot_product_attention(q_sdpa, k_sdpa, v_sdpa, attn_mask=dense, enable_gqa=True)

    impls = {"triton": lambda: ta.tree_attention(q, k, v, lengths, packed, t)}
    splits = ta.launch_plan(batch, t, args.heads, args.kv_heads, k.shape[2], q.dtype, q.device)[-1]
    if splits > 1:
        impls["triton_nosplit"] = lambda: ta._tree_attention(q, k, v, lengths, packed, t, num_splits=1)
    if args.block_size > 0:
        k_pool, v_pool, table = paged_copy(k, v, args.block_size)
        impls["triton_paged"] = lambda: ta.tree_attention(q, k_pool, v_pool, lengths, packed, t,
                                                          block_table=table)
    impls["sdpa"] = sdpa
    if prefix <= args.ref_max:
        impls["reference"] = lambda: reference.tree_attention(q, k, v, lengths, packed, t)
    try:
        from flash_attn import flash_attn_with_kvcache

        k_fa, v_fa = k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()  # [B, S, Hkv, D]
        impls["flash_attn_causal"] = lambda: flash_attn_with_kvcache(q, k_fa, v_fa, cache_seqlens=lengths + t,
                                                                     causal=True)
    except ImportError:
        pass

    expected = reference.tree_attention(q, k, v, lengths, packed, t).float()
    err = (ta.tree_attention(q, k, v, lengths, packed, t).float() - expected).abs().max().item()
    if args.block_size > 0:
        paged = impls["triton_paged"]().float()
        err = max(err, (paged - expected).abs().max().item())
    err_sdpa = (sdpa().transpose(1, 2).float() - expected).abs().max().item()
    records = []
    for name, fn in impls.items():
        timing = common.bench(fn)
        record = {"batch": batch, "prefix": prefix, "tq": t, "impl": name, **timing,
                  **common.bandwidth_fields(nbytes, timing["median_us"], copy_gbs),
                  "splits": splits if name == "triton" else None,
                  "max_err": err if name.startswith("triton") else (err_sdpa if name == "sdpa" else None)}
        records.append(record)
        print(f"{batch:>5} {prefix:>6} {t:>3} {name:>18} {timing['median_us']:>10.1f} "
              f"{timing['p20_us']:>8.1f} {timing['p80_us']:>8.1f} {record['gbs']:>8.0f} "
              f"{100 * record['frac_copy_bw']:>5.1f}%",
              flush=True)
    return records


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("bench_tree_attention: skipped, no CUDA device")
        return 0
    copy_gbs = common.copy_bandwidth_gbs()
    print(f"device: {common.device_name()}  copy bandwidth: {copy_gbs:.0f} GB/s  "
          f"Hq={args.heads} Hkv={args.kv_heads} D={args.head_dim} {args.dtype}")
    print(f"{'batch':>5} {'prefix':>6} {'T':>3} {'impl':>18} {'median us':>10} {'p20':>8} {'p80':>8} "
          f"{'GB/s':>8} {'%bw':>6}")
    records = []
    for batch in args.batch:
        for prefix in args.prefix:
            for t in args.tq:
                records += run_case(args, batch, prefix, t, copy_gbs)
    if not args.no_save:
        for r in records:
            r.update(heads=args.heads, kv_heads=args.kv_heads, head_dim=args.head_dim, dtype=args.dtype,
                     copy_gbs=copy_gbs)
        print(f"appended {len(records)} results to {common.append_results('tree_attention', records)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
