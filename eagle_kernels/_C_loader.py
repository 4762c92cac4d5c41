"""The compiled CUDA ops (``eagle_kernels._C``): loading, a JIT fallback, and typed wrappers.

Loading order, on first use (never at import, since a JIT build takes minutes):

1. the extension built by ``setup.py`` (``eagle_kernels/_C*.so``), loaded with ``torch.ops.load_library``;
2. on a machine with a CUDA torch, a GPU, ``nvcc`` and ``ninja``, and a source checkout (``csrc/`` beside the
   package): a JIT build with ``torch.utils.cpp_extension.load``, cached in torch's extensions directory
   (``TORCH_EXTENSIONS_DIR``); ``EAGLE_NO_JIT=1`` turns it off;
3. otherwise the ops are unavailable and :func:`available` returns ``False`` (:func:`status` says why); the
   dispatchers in :mod:`eagle_kernels` then use Triton or the PyTorch reference.

The wrappers allocate the outputs and call ``torch.ops.eagle_kernels.<op>``; they never synchronise with the
host.
"""

from __future__ import annotations

import importlib.machinery
import os
import threading

import torch

from ._cuda_toolkit import find_cuda_home

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
CSRC_DIR = os.path.join(os.path.dirname(PACKAGE_DIR), "csrc")
EXTENSION_SOURCES = ("ops.cc", "kv_compact.cu", "tree_verify.cu")
OP_NAMES = ("kv_compact", "tree_verify_greedy", "tree_verify_sampling")

_lock = threading.Lock()
_state: dict = {"available": None, "status": "not loaded yet"}



def built_library_path() -> str | None:
    """Path of the extension built by ``setup.py`` inside the package, or ``None``."""
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = os.path.join(PACKAGE_DIR, "_C" + suffix)
        if os.path.exists(path):
            return path
    return None


def ops_registered() -> bool:
    """Whether every op schema of the library is known to the dispatcher."""
    for name in OP_NAMES:
        try:
            getattr(torch.ops.eagle_kernels, name)
        except (AttributeError, RuntimeError):  # the error type differs between torch versions
            return False
    return True


def _jit_unavailable_reason() -> str | None:
    if os.environ.get("EAGLE_NO_JIT", "0") == "1":
        return "EAGLE_NO_JIT=1"
    if torch.version.cuda is None or not torch.cuda.is_available():
        return "no CUDA build of torch with a visible GPU"
    if not all(os.path.exists(os.path.join(CSRC_DIR, name)) for name in EXTENSION_SOURCES):
        return f"CUDA sources not found under {CSRC_DIR} (not a source checkout)"
    from torch.utils import cpp_extension

    if not cpp_extension.is_ninja_available():
        return "ninja is not installed"
    if find_cuda_home() is None:
        return "no CUDA toolkit (nvcc) found"
    return None


def _jit_build() -> None:
    from torch.utils import cpp_extension

    # torch guesses the toolkit root as dirname(dirname(which nvcc)); a wrapper script defeats that guess.
    cpp_extension.CUDA_HOME = find_cuda_home()
    cpp_extension.load(
        name="eagle_kernels_C",
        sources=[os.path.join(CSRC_DIR, name) for name in EXTENSION_SOURCES],
        extra_include_paths=[CSRC_DIR],
        extra_cflags=["-O3"],
        extra_cuda_cflags=["-O3", "--expt-relaxed-constexpr"],
        is_python_module=False,  # loads the library with torch.ops.load_library: the ops register themselves
        verbose=os.environ.get("EAGLE_JIT_VERBOSE", "0") == "1",
    )


def _load() -> tuple[bool, str]:
    if ops_registered():
        return True, "already registered"
    path = built_library_path()
    if path is not None:
        try:
            torch.ops.load_library(path)
            return True, f"loaded {path}"
        except OSError as exc:  # e.g. built against another torch: fall through to the JIT build
            built_error = f"{path} failed to load ({exc})"
    else:
        built_error = "eagle_kernels._C is not built"
    reason = _jit_unavailable_reason()
    if reason is not None:
        return False, f"{built_error}; JIT build skipped: {reason}"
    try:
        _jit_build()
    except Exception as exc:  # a failed JIT build must leave the Triton/reference paths working
        return False, f"{built_error}; JIT build failed: {exc}"
    return ops_registered(), "JIT-built from csrc/"


