"""Ahead-of-time compilation for Hopper (sm_90) of every Triton launch variant the dispatch can choose.

No GPU is needed: ``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))`` runs the whole pipeline
down to a cubin. Each variant is compiled twice: bare, and with the hints Triton's JIT adds at a typical
launch (``tt.divisibility = 16`` on aligned pointers and on integers that are multiples of 16: the variant's
``divisible`` list). The hints change the code (vectorised, pipelined K/V loads take far more shared
memory), so the budget is checked on both; a variant may carry a tighter ``max_shared``. Each module lists
its variants in ``compile_variants(dtype)``; a second test sweeps shapes through the host functions (kernels
replaced by recorders, tensors on the ``meta`` device) and checks that every launch they make is one of those
variants, so the list cannot drift from the dispatch.
"""

import importlib
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

pytestmark = pytest.mark.kernels

MODULES = [
    "eagle_kernels.tree_attention",
    "eagle_kernels.draft_fc",
    "eagle_kernels.rms_norm",
    "eagle_kernels.lm_head_topk",
    "eagle_kernels.rotary_store_kv",
    "eagle_kernels.silu_mul",
    "eagle_kernels.counter_uniform",
]
DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
HOPPER_MAX_SHARED = 232448  # bytes of shared memory one block may use on sm_90 (227 KiB)
WORKERS = 2

AOT_COMPILE = """
import importlib, json, os, sys
os.environ.pop("TRITON_INTERPRET", None)  # a compiled (not interpreted) Triton
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from eagle_kernels._triton_common import divisibility_attrs

module, shard, shards = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
mod = importlib.import_module(module)
variants = [(dtype, v) for dtype in ("fp16", "bf16", "fp32") for v in mod.compile_variants(dtype)]
results = []
for i, (dtype, v) in enumerate(variants):
    if i % shards != shard:
        continue
    options = {"num_warps": v["num_warps"], "num_stages": v["num_stages"]}
    for hints in (False, True):
        attrs = divisibility_attrs(v["kernel"], v["signature"], v["divisible"]) if hints else None
        source = ASTSource(fn=v["kernel"], signature=v["signature"], constexprs=v["constexprs"], attrs=attrs)
        kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
        results.append({"dtype": dtype, "kernel": v["kernel"].__name__, "constexprs": repr(v["constexprs"]),
                        "num_warps": v["num_warps"], "num_stages": v["num_stages"], "hints": hints,
                        "cubin_bytes": len(kernel.asm["cubin"]), "shared": kernel.metadata.shared,
                        "max_shared": v.get("max_shared"), "sm90": "sm_90" in kernel.asm["ptx"]})
print(json.dumps({"total": len(variants), "results": results}))
"""


@pytest.mark.parametrize("module", MODULES)
def test_every_variant_compiles_for_hopper(module, tmp_path):
    # Fresh interpreters (this process may run Triton in interpreter mode, which cannot compile) and a fresh
    # cache directory, so that every cubin is really built.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "TRITON_CACHE_DIR": str(tmp_path)}
    env.pop("TRITON_INTERPRET", None)

    def run(shard):
        cmd = [sys.executable, "-c", AOT_COMPILE, module, str(shard), str(WORKERS)]
        return subprocess.run(cmd, capture_output=True, text=True, env=env)

    with ThreadPoolExecutor(WORKERS) as pool:
        runs = list(pool.map(run, range(WORKERS)))
    for r in runs:
        assert r.returncode == 0, r.stderr[-4000:]
    payloads = [json.loads(r.stdout.strip().splitlines()[-1]) for r in runs]
    results = [x for p in payloads for x in p["results"]]
    assert len(results) == 2 * payloads[0]["total"] > 0
    for x in results:
        print(f"{x['dtype']} {x['kernel']} {x['constexprs']} warps={x['num_warps']} stages={x['num_stages']} "
              f"hints={x['hints']}: shared {x['shared']} B")
        assert x["cubin_bytes"] > 0 and x["sm90"], x
        assert x["shared"] <= HOPPER_MAX_SHARED, f"needs more shared memory than an H100 block has: {x}"
        if x["max_shared"] is not None:
            assert x["shared"] <= x["max_shared"], f"over this variant's shared-memory budget: {x}"


# ------------------------------------------------------------------------------ dispatch stays in the list


class Recorder:
    """Stands in for a Triton kernel: ``kernel[grid](*args, **kwargs)`` records the launch, runs nothing."""

    def __init__(self, name, log):
        self.name, self.log = name, log

    def __getitem__(self, grid):
        def launch(*args, num_warps=4, num_stages=3, **constexprs):
            constexprs.pop("FP32_DOT", None)  # interpreter-only switch, always False on a GPU
            self.log.append((self.name, tuple(sorted(constexprs.items())), num_warps, num_stages))

        return launch


def allowed_launches(module):
    allowed = {}
    for dtype in DTYPES.values():
        allowed[dtype] = set()
        for v in module.compile_variants(dtype):
            cx = {k: x for k, x in v["constexprs"].items() if k != "FP32_DOT"}
            key = (v["kernel"].__name__, tuple(sorted(cx.items())), v["num_warps"], v["num_stages"])
            allowed[dtype].add(key)
    return allowed


