"""What a decoding step costs the host: kernel launches and host synchronisations, counted through the
public API on any device (a CPU too), so that a test can hold the line and a benchmark can print the table.

- Torch ops are seen by a ``TorchDispatchMode``: every op that launches work counts one (views, metadata
  and allocations do not).
- An ``eagle_kernels`` op that is a GPU kernel counts as its launches on a GPU (see :data:`KERNEL_LAUNCHES`)
  and what it does inside (its CPU reference here) is not counted; ops that are plain torch code on a GPU
  too (``pack_tree_mask`` ...) are counted op by op.
- Host synchronisations: reading a device value (``aten._local_scalar_dense``: ``.item()``, ``int()``,
  ``bool()``), ``.tolist()``, ``.numpy()``, ``.cpu()`` of a non-CPU tensor,
  ``torch.tensor(data, device=...)``, and explicit CUDA synchronisation.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import eagle_kernels

# Launches each op makes on a GPU (its most: e.g. tree attention's split-KV reduction).
KERNEL_LAUNCHES = {
    "tree_attention": 2,
    "rms_norm": 1,
    "add_rms_norm": 1,
    "draft_fc": 1,
    "lm_head_topk": 3,
    "kv_compact": 1,
    "tree_verify_greedy": 1,
    "tree_verify_sampling": 1,
    "silu_mul": 1,
    "rotary_store_kv": 1,
    "counter_uniform": 1,
    "top_p_threshold": 1,
    "masked_softmax_": 1,
}
# Allocations and metadata: no kernel runs.
FREE_OPS = {"empty", "empty_strided", "detach", "alias", "lift_fresh", "_unsafe_view", "set_", "resize_"}


@dataclass
class Cost:
    launches: int = 0
    syncs: int = 0
    by_op: dict = field(default_factory=dict)

    def add(self, name: str, n: int = 1) -> None:
        self.launches += n
        self.by_op[name] = self.by_op.get(name, 0) + n


class _Counter(TorchDispatchMode):
    def __init__(self, cost: Cost, paused: list[int]):
        super().__init__()
        self.cost, self.paused = cost, paused

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not self.paused[0]:
            name = func.overloadpacket.__name__
            if name == "_local_scalar_dense":
                self.cost.syncs += 1
            elif not func.is_view and name not in FREE_OPS:
                self.cost.add(name)
        return out


@contextlib.contextmanager
def count_round_cost():
    """Count launches and syncs inside the block; yields a :class:`Cost` filled as it runs."""
    cost, paused = Cost(), [0]
    patches = []

    def patch(owner, name, wrapper_of):
        original = getattr(owner, name)
        patches.append((owner, name, original))
        setattr(owner, name, wrapper_of(original))

    def kernel(name, n):
        def wrap(fn):
            def op(*args, **kwargs):
                if not paused[0]:
                    cost.add(name, n)
                paused[0] += 1
                try:
                    return fn(*args, **kwargs)
                finally:
                    paused[0] -= 1

            return op

        return wrap

    def sync(fn, when=lambda *a, **k: True):
        def wrapped(*args, **kwargs):
            if not paused[0] and when(*args, **kwargs):
                cost.syncs += 1
            return fn(*args, **kwargs)

        return wrapped

    for name, n in KERNEL_LAUNCHES.items():
        if hasattr(eagle_kernels, name):
            patch(eagle_kernels, name, kernel(name, n))
    for name in ("tolist", "numpy"):
        patch(torch.Tensor, name, sync)
    patch(torch.Tensor, "cpu", lambda fn: sync(fn, lambda self, *a, **k: self.device.type != "cpu"))
    patch(torch, "tensor", lambda fn: sync(fn, lambda *a, **k: k.get("device") is not None))
    patch(torch.cuda, "synchronize", sync)
    try:
        with _Counter(cost, paused):
            yield cost
    finally:
        for owner, name, original in reversed(patches):
            setattr(owner, name, original)


def step_costs(runner, steps: int) -> list[Cost]:
    """Run ``steps`` steps of ``runner`` (sequences already added), each counted on its own."""
    costs = []
    for _ in range(steps):
        if not runner.has_running():
            break
        with count_round_cost() as cost:
            runner.step()
        costs.append(cost)
    return costs
