"""Helpers shared by the ``eagle`` commands: the model's tokenizer, result lines."""

from __future__ import annotations

from ..errors import EagleError


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
