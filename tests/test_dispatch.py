"""No silent fallbacks: every op records what it ran, a fallback on a CUDA tensor warns once, and
``EAGLE_KERNELS_STRICT=1`` makes it an error. CUDA tensors are stood in for (no GPU here): the dispatch reads
only ``is_cuda`` and ``device.type`` before it chooses."""

import os
import types
import warnings

import pytest
import torch

import eagle_kernels
from eagle_kernels import _dispatch

CUDA_LIKE = types.SimpleNamespace(is_cuda=True, device=torch.device("cuda"))
CPU = torch.zeros(1)


@pytest.fixture(autouse=True)
def fresh_record(monkeypatch):
    monkeypatch.delenv("EAGLE_KERNELS_STRICT", raising=False)
    monkeypatch.delenv("EAGLE_KERNELS_BACKEND", raising=False)
    eagle_kernels.reset_backends()
    yield
    eagle_kernels.reset_backends()


# The Triton kernels run on a GPU where there is one, else through the interpreter (tests/conftest.py).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_every_op_records_what_it_ran():
    x = torch.randn(3, 8, device=DEVICE)
    eagle_kernels.rms_norm(x, torch.ones(8, device=DEVICE), 1e-6)
    with eagle_kernels.reference_backend():
        eagle_kernels.silu_mul(x, x)
    ran = eagle_kernels.backends()
    kernel = "triton" if DEVICE == "cuda" or os.environ.get("TRITON_INTERPRET") == "1" else "reference"
    assert ran["rms_norm"] == {"backend": kernel, "device": DEVICE, "reason": None}
    assert ran["silu_mul"] == {"backend": "reference", "device": DEVICE, "reason": "reference forced"}
    table = eagle_kernels.format_backends()
    assert "rms_norm" in table and "reference forced" in table


def test_unsupported_inputs_on_cpu_are_recorded_with_the_reason(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # Triton applies to CPU tensors (the reference runs)
    q = torch.randn(1, 1, 2, 256)  # head_dim 256: no Triton tree attention
    kv = torch.randn(1, 2, 4, 256)
    eagle_kernels.tree_attention(q, kv, kv, torch.zeros(1, dtype=torch.int32))
    ran = eagle_kernels.backends()["tree_attention"]
    assert ran["backend"] == "reference" and "head_dim 256 > 128" in ran["reason"]


def test_a_fallback_on_cuda_warns_once_and_is_recorded():
    with pytest.warns(UserWarning, match="tree_attention: its triton implementation cannot run"):
        assert _dispatch.pick("tree_attention", CUDA_LIKE, triton="head_dim 256 > 128") == "reference"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same op and reason again: no second warning
        _dispatch.pick("tree_attention", CUDA_LIKE, triton="head_dim 256 > 128")
    assert eagle_kernels.backends()["tree_attention"] == {
        "backend": "reference", "device": "cuda", "reason": "no triton: head_dim 256 > 128"}


def test_strict_mode_makes_a_fallback_on_cuda_an_error(monkeypatch):
    monkeypatch.setenv("EAGLE_KERNELS_STRICT", "1")
    with pytest.raises(eagle_kernels.KernelFallbackError, match="kv_compact.*extension is not built"):
        _dispatch.pick("kv_compact", CUDA_LIKE, cuda="the extension is not built", triton=None)
    # What is supported runs; CPU tensors and a forced reference are never fallbacks.
    assert _dispatch.pick("kv_compact", CUDA_LIKE, cuda=None, triton=None) == "cuda"
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # (pick only reads it: no kernel runs here)
    assert _dispatch.pick("kv_compact", CPU, cuda="the extension is not built", triton=None) == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert _dispatch.pick("kv_compact", CPU, cuda="the extension is not built", triton=None) == "reference"
    monkeypatch.setenv("EAGLE_KERNELS_BACKEND", "reference")
    assert _dispatch.pick("kv_compact", CUDA_LIKE, cuda="not built", triton=None) == "reference"


def test_cuda_op_availability_is_asked_only_for_cuda_tensors():
    asked = []

    def unavailable():
        asked.append(1)
        return "not built"

    _dispatch.pick("tree_verify_greedy", CPU, cuda=unavailable)
    assert not asked
    with pytest.warns(UserWarning):
        _dispatch.pick("tree_verify_greedy", CUDA_LIKE, cuda=unavailable)
    assert asked == [1]
