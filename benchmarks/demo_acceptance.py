"""Mean acceptance length and tokens/s of the embedded demo pair on held-out standard-library modules.

    python benchmarks/demo_acceptance.py                   # 16 held-out snippets, 128 new tokens, CPU
    python benchmarks/demo_acceptance.py --prompts 4 --trees dynamic

For each snippet (400 characters cut at line ends from the held-out modules, see :mod:`eagle_engine.demo`)
it runs vanilla greedy decoding once and greedy EAGLE with each draft tree (the default EAGLE-2 dynamic tree,
the EAGLE-1 static tree, a chain), checks the outputs are identical, and reports per tree: mean acceptance
length (tokens per target forward, bonus included, over all rounds), tokens/s of EAGLE and of vanilla
(new tokens over wall time, prefill included) and the speedup. Results: a table on stdout and one JSON line
per tree appended to ``benchmarks/results/demo_acceptance.json`` (device, machine, date, commit).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import append_results, format_table  # noqa: E402

from eagle_engine import EagleEngine, demo_paths  # noqa: E402
from eagle_engine.tools import corpus  # noqa: E402
from eagle_engine.tools.common import load_tokenizer  # noqa: E402
from eagle_engine.tools.corpus import read_corpus  # noqa: E402


def machine() -> str:
    """CPU model and core count (Linux), else the platform's processor name."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"


def run(engine, fn, prompts, new_tokens):
    """Greedy outputs and totals of ``fn`` (``engine.generate`` or ``engine.generate_vanilla``)."""
    outs = [fn(ids, new_tokens, stop_token_ids=[]) for ids in prompts]
    tokens = sum(len(o.tokens) for o in outs)
    seconds = sum(o.total_seconds for o in outs)
    rounds = [n for o in outs for n in o.accept_lengths]
    return outs, tokens / seconds, (sum(rounds) / len(rounds) if rounds else None)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-chars", type=int, default=400)
    ap.add_argument("--trees", default="dynamic,static,chain")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pair", default=None, help="a built pair's dir (target/, head/); default: the embedded")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--no-save", action="store_true", help="print only, append no results")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.pair:
        target_dir, head_dir = os.path.join(args.pair, "target"), os.path.join(args.pair, "head")
    else:
        target_dir, head_dir = demo_paths()
    tokenizer = load_tokenizer(target_dir)
    texts = read_corpus(corpus.stdlib_files("heldout"))
    snippets = corpus.code_prompts(texts, args.prompts, args.prompt_chars, seed=args.seed)
    prompts = [tokenizer(s, add_special_tokens=False)["input_ids"] for s in snippets]
    engine = EagleEngine.from_pretrained(target_dir, head_dir, device=args.device, dtype=args.dtype)
    engine.generate_vanilla(prompts[0], 8)  # warm-up
    vanilla, vanilla_tps, _ = run(engine, engine.generate_vanilla, prompts, args.new_tokens)
    rows = []
    for kind in args.trees.split(","):
        engine.tree = EagleEngine(engine.target, tree=kind).tree
        engine.generate(prompts[0], 8)  # warm-up
        outs, tps, accept = run(engine, engine.generate, prompts, args.new_tokens)
        same = sum(o.tokens == v.tokens for o, v in zip(outs, vanilla))
        rows.append({"tree": kind, "nodes": engine.tree.num_nodes, "mean_accept_length": accept,
                     "eagle_tok_s": tps, "vanilla_tok_s": vanilla_tps, "speedup": tps / vanilla_tps,
                     "identical": f"{same}/{len(prompts)}"})  # fmt: skip
    print(format_table(rows, list(rows[0])))
    common = {"prompts": len(prompts), "new_tokens": args.new_tokens, "dtype": args.dtype}
    common["machine"] = machine()
    if not args.no_save:
        path = append_results("demo_acceptance", [{**common, **r} for r in rows])
        print(f"appended to {os.path.relpath(path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