def available() -> bool:
    """Whether the CUDA ops are loaded (loading or JIT-building them on the first call)."""
    if _state["available"] is None:
        with _lock:
            if _state["available"] is None:
                _state["available"], _state["status"] = _load()
    return _state["available"]


def status() -> str:
    """A sentence on how the CUDA ops were loaded, or why they are unavailable."""
    available()
    return _state["status"]


# ------------------------------------------------------------------------------------------ wrappers


def kv_compact_cuda(
    cache: torch.Tensor, lengths: torch.Tensor, src: torch.Tensor, counts: torch.Tensor
) -> None:
    """Move accepted tree rows of every layer, K and V, in one launch, in place (CUDA op).

    Parameters
    ----------
    cache : bf16/fp16/fp32 ``[num_layers, 2, B, Hkv, S, D]``, contiguous, on a CUDA device
    lengths : int ``[B]``: committed prefix; tree rows start at ``lengths[b]``
    src : int32/int64 ``[B, N]``: row ``lengths[b] + src[b, i]`` moves to ``lengths[b] + i``
    counts : int ``[B]``: ``i < counts[b]`` moves, ``0 <= counts[b] <= N``

    Contract: :func:`eagle_kernels.reference.kv_compact`.
    """
    if src.dtype not in (torch.int32, torch.int64):
        src = src.to(torch.int64)
    torch.ops.eagle_kernels.kv_compact(
        cache, lengths.to(torch.int32).contiguous(), src.contiguous(), counts.to(torch.int32).contiguous()
    )


def _verify_outputs(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    batch, num_nodes = tokens.shape
    num_accepted = torch.empty(batch, dtype=torch.int32, device=tokens.device)
    accepted_nodes = torch.empty(batch, num_nodes, dtype=torch.int32, device=tokens.device)
    bonus = torch.empty(batch, dtype=torch.int64, device=tokens.device)
    return num_accepted, accepted_nodes, bonus


def _as_index(t: torch.Tensor) -> torch.Tensor:
    return (t if t.dtype in (torch.int32, torch.int64) else t.to(torch.int64)).contiguous()


def tree_verify_greedy_cuda(
    tokens: torch.Tensor, parents: torch.Tensor, target_argmax: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Greedy tree verification (CUDA op, one block per sequence).

    Parameters
    ----------
    tokens, target_argmax : int ``[B, T]``
    parents : int ``[B, T]`` (``parents[b, 0]`` is ignored)

    Returns
    -------
    ``(num_accepted int32 [B], accepted_nodes int32 [B, T], bonus int64 [B])``; contract:
    :func:`eagle_kernels.reference.tree_verify_greedy`.
    """
    outputs = _verify_outputs(tokens)
    torch.ops.eagle_kernels.tree_verify_greedy(
        _as_index(tokens), _as_index(parents), _as_index(target_argmax), *outputs
    )
    return outputs


def tree_verify_sampling_cuda(
    tokens: torch.Tensor, parents: torch.Tensor, target_probs: torch.Tensor, uniforms: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Lossless sampling verification of a draft tree (CUDA op, one block per sequence).

    Parameters
    ----------
    tokens, parents : int ``[B, T]``
    target_probs : ``[B, T, V]`` (computed in fp32): the target's distribution after each node
    uniforms : ``[B, T]`` in ``[0, 1)``: ``uniforms[b, i]`` tests node ``i > 0``; ``uniforms[b, 0]`` draws the
        bonus token

    Returns
    -------
    ``(num_accepted int32 [B], accepted_nodes int32 [B, T], bonus int64 [B])``; contract:
    :func:`eagle_kernels.reference.tree_verify_sampling`.
    """
    outputs = _verify_outputs(tokens)
    torch.ops.eagle_kernels.tree_verify_sampling(
        _as_index(tokens),
        _as_index(parents),
        target_probs.to(torch.float32).contiguous(),
        uniforms.to(torch.float32).contiguous(),
        *outputs,
    )
    return outputs


__all__ = [
    "available",
    "status",
    "find_cuda_home",
    "built_library_path",
    "ops_registered",
    "kv_compact_cuda",
    "tree_verify_greedy_cuda",
    "tree_verify_sampling_cuda",
]
