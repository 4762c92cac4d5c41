"""Mean acceptance length and tokens/s of the embedded demo pair on held-out standard-library modules.

    python benchmarks/demo_acceptance.py                   # 16 held-out snippets, 128 new tokens, CPU
    python benchmarks/demo_acceptance.py --prompts 4 --trees dynamic
    python benchmarks/demo_acceptance.py --head eagle3     # the EAGLE-3 demo head, not the EAGLE-1/2 one

For each snippet (400 characters cut at line ends from the held-out modules, see :mod:`eagle_engine.demo`)
it runs greedy EAGLE with each draft tree (the default EAGLE-2 dynamic tree, the EAGLE-1 static tree, a
chain) interleaved with vanilla greedy decoding, ``--repeats`` times, with the measuring code of
``eagle bench`` (:func:`eagle_engine.tools.bench.measure_trees`): mean acceptance length (tokens per target
forward, bonus included, over all rounds), tokens/s of EAGLE and of vanilla (new tokens over wall time,
prefill included; min/median/max over the repeats), the speedup (median over median) and outputs identical
n/n. Results: a table on stdout and one JSON line per tree appended to
``benchmarks/results/demo_acceptance.json`` (device, machine, load average, date, commit, ``head``;
``eagle_tok_s`` and ``vanilla_tok_s`` are the medians; lines without ``head`` are the EAGLE-1/2 head's).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import append_results  # noqa: E402

from eagle_engine import EagleEngine, demo_paths  # noqa: E402
from eagle_engine.tools import corpus  # noqa: E402
from eagle_engine.tools.bench import format_rows, load_average, machine, measure_trees  # noqa: E402
from eagle_engine.tools.common import load_tokenizer  # noqa: E402
from eagle_engine.tools.corpus import read_corpus  # noqa: E402
from eagle_engine.tools.demo import DEMO_HEADS  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-chars", type=int, default=400)
    ap.add_argument("--trees", default="dynamic,static,chain")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--head",
        default="eagle2",
        choices=sorted(DEMO_HEADS),
        help="draft head: eagle2 (default: the EAGLE-1/2 head, head/) or eagle3 (the EAGLE-3 head, head3/)",
    )
    ap.add_argument(
        "--pair", default=None, help="a built pair's dir (target/, head/, head3/); default: the embedded"
    )
    ap.add_argument("--repeats", type=int, default=1, help="interleaved repeats (min/median/max tokens/s)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--no-save", action="store_true", help="print only, append no results")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.pair:
        target_dir = os.path.join(args.pair, "target")
        head_dir = os.path.join(args.pair, DEMO_HEADS[args.head][0])
    else:
        target_dir, head_dir = demo_paths(args.head)
    tokenizer = load_tokenizer(target_dir)
    texts = read_corpus(corpus.stdlib_files("heldout"))
    snippets = corpus.code_prompts(texts, args.prompts, args.prompt_chars, seed=args.seed)
    prompts = [tokenizer(s, add_special_tokens=False)["input_ids"] for s in snippets]
    engine = EagleEngine.from_pretrained(target_dir, head_dir, device=args.device, dtype=args.dtype,
                                         threads=0)  # (set above)
    load = load_average()
    trees = args.trees.split(",")
    rows = measure_trees(engine, prompts, trees, args.new_tokens, args.repeats, stop_token_ids=[])
    print(format_rows(rows))
    for r in rows:  # flat records, as earlier results: the medians, with min and max beside them
        for key in ("eagle_tok_s", "vanilla_tok_s"):
            spread = r.pop(key)
            r[key], r[key + "_min"], r[key + "_max"] = spread["median"], spread["min"], spread["max"]
    common = {"head": args.head, "prompts": len(prompts), "new_tokens": args.new_tokens, "dtype": args.dtype}
    common.update(machine=machine(), repeats=args.repeats, load_average=load)
    if not args.no_save:
        path = append_results("demo_acceptance", [{**common, **r} for r in rows])
        print(f"appended to {os.path.relpath(path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