def record(monkeypatch, module, log=None):
    log = [] if log is None else log
    for name in dir(module):
        if name.startswith("_") and name.endswith("_kernel"):
            monkeypatch.setattr(module, name, Recorder(name, log))
    return log


def test_tree_attention_dispatch_uses_listed_variants(monkeypatch):
    ta = importlib.import_module("eagle_kernels.tree_attention")
    allowed = allowed_launches(ta)
    log = record(monkeypatch, ta)
    meta = dict(device="meta")
    for dtype, name in DTYPES.items():
        for tq in (1, 3, 16, 17, 64, 65, 200, 4096):
            for group in (1, 2, 4, 8):
                for d in (64, 80, 128):
                    for cache_len, batch in ((tq + 40, 1), (tq + 2048, 1), (tq + 32768, 8)):
                        for masked in (False, True):
                            q = torch.empty(batch, tq, 8 * group, d, dtype=dtype, **meta)
                            k = torch.empty(batch, 8, cache_len, d, dtype=dtype, **meta)
                            lengths = torch.empty(batch, dtype=torch.int32, **meta)
                            mask = torch.empty(batch, tq, (tq + 31) // 32, dtype=torch.int32, **meta)
                            log.clear()
                            ta.tree_attention(q, k, k, lengths, mask if masked else None)
                            assert log and set(log) <= allowed[name], (name, tq, group, d, cache_len, log)


def test_draft_head_dispatch_uses_listed_variants(monkeypatch):
    fc, rms, lm = (
        importlib.import_module(f"eagle_kernels.{m}") for m in ("draft_fc", "rms_norm", "lm_head_topk")
    )
    allowed = {d: set().union(*(allowed_launches(m)[d] for m in (fc, rms, lm))) for d in DTYPES.values()}
    log = []
    for module in (fc, rms, lm):
        record(monkeypatch, module, log)
    meta = dict(device="meta")
    for dtype, name in DTYPES.items():
        for n in (1, 16, 17, 60, 300):
            for h in (64, 1024, 1025, 4096, 8192):
                ids = torch.empty(n, dtype=torch.int64, **meta)
                x = torch.empty(n, h, dtype=dtype, **meta)
                w = torch.empty(h, dtype=dtype, **meta)
                log.clear()
                fc.draft_fc(ids, torch.empty(100, h, dtype=dtype, **meta), x,
                            torch.empty(h, 2 * h, dtype=dtype, **meta), w if n % 2 else None)
                rms.rms_norm(x, w, 1e-6)
                rms.add_rms_norm(x, x, w, 1e-6)
                for k in range(1, lm.MAX_TOPK + 1):
                    before = len(log)
                    lm.lm_head_topk(x, torch.empty(1000, h, dtype=dtype, **meta), k)
                    assert len(log) == before + 2  # the tile kernel and the merge kernel, nothing else
                assert log and set(log) <= allowed[name], (name, n, h, log)


def test_round_kernels_dispatch_uses_listed_variants(monkeypatch):
    rot, silu, cu = (
        importlib.import_module(f"eagle_kernels.{m}")
        for m in ("rotary_store_kv", "silu_mul", "counter_uniform")
    )
    allowed = {d: set().union(*(allowed_launches(m)[d] for m in (rot, silu, cu))) for d in DTYPES.values()}
    log = []
    for module in (rot, silu, cu):
        record(monkeypatch, module, log)
    meta = dict(device="meta")
    for dtype, name in DTYPES.items():
        for bsz, seq in ((1, 1), (3, 63), (8, 4096)):
            for hq, hkv in ((8, 8), (32, 8), (40, 4)):
                for d in (2, 24, 32, 64, 80, 128, 256):
                    qkv = torch.empty(bsz, seq, (hq + 2 * hkv) * d, dtype=dtype, **meta)
                    q = qkv[..., : hq * d].view(bsz, seq, hq, d)
                    k = qkv[..., hq * d : (hq + hkv) * d].view(bsz, seq, hkv, d)
                    cache = torch.empty(2, 2, bsz, hkv, seq + 10, d, dtype=dtype, **meta)
                    pos = torch.empty(bsz, seq, dtype=torch.int64, **meta)
                    rows = torch.empty(bsz, dtype=torch.int32, **meta)
                    cos_sin = torch.empty(100, d, dtype=torch.float32, **meta)
                    w = torch.empty(d, dtype=dtype, **meta)
                    for qw, kw in ((None, None), (w, w), (None, w), (w, None)):
                        log.clear()
                        rot.rotary_store_kv(q, k, k, pos, cos_sin, cache[1, 0], cache[1, 1], rows, qw, kw)
                        assert log and set(log) <= allowed[name], (name, bsz, seq, hq, d, log)
            for inter in (1, 111, 1024, 14336):
                gate_up = torch.empty(bsz, seq, 2 * inter, dtype=dtype, **meta)
                log.clear()
                silu.silu_mul(gate_up[..., :inter], gate_up[..., inter:])
                cu.counter_uniform(torch.empty(bsz, dtype=torch.int64, **meta),
                                   torch.empty(bsz, dtype=torch.int64, **meta), inter)
                assert log and set(log) <= allowed[name], (name, bsz, seq, inter, log)
