"""`eagle serve` under load: 1, 4 and 16 concurrent streaming clients, EAGLE (server with --draft) against
vanilla decoding (the same server without it).

    python benchmarks/bench_serve.py                              # the embedded demo pair, CPU
    python benchmarks/bench_serve.py --concurrency 1,4,16 --requests-per-client 2 --max-tokens 48

Each level runs ``c`` client threads; each sends ``--requests-per-client`` streaming greedy completions one
after another (prompts cut from the held-out standard-library modules, ``ignore_eos`` so every request
makes ``--max-tokens`` tokens). Per level: throughput (completion tokens over the level's wall time) and
the mean acceptance length, then each latency twice, p50/p99/mean: as the clients measured it and from the
server's own histograms (scraped from /metrics before and after the level), with whether they agree
(counts, means and p50s: see ``agreement``). TTFT: sent -> first chunk. ITL: a chunk's gap shared by its
tokens (every chunk carries the usage so far, ``continuous_usage_stats``). TPOT: first to last chunk over
the tokens after the first, per request. e2e: sent -> last chunk. Also the gap between chunks as a reader
waits it (an EAGLE chunk carries a round's tokens) and the server's queue time. Records are appended (JSON
lines) to ``benchmarks/results/bench_serve.json``; the latency plot goes to
``benchmarks/results/bench_serve.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import statistics
import subprocess
import sys
import threading
import time

import httpx
from common import RESULTS_DIR, ROOT, append_results, parse

from eagle_engine.tools.latency import ScrapedHistogram, percentile, scrape_histograms


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


def scrape(url: str) -> tuple[dict, float, float]:
    """(the server's histograms, accepted tokens, verification rounds) so far, from /metrics."""
    text = httpx.get(url + "/metrics", timeout=10).text
    values = {}
    for line in text.splitlines():
        if line.startswith(("eagle_accepted_tokens_total ", "eagle_verify_rounds_total ")):
            name, value = line.split()
            values[name] = float(value)
    accepted = values.get("eagle_accepted_tokens_total", 0.0)
    return scrape_histograms(text), accepted, values.get("eagle_verify_rounds_total", 0.0)


def one_request(client: httpx.Client, url: str, model: str, prompt: str, max_tokens: int) -> dict:
    """One streaming greedy completion: when it was sent, and each chunk's arrival with the tokens made so
    far (``continuous_usage_stats``), the finishing chunk last. ``client``: the caller's, kept alive across
    its requests as real clients do (a new one costs tens of ms of TLS setup, which TTFT would count)."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    body.update(ignore_eos=True, stream_options={"include_usage": True, "continuous_usage_stats": True})
    t0 = time.perf_counter()
    chunks, tokens = [], 0
    with client.stream("POST", url + "/v1/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event["choices"]:
                tokens = event["usage"]["completion_tokens"]
                chunks.append((time.perf_counter(), tokens))
    return {"start": t0, "chunks": chunks, "tokens": tokens}


def client_latencies(results: list[dict]) -> dict[str, list[float]]:
    """Seconds, as the clients saw them, defined as the server's histograms define them: TTFT (sent ->
    first chunk), ITL (a chunk's gap shared evenly by its tokens, one value per token after the first),
    TPOT (first to last chunk over the tokens after the first, per request), e2e (sent -> finishing
    chunk); and the plain gaps between chunks (what a reader of the stream waits)."""
    out = {"ttft": [], "itl": [], "tpot": [], "e2e": [], "chunk_gap": []}
    for r in results:
        chunks = [(t, n) for t, n in r["chunks"]]
        if not chunks:
            continue
        out["ttft"].append(chunks[0][0] - r["start"])
        out["e2e"].append(chunks[-1][0] - r["start"])
        out["itl"].extend([0.0] * (chunks[0][1] - 1))  # tokens beyond the first in the first chunk
        for (t_prev, n_prev), (t, n) in zip(chunks, chunks[1:]):
            if n > n_prev:
                out["itl"].extend([(t - t_prev) / (n - n_prev)] * (n - n_prev))
                out["chunk_gap"].append(t - t_prev)
        if r["tokens"] > 1:
            out["tpot"].append((chunks[-1][0] - chunks[0][0]) / (r["tokens"] - 1))
    return out


SERVER_HISTOGRAMS = {  # this benchmark's name -> the server's histogram
    "ttft": "eagle_time_to_first_token_seconds",
    "itl": "eagle_inter_token_latency_seconds",
    "tpot": "eagle_time_per_output_token_seconds",
    "e2e": "eagle_e2e_request_latency_seconds",
    "queue": "eagle_request_queue_seconds",
}


def agreement(client: list[float], server: ScrapedHistogram, contains: bool) -> bool:
    """Whether the client's figures match the server's histogram:
    - the same number of observations;
    - the means (a histogram's is exact): with ``contains`` (TTFT, e2e: each client interval holds the
      server's) the client's no smaller, the difference being the HTTP and streaming time the client sees
      on top; otherwise (ITL, TPOT: the same gaps on two clocks) within 1 ms or 10%, whichever is more;
    - the client's p50 inside the bucket of the server's estimate (its resolution), widened by that mean
      difference and by 1 ms or 10%.
    The p99s are reported, not compared: a tail of a few values moves with the jitter between the engine
    thread's clock and the client's (a chunk the event loop sends late shortens the gap after it)."""
    if len(client) != server.count or not client:
        return False
    mean = statistics.mean(client)
    offset = mean - server.mean
    if (offset < 0) if contains else abs(offset) > max(1e-3, 0.1 * mean):
        return False
    estimate = server.quantile(50)
    lo, hi = server.bucket_of(estimate)
    if estimate == hi:  # on a boundary (the rank fell between two buckets): either may hold it
        hi = server.bucket_of(math.nextafter(hi, math.inf))[1]
    value = percentile(client, 50)
    tolerance = abs(offset) + max(1e-3, 0.1 * value)
    return lo - tolerance <= value <= hi + tolerance


def run_level(url: str, model: str, prompts: list[str], concurrency: int, args) -> dict:
    """``concurrency`` clients, each sending its requests back to back; latencies from the clients and from
    the server's histograms (what they gained during the level), side by side."""
    results, lock = [], threading.Lock()
    histograms0, accepted0, rounds0 = scrape(url)

    def client(i: int):
        with httpx.Client() as http:
            for j in range(args.requests_per_client):
                prompt = prompts[(i * args.requests_per_client + j) % len(prompts)]
                r = one_request(http, url, model, prompt, args.max_tokens)
                with lock:
                    results.append(r)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    histograms, accepted, rounds = scrape(url)
    seen = client_latencies(results)
    tokens = sum(r["tokens"] for r in results)
    row = {
        "concurrency": concurrency,
        "requests": len(results),
        "completion_tokens": tokens,
        "wall_s": wall,
        "throughput_tok_s": tokens / wall,
        "chunks_per_request": statistics.mean(len(r["chunks"]) for r in results),
        "mean_acceptance_length": (accepted - accepted0) / (rounds - rounds0) if rounds > rounds0 else None,
    }
    for key, values in seen.items():
        mean = statistics.mean(values) if values else float("nan")
        p50, p99 = percentile(values, 50), percentile(values, 99)
        row.update({f"{key}_p50_ms": 1e3 * p50, f"{key}_p99_ms": 1e3 * p99, f"{key}_mean_ms": 1e3 * mean,
                    f"{key}_count": len(values)})
    for key, name in SERVER_HISTOGRAMS.items():
        h, server = histograms[name] - histograms0[name], f"server_{key}"
        row.update({f"{server}_p50_ms": 1e3 * h.quantile(50), f"{server}_p99_ms": 1e3 * h.quantile(99),
                    f"{server}_mean_ms": 1e3 * h.mean, f"{server}_count": h.count})
        if key in seen:
            row[f"agree_{key}"] = agreement(seen[key], h, contains=key in ("ttft", "e2e"))
    return row


def print_level(mode: str, row: dict) -> None:
    print(f"{mode} c={row['concurrency']}: {row['throughput_tok_s']:.1f} tok/s, {row['requests']} requests, "
          f"accept {row['mean_acceptance_length']}, chunk gap p50/p99 {row['chunk_gap_p50_ms']:.1f}/"
          f"{row['chunk_gap_p99_ms']:.1f} ms, queue (server) p50/p99 {row['server_queue_p50_ms']:.1f}/"
          f"{row['server_queue_p99_ms']:.1f} ms")
    print(f"  {'ms':6s} {'client p50/p99/mean':>26s} {'server p50/p99/mean':>26s}  agree")
    for key in ("ttft", "itl", "tpot", "e2e"):
        client = "/".join(f"{row[f'{key}_{s}_ms']:.1f}" for s in ("p50", "p99", "mean"))
        server = "/".join(f"{row[f'server_{key}_{s}_ms']:.1f}" for s in ("p50", "p99", "mean"))
        print(f"  {key.upper():6s} {client:>26s} {server:>26s}  {'yes' if row[f'agree_{key}'] else 'NO'}")
    sys.stdout.flush()


def plot(records: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(19, 4.2))
    panels = [
        ("ttft", "time to first token (ms)"),
        ("itl", "inter-token latency (ms)"),
        ("tpot", "time per output token (ms)"),
        ("e2e", "end-to-end latency (ms)"),
    ]
    for ax, (key, label) in zip(axes, panels):
        for mode, color in (("eagle", "tab:blue"), ("vanilla", "tab:orange")):
            rows = sorted((r for r in records if r["mode"] == mode), key=lambda r: r["concurrency"])
            if not rows:
                continue
            xs = [r["concurrency"] for r in rows]
            ax.plot(xs, [r[f"{key}_p50_ms"] for r in rows], "o-", color=color, label=f"{mode} p50")
            ax.plot(xs, [r[f"{key}_p99_ms"] for r in rows], "s--", color=color, label=f"{mode} p99")
            ax.plot(xs, [r[f"server_{key}_p50_ms"] for r in rows], "x:", color=color,
                    label=f"{mode} p50 (server histogram)")
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
    ap.add_argument("--modes", default="eagle,vanilla", help="servers to measure: eagle, vanilla or both")
    ap.add_argument("--no-save", action="store_true", help="print only: no JSON record, no plot")
    args = parse(ap, argv)
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not args.modes or set(args.modes) - {"eagle", "vanilla"}:
        ap.error(f"--modes takes eagle and/or vanilla, got {','.join(args.modes)!r}")

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
    for mode in args.modes:
        proc, url = start_server(base, draft if mode == "eagle" else None, args)
        try:
            with httpx.Client() as http:
                one_request(http, url, model, prompts[0], 8)  # warm-up
            for c in args.concurrency:
                row = {"mode": mode, **run_level(url, model, prompts, c, args)}
                records.append(row)
                print_level(mode, row)
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
