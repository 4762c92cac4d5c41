"""CUDA graphs for decoding steps: the only GPU-only code of the engine.

A step function mutates static buffers only (see :mod:`.batch`). Per key (batch bucket, mode) the first
call runs eagerly (it compiles the Triton kernels and warms cuBLAS up), the second captures the step into a
graph and replays it, and every later call replays. Nothing runs during capture, so each call executes the
step exactly once. A step that cannot be captured (e.g. an op that falls back to a reference with host
synchronisation) runs eagerly from then on, with a warning.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Hashable

import torch


class GraphCache:
    def __init__(self, device: torch.device, enabled: bool):
        self.device, self.enabled = device, enabled
        self.graphs: dict[Hashable, torch.cuda.CUDAGraph] = {}
        self.warmed: set[Hashable] = set()
        self.failed: set[Hashable] = set()
        self.pool = None  # one memory pool shared by all graphs (they never run concurrently)

    def clear(self) -> None:
        """Forget every graph (e.g. after a tensor they read was replaced); the next calls warm up again."""
        self.graphs.clear()
        self.warmed.clear()

    def run(self, key: Hashable, step: Callable[[], None]) -> None:
        """Run ``step`` once: eagerly, or by capturing then replaying, or by replaying (see the module)."""
        if not self.enabled or key in self.failed:
            step()
            return
        graph = self.graphs.get(key)
        if graph is None and key not in self.warmed:
            self.warmed.add(key)
            step()
            return
        if graph is None:
            graph = self._capture(key, step)
            if graph is None:
                step()
                return
        graph.replay()

    def _capture(self, key: Hashable, step: Callable[[], None]):
        """Capture ``step`` into a new graph, or return None (warning once) where it cannot be captured.

        Capture runs on a side stream entered by a context of our own, so the caller's stream is current
        again however capture ends: ``torch.cuda.graph``'s ``__exit__`` calls ``capture_end()`` before it
        restores the stream, and when that raises (a step that synchronises invalidates the capture) the
        side stream would stay current for everything after."""
        graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize(self.device)
        caller = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(caller)
        error = None
        with torch.cuda.stream(side):
            # thread_local: CUDA work the caller's threads do meanwhile (their own torch code between
            # stream chunks) does not invalidate this thread's capture
            graph.capture_begin(pool=self.pool, capture_error_mode="thread_local")
            try:
                step()
            except Exception as e:  # noqa: BLE001 (any failure inside capture means: run this key eagerly)
                error = e
            finally:
                try:
                    graph.capture_end()
                except Exception as e:  # noqa: BLE001
                    error = error or e
        caller.wait_stream(side)
        if error is not None:
            torch.cuda.synchronize(self.device)
            warnings.warn(f"CUDA graph capture failed for {key!r} ({type(error).__name__}: {error}); "
                          "running eagerly")
            self.failed.add(key)
            return None
        self.pool = graph.pool()
        self.graphs[key] = graph
        return graph
