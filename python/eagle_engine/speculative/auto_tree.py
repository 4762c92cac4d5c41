"""Trees sized to the device: ``TreeConfig(total_tokens="auto")``.

A bigger tree accepts more tokens per round but costs more per round; where the balance lies depends on the
device (a GPU verifies 60 tokens for about the price of one, a CPU pays for each) and on the head. For each
rung of :data:`LADDER` (chains to the EAGLE-2 default) the engine measures once:

- the round's cost: seconds per round at batch 1 (draft + verify + commit; a round has fixed shapes, so its
  cost does not depend on what is accepted);
- the head's acceptance profile: mean tokens per round, greedy, on calibration text the target writes itself
  (it continues its beginning-of-sequence token followed by each of its 4 likeliest first tokens);

and picks the rung with the most expected tokens per second, ``accept_length / round_seconds``. The result is
cached on disk per device, thread count (CPU), dtype, target and head (``$EAGLE_CACHE_DIR``, default
``~/.cache/eagle_engine/auto_tree.json``), so it is measured once per machine.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass

import torch

from .tree import TreeConfig

# (total_tokens, depth, top_k): chains first (what a CPU affords), then wider and deeper dynamic trees.
LADDER = ((4, 2, 1), (6, 4, 1), (10, 4, 3), (16, 5, 4), (32, 5, 8), (60, 6, 10))
CALIBRATION_PROMPTS = 4
CALIBRATION_TOKENS = 48
CACHE_VERSION = 1


def ladder() -> list[TreeConfig]:
    """The candidate trees, smallest first."""
    return [TreeConfig(total_tokens=t, depth=d, top_k=k) for t, d, k in LADDER]


@dataclass
class TreeProfile:
    """One candidate's measurements: mean tokens kept per round and seconds per round (batch 1)."""

    tree: TreeConfig
    accept_length: float
    round_seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.accept_length / max(self.round_seconds, 1e-12)


def choose(profiles: list[TreeProfile]) -> TreeProfile:
    """The profile with the most expected tokens per second (the smaller tree on a tie)."""
    return max(profiles, key=lambda p: (p.tokens_per_second, -p.tree.num_nodes))


def calibration_prompts(target, count: int = CALIBRATION_PROMPTS) -> list[list[int]]:
    """``[bos, t]`` for the target's ``count`` likeliest first tokens ``t`` after its bos token (token 0 when
    the config names none): text the target writes itself, so no tokenizer or dataset is needed."""
    bos = target.config.bos_token_id if getattr(target.config, "bos_token_id", None) is not None else 0
    cache = target.allocate_cache(1, 2)
    device = target.lm_head_weight.device
    with torch.inference_mode():
        zero = torch.zeros(1, 1, dtype=torch.long, device=device)
        out = target(zero + bos, zero, cache)
        first = target.logits(out.hidden[:, 0]).topk(count, dim=-1).indices[0].tolist()
    return [[bos, t] for t in first]


