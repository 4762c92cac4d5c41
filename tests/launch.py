"""Launching test processes: free loopback ports and the command and environment of a ``torchrun`` run."""

from __future__ import annotations

import os
import socket
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_command(nproc: int, *args: str) -> list[str]:
    """``torchrun --nproc-per-node NPROC ARGS`` on loopback (a free rendezvous port)."""
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
            "--master-addr=127.0.0.1", f"--master-port={free_port()}", *args]


def torchrun_env() -> dict:
    """The ranks' environment: every op through its PyTorch reference, one thread each, this checkout
    first."""
    env = dict(os.environ, EAGLE_KERNELS_BACKEND="reference", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([os.path.join(ROOT, "python"), ROOT, env.get("PYTHONPATH", "")])
    return env
