"""What Triton's JIT compiles for the launches the engine makes, found and compiled for Hopper without a GPU.

Each kernel module's host functions are called over the shapes the engine launches at real model sizes
(``SWEEPS``), on ``meta`` tensors, with the module's ``@triton.jit`` kernels replaced by recorders. A recorder
binds each launch's arguments exactly as Triton's own launcher does (``create_function_from_signature`` and
``JITFunction._pack_args`` against a CUDA sm_90 backend): the same signature, the same integers specialised
to 1 or marked divisible by 16, the same 16-byte-aligned pointers. Every distinct variant is then compiled to
a cubin with ``triton.compile``. So what is compiled here is what the JIT would compile on an H100 for those
launches, and nothing else.

Run as a script, in a process without ``TRITON_INTERPRET`` (it needs real ``JITFunction`` kernels)::

    python tests/jit_sweep.py MODULE SHARD SHARDS    # prints one JSON object: {"variants", "results"}
"""

from __future__ import annotations

import importlib
import json
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.compiler.compiler import make_backend  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
META = dict(device="meta")


class Recorder:
    """Stands in for one ``@triton.jit`` kernel: ``kernel[grid](*args, **kwargs)`` records the variant the
    JIT would compile for the launch (keyed like the JIT's own cache) and runs nothing."""

    def __init__(self, jit: JITFunction, variants: dict):
        self.jit, self.variants = jit, variants
        self.backend = make_backend(TARGET)
        self.binder = create_function_from_signature(jit.signature, jit.params, self.backend)

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            kwargs.setdefault("debug", False)
            bound, specialization, options = self.binder(*args, **kwargs)
            key = (self.jit.__name__, str(specialization), str(options))
            if key not in self.variants:
                options, signature, constexprs, attrs = self.jit._pack_args(
                    self.backend, kwargs, bound, specialization, options)
                self.variants[key] = (self.jit, signature, constexprs, attrs, options)

        return launch


def record_launches(module, sweep) -> list:
    """The distinct JIT variants of ``module``'s kernels over ``sweep(module)``'s launches."""
    variants = {}
    kernels = {name: k for name, k in vars(module).items()
               if isinstance(k, JITFunction) and name.endswith("_kernel")}
    for name, kernel in kernels.items():
        setattr(module, name, Recorder(kernel, variants))
    try:
        sweep(module)
    finally:
        for name, kernel in kernels.items():
            setattr(module, name, kernel)
    return list(variants.values())


def empty(*shape, dtype=torch.float32):
    return torch.empty(*shape, dtype=dtype, **META)


# ---------------------------------------------------------------------- the launches, at real model sizes

HEAD_DIMS = (64, 80, 128)
HIDDEN = (4096, 5120, 8192)
VOCABS = (32000, 128256, 151936)


# Paged caches as other engines and ours lay them out: (block_size, layout); "HND" is a slice of the engine's
# [L, 2, num_blocks, Hkv, block_size, D] buffer, "NHD" a permuted view of a [num_blocks, block_size, Hkv, D]
# pool (vLLM, FlashInfer). 1: one row per block.
PAGED_LAYOUTS = ((16, "HND"), (64, "NHD"), (1, "HND"))


def paged_buffer(num_layers, num_blocks, hkv, block_size, d, dtype, layout):
    """A paged KV buffer ``[num_layers, 2, num_blocks, Hkv, block_size, D]``: contiguous ("HND"), or the
    permuted view of a ``[num_layers, 2, num_blocks, block_size, Hkv, D]`` one ("NHD")."""
    if layout == "HND":
        return empty(num_layers, 2, num_blocks, hkv, block_size, d, dtype=dtype)
    return empty(num_layers, 2, num_blocks, block_size, hkv, d, dtype=dtype).transpose(3, 4)


