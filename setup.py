"""Build and install ``eagle_kernels`` (with its optional CUDA extension) and ``eagle_engine``.

The CUDA extension ``eagle_kernels._C`` is built only where it can be: a CUDA build of torch is importable in
the build environment (``pip install -e . --no-build-isolation``) and a CUDA toolkit with ``nvcc`` is found.
Everywhere else this script says why it skips the extension and installs the pure-Python packages; the ops
then run through Triton or the PyTorch reference.

Environment variables
---------------------
EAGLE_SKIP_CUDA_BUILD=1 : never build the extension.
TORCH_CUDA_ARCH_LIST    : GPU architectures to build for (torch's syntax, e.g. ``"9.0a;8.0"``); the default is
                          ``sm_90a`` (Hopper, for wgmma/TMA-era tuning) and ``sm_80`` (Ampere and later).
CUDA_HOME / CUDA_PATH   : the CUDA toolkit root; otherwise found from the ``nvcc`` on ``PATH``.
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
EXTENSION_SOURCES = ["csrc/ops.cc", "csrc/kv_compact.cu", "csrc/tree_verify.cu"]
DEFAULT_GENCODE = ["-gencode=arch=compute_90a,code=sm_90a", "-gencode=arch=compute_80,code=sm_80"]


def read_version() -> str:
    with open(os.path.join(ROOT, "eagle_kernels", "__init__.py"), encoding="utf-8") as f:
        match = re.search(r'^__version__\s*=\s*"([^"]+)"', f.read(), re.MULTILINE)
    return match.group(1) if match else "0.0.0"


def find_cuda_home() -> str | None:
    """The CUDA toolkit root, by ``eagle_kernels/_cuda_toolkit.py`` (loaded by path, since importing the
    package would import torch)."""
    path = os.path.join(ROOT, "eagle_kernels", "_cuda_toolkit.py")
    spec = importlib.util.spec_from_file_location("_eagle_cuda_toolkit", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.find_cuda_home()


def skip(reason: str) -> tuple[list, dict]:
    print(f"eagle_kernels: skipping the CUDA extension eagle_kernels._C: {reason}.", file=sys.stderr)
    print("eagle_kernels: installing the pure-Python packages (Triton and reference paths).", file=sys.stderr)
    return [], {}


def cuda_extensions() -> tuple[list, dict]:
    """``(ext_modules, cmdclass)`` for the CUDA extension, or empty ones with a printed reason."""
    if os.environ.get("EAGLE_SKIP_CUDA_BUILD", "0") == "1":
        return skip("EAGLE_SKIP_CUDA_BUILD=1")
    try:
        import torch
        import torch.utils.cpp_extension as cpp_extension
    except ImportError:
        return skip("torch is not importable here (build with --no-build-isolation after installing torch)")
    if torch.version.cuda is None:
        return skip(f"torch {torch.__version__} is not a CUDA build")
    cuda_home = find_cuda_home()
    if cuda_home is None:
        return skip("no CUDA toolkit found (no nvcc on PATH and CUDA_HOME/CUDA_PATH unset)")
    # torch guesses the toolkit root as dirname(dirname(which nvcc)); a wrapper script defeats that guess.
    cpp_extension.CUDA_HOME = cuda_home
    os.environ["CUDA_HOME"] = cuda_home
    nvcc_flags = ["-O3", "-lineinfo", "--expt-relaxed-constexpr"]
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        nvcc_flags += DEFAULT_GENCODE  # explicit -gencode flags stop torch from adding its own arch list
    print(f"eagle_kernels: building eagle_kernels._C with the CUDA toolkit at {cuda_home}", file=sys.stderr)
    extension = cpp_extension.CUDAExtension(
        name="eagle_kernels._C",
        sources=EXTENSION_SOURCES,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": ["-O3"], "nvcc": nvcc_flags},
    )
    return [extension], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


# Triton kernels (Linux only). The tested range: 3.6 (the GPU image's version; CI runs the kernel tests
# under it) to 3.9 (what a fresh install resolves; CI's main run). Triton 3.6's interpreter, used by the CPU
# tests, needs numpy < 2.3.
TRITON = ['triton>=3.6,<3.10; platform_system == "Linux"', "numpy<2.3"]
# Everything `python -m pytest -q tests` and `ruff check .` need on a fresh machine, the server tests' HTTP
# stack included; ninja runs the CUDA extension's compile test in parallel.
TEST_TOOLS = [
    "pytest",
    "scipy",
    "ruff",
    "ninja",
    "fastapi",
    "uvicorn",
    "openai",
    "httpx",
    "prometheus_client",
    "matplotlib",
]

engine_packages = find_packages(where="python")
ext_modules, cmdclass = cuda_extensions()

setup(
    name="eagle-spec",
    version=read_version(),
    description="EAGLE speculative decoding: CUDA/Triton kernels and a thin decoding engine",
    python_requires=">=3.10",
    packages=find_packages(include=["eagle_kernels", "eagle_kernels.*"]) + engine_packages,
    # eagle_engine lives under python/; mapping each found package keeps future subpackages included.
    package_dir={name: os.path.join("python", *name.split(".")) for name in engine_packages},
    package_data={"eagle_engine": ["data/**/*"]},
    include_package_data=True,
    install_requires=["torch", "numpy", "safetensors", "transformers", "tokenizers", "tqdm"],
    extras_require={
        "triton": TRITON,
        "test": TRITON + TEST_TOOLS,
        "serve": ["fastapi", "uvicorn", "prometheus_client"],
    },
    entry_points={"console_scripts": ["eagle = eagle_engine.tools.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
