"""``eagle bench``: EAGLE against vanilla decoding on prompts cut from a corpus, per draft tree.

For every tree, each repeat runs every prompt with EAGLE then with vanilla decoding, interleaved (EAGLE,
vanilla, EAGLE, vanilla, ...), so that a change in the machine's load hits both alike. Per tree it reports
the mean acceptance length (tokens per target forward, bonus included, over every round of the first
repeat), tokens/s of EAGLE and of vanilla (new tokens over wall time, prefill included, summed over the
prompts of one repeat) as min / median / max over the repeats, the speedup (median over median) and how
many prompts gave identical outputs (greedy EAGLE is lossless: n/n expected; with sampling, equal seeds give
equal distributions, not equal tokens). ``benchmarks/demo_acceptance.py`` measures the demo pair with the
same :func:`measure_trees`.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time

TREES = ("dynamic", "static", "chain")


def machine() -> str:
    """CPU model and core count (Linux), else the platform's processor name; torch's thread count."""
    import torch

    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"


def load_average() -> str | None:
    """The 1/5/15-minute load averages (the machine's load must be reported beside any tokens/s)."""
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except (OSError, AttributeError):
        return None


def _spread(values: list[float]) -> dict:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def measure_tree(engine, prompts: list[list[int]], max_new_tokens: int, repeats: int = 1, **sampling) -> dict:
    """One tree: ``engine`` (with a draft) on ``prompts`` (token id lists), interleaved and repeated."""
    eagle_tps, vanilla_tps, rounds, identical = [], [], [], 0
    for r in range(repeats):
        e_tok = v_tok = 0
        e_s = v_s = 0.0
        for ids in prompts:
            e = engine.generate(ids, max_new_tokens, **sampling)
            v = engine.generate_vanilla(ids, max_new_tokens, **sampling)
            e_tok, e_s = e_tok + len(e.tokens), e_s + e.total_seconds
            v_tok, v_s = v_tok + len(v.tokens), v_s + v.total_seconds
            if r == 0:
                rounds.extend(e.accept_lengths)
                identical += e.tokens == v.tokens
        eagle_tps.append(e_tok / max(e_s, 1e-9))
        vanilla_tps.append(v_tok / max(v_s, 1e-9))
    eagle, vanilla = _spread(eagle_tps), _spread(vanilla_tps)
    return {
        "tree": None,
        "nodes": engine.tree.num_nodes,
        "mean_accept_length": sum(rounds) / len(rounds) if rounds else float("nan"),
        "eagle_tok_s": eagle,
        "vanilla_tok_s": vanilla,
        "speedup": eagle["median"] / max(vanilla["median"], 1e-9),
        "identical": f"{identical}/{len(prompts)}",
    }


def measure_trees(engine, prompts, trees=TREES, max_new_tokens: int = 64, repeats: int = 1, **sampling):
    """:func:`measure_tree` for each tree name, each after a short warm-up; a list of row dicts."""
    from ..engine.engine import EagleEngine

    rows = []
    for kind in trees:
        tree_engine = EagleEngine(engine.target, engine.draft, tree=kind)
        tree_engine.generate(prompts[0], 4, **sampling)  # warm-up: first calls pay one-off costs
        tree_engine.generate_vanilla(prompts[0], 4, **sampling)
        row = measure_tree(tree_engine, prompts, max_new_tokens, repeats, **sampling)
        row["tree"] = kind
        rows.append(row)
    return rows


def format_rows(rows: list[dict]) -> str:
    """A plain-text table of :func:`measure_trees` rows."""
    head = ["tree", "nodes", "accept len", "EAGLE tok/s min/med/max", "vanilla tok/s min/med/max", "speedup",
            "identical"]  # fmt: skip

    def spread(s):
        return f"{s['min']:.1f} / {s['median']:.1f} / {s['max']:.1f}"

    table = [head] + [
        [r["tree"], str(r["nodes"]), f"{r['mean_accept_length']:.2f}", spread(r["eagle_tok_s"]),
         spread(r["vanilla_tok_s"]), f"{r['speedup']:.2f}x", r["identical"]]  # fmt: skip
        for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def fit_prompts(prompts: list[list[int]], max_length: int, max_new_tokens: int, room: int = 80):
    """Keep each prompt's last tokens so that prompt + new tokens + a draft tree fit the model."""
    keep = max_length - max_new_tokens - room
    if keep < 1:
        from ..errors import EagleError

        raise EagleError(
            f"--max-new-tokens {max_new_tokens} + {room} positions for a draft tree leave no room for a "
            f"prompt in the model's maximum length {max_length}"
        )
    return [p[-keep:] for p in prompts]


def run_bench(args) -> dict:
    """``eagle bench`` (see the module docstring); prints the table, writes ``args.json`` if given."""
    from ..engine.cpu_threads import set_threads
    from ..engine.engine import EagleEngine
    from ..errors import EagleError
    from .common import check_model_dir, load_tokenizer
    from .corpus import code_prompts, prompt_pool, read_documents
    from .model_args import draft_vocab_kwargs

    threads = set_threads(args.threads)
    check_model_dir(args.base)
    tokenizer = load_tokenizer(args.base)
    trees = [t.strip() for t in args.trees.split(",") if t.strip()]
    unknown = [t for t in trees if t not in TREES + ("auto",)]
    if not trees or unknown:
        raise EagleError(f"--trees: unknown tree(s) {unknown}; use a comma-separated list of "
                         f"{', '.join(TREES + ('auto',))}")
    corpus = read_documents(args.corpus, args.doc_separator)
    pool = prompt_pool(corpus.documents, args.prompt_chars)
    if not pool:
        raise EagleError(
            f"--corpus: no text of at least {2 * args.prompt_chars} characters (2 x --prompt-chars) to cut "
            f"prompts from ({corpus.describe()})"
        )
    skipped = len(corpus.documents) - len(pool)
    print(f"[bench] corpus: {corpus.describe()}; prompts cut from {len(pool)} of them "
          f"({skipped} shorter than {2 * args.prompt_chars} characters skipped)")  # fmt: skip
    engine = EagleEngine.from_pretrained(args.base, args.draft, device=args.device, dtype=args.dtype,
                                         threads=0, **draft_vocab_kwargs(args))  # (threads set above)
    texts = code_prompts(pool, args.prompts, args.prompt_chars, seed=args.seed)
    prompts = [tokenizer(t, add_special_tokens=True)["input_ids"] for t in texts]
    prompts = fit_prompts(prompts, engine.max_length, args.max_new_tokens)
    sampling = dict(temperature=args.temperature, seed=args.seed, stop_token_ids=args.stop_token_ids)
    load, started = load_average(), time.time()
    rows = measure_trees(engine, prompts, trees, args.max_new_tokens, args.repeats, **sampling)
    print(format_rows(rows))
    result = {
        "command": " ".join(["eagle", *getattr(args, "argv", sys.argv[1:])]),
        "base": args.base, "draft": args.draft, "corpus": args.corpus, "device": args.device,
        "dtype": args.dtype, "prompts": len(prompts), "prompt_chars": args.prompt_chars,
        "max_new_tokens": args.max_new_tokens, "repeats": args.repeats, "temperature": args.temperature,
        "seed": args.seed, "stop_token_ids": args.stop_token_ids, "threads": threads, "machine": machine(),
        "load_average_before": load, "load_average_after": load_average(), "seconds": time.time() - started,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "rows": rows,
    }  # fmt: skip
    after = result["load_average_after"]
    print(f"[bench] machine: {result['machine']}; load average before/after: {load} / {after}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"[bench] results written to {args.json}")
    return result