def measure(target, head, trees: list[TreeConfig], prompts: list[list[int]], new_tokens: int,
            cuda_graphs: bool = False) -> list[TreeProfile]:
    """Run ``prompts`` greedily (one at a time) with each tree; a :class:`TreeProfile` per tree."""
    from ..engine.runner import Runner
    from ..engine.sequence import Sequence
    from .eagle import EagleDrafter
    from .sampling import SamplingParams

    max_len = min(target.config.max_length, max(len(p) for p in prompts) + new_tokens + 8)
    layers = target.config.num_hidden_layers
    profiles = []
    for tree in trees:
        runner = Runner(target, EagleDrafter(head, tree, layers), max_batch_size=1, max_model_len=max_len,
                        cuda_graphs=cuda_graphs)
        tokens = rounds = 0
        step_times: list[float] = []
        with torch.inference_mode():
            for i, prompt in enumerate([prompts[0]] + prompts):  # the first run warms up (not counted)
                seq = Sequence(prompt, SamplingParams(), new_tokens, frozenset(), 0, max_len)
                runner.add([seq])
                while runner.has_running():
                    t0 = time.perf_counter()
                    runner.step()
                    if i > 0:
                        step_times.append(time.perf_counter() - t0)
                if i > 0:
                    tokens += sum(seq.accept_lengths)
                    rounds += len(seq.accept_lengths)
        step_times.sort()
        median = step_times[len(step_times) // 2] if step_times else float("inf")
        profiles.append(TreeProfile(tree, tokens / max(rounds, 1), median))
        del runner
    return profiles


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"cpu:{platform.processor() or platform.machine()}:{torch.get_num_threads()} threads"


def fingerprint(*modules) -> str:
    """A short hash of the modules' parameter names, shapes and first values (cheap, even for big models)."""
    h = hashlib.sha1()
    for module in modules:
        for name, p in module.named_parameters():
            h.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
            h.update(p.detach().reshape(-1)[:64].float().cpu().numpy().tobytes())
        vocab = getattr(module, "draft_token_ids", None)  # a reduced draft vocabulary changes the cost
        if vocab is not None:
            h.update(f"draft_vocab:{vocab.numel()}".encode())
            h.update(vocab[:64].cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def cache_path() -> str:
    default = os.path.join(os.path.expanduser("~"), ".cache", "eagle_engine")
    return os.path.join(os.environ.get("EAGLE_CACHE_DIR") or default, "auto_tree.json")


def _read_cache(path: str) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
        return data if isinstance(data, dict) and data.get("version") == CACHE_VERSION else {}
    except (OSError, ValueError):
        return {}


def _write_cache(path: str, key: str, entry: dict) -> None:
    """Add ``entry`` under ``key`` (atomically: a reader never sees half a file; an unwritable cache only
    means measuring again next time)."""
    data = _read_cache(path) or {"version": CACHE_VERSION, "entries": {}}
    data.setdefault("entries", {})[key] = entry
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, path)
    except OSError as e:
        print(f"[eagle] auto tree: could not write the cache {path}: {e}", file=sys.stderr)


def auto_tree(target, head, *, cuda_graphs=False, profile_fn=None, use_cache: bool = True) -> TreeConfig:
    """The ladder's tree with the most expected tokens per second for ``target`` and ``head`` on their
    device. ``profile_fn(trees) -> list[TreeProfile]`` replaces the measurement (tests stub it; then
    nothing is cached). Under tensor parallelism every rank measures (the rounds' collectives need all of
    them) and all take rank 0's choice."""
    trees = ladder()
    if profile_fn is not None:
        return choose(profile_fn(trees)).tree
    best = _measured_choice(target, head, trees, cuda_graphs, use_cache)
    if target.tp is not None:  # ranks time differently: all take rank 0's choice, or their rounds diverge
        best = trees[target.tp.broadcast_ints([trees.index(best)], target.lm_head_weight.device)[0]]
    return best


def _measured_choice(target, head, trees, cuda_graphs, use_cache) -> TreeConfig:
    device = target.lm_head_weight.device
    key = "|".join([
        _device_name(device), str(target.lm_head_weight.dtype), fingerprint(target), fingerprint(head),
        f"graphs={bool(cuda_graphs)}",
    ])
    path = cache_path()
    if use_cache:
        entry = _read_cache(path).get("entries", {}).get(key)
        if entry is not None:
            try:
                return TreeConfig(**entry["tree"])
            except Exception:  # a stale or edited entry: measure again
                pass
    print(f"[eagle] auto tree: measuring {len(trees)} tree sizes on {_device_name(device)} "
          "(once; cached)...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    profiles = measure(target, head, trees, calibration_prompts(target), CALIBRATION_TOKENS, cuda_graphs)
    best = choose(profiles)
    summary = ", ".join(f"{p.tree.num_nodes}: {p.tokens_per_second:.0f}/s" for p in profiles)
    t = best.tree
    print(f"[eagle] auto tree: {t.num_nodes} nodes (depth {t.depth}, top-k {t.top_k}) in "
          f"{time.perf_counter() - t0:.1f} s; expected tokens/s by size: {summary}", file=sys.stderr)
    if use_cache:
        tree = {k: v for k, v in asdict(best.tree).items() if k != "choices"}
        rows = [{"total_tokens": p.tree.num_nodes, "depth": p.tree.depth, "top_k": p.tree.top_k,
                 "accept_length": p.accept_length, "round_seconds": p.round_seconds} for p in profiles]
        _write_cache(path, key, {"tree": tree, "profiles": rows})
    return best.tree
