"""Ahead-of-time compilation for Hopper (sm_90) of exactly what Triton's JIT compiles for the engine's
launches.

No GPU is needed. ``tests/jit_sweep.py`` calls each kernel module's host functions over the shapes the engine
launches at real model sizes, on ``meta`` tensors, with the kernels replaced by recorders that bind every
launch as Triton's own launcher does (the integers it specialises to 1 or marks divisible by 16, the aligned
pointers), and compiles each distinct variant to a cubin with ``triton.compile``. Every variant must fit the
shared memory its module allows (one block's 227 KiB; decode and draft-step attention tiles, half an SM so
that two blocks share one); no integer argument may be specialised to 1 (each kernel lists those that can be
1 in ``do_not_specialize``: one compiled variant per block config); the overlap-safe KV compaction must keep
its barrier between reads and writes.
"""

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

pytestmark = pytest.mark.kernels

SWEEP = os.path.join(os.path.dirname(os.path.abspath(__file__)), "jit_sweep.py")
MODULES = [
    "eagle_kernels.tree_attention",
    "eagle_kernels.draft_fc",
    "eagle_kernels.rms_norm",
    "eagle_kernels.lm_head_topk",
    "eagle_kernels.rotary_store_kv",
    "eagle_kernels.silu_mul",
    "eagle_kernels.counter_uniform",
    "eagle_kernels.kv_compact",
    "eagle_kernels.top_p_threshold",
    "eagle_kernels.masked_softmax",
]
WORKERS = 2


@pytest.mark.parametrize("module", MODULES)
def test_what_the_jit_compiles_compiles_for_hopper_within_budget(module, tmp_path):
    # Fresh interpreters (this process runs Triton in interpreter mode, which cannot compile) and a fresh
    # cache directory, so that every cubin is really built.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "TRITON_CACHE_DIR": str(tmp_path)}
    env.pop("TRITON_INTERPRET", None)

    def run(shard):
        cmd = [sys.executable, SWEEP, module, str(shard), str(WORKERS)]
        return subprocess.run(cmd, capture_output=True, text=True, env=env)

    with ThreadPoolExecutor(WORKERS) as pool:
        runs = list(pool.map(run, range(WORKERS)))
    for r in runs:
        assert r.returncode == 0, r.stderr[-4000:]
    payloads = [json.loads(r.stdout.strip().splitlines()[-1]) for r in runs]
    results = [x for p in payloads for x in p["results"]]
    assert len(results) == payloads[0]["variants"] > 0
    for x in results:
        print(f"{x['kernel']} {x['constexprs']} warps={x['num_warps']} stages={x['num_stages']}: "
              f"shared {x['shared']} B of {x['budget']}")
        assert x["cubin_bytes"] > 0, x
        assert x["shared"] <= x["budget"], f"over its shared-memory budget: {x}"
        assert not x["specialised_to_1"], f"the JIT would compile a variant for the value 1: {x}"
        if x["kernel"] == "_kv_compact_kernel":
            assert x["barrier"], "kv_compact must read all accepted rows before writing any"
