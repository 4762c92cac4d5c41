"""The ``eagle`` command: ``eagle generate`` (vanilla or EAGLE) and friends."""

from __future__ import annotations

import argparse
import sys

from .errors import EagleError


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--base", required=True, help="target model directory (Hugging Face format, with tokenizer)"
    )
    p.add_argument(
        "--draft", default=None, help="EAGLE draft head directory (official format); omit: vanilla"
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--dtype", default="float32", help="float32, float16 or bfloat16 (default: float32)")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="eagle", description="EAGLE speculative decoding engine")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="complete a prompt and report tokens/s")
    _add_model_args(gen)
    gen.add_argument("--prompt", required=True, help="prompt text")
    gen.add_argument("--compare", action="store_true", help="also run vanilla decoding and compare")
    _add_sampling_args(gen)
    return parser


def load_tokenizer(model_dir: str):
    """The model directory's own tokenizer (``transformers.AutoTokenizer``, local files only)."""
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except Exception as e:  # transformers raises many types for a missing/broken tokenizer
        raise EagleError(f"cannot load a tokenizer from {model_dir}: {type(e).__name__}: {e}") from None


def report(label: str, result, text: str | None = None) -> None:
    if text is not None:
        print(text)
    line = f"[{label}] {len(result.tokens)} tokens in {result.total_seconds:.3f} s: "
    line += f"{result.tokens_per_second:.1f} tokens/s (stop: {result.stop_reason})"
    print(line)
    if result.accept_lengths:
        print(f"mean acceptance length: {result.mean_accept_length:.2f}")


def cmd_generate(args) -> None:
    from .engine import EagleEngine

    tokenizer = load_tokenizer(args.base)
    engine = EagleEngine.from_pretrained(args.base, args.draft, device=args.device, dtype=args.dtype)
    ids = tokenizer(args.prompt, add_special_tokens=True)["input_ids"]
    sampling = dict(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed)
    if args.draft is not None:
        result = engine.generate(ids, args.max_new_tokens, **sampling)
        report("eagle", result, args.prompt + tokenizer.decode(result.tokens, skip_special_tokens=True))
    if args.draft is None or args.compare:
        result = engine.generate_vanilla(ids, args.max_new_tokens, **sampling)
        text = args.prompt + tokenizer.decode(result.tokens, skip_special_tokens=True)
        report("vanilla", result, text if args.draft is None else None)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        {"generate": cmd_generate}[args.command](args)
    except EagleError as e:
        print(f"eagle: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
