"""Which implementation every op runs in the engine: the demo pair generates greedy and sampled text (EAGLE
and vanilla) on the device, then ``eagle_kernels.format_backends()`` is printed and recorded.

    EAGLE_KERNELS_STRICT=1 python benchmarks/backends.py     # the GPU suite: any fallback is an error

Results are appended to ``benchmarks/results/backends.json`` (``$EAGLE_BENCH_RESULTS`` overrides the folder).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402


def main(argv=None) -> int:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on a CPU")
    ap.add_argument("--no-save", action="store_true", help="print only")
    args = common.parse(ap, argv)
    dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")

    import eagle_kernels
    from eagle_engine import EagleEngine, demo_paths

    engine = EagleEngine.from_pretrained(*demo_paths(), device=args.device, dtype=dtype, max_batch_size=2)
    prompts = [list(range(10, 60)), list(range(100, 130))]
    engine.generate(prompts, max_new_tokens=24)
    engine.generate(prompts, max_new_tokens=24, temperature=0.8, top_p=0.9, top_k=20, seed=[1, 2])
    engine.generate_vanilla(prompts, max_new_tokens=8, temperature=0.7, top_p=0.8, seed=[3, 4])
    strict = os.environ.get("EAGLE_KERNELS_STRICT", "0")
    print(f"{common.device_name()}, {dtype}, EAGLE_KERNELS_STRICT={strict}")
    print(eagle_kernels.format_backends())
    if not args.no_save:
        records = [{"op": op, **v} for op, v in eagle_kernels.backends().items()]
        print("appended to", common.append_results("backends", records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
