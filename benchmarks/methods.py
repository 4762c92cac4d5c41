"""The headline comparison in one engine: every speculative method on the same target, text and settings.

    python benchmarks/methods.py                         # demo pair, 16 held-out snippets, CPU
    python benchmarks/methods.py --prompts 4 --new-tokens 64 --repeats 1      # a quick look

Methods (rows, in this order): ``vanilla``, ``prompt_lookup``, ``lookahead``, ``medusa`` (Medusa-1 heads),
``eagle1`` (the EAGLE-1/2 head with EAGLE-1's static tree), ``eagle2`` (the same head, EAGLE-2's dynamic
tree of 60 nodes), ``eagle2_auto`` (dynamic tree sized to the device: ``tree="auto"``), ``eagle3`` (the
EAGLE-3 demo head, dynamic tree). All share one loaded target. Greedy decoding of the held-out demo
snippets (standard-library modules the demo pair never saw, see :mod:`eagle_engine.tools.corpus`),
interleaved: for each repeat and prompt, every method runs once, so a load change hits all alike.

Per method: mean accepted length (tokens kept per target forward, bonus included), tokens/s (new tokens
over wall time, prefill included; the median over repeats), speedup over vanilla (median over median), and
whether the output equals vanilla's on every prompt. Written to ``benchmarks/results/methods.json``
(``{"device", "rows": [{"method", "mean_accept_length", "tokens_per_second", "speedup", "lossless"}, ...]}``
plus the machine, settings, date and commit) and a bar chart ``benchmarks/results/methods.png``.

Medusa heads for the demo target are not shipped (a vocabulary projection per head: ~9 MB): ``--medusa
DIR`` names trained heads; without it they are trained once by the ``eagle train-draft --method medusa``
workflow (4 heads, ``--medusa-steps`` x 6 x 384 tokens of the demo's training split) into ``--work`` (default
``benchmarks/.work``, ignored by git) and reused.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import RESULTS_DIR, environment, parse  # noqa: E402

from eagle_engine import EagleEngine, demo_paths  # noqa: E402
from eagle_engine.models.loading import load_draft, load_target  # noqa: E402
from eagle_engine.tools import corpus  # noqa: E402
from eagle_engine.tools.bench import load_average, machine  # noqa: E402
from eagle_engine.tools.common import load_tokenizer  # noqa: E402
from eagle_engine.tools.corpus import read_corpus  # noqa: E402

METHODS = ("vanilla", "prompt_lookup", "lookahead", "medusa", "eagle1", "eagle2", "eagle2_auto", "eagle3")
PUBLISHED = {"lookahead": 2.0, "medusa": 1.6}  # EAGLE's speedup over them, as the EAGLE paper reports


def medusa_heads(args, target_dir: str) -> str:
    """A Medusa head directory for the demo target: ``--medusa`` or trained once into ``--work``."""
    if args.medusa:
        return args.medusa
    out = os.path.join(args.work, "medusa-demo")
    if os.path.isfile(os.path.join(out, "config.json")):
        return out
    print(f"[methods] training Medusa heads for the demo target into {out} (once)...", file=sys.stderr)
    from eagle_engine.tools.train import DraftTrainJob, train_draft

    job = DraftTrainJob(  # the `eagle train-draft --method medusa` workflow, on the demo's training split
        base=target_dir, corpus=corpus.stdlib_files("train"), out=out, method="medusa", medusa_heads=4,
        steps=args.medusa_steps, seq_len=384, batch_size=6, lr=2e-3, device=args.device, resume=True,
        eval_corpus=corpus.stdlib_files("heldout"), eval_prompts=8,
    )
    train_draft(job)
    return out


def build_engines(args) -> dict[str, EagleEngine]:
    target_dir, head_dir = demo_paths()
    target = load_target(target_dir, device=args.device, dtype=args.dtype)
    eagle_head = load_draft(head_dir, target)
    eagle3_head = load_draft(demo_paths(head="eagle3")[1], target)
    medusa = load_draft(medusa_heads(args, target_dir), target)
    common = dict(max_batch_size=1)
    lookahead = json.loads(args.lookahead) if args.lookahead else None
    prompt_lookup = json.loads(args.prompt_lookup) if args.prompt_lookup else None
    return {
        "vanilla": EagleEngine(target, **common),
        "prompt_lookup": EagleEngine(target, method="prompt_lookup", prompt_lookup=prompt_lookup, **common),
        "lookahead": EagleEngine(target, method="lookahead", lookahead=lookahead, **common),
        "medusa": EagleEngine(target, medusa, **common),
        "eagle1": EagleEngine(target, eagle_head, tree="static", **common),
        "eagle2": EagleEngine(target, eagle_head, tree="dynamic", **common),
        "eagle2_auto": EagleEngine(target, eagle_head, tree="auto", **common),
        "eagle3": EagleEngine(target, eagle3_head, tree="dynamic", **common),
    }


def run(engines: dict[str, EagleEngine], prompts, new_tokens: int, repeats: int) -> list[dict]:
    """Interleaved greedy runs; one row per method."""
    gen = {m: (e.generate_vanilla if m == "vanilla" else e.generate) for m, e in engines.items()}
    for m in engines:  # warm-up: first calls pay one-off costs (compilation, then CUDA-graph capture on the
        gen[m](prompts[0], 48, stop_token_ids=[])  # second step of a key): several rounds, none timed
    tps = {m: [] for m in engines}
    accepted = {m: [] for m in engines}
    outputs = {m: [] for m in engines}
    for r in range(repeats):
        tokens = {m: 0 for m in engines}
        seconds = {m: 0.0 for m in engines}
        for i, ids in enumerate(prompts):
            for m in engines:
                res = gen[m](ids, new_tokens, stop_token_ids=[])
                tokens[m] += len(res.tokens)
                seconds[m] += res.total_seconds
                if r == 0:
                    accepted[m].extend(res.accept_lengths or [1] * (len(res.tokens) - 1))
                    outputs[m].append(res.tokens)
            progress = f"[methods] repeat {r + 1}/{repeats}: prompt {i + 1}/{len(prompts)}"
            print(progress, file=sys.stderr, end="\r")
        for m in engines:
            tps[m].append(tokens[m] / max(seconds[m], 1e-9))
    print(file=sys.stderr)
    base = statistics.median(tps["vanilla"])
    rows = []
    for m in engines:
        median = statistics.median(tps[m])
        same = sum(a == b for a, b in zip(outputs[m], outputs["vanilla"]))
        rows.append({
            "method": m,
            "mean_accept_length": sum(accepted[m]) / max(len(accepted[m]), 1),
            "tokens_per_second": median,
            "tokens_per_second_min": min(tps[m]),
            "tokens_per_second_max": max(tps[m]),
            "speedup": median / max(base, 1e-9),
            "lossless": same == len(prompts),
            "identical": f"{same}/{len(prompts)}",
        })
    return rows


def table(rows: list[dict]) -> str:
    head = ["method", "accept len", "tokens/s (min-max)", "speedup", "= vanilla"]
    body = [[r["method"], f"{r['mean_accept_length']:.2f}",
             f"{r['tokens_per_second']:.1f} ({r['tokens_per_second_min']:.1f}-"
             f"{r['tokens_per_second_max']:.1f})",
             f"{r['speedup']:.2f}x", r["identical"]] for r in rows]  # fmt: skip
    widths = [max(len(x[i]) for x in [head] + body) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(x, widths)).rstrip() for x in [head] + body]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def ratios(rows: list[dict]) -> list[str]:
    """EAGLE's speedup over Lookahead and Medusa (the best EAGLE row), beside the published ratios."""
    by = {r["method"]: r for r in rows}
    eagle = max((r for r in rows if r["method"].startswith("eagle")), key=lambda r: r["tokens_per_second"])
    out = []
    for other, published in PUBLISHED.items():
        ratio = eagle["tokens_per_second"] / max(by[other]["tokens_per_second"], 1e-9)
        out.append(f"{eagle['method']} / {other}: {ratio:.2f}x here (published: about {published:g}x)")
    return out


