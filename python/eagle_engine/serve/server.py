"""``eagle serve``: load the model pair, build the app, run it under uvicorn."""

from __future__ import annotations

import os

from ..errors import EagleError


def model_name_of(base: str | None) -> str:
    return "eagle-demo" if base is None else os.path.basename(os.path.normpath(base))


def load(base: str | None, draft: str | None, device="cpu", dtype="float32", max_batch_size=8, **method):
    """``(engine, tokenizer, model_name)``; no ``base``: the embedded demo pair (with its EAGLE head unless
    ``draft`` names another or ``method`` needs none). ``method``: ``from_pretrained``'s ``method``,
    ``tree``, ``medusa``, ``lookahead``, ``prompt_lookup`` keywords (default: EAGLE, ``tree="auto"``)."""
    from ..engine.engine import EagleEngine
    from ..tools.common import load_tokenizer
    from ..tools.demo import demo_paths

    name = model_name_of(base)
    if base is None:
        base, demo_head = demo_paths()
        if method.get("method") in (None, "eagle"):
            draft = draft or demo_head
    engine = EagleEngine.from_pretrained(
        base, draft, device=device, dtype=dtype, max_batch_size=max_batch_size, **method
    )
    return engine, load_tokenizer(base), name


def serve(args) -> None:
    try:
        import uvicorn
    except ImportError:
        raise EagleError("eagle serve needs the server extras: pip install 'eagle-spec[serve]'") from None
    from ..tools.common import apply_threads
    from .app import create_app

    apply_threads(args.threads)

    from ..tools.cli import method_kwargs

    engine, tokenizer, name = load(
        args.base, args.draft, args.device, args.dtype, args.max_batch_size, **method_kwargs(args)
    )
    app = create_app(engine, tokenizer, name, args.max_queue)
    mode = engine.method or "vanilla"
    print(f"eagle serve: {name} ({mode}) on http://{args.host}:{args.port}/v1", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
