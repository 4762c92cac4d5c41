"""Launching test processes and waiting on them: free loopback ports, the command and environment of a
``torchrun`` run, and a bounded wait for a condition."""

from __future__ import annotations

import os
import socket
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(condition, what, timeout: float = 30.0, poll: float = 0.01) -> None:
    """Poll ``condition()`` until it holds; fail the test after ``timeout`` seconds, saying ``what`` (a
    string, or a callable that gives one: the state at the time)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what() if callable(what) else what
        time.sleep(poll)


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