def chart(rows: list[dict], device: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.6), dpi=120)
    names = [r["method"] for r in rows]
    speed = [r["speedup"] for r in rows]
    bars = ax.bar(names, speed, color=["#888" if n == "vanilla" else "#3a7" if n.startswith("eagle")
                                      else "#58b" for n in names])  # fmt: skip
    ax.axhline(1.0, color="#444", lw=0.8, ls="--")
    for bar, r in zip(bars, rows):
        ax.annotate(f"{r['speedup']:.2f}x\n{r['mean_accept_length']:.2f}", (bar.get_x() + bar.get_width() / 2,
                    bar.get_height()), ha="center", va="bottom", fontsize=7)  # fmt: skip
    ax.set_ylabel("speedup over vanilla (greedy)")
    ax.set_title(f"Methods on the demo pair, held-out snippets ({device})", fontsize=9)
    ax.tick_params(axis="x", labelsize=8)
    ax.set_ylim(0, max(speed) * 1.3)
    fig.tight_layout()
    fig.savefig(path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-chars", type=int, default=400)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on a CPU")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: the demo is tiny)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--medusa", default=None, help="trained Medusa heads (default: train)")
    ap.add_argument("--medusa-steps", type=int, default=1000, help="steps when training the Medusa heads")
    ap.add_argument("--work", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), ".work"))
    ap.add_argument("--lookahead", default=None, metavar="JSON", help="LookaheadConfig fields (default: its)")
    ap.add_argument("--prompt-lookup", default=None, metavar="JSON", help="PromptLookupConfig fields")
    ap.add_argument("--out", default=RESULTS_DIR, help="directory for methods.json and methods.png")
    args = parse(ap, argv)
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    torch.set_num_threads(args.threads)
    target_dir, _ = demo_paths()
    tokenizer = load_tokenizer(target_dir)
    texts = read_corpus(corpus.stdlib_files("heldout"))
    snippets = corpus.code_prompts(texts, args.prompts, args.prompt_chars, seed=args.seed)
    prompts = [tokenizer(s, add_special_tokens=False)["input_ids"] for s in snippets]
    load = load_average()
    t0 = time.time()
    engines = build_engines(args)
    rows = run(engines, prompts, args.new_tokens, args.repeats)
    env = environment()
    device = env.get("device") if args.device.startswith("cuda") else machine()
    print(table(rows))
    for line in ratios(rows):
        print(line)
    result = {
        "device": device,
        "rows": rows,
        "settings": {"prompts": len(prompts), "new_tokens": args.new_tokens, "repeats": args.repeats,
                     "dtype": args.dtype, "threads": args.threads, "greedy": True,
                     "eagle2_auto_tree": {"total_tokens": engines["eagle2_auto"].tree.num_nodes,
                                          "depth": engines["eagle2_auto"].tree.depth,
                                          "top_k": engines["eagle2_auto"].tree.top_k},
                     "lookahead": vars(engines["lookahead"].settings),
                     "prompt_lookup": vars(engines["prompt_lookup"].settings)},
        "ratios": ratios(rows),
        "load_average": load,
        "seconds": round(time.time() - t0, 1),
        **{k: v for k, v in env.items() if k in ("date", "commit")},
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "methods.json"), "w") as f:
        json.dump(result, f, indent=1)
    chart(rows, device, os.path.join(args.out, "methods.png"))
    print(f"wrote {os.path.join(args.out, 'methods.json')} and methods.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
