"""``eagle serve``: load the model pair, build the app, run it under uvicorn."""

from __future__ import annotations

import os

from ..errors import EagleError


def model_name_of(base: str | None) -> str:
    return "eagle-demo" if base is None else os.path.basename(os.path.normpath(base))


def load(args, max_batch_size: int = 8):
    """``(engine, tokenizer, model_name)`` from the serve flags (``--base``, ``--draft``, ``--method``,
    ``--method-settings``, ``--tree``, ``--device``, ``--dtype``); no ``--base``: the embedded demo pair (with
    its EAGLE head unless ``--draft`` names another or the method needs none)."""
    from ..engine.engine import EagleEngine
    from ..tools.common import load_tokenizer
    from ..tools.model_args import method_kwargs, naming_the_demo_target, use_demo_target

    name = model_name_of(args.base)
    on_demo = use_demo_target(args)
    with naming_the_demo_target(on_demo):
        engine = EagleEngine.from_pretrained(
            args.base, args.draft, device=args.device, dtype=args.dtype, max_batch_size=max_batch_size,
            **method_kwargs(args),
        )
    return engine, load_tokenizer(args.base), name


def serve(args) -> None:
    try:
        import uvicorn
    except ImportError:
        raise EagleError("eagle serve needs the server extras: pip install 'eagle-spec[serve]'") from None
    from ..tools.common import apply_threads
    from .app import create_app

    apply_threads(args.threads)

    engine, tokenizer, name = load(args, args.max_batch_size)
    app = create_app(engine, tokenizer, name, args.max_queue, args.max_request_bytes)
    mode = engine.method or "vanilla"
    print(f"eagle serve: {name} ({mode}) on http://{args.host}:{args.port}/v1", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
