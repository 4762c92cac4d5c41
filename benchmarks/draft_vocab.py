"""A reduced draft vocabulary for an EAGLE-1/2 head: acceptance and speed on the demo pair, and the draft LM
head's cost at a real shape.

    python benchmarks/draft_vocab.py          # demo pair (CPU): sizes 4096 (the whole), 2048, 1024, 512
    python benchmarks/draft_vocab.py --lm-head-shape 4096,128256 --lm-head-sizes 128256,32000

Demo pair: token frequencies of the demo's training split (every token of its rows, as ``eagle prepare-data
--token-frequencies`` counts text), greedy decoding of held-out snippets with the dynamic EAGLE-2 tree, each
size's engine run once per repeat and prompt in turn (so a load change hits all alike): mean acceptance
length, tokens/s (median over repeats), and whether every output equals vanilla decoding's.
Real shape: ``lm_head_topk`` of 10 rows (one dynamic-tree level) over a ``[V, H]`` weight against the
reduced ``[Vd, H]`` one, median of ``--lm-head-repeats`` calls on this machine's device. A GPU round's model
(``benchmarks/round_model.py --draft-vocab N``) predicts the rest.
Written to ``benchmarks/results/draft_vocab.json`` (one JSON line per row, with machine, date and commit).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import append_results, format_table, interleaved_decode, parse  # noqa: E402

import eagle_kernels as ops  # noqa: E402
from eagle_engine import EagleEngine, demo_paths  # noqa: E402
from eagle_engine.models.vocab import most_frequent, save_frequencies  # noqa: E402
from eagle_engine.tools.common import load_tokenizer  # noqa: E402
from eagle_engine.tools.corpus import code_prompts, read_corpus, stdlib_files  # noqa: E402
from eagle_engine.tools.training_data import text_rows, token_frequencies  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="4096,2048,1024,512", help="draft vocabulary sizes (4096: the whole)")
    ap.add_argument("--prompts", type=int, default=8, help="held-out snippets (default: 8)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--lm-head-shape", default="4096,128256", help="H,V of the real-shape LM head (Llama-3.1-8B)"
    )
    ap.add_argument("--lm-head-sizes", default="128256,32000", help="V, then reduced sizes Vd, to time")
    ap.add_argument("--lm-head-repeats", type=int, default=20)
    ap.add_argument(
        "--work", default=os.path.join(os.path.dirname(__file__), ".work"), help="frequency file dir"
    )
    return parse(ap, argv)


def demo_rows(args) -> list[dict]:
    base, head = demo_paths()
    tokenizer = load_tokenizer(base)
    os.makedirs(args.work, exist_ok=True)
    freq = os.path.join(args.work, "demo_frequencies.json")
    counts = token_frequencies(text_rows(tokenizer, read_corpus(stdlib_files("train")), 256), 4096)
    save_frequencies(freq, counts, {"data": "demo training split", "seq_len": 256})
    texts = code_prompts(read_corpus(stdlib_files("heldout")), args.prompts, 400, seed=0)
    prompts = [tokenizer(t)["input_ids"] for t in texts]
    sizes = [int(s) for s in args.sizes.split(",")]
    engines = {}
    for size in sizes:
        extra = {} if size == 4096 else {"draft_vocab_size": size, "token_frequencies": freq}
        engines[size] = EagleEngine.from_pretrained(base, head, tree="dynamic", threads=args.threads, **extra)
    vanilla = [
        engines[sizes[0]].generate_vanilla(p, args.new_tokens, stop_token_ids=[]).tokens for p in prompts
    ]
    runs = interleaved_decode(engines, prompts, args.new_tokens, args.repeats, vanilla)
    rows = []
    for size in sizes:
        covered = int(counts[most_frequent(counts, size)].sum()) / int(counts.sum())
        rows.append(
            {
                "part": "demo",
                "draft_vocab": size,
                "trained_token_share": round(covered, 4),
                **runs[size],
                "prompts": len(prompts),
                "repeats": args.repeats,
                "threads": args.threads,
            }
        )
    for engine in engines.values():
        engine.close()
    return rows


def lm_head_rows(args) -> list[dict]:
    hidden, vocab = (int(x) for x in args.lm_head_shape.split(","))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    weight = torch.randn(vocab, hidden, device=device, dtype=dtype) / hidden**0.5
    x = torch.randn(10, hidden, device=device, dtype=dtype)
    rows = []
    for size in (int(s) for s in args.lm_head_sizes.split(",")):
        w = weight[:size].contiguous()
        times = []
        for _ in range(args.lm_head_repeats + 2):
            if device == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            ops.lm_head_topk(x, w, 10)
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - started)
        med = statistics.median(times[2:])  # two warm-up calls
        rows.append(
            {
                "part": "lm_head_topk",
                "device": device,
                "dtype": str(dtype).removeprefix("torch."),
                "hidden": hidden,
                "draft_vocab": size,
                "rows": 10,
                "median_ms": 1e3 * med,
                "weight_MB": w.numel() * w.element_size() / 1e6,
                "backends": ops.backends(),
            }
        )
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    demo = demo_rows(args)
    print(
        format_table(
            demo,
            ["draft_vocab", "trained_token_share", "mean_accept_length", "tokens_per_second", "lossless"],
        )
    )
    head = lm_head_rows(args)
    print(format_table(head, ["device", "dtype", "hidden", "draft_vocab", "rows", "median_ms", "weight_MB"]))
    append_results("draft_vocab", demo + head)
    return 0


if __name__ == "__main__":
    sys.exit(main())
