"""The embedded demo pair: a small Llama model trained on Python's own standard library, and its EAGLE heads.

The demo target is trained on the standard library's ``.py`` sources (split in :mod:`.corpus`); an
EAGLE-1/2 head (``eagle2``, the default) and an EAGLE-3 head (``eagle3``) are trained on the target's
features. All three ship inside the package (``eagle_engine/data/demo/``) so that ``eagle demo`` runs with
nothing downloaded. ``benchmarks/build_demo.py`` rebuilds them from a seed.
"""

from __future__ import annotations

import os
from importlib import resources

import torch

from ..errors import EagleError
from .common import load_tokenizer, report
from .detokenize import decode_new

# ``--head`` name -> (directory under data/demo, what it is, the build_demo.py stage that writes it)
DEMO_HEADS = {
    "eagle2": ("head", "EAGLE-1/2 head", "head"),
    "eagle3": ("head3", "EAGLE-3 head", "head3"),
}


def _demo_dir() -> str:
    return str(resources.files("eagle_engine") / "data" / "demo")


def _missing(path: str, stage: str | None = None) -> EagleError:
    build = "python benchmarks/build_demo.py" + (f" --stages {stage}" if stage else "")
    return EagleError(
        f"the embedded demo model is missing ({path} not found): reinstall the package with its data "
        f"files, or rebuild it with `{build}`"
    )


def demo_head_path(head: str = "eagle2") -> str:
    """The directory of the embedded demo head ``head``: ``"eagle2"`` (the EAGLE-1/2 head, the default) or
    ``"eagle3"`` (the EAGLE-3 head). Both fit the target of :func:`demo_paths`.

    Raises :class:`EagleError` for another name, or when the head's data is missing.
    """
    if head not in DEMO_HEADS:
        raise EagleError(f"unknown demo head {head!r}: choose one of {', '.join(DEMO_HEADS)}")
    subdir, _, stage = DEMO_HEADS[head]
    path = os.path.join(_demo_dir(), subdir)
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise _missing(os.path.join(path, "config.json"), stage)
    return path


def demo_paths(head: str = "eagle2") -> tuple[str, str]:
    """``(target_dir, head_dir)`` of the demo pair embedded in the package; ``head="eagle3"`` pairs the
    target with its EAGLE-3 head instead of the EAGLE-1/2 head (see :func:`demo_head_path`).

    Raises :class:`EagleError` when the data is missing (a checkout where it was never built, or a package
    installed without its data files) or ``head`` is unknown.
    """
    target = os.path.join(_demo_dir(), "target")
    for what in ("config.json", "tokenizer.json"):
        if not os.path.isfile(os.path.join(target, what)):
            raise _missing(os.path.join(target, what))  # every stage: the heads fit their target
    return target, demo_head_path(head)


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
    head: str = "eagle2",
) -> dict:
    """``eagle demo``: complete ``prompt`` (default :data:`DEMO_PROMPT`) with EAGLE on the embedded pair, then
    with vanilla decoding; print the completion, the mean acceptance length and both tokens/s.

    ``head``: the demo head drafting, ``"eagle2"`` (EAGLE-1/2, the default) or ``"eagle3"`` (EAGLE-3).

    ``tree="auto"`` sizes the tree to the device (measured once, cached; see
    :mod:`eagle_engine.speculative.auto_tree`): a short chain on a CPU, where a 60-node tree costs about what
    decoding 60 tokens does, a bigger tree on a GPU, where verifying 60 tokens costs about what one does."""
    from ..engine.engine import EagleEngine

    target_dir, head_dir = demo_paths(head)  # an unknown or missing head fails before any work
    # A 3.4M-parameter model: thread hand-offs cost more than they save, hence 1 thread unless told.
    torch.set_num_threads(1 if threads is None else threads)
    print(f"[demo] head: {head} ({DEMO_HEADS[head][1]}), draft tree: {tree}, device: {device}")
    prompt = DEMO_PROMPT if prompt is None else prompt
    tokenizer = load_tokenizer(target_dir)
    engine = EagleEngine.from_pretrained(target_dir, head_dir, device=device, dtype="float32", tree=tree,
                                         threads=0)  # (set above)
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
