"""``eagle serve``: load the model pair, build the app, run it under uvicorn (on rank 0 under tensor
parallelism; the other ranks follow its schedule)."""

from __future__ import annotations

import os
import signal

from ..errors import EagleError
from ..models.parallel import shutdown


def model_name_of(base: str | None) -> str:
    return "eagle-demo" if base is None else os.path.basename(os.path.normpath(base))


def load(args, max_batch_size: int = 8):
    """``(engine, tokenizer, model_name)`` from the serve flags (``--base``, ``--draft``, ``--method``,
    ``--method-settings``, ``--tree``, ``--device``, ``--dtype``, ``--tensor-parallel-size``); no ``--base``:
    the embedded demo pair (with its EAGLE head unless ``--draft`` names another or the method needs none)."""
    from ..engine.engine import EagleEngine
    from ..tools.common import load_tokenizer
    from ..tools.model_args import cache_kwargs, method_kwargs, naming_the_demo_target, use_demo_target

    name = model_name_of(args.base)
    on_demo = use_demo_target(args)
    with naming_the_demo_target(on_demo):
        engine = EagleEngine.from_pretrained(
            args.base, args.draft, device=args.device, dtype=args.dtype, max_batch_size=max_batch_size,
            threads=0, tensor_parallel_size=args.tensor_parallel_size, **method_kwargs(args),
            **cache_kwargs(args),
        )
    return engine, load_tokenizer(args.base), name


def serve(args) -> None:
    try:
        import uvicorn
    except ImportError:
        raise EagleError("eagle serve needs the server extras: pip install 'eagle-spec[serve]'") from None
    from ..engine.cpu_threads import set_threads
    from .app import create_app

    set_threads(args.threads)

    engine, tokenizer, name = load(args, args.max_batch_size)
    tp = engine.target.tp
    if tp is not None and tp.rank != 0:
        follow(engine)
        return
    app = create_app(engine, tokenizer, name, args.max_queue, args.max_request_bytes, args.queue_timeout)
    mode = engine.method or "vanilla"
    ranks = f", {tp.size} tensor-parallel ranks" if tp is not None else ""
    print(f"eagle serve: {name} ({mode}{ranks}) on http://{args.host}:{args.port}/v1", flush=True)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=args.shutdown_timeout)
    server = uvicorn.Server(config)

    def shut_down(signum, frame):
        # uvicorn handles SIGINT/SIGTERM while it serves (it lets running requests finish for up to
        # --shutdown-timeout seconds, then cancels them; the app's shutdown stops the engine and, under
        # tensor parallelism, every rank), then re-raises the signal to this handler: the process
        # leaves in order (the ranks' last barrier too) and exits 0. Before uvicorn's handlers, it stops it.
        server.should_exit = True

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, shut_down)
    engine.scheduler.on_broken = lambda: setattr(server, "should_exit", True)  # nothing left to serve
    server.run()
    if engine.scheduler.channel.broken:  # another rank died or was stopped first: no barrier can meet
        shutdown(barrier=False)
        raise EagleError("another tensor-parallel rank is gone; the server stopped")


def follow(engine) -> None:
    """A rank > 0 of ``torchrun ... eagle serve --tensor-parallel-size N``: no HTTP, no queue of its own; it
    runs the steps rank 0's scheduler broadcasts until rank 0 stops (its server shuts down) or is gone.

    torchrun passes Ctrl-C (SIGINT) on to every rank: this rank ignores it and ends with the stop rank 0's
    server sends as it shuts down; SIGTERM (the launcher stopping its workers) ends it at once."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    engine.scheduler.local_submissions = False  # requests come from rank 0's plans alone
    engine.scheduler.follow()
    if engine.scheduler.channel.broken:
        shutdown(barrier=False)
        raise EagleError("rank 0 is gone; this rank stopped")
