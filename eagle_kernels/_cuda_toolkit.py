"""Finding the CUDA toolkit. Standard library only: setup.py loads this file by path, before the package (and
torch) can be imported, and ``eagle_kernels._C_loader`` imports it for the JIT build."""

from __future__ import annotations

import os
import re
import shutil
import subprocess


def find_cuda_home() -> str | None:
    """Root of the CUDA toolkit: ``CUDA_HOME``/``CUDA_PATH``, else derived from the ``nvcc`` on ``PATH``.

    ``nvcc`` may be a wrapper script outside the toolkit, so ``dirname(dirname(nvcc))`` is only trusted when
    it holds ``include/cuda_runtime.h``; otherwise ``nvcc --dryrun`` reports the toolkit's own ``TOP``.
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var) and os.path.isdir(os.environ[var]):
            return os.environ[var]
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    candidate = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    if os.path.exists(os.path.join(candidate, "include", "cuda_runtime.h")):
        return candidate
    try:
        command = [nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull]
        dry = subprocess.run(command, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    for line in (dry.stdout + dry.stderr).splitlines():
        match = re.match(r"#\$ TOP=(.+)$", line.strip())
        if match:
            return os.path.realpath(match.group(1).strip())
    return None
