"""Shared benchmark helpers: timing, environment facts, measured bandwidth, JSON results, a summary table.

- :func:`parse` parses a benchmark's arguments (and stops there for the GPU suite's dry run);
- :func:`bench` times a callable with ``triton.testing.do_bench``: median and 20th/80th percentiles.
- :func:`environment` gives the device name, the UTC date and the git commit stamped on every result.
- :func:`copy_bandwidth_gbs` measures device copy bandwidth (bytes read + written per second) with a large
  ``torch`` copy: the yardstick for "% of bandwidth".
- :func:`append_results` appends one JSON object per line to ``benchmarks/results/<name>.json`` (the folder
  is ``$EAGLE_BENCH_RESULTS`` where that is set).
- ``python benchmarks/common.py summary [--since ISO-DATE]`` prints the results recorded since a date, across
  every file under ``benchmarks/results`` (``*.json`` and ``*.jsonl``).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import glob
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
# Where results are appended: benchmarks/results, or $EAGLE_BENCH_RESULTS (the GPU suite points it at $OUT).
RESULTS_DIR = os.environ.get("EAGLE_BENCH_RESULTS") or os.path.join(HERE, "results")
ROOT = os.path.dirname(HERE)
for _path in (ROOT, os.path.join(ROOT, "python")):  # run from a plain checkout too
    if _path not in sys.path:
        sys.path.insert(0, _path)


def parse(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """``parser.parse_args(argv)``; with ``EAGLE_BENCH_CHECK_ARGS=1`` (the GPU suite's dry run) it stops
    there: every argument read and checked, nothing run."""
    args = parser.parse_args(argv)
    if os.environ.get("EAGLE_BENCH_CHECK_ARGS") == "1":
        print(f"{parser.prog}: arguments ok")
        sys.exit(0)
    return args


def bench(fn, warmup_ms: int = 25, rep_ms: int = 100) -> dict:
    """Time ``fn`` on the current CUDA device: ``{"median_us", "p20_us", "p80_us"}`` (microseconds)."""
    from triton.testing import do_bench

    median, p20, p80 = do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
    return {"median_us": median * 1e3, "p20_us": p20 * 1e3, "p80_us": p80 * 1e3}


def git_commit() -> str:
    """Short commit of the checkout (``-dirty`` when it has local changes), or ``"unknown"``."""
    try:
        commit = subprocess.run(["git", "-C", HERE, "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", HERE, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def device_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@functools.lru_cache(maxsize=None)
def environment() -> dict:
    """Facts stamped on every result: device, date, commit, torch and triton versions."""
    import torch

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"device": device_name(), "date": utc_now(), "commit": git_commit(), "torch": torch.__version__,
            "triton": triton_version}


@functools.lru_cache(maxsize=None)
def copy_bandwidth_gbs(nbytes: int = 1 << 30) -> float:
    """Measured device-to-device copy bandwidth in GB/s, counting the bytes read plus the bytes written."""
    import torch

    src = torch.empty(nbytes // 2, dtype=torch.float16, device="cuda").fill_(1.0)
    dst = torch.empty_like(src)
    t = bench(lambda: dst.copy_(src))["median_us"] * 1e-6
    return 2 * nbytes / t / 1e9


def bandwidth_fields(nbytes: int, median_us: float, copy_gbs: float) -> dict:
    """Effective GB/s of moving ``nbytes`` in ``median_us``, and its fraction of the copy bandwidth."""
    gbs = nbytes / (median_us * 1e-6) / 1e9
    return {"bytes": nbytes, "gbs": gbs, "frac_copy_bw": gbs / copy_gbs if copy_gbs else None}


def append_results(name: str, records: list[dict], results_dir: str = RESULTS_DIR) -> str:
    """Append ``records``, stamped with :func:`environment`, as JSON lines to ``<results_dir>/<name>.json``.

    Returns the path written."""
    os.makedirs(results_dir, exist_ok=True)
    path = os.path.join(results_dir, f"{name}.json")
    env = environment()
    with open(path, "a") as f:
        for record in records:
            f.write(json.dumps({"benchmark": name, **env, **record}) + "\n")
    return path


def interleaved_decode(engines: dict, prompts: list[list[int]], new_tokens: int, repeats: int,
                       reference: list[list[int]]) -> dict:
    """Greedy decoding of ``prompts`` by each of ``engines`` (``{name: EagleEngine}``), each engine once per
    repeat and prompt in turn (a load change hits all alike): ``{name: {"mean_accept_length",
    "tokens_per_second" (the median over its calls), "lossless"}}``, lossless meaning every output equals
    ``reference``'s."""
    import statistics
    import time

    out = {name: {"accept_lengths": [], "tokens_per_second": [], "lossless": True} for name in engines}
    for _ in range(repeats):
        for i, prompt in enumerate(prompts):
            for name, engine in engines.items():
                started = time.perf_counter()
                r = engine.generate(prompt, new_tokens, stop_token_ids=[])
                out[name]["tokens_per_second"].append(len(r.tokens) / (time.perf_counter() - started))
                out[name]["accept_lengths"].extend(r.accept_lengths)
                out[name]["lossless"] &= r.tokens == reference[i]
    return {name: {"mean_accept_length": statistics.mean(run["accept_lengths"]),
                   "tokens_per_second": statistics.median(run["tokens_per_second"]),
                   "lossless": run["lossless"]} for name, run in out.items()}  # fmt: skip


def format_table(rows: list[dict], columns: list[str]) -> str:
    """Plain-text table of ``rows`` restricted to ``columns`` (floats with 4 significant digits)."""

    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v)

    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def load_results(results_dir: str = RESULTS_DIR, since: str | None = None) -> dict[str, list[dict]]:
    """Every JSON-lines record under ``results_dir`` (dated at or after ``since`` when given), by file."""
    out = {}
    for path in sorted(glob.glob(os.path.join(results_dir, "*.json")) + glob.glob(os.path.join(results_dir,
                                                                                             "*.jsonl"))):
        records = []
        with open(path) as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(record, dict) and (since is None or str(record.get("date", "")) >= since):
                    records.append(record)
        if records:
            out[os.path.basename(path)] = records
    return out


SUMMARY_SKIP = {"device", "date", "commit", "torch", "triton", "benchmark", "bytes", "p20_us", "p80_us",
                "steps"}


def summary(results_dir: str = RESULTS_DIR, since: str | None = None) -> str:
    """A short per-file table of recorded results (the columns each file's records share)."""
    blocks = []
    for name, records in load_results(results_dir, since).items():
        columns = [k for k in records[0] if k not in SUMMARY_SKIP and all(k in r for r in records)][:10]
        head = f"== {name}: {len(records)} results ({records[-1].get('device', '?')}, " \
               f"commit {records[-1].get('commit', '?')})"
        blocks.append(head + "\n" + format_table(records[-40:], columns))
    return "\n\n".join(blocks) if blocks else "no results"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Benchmark helpers; `summary` prints recorded results.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_sum = sub.add_parser("summary", help="print results recorded since a date")
    p_sum.add_argument("--since", default=None, help="ISO date-time (UTC), e.g. 2026-01-31T12:00:00Z")
    p_sum.add_argument("--results-dir", default=RESULTS_DIR)
    sub.add_parser("bandwidth", help="measure the device copy bandwidth")
    args = parser.parse_args(argv)
    if args.command == "summary":
        print(summary(args.results_dir, args.since))
    else:
        print(f"{device_name()}: copy bandwidth {copy_bandwidth_gbs():.0f} GB/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
