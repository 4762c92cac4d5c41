"""CI proof that the CUDA sources compile and the op library loads, on machines without a GPU.

The whole extension (csrc/ops.cc, csrc/*.cu) is compiled with nvcc and the C++ compiler against the installed
torch's headers (a CPU build of torch is fine), linked against c10, torch_cpu and cudart only, with
``--no-undefined`` (so nothing may need c10_cuda/torch_cuda, which a CPU wheel lacks), then loaded with
``torch.ops.load_library`` in a fresh interpreter that checks every schema and the CUDA and Meta
registrations.
A second test configures and builds the CMake project (static kernel library + kernel test program).
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.utils.cpp_extension as cpp_extension

from eagle_kernels._C_loader import CSRC_DIR, EXTENSION_SOURCES, find_cuda_home

ROOT = os.path.dirname(CSRC_DIR)
CUDA_HOME = find_cuda_home()
NVCC = os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else None

pytestmark = pytest.mark.skipif(
    NVCC is None or not os.path.exists(NVCC),
    reason="nvcc not found (no CUDA toolkit on PATH, CUDA_HOME/CUDA_PATH unset): cannot compile CUDA sources",
)

EXPECTED_SCHEMAS = {
    "kv_compact": "eagle_kernels::kv_compact(Tensor(a!) cache, Tensor lengths, Tensor src, "
    "Tensor counts) -> ()",
    "tree_verify_greedy": "eagle_kernels::tree_verify_greedy(Tensor tokens, Tensor parents, "
    "Tensor target_argmax, Tensor(a!) num_accepted, Tensor(b!) accepted_nodes, Tensor(c!) bonus) -> ()",
    "tree_verify_sampling": "eagle_kernels::tree_verify_sampling(Tensor tokens, Tensor parents, "
    "Tensor target_probs, Tensor uniforms, Tensor(a!) num_accepted, Tensor(b!) accepted_nodes, "
    "Tensor(c!) bonus) -> ()",
}


def cuda_lib_dir() -> str:
    for sub in ("lib64", "lib", os.path.join("targets", "x86_64-linux", "lib")):
        if os.path.exists(os.path.join(CUDA_HOME, sub, "libcudart.so")):
            return os.path.join(CUDA_HOME, sub)
    pytest.skip(f"no libcudart.so under {CUDA_HOME}")


def build_commands(build_dir: str) -> tuple[list[tuple[str, str, list[str]]], list[str], str]:
    """``([(source, object, compile command)], link command, library path)`` for a CPU-torch compile check."""
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    includes = [f"-I{CSRC_DIR}"]
    for path in cpp_extension.include_paths():
        includes += ["-isystem", path]  # torch's own warnings are not ours; nvcc wants the path separate
    common = ["-O2", "-std=c++20", f"-D_GLIBCXX_USE_CXX11_ABI={abi}", *includes]
    cxx = os.environ.get("CXX", "c++")
    compiles = []
    for name in EXTENSION_SOURCES:
        source, obj = os.path.join(CSRC_DIR, name), os.path.join(build_dir, name + ".o")
        if name.endswith(".cu"):
            # One architecture keeps the check fast; the kernels themselves compile identically for others.
            command = [NVCC, *common, "-gencode=arch=compute_90a,code=sm_90a", "--expt-relaxed-constexpr",
                       "-Xcompiler", "-fPIC", "-c", source, "-o", obj]  # fmt: skip
        else:
            command = [cxx, *common, "-fPIC", "-c", source, "-o", obj]
        compiles.append((source, obj, command))
    library = os.path.join(build_dir, "eagle_kernels_C.so")
    torch_lib = os.path.join(os.path.dirname(torch.__file__), "lib")
    link = [cxx, "-shared", *(obj for _, obj, _ in compiles), "-o", library, f"-L{torch_lib}", "-lc10",
            "-ltorch_cpu", f"-L{cuda_lib_dir()}", "-lcudart", f"-Wl,-rpath,{cuda_lib_dir()}",
            f"-Wl,-rpath,{torch_lib}", "-Wl,--no-undefined"]  # fmt: skip
    return compiles, link, library


def run_build(build_dir: str) -> str:
    compiles, link, library = build_commands(build_dir)
    ninja = shutil.which("ninja")
    if ninja is None:  # sequential fallback; ninja (pip install ninja) runs the compiles in parallel
        for _, _, command in compiles:
            subprocess.run(command, check=True)
        subprocess.run(link, check=True)
        return library
    quote = subprocess.list2cmdline
    lines = ["rule run", "  command = $cmd", ""]
    for source, obj, command in compiles:
        lines += [f"build {obj}: run {source}", f"  cmd = {quote(command)}", ""]
    lines += [f"build {library}: run {' '.join(obj for _, obj, _ in compiles)}", f"  cmd = {quote(link)}", ""]
    with open(os.path.join(build_dir, "build.ninja"), "w") as f:
        f.write("\n".join(lines))
    jobs = str(max(1, min(len(compiles), os.cpu_count() or 1)))
    result = subprocess.run([ninja, "-C", build_dir, "-j", jobs], capture_output=True, text=True)
    log = f"{result.stdout[-8000:]}\n{result.stderr[-4000:]}"
    assert result.returncode == 0, f"extension build failed:\n{log}"
    return library


LOAD_AND_INSPECT = textwrap.dedent(
    """
    import json, sys, torch
    torch.ops.load_library(sys.argv[1])
    report = {}
    for name in sys.argv[2:]:
        qualified = "eagle_kernels::" + name
        report[name] = {
            "schema": str(getattr(torch.ops.eagle_kernels, name).default._schema),
            "cuda": torch._C._dispatch_has_kernel_for_dispatch_key(qualified, "CUDA"),
            "meta": torch._C._dispatch_has_kernel_for_dispatch_key(qualified, "Meta"),
        }
    print(json.dumps(report))
    """
)


def test_extension_compiles_links_without_cuda_torch_and_registers_every_schema(tmp_path):
    library = run_build(str(tmp_path))
    # A fresh interpreter: a namespace can be defined once per process (the built _C may already be loaded).
    result = subprocess.run(
        [sys.executable, "-c", LOAD_AND_INSPECT, library, *EXPECTED_SCHEMAS],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    for name, schema in EXPECTED_SCHEMAS.items():
        assert report[name]["schema"] == schema
        assert report[name]["cuda"], f"{name}: no CUDA kernel registered"
        assert report[name]["meta"], f"{name}: no Meta kernel registered"


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake not found")
def test_cmake_build_configures_and_compiles(tmp_path):
    build_dir = str(tmp_path / "build")
    configure = ["cmake", "-S", ROOT, "-B", build_dir, f"-DCMAKE_CUDA_COMPILER={NVCC}"]
    if shutil.which("ninja"):
        configure += ["-G", "Ninja"]
    for command in (configure, ["cmake", "--build", build_dir, "-j", str(os.cpu_count() or 1)]):
        result = subprocess.run(command, capture_output=True, text=True)
        log = f"{result.stdout[-6000:]}\n{result.stderr[-4000:]}"
        assert result.returncode == 0, f"{' '.join(command)} failed:\n{log}"
    assert any(name.startswith("libeagle_kernels_cuda") for name in os.listdir(build_dir))
    assert os.path.exists(os.path.join(build_dir, "test_kernels"))
