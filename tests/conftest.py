"""Shared pytest setup.

- The packages import from a plain checkout too.
- Without a GPU, Triton kernels run through Triton's interpreter (``TRITON_INTERPRET=1``). Triton reads the
  variable when kernels are defined, so it is set here, once, before anything imports Triton.
- Engine tests run the reference ops (fast) via the ``reference_ops`` fixture; kernel tests and
  ``test_engine_with_kernels.py`` run the kernels.
"""

import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (ROOT, os.path.join(ROOT, "python")):
    if path not in sys.path:
        sys.path.insert(0, path)

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Measured settings (the auto tree) are cached per machine: tests keep theirs in a throw-away directory.
if "EAGLE_CACHE_DIR" not in os.environ:
    import tempfile

    os.environ["EAGLE_CACHE_DIR"] = tempfile.mkdtemp(prefix="eagle-test-cache-")

# The test models are tiny: threading overhead dominates their ops, and CI has two cores.
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` skip, saying why, where no CUDA GPU is visible."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none visible here)")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture
def cuda_ops():
    """The compiled CUDA ops (``eagle_kernels._C``), or a skip saying why they are unavailable (a failure
    under ``EAGLE_KERNELS_STRICT=1``, as the GPU suite runs). Checked when a test runs, never at collection:
    a first check may start a JIT build of minutes (``EAGLE_NO_JIT=1`` turns that off; the GPU suite builds
    the extension in a step of its own first)."""
    from eagle_kernels import _C_loader

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (none visible here)")
    if not _C_loader.available():
        why = f"the eagle_kernels._C extension is unavailable: {_C_loader.status()}"
        if os.environ.get("EAGLE_KERNELS_STRICT") == "1":  # the GPU suite: a missing extension is a failure
            pytest.fail(why)
        pytest.skip(why)
    return _C_loader


@pytest.fixture(scope="module")
def reference_ops():
    """Run every eagle_kernels op through its PyTorch reference for a test module (module-scoped so that
    module fixtures which generate or train run on it too: they request it explicitly)."""
    import eagle_kernels

    with eagle_kernels.reference_backend():
        yield


INT_POISON = -123456789  # int32 and int64; narrower integer types get their minimum


def poison(t: torch.Tensor) -> torch.Tensor:
    """Fill ``t`` with a value no kernel writes: NaN (floating), ``INT_POISON`` (integers), True (bool)."""
    if t.device.type == "meta" or t.numel() == 0:
        return t
    if t.is_floating_point() or t.is_complex():
        return t.fill_(float("nan"))
    if t.dtype == torch.bool:
        return t.fill_(True)
    info = torch.iinfo(t.dtype)
    return t.fill_(INT_POISON if info.min <= INT_POISON else info.min)


@pytest.fixture
def poison_empty(monkeypatch):
    """Outputs and scratch that the kernels' host functions allocate with ``torch.empty`` start poisoned
    (NaN, ``INT_POISON``, True): nothing unwritten can pass for a result."""
    empty = torch.empty

    def poisoned_empty(*args, **kwargs):
        return poison(empty(*args, **kwargs))

    monkeypatch.setattr(torch, "empty", poisoned_empty)
