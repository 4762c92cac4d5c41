"""A reduced draft LM head for EAGLE-1/2 heads at inference: the most frequent tokens of a frequency file,
lossless (greedy tokens equal vanilla decoding's), its drafts only from that vocabulary, and clear errors."""

import pytest
import torch

from eagle_engine import EagleEngine, EagleError
from eagle_engine.models.vocab import load_frequencies, most_frequent, save_frequencies
from eagle_engine.tools.cli import main
from eagle_engine.tools.common import load_tokenizer
from eagle_engine.tools.corpus import read_corpus, stdlib_files
from eagle_engine.tools.demo import demo_paths
from eagle_engine.tools.training_data import text_rows, token_frequencies

pytestmark = pytest.mark.usefixtures("reference_ops")

SIZE = 1024  # of the demo's 4,096 tokens


@pytest.fixture(scope="module")
def frequencies(tmp_path_factory):
    """A frequency file of the demo target's tokens over part of the demo's training corpus."""
    base, _ = demo_paths()
    tokenizer = load_tokenizer(base)
    rows = text_rows(tokenizer, read_corpus(stdlib_files("train")[:60]), 128)
    path = str(tmp_path_factory.mktemp("vocab") / "freq.json")
    save_frequencies(path, token_frequencies(rows, 4096), {"what": "test"})
    return path


def test_most_frequent_is_deterministic_and_sorted():
    counts = torch.tensor([5, 0, 9, 5, 1, 9])
    assert most_frequent(counts, 3).tolist() == [0, 2, 5]  # 9, 9, then the lower id of the two 5s
    with pytest.raises(EagleError, match="does not fit"):
        most_frequent(counts, 7)


def test_reduced_draft_vocabulary_is_lossless_and_drafts_only_from_it(frequencies):
    base, head = demo_paths()
    tokenizer = load_tokenizer(base)
    whole = EagleEngine.from_pretrained(base, head, tree="chain", threads=1)
    reduced = EagleEngine.from_pretrained(
        base, head, tree="chain", threads=1, draft_vocab_size=SIZE, token_frequencies=frequencies
    )
    chosen = most_frequent(load_frequencies(frequencies, 4096), SIZE)
    assert torch.equal(reduced.draft.draft_token_ids, chosen)
    assert reduced.draft.lm_head_weight.shape == (SIZE, 256)
    hidden = torch.randn(3, 256)
    _, ids = reduced.draft.topk(hidden, 5)
    assert bool(torch.isin(ids, chosen).all())
    prompts = [
        tokenizer(p)["input_ids"] for p in ("import os\n\ndef main(", "class Stack:\n    def push(self")
    ]
    for prompt in prompts:
        mine = reduced.generate(prompt, 48, stop_token_ids=[])
        assert mine.tokens == whole.generate_vanilla(prompt, 48, stop_token_ids=[]).tokens
        assert sum(mine.accept_lengths) / len(mine.accept_lengths) > 1.0  # drafts were accepted
    for engine in (whole, reduced):
        engine.close()


def test_reduced_draft_vocabulary_errors(frequencies, tmp_path):
    base, head = demo_paths()
    with pytest.raises(EagleError, match="needs both"):
        EagleEngine.from_pretrained(base, head, draft_vocab_size=SIZE)
    _, head3 = demo_paths("eagle3")
    with pytest.raises(EagleError, match="EAGLE-3 heads carry their own"):
        EagleEngine.from_pretrained(base, head3, draft_vocab_size=SIZE, token_frequencies=frequencies)
    other = tmp_path / "other.json"
    save_frequencies(str(other), torch.ones(100, dtype=torch.long), {})
    with pytest.raises(EagleError, match="100-token vocabulary; this model has 4096"):
        EagleEngine.from_pretrained(base, head, draft_vocab_size=SIZE, token_frequencies=str(other))
    with pytest.raises(EagleError, match="5000 tokens does not fit"):
        EagleEngine.from_pretrained(base, head, draft_vocab_size=5000, token_frequencies=frequencies)


def test_generate_command_takes_a_draft_vocabulary(frequencies, capsys):
    args = ["generate", "--prompt", "def f(x):", "--max-new-tokens", "16", "--compare", "--tree", "chain"]
    assert main(args + ["--draft-vocab-size", str(SIZE), "--draft-vocab-frequencies", frequencies]) == 0
    assert "outputs identical: yes" in capsys.readouterr().out
    assert main(args + ["--draft-vocab-size", str(SIZE)]) == 2
    assert "go together" in capsys.readouterr().err
