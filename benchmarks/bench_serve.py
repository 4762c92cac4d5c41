"""`eagle serve` under load: 1, 4 and 16 concurrent streaming clients, EAGLE (server with --draft) against
vanilla decoding (the same server without it).

    python benchmarks/bench_serve.py                              # the embedded demo pair, CPU
    python benchmarks/bench_serve.py --concurrency 1,4,16 --requests-per-client 2 --max-tokens 48

Each level runs ``c`` client threads; each sends ``--requests-per-client`` streaming greedy completions one
after another (prompts cut from the held-out standard-library modules, ``ignore_eos`` so every request
makes ``--max-tokens`` tokens). Per level: throughput (completion tokens over the level's wall time), time
to first token (TTFT: request sent -> first text chunk), inter-token latency (ITL: the gap between two
streamed chunks as the client sees it; an EAGLE chunk carries every token of one round) and time per output
token (TPOT: first to last chunk over the tokens after the first, per request), each p50/p99, and the mean
acceptance length from the server's /metrics. Records are appended (JSON lines) to
``benchmarks/results/bench_serve.json``; the latency plot goes to ``benchmarks/results/bench_serve.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time

import httpx
from common import RESULTS_DIR, ROOT, append_results, parse


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    xs = sorted(values)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(base: str, draft: str | None, args) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "eagle_engine", "serve", "--base", base, "--port", str(port)]
    cmd += [
        "--max-batch-size",
        str(max(args.concurrency)),
        "--tree",
        args.tree,
        "--threads",
        str(args.threads),
    ]
    cmd += ["--device", args.device, "--log-level", "warning"] + (["--draft", draft] if draft else [])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.join(ROOT, "python"), ROOT]))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}: {' '.join(cmd)}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise SystemExit("the server did not come up within 180 s")


def acceptance_counters(url: str) -> tuple[float, float]:
    """(accepted tokens, verification rounds) so far, from /metrics."""
    values = {}
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(("eagle_accepted_tokens_total ", "eagle_verify_rounds_total ")):
            name, value = line.split()
            values[name] = float(value)
    return values.get("eagle_accepted_tokens_total", 0.0), values.get("eagle_verify_rounds_total", 0.0)


def one_request(url: str, model: str, prompt: str, max_tokens: int) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    body.update(ignore_eos=True, stream_options={"include_usage": True})
    t0 = time.perf_counter()
    chunk_times, texts, usage = [], [], None
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                usage = event["usage"]
            if event["choices"] and event["choices"][0]["text"]:
                chunk_times.append(time.perf_counter())
                texts.append(event["choices"][0]["text"])
    end = time.perf_counter()
    return {
        "start": t0,
        "end": end,
        "chunks": chunk_times,
        "texts": texts,
        "tokens": usage["completion_tokens"],
    }


def run_level(url: str, model: str, prompts: list[str], concurrency: int, args) -> dict:
    """``concurrency`` clients, each sending its requests back to back."""
    results, lock = [], threading.Lock()
    accepted0, rounds0 = acceptance_counters(url)

    def client(i: int):
        for j in range(args.requests_per_client):
            prompt = prompts[(i * args.requests_per_client + j) % len(prompts)]
            r = one_request(url, model, prompt, args.max_tokens)
            with lock:
                results.append(r)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    accepted, rounds = acceptance_counters(url)
    ttft = [r["chunks"][0] - r["start"] for r in results if r["chunks"]]
    itl = [b - a for r in results for a, b in zip(r["chunks"], r["chunks"][1:])]
    tpot = [(r["chunks"][-1] - r["chunks"][0]) / (r["tokens"] - 1) for r in results if r["tokens"] > 1]
    tokens = sum(r["tokens"] for r in results)
    return {
        "concurrency": concurrency,
        "requests": len(results),
        "completion_tokens": tokens,
        "wall_s": wall,
        "throughput_tok_s": tokens / wall,
        "ttft_p50_ms": 1e3 * percentile(ttft, 50),
        "ttft_p99_ms": 1e3 * percentile(ttft, 99),
        "itl_p50_ms": 1e3 * percentile(itl, 50),
        "itl_p99_ms": 1e3 * percentile(itl, 99),
        "tpot_p50_ms": 1e3 * percentile(tpot, 50),
        "tpot_p99_ms": 1e3 * percentile(tpot, 99),
        "chunks_per_request": statistics.mean(len(r["chunks"]) for r in results),
        "mean_acceptance_length": (accepted - accepted0) / (rounds - rounds0) if rounds > rounds0 else None,
    }


def plot(records: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    panels = [
        ("ttft", "time to first token (ms)"),
        ("itl", "inter-token latency (ms)"),
        ("tpot", "TPOT (ms)"),
    ]
    for ax, (key, label) in zip(axes, panels):
        for mode, color in (("eagle", "tab:blue"), ("vanilla", "tab:orange")):
            rows = sorted((r for r in records if r["mode"] == mode), key=lambda r: r["concurrency"])
            xs = [r["concurrency"] for r in rows]
            ax.plot(xs, [r[f"{key}_p50_ms"] for r in rows], "o-", color=color, label=f"{mode} p50")
            ax.plot(xs, [r[f"{key}_p99_ms"] for r in rows], "s--", color=color, label=f"{mode} p99")
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({r["concurrency"] for r in records}))
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("eagle serve: latency against concurrency (" + records[0]["machine"] + ")", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", default="1,4,16", help="client counts (comma-separated)")
    ap.add_argument("--requests-per-client", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--prompt-chars", type=int, default=300)
    ap.add_argument("--base", default=None, help="target directory (default: the embedded demo target)")
    ap.add_argument("--draft", default=None, help="head directory (default: the embedded demo head)")
    ap.add_argument("--tree", default="auto")
    ap.add_argument("--device", default=None, help="default: cuda where a GPU is visible, else cpu")
    ap.add_argument("--threads", type=int, default=1, help="server torch threads (default 1)")
    ap.add_argument("--no-save", action="store_true", help="print only: no JSON record, no plot")
    args = parse(ap, argv)
    args.concurrency = [int(c) for c in args.concurrency.split(",")]

    import torch

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    from eagle_engine import demo_paths
    from eagle_engine.tools import corpus
    from eagle_engine.tools.bench import load_average, machine

    base, draft = args.base, args.draft
    if base is None:
        base, demo_head = demo_paths()
        draft = draft or demo_head
    texts = corpus.read_corpus(corpus.stdlib_files("heldout"))
    prompts = corpus.code_prompts(texts, max(args.concurrency) * args.requests_per_client, args.prompt_chars)
    model = os.path.basename(os.path.normpath(base))
    torch.set_num_threads(args.threads)  # (this process only times clients) so machine() names the server's
    load_before = load_average()
    records = []
    for mode, head in (("eagle", draft), ("vanilla", None)):
        proc, url = start_server(base, head, args)
        try:
            one_request(url, model, prompts[0], 8)  # warm-up
            for c in args.concurrency:
                row = {"mode": mode, **run_level(url, model, prompts, c, args)}
                records.append(row)
                print(
                    f"{mode:8s} c={c:3d}  {row['throughput_tok_s']:7.1f} tok/s  "
                    f"TTFT p50/p99 {row['ttft_p50_ms']:7.1f}/{row['ttft_p99_ms']:7.1f} ms  "
                    f"ITL p50/p99 {row['itl_p50_ms']:6.1f}/{row['itl_p99_ms']:6.1f} ms  "
                    f"TPOT p50 {row['tpot_p50_ms']:6.1f} ms  accept {row['mean_acceptance_length']}",
                    flush=True,
                )
        finally:
            proc.terminate()
            proc.wait(30)
    common = dict(
        machine=machine(),
        load_average_before=load_before,
        load_average_after=load_average(),
        device=args.device,
        tree=args.tree,
        server_threads=args.threads,
        max_batch_size=max(args.concurrency),
        max_tokens=args.max_tokens,
        requests_per_client=args.requests_per_client,
        prompt_chars=args.prompt_chars,
        base=os.path.relpath(base, ROOT) if args.base is None else base,
    )
    records = [{**common, **r} for r in records]
    if not args.no_save:
        path = append_results("bench_serve", records)
        png = os.path.join(RESULTS_DIR, "bench_serve.png")
        plot(records, png)
        print(f"appended to {os.path.relpath(path, ROOT)}; plot: {os.path.relpath(png, ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
