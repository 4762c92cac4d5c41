"""The embedded demo pair: a small Llama model trained on Python's own standard library, and its EAGLE head.

The demo target is trained on the standard library's ``.py`` sources (split in :mod:`.corpus`); its
EAGLE-1/2 head is trained on the target's features. Both ship inside the package (``eagle_engine/data/demo/``)
so that ``eagle demo`` runs with nothing downloaded. ``benchmarks/build_demo.py`` rebuilds them from a seed.
"""

from __future__ import annotations

import os
from importlib import resources

import torch

from ..errors import EagleError
from .common import load_tokenizer, report
from .detokenize import decode_new


def demo_paths() -> tuple[str, str]:
    """``(target_dir, head_dir)`` of the demo pair embedded in the package.

    Raises :class:`EagleError` when the data is missing (a checkout where it was never built, or a package
    installed without its data files).
    """
    base = resources.files("eagle_engine") / "data" / "demo"
    target, head = str(base / "target"), str(base / "head")
    for d, what in ((target, "config.json"), (target, "tokenizer.json"), (head, "config.json")):
        if not os.path.isfile(os.path.join(d, what)):
            raise EagleError(
                f"the embedded demo model is missing ({os.path.join(d, what)} not found): reinstall the "
                "package with its data files, or rebuild it with `python benchmarks/build_demo.py`"
            )
    return target, head


# No trailing newline (see code_prompts): the model writes the next line's indentation itself.
DEMO_PROMPT = '''def read_lines(filename):
    """Return the lines of *filename* as a list."""
    with open(filename) as f:'''


def run_demo(
    prompt: str | None = None,
    max_new_tokens: int = 128,
    tree="auto",
    device="cpu",
    threads: int | None = None,
) -> dict:
    """``eagle demo``: complete ``prompt`` (default :data:`DEMO_PROMPT`) with EAGLE on the embedded pair, then
    with vanilla decoding; print the completion, the mean acceptance length and both tokens/s.

    ``tree="auto"`` sizes the tree to the device (measured once, cached; see
    :mod:`eagle_engine.spec.auto_tree`): a short chain on a CPU, where a 60-node tree costs about what
    decoding 60 tokens does, a bigger tree on a GPU, where verifying 60 tokens costs about what one does."""
    from ..engine.engine import EagleEngine

    # A 3.4M-parameter model: thread hand-offs cost more than they save, hence 1 thread unless told.
    torch.set_num_threads(1 if threads is None else threads)
    print(f"[demo] draft tree: {tree}, device: {device}")
    target_dir, head_dir = demo_paths()
    prompt = DEMO_PROMPT if prompt is None else prompt
    tokenizer = load_tokenizer(target_dir)
    engine = EagleEngine.from_pretrained(target_dir, head_dir, device=device, dtype="float32", tree=tree)
    if tree == "auto":
        t = engine.tree
        print(f"[demo] auto tree: {t.num_nodes} nodes, depth {t.depth}, top-k {t.top_k}")
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if not ids:
        raise EagleError("the prompt is empty")
    engine.generate_vanilla(ids, 4)  # warm-up: first calls pay one-off costs
    eagle = engine.generate(ids, max_new_tokens)
    report("eagle", eagle, prompt + decode_new(tokenizer, ids, eagle.tokens))
    vanilla = engine.generate_vanilla(ids, max_new_tokens)
    report("vanilla", vanilla)
    same = "identical" if vanilla.tokens == eagle.tokens else "DIFFERENT"
    print(f"outputs identical: {'yes' if vanilla.tokens == eagle.tokens else 'no'}")
    speedup = eagle.tokens_per_second / max(vanilla.tokens_per_second, 1e-9)
    e_tps, v_tps = eagle.tokens_per_second, vanilla.tokens_per_second
    print(f"EAGLE {e_tps:.1f} tokens/s vs vanilla {v_tps:.1f} tokens/s: {speedup:.2f}x; outputs {same}")
    return {"eagle": eagle, "vanilla": vanilla, "speedup": speedup}


def train_tokenizer(texts: list[str], vocab_size: int, out_dir: str | None = None):
    """A byte-level BPE tokenizer (``<s>`` bos, ``</s>`` eos) trained on ``texts``; saved in Hugging Face
    format to ``out_dir`` when given. Returns a ``transformers.PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    if out_dir is not None:
        fast.save_pretrained(out_dir)
    return fast