def sweep_tree_attention(m):
    for dtype in DTYPES:
        for tq in (1, 10, 16, 60, 64, 65, 200, 2048):  # decode, draft levels, trees, prefill
            for group in (1, 4, 8):
                for d in HEAD_DIMS:
                    for cache_len, batch in ((tq + 40, 1), (tq + 2048, 1), (tq + 32768, 8)):
                        for masked in (False, True):
                            q = empty(batch, tq, 8 * group, d, dtype=dtype)
                            k = empty(batch, 8, cache_len, d, dtype=dtype)
                            mask = empty(batch, tq, (tq + 31) // 32, dtype=torch.int32) if masked else None
                            lengths = empty(batch, dtype=torch.int32)
                            m.tree_attention(q, k, k, lengths, mask)
                            for block_size, layout in PAGED_LAYOUTS:
                                max_blocks = -(-cache_len // block_size)
                                buf = paged_buffer(2, batch * max_blocks + 7, 8, block_size, d, dtype, layout)
                                table = empty(batch, max_blocks, dtype=torch.int32)
                                m.tree_attention(q, buf[1, 0], buf[1, 1], lengths, mask, block_table=table)


def sweep_draft_fc(m):
    for dtype in DTYPES:
        for n in (1, 10, 16, 17, 60, 80, 640):
            for h in HIDDEN:
                m.draft_fc(empty(n, dtype=torch.int64), empty(1000, h, dtype=dtype), empty(n, h, dtype=dtype),
                           empty(h, 2 * h, dtype=dtype), empty(h, dtype=dtype) if n % 2 else None)


def sweep_rms_norm(m):
    for dtype in DTYPES:
        for n in (1, 10, 60, 640, 4096):
            for h in HIDDEN + (128,):  # 128: per-head q/k norms (Qwen3) when not fused
                x = empty(n, h, dtype=dtype)
                m.rms_norm(x, empty(h, dtype=dtype), 1e-6)
                m.add_rms_norm(x, x, empty(h, dtype=dtype), 1e-6)


def sweep_lm_head_topk(m):
    for dtype in DTYPES:
        for n in (1, 10, 16, 17, 60, 64, 65, 80, 128, 129, 640):
            for h in HIDDEN:
                for vocab in VOCABS:
                    for k in (1, 4, 8, 10, 16):
                        m.lm_head_topk(empty(n, h, dtype=dtype), empty(vocab, h, dtype=dtype), k)


def sweep_rotary_store_kv(m):
    for dtype in DTYPES:
        for bsz, seq in ((1, 1), (8, 1), (1, 10), (8, 60), (1, 4096)):
            for hq, hkv in ((32, 8), (64, 8), (40, 8), (28, 4)):
                for d in HEAD_DIMS:
                    qkv = empty(bsz, seq, (hq + 2 * hkv) * d, dtype=dtype)
                    q = qkv[..., : hq * d].view(bsz, seq, hq, d)
                    k = qkv[..., hq * d : (hq + hkv) * d].view(bsz, seq, hkv, d)
                    v = qkv[..., (hq + hkv) * d :].view(bsz, seq, hkv, d)
                    cache = empty(4, 2, bsz, hkv, seq + 2048, d, dtype=dtype)
                    pos = empty(bsz, seq, dtype=torch.int64)
                    rows = empty(bsz, dtype=torch.int32)
                    w = empty(d, dtype=dtype)
                    cos_sin = empty(8192, d)
                    for norms in ((None, None), (w, w)):
                        m.rotary_store_kv(q, k, v, pos, cos_sin, cache[1, 0], cache[1, 1], rows, *norms)
                        for block_size, layout in PAGED_LAYOUTS:
                            max_blocks = -(-(seq + 2048) // block_size)
                            buf = paged_buffer(4, bsz * max_blocks + 7, hkv, block_size, d, dtype, layout)
                            table = empty(bsz, max_blocks, dtype=torch.int32)
                            m.rotary_store_kv(q, k, v, pos, cos_sin, buf[1, 0], buf[1, 1], rows, *norms,
                                              block_table=table)


def sweep_silu_mul(m):
    for dtype in DTYPES:
        for rows in (1, 10, 60, 640, 4096):
            for inter in (11008, 13824, 14336, 18944, 28672):
                gate_up = empty(rows, 2 * inter, dtype=dtype)
                m.silu_mul(gate_up[..., :inter], gate_up[..., inter:])


def sweep_counter_uniform(m):
    for bsz in (1, 8, 64):
        for n in (1, 7, 60, 64, 128):
            m.counter_uniform(empty(bsz, dtype=torch.int64), empty(bsz, dtype=torch.int64), n)


def sweep_kv_compact(m):
    for dtype in DTYPES:
        for bsz in (1, 8, 64):
            for width in (1, 4, 7, 8, 64):
                for d in HEAD_DIMS:
                    cache = empty(32, 2, bsz, 8, 4096, d, dtype=dtype)
                    args = (empty(bsz, dtype=torch.int32), empty(bsz, width, dtype=torch.int64),
                            empty(bsz, dtype=torch.int32))
                    m.kv_compact(cache, *args)
                    for block_size, layout in PAGED_LAYOUTS:
                        max_blocks = 4096 // block_size
                        buf = paged_buffer(32, bsz * max_blocks + 7, 8, block_size, d, dtype, layout)
                        m.kv_compact(buf, *args, block_table=empty(bsz, max_blocks, dtype=torch.int32))


def sweep_sampling(m):
    """Both sampling kernels over the candidate rows of a round (a slice of [n, T, V]) or a step's rows."""
    for n, t, extra in ((1, 1, 0), (8, 60, 0), (64, 60, 0), (8, 10, 7)):
        for vocab in VOCABS:
            logits = empty(n, t + extra, vocab)[:, :t]
            rows = empty(n, t)
            if hasattr(m, "top_p_threshold"):
                m.top_p_threshold(logits, rows, rows)
            else:
                m.masked_softmax_(logits, rows)


SWEEPS = {
    "eagle_kernels.tree_attention": sweep_tree_attention,
    "eagle_kernels.draft_fc": sweep_draft_fc,
    "eagle_kernels.rms_norm": sweep_rms_norm,
    "eagle_kernels.lm_head_topk": sweep_lm_head_topk,
    "eagle_kernels.rotary_store_kv": sweep_rotary_store_kv,
    "eagle_kernels.silu_mul": sweep_silu_mul,
    "eagle_kernels.counter_uniform": sweep_counter_uniform,
    "eagle_kernels.kv_compact": sweep_kv_compact,
    "eagle_kernels.top_p_threshold": sweep_sampling,
    "eagle_kernels.masked_softmax": sweep_sampling,
}


# ------------------------------------------------------------------------------------------ compiling


def compile_variant(module, variant) -> dict:
    """Compile one recorded variant for sm_90: its shared memory, the module's budget for it, its constexprs
    and which integers were specialised to 1."""
    jit, signature, constexprs, attrs, options = variant
    source = ASTSource(jit, signature, constexprs, attrs)
    kernel = triton.compile(source, target=TARGET, options=options.__dict__)
    named = {jit.arg_names[path[0]]: value for path, value in constexprs.items()}
    budget_of = getattr(module, "shared_memory_budget", None)
    from eagle_kernels._triton_common import HOPPER_MAX_SHARED

    return {
        "kernel": jit.__name__,
        "constexprs": {k: v for k, v in named.items() if jit.params[jit.arg_names.index(k)].is_constexpr},
        "specialised_to_1": sorted(k for k, v in named.items()
                                   if not jit.params[jit.arg_names.index(k)].is_constexpr and v == 1),
        "num_warps": options.num_warps,
        "num_stages": options.num_stages,
        "shared": kernel.metadata.shared,
        "budget": budget_of(jit.__name__, named) if budget_of else HOPPER_MAX_SHARED,
        "cubin_bytes": len(kernel.asm["cubin"]),
        "barrier": "bar.sync" in kernel.asm["ptx"],
    }


def main(argv) -> int:
    module_name, shard, shards = argv[0], int(argv[1]), int(argv[2])
    module = importlib.import_module(module_name)
    variants = record_launches(module, SWEEPS[module_name])
    results = [compile_variant(module, v) for i, v in enumerate(variants) if i % shards == shard]
    print(json.dumps({"variants": len(variants), "results": results}, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
