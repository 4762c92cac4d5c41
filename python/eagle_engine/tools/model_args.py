"""The model flags the ``eagle`` commands share, turned into :meth:`EagleEngine.from_pretrained` keywords:
``--base`` (omitted: the embedded demo model), ``--draft``, ``--method``, ``--method-settings``, ``--tree``.
Here, below both ``tools/cli.py`` and ``serve/server.py``, which use them."""

from __future__ import annotations

import contextlib

from ..errors import EagleError


def use_demo_target(args) -> bool:
    """Without ``--base`` the target is the embedded demo model (with its EAGLE head unless ``--draft`` or
    ``--method`` says otherwise): fills ``args.base``/``args.draft``; True when ``--draft`` was given."""
    if args.base is not None:
        return False
    from .demo import demo_paths

    args.base, demo_head = demo_paths()
    given = args.draft is not None
    if args.method in (None, "eagle"):
        args.draft = args.draft or demo_head
    return given


@contextlib.contextmanager
def naming_the_demo_target(on_demo: bool):
    """A head that does not fit the target says so: with ``--draft`` and no ``--base``, that the target was
    the embedded demo model (the usual cause: ``--base`` forgotten)."""
    try:
        yield
    except EagleError as e:
        if not on_demo:
            raise
        raise type(e)(f"{e} (no --base was given, so the target is the embedded demo model; pass --base with "
                      "the directory of the model this head was trained for)") from None


def method_kwargs(args) -> dict:
    """``from_pretrained`` keywords for ``--method``, ``--method-settings`` and ``--tree``."""
    import json

    kwargs = {"method": args.method}
    method = args.method
    if method is None and args.draft is not None:
        from ..models.loading import is_medusa_dir

        method = "medusa" if is_medusa_dir(args.draft) else "eagle"
    if args.method_settings is not None:
        try:
            settings = json.loads(args.method_settings)
        except json.JSONDecodeError as e:
            raise EagleError(f"--method-settings is not valid JSON: {e}") from None
        if method in (None, "eagle"):
            raise EagleError("--method-settings is for medusa, lookahead or prompt_lookup (EAGLE: --tree)")
        kwargs[method] = settings
    if method in (None, "eagle"):
        kwargs["tree"] = args.tree
    return kwargs | draft_vocab_kwargs(args)


def cache_kwargs(args) -> dict:
    """``from_pretrained`` keywords of the KV cache flags (``--max-model-len``, ``--kv-cache-memory``,
    ``--block-size``, ``--enable-prefix-caching``, ``--max-prefill-tokens``) where a command has them."""
    from ..engine.kv_budget import parse_size

    names = ("max_model_len", "kv_cache_memory", "block_size", "enable_prefix_caching", "max_prefill_tokens")
    kwargs = {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}
    if "kv_cache_memory" in kwargs:
        parse_size(kwargs["kv_cache_memory"])  # a bad size is named before anything loads
    return kwargs


def draft_vocab_kwargs(args) -> dict:
    """``from_pretrained`` keywords for ``--draft-vocab-size`` and ``--draft-vocab-frequencies`` (commands
    without them: none)."""
    size, path = getattr(args, "draft_vocab_size", None), getattr(args, "draft_vocab_frequencies", None)
    if size is None and path is None:
        return {}
    if size is None or path is None:
        raise EagleError("--draft-vocab-size and --draft-vocab-frequencies go together")
    return {"draft_vocab_size": size, "token_frequencies": path}
