"""examples/embed_paged.py: another engine's speculative loop (its own NHD block pool, allocator and Llama
forward over eagle_kernels ops; the EAGLE head and tree builder borrowed) gives ``EagleEngine.generate``'s
greedy tokens at block sizes 1 and 16; a wrong block table changes them, and ``--check`` says so."""

import importlib.util
import os

import pytest
import torch

pytestmark = pytest.mark.usefixtures("reference_ops")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "embed_paged.py")
PROMPTS = (
    'def read_lines(filename):\n    """Return the lines of *filename*."""\n    with open(filename) as f:',
    "import os\nimport sys\n\n\nclass Config:\n    def __init__(self, path):\n",
)
NEW = "24"


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("embed_paged", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("block_size", [1, 16])
@pytest.mark.parametrize("prompt", PROMPTS)
def test_the_example_gives_the_engines_tokens(example, capsys, prompt, block_size):
    args = ["--check", "--prompt", prompt, "--max-new-tokens", NEW, "--block-size", str(block_size)]
    assert example.main(args) == 0
    out = capsys.readouterr().out
    assert f"{NEW} tokens in" in out and "EagleEngine.generate gives the same tokens" in out
    mean = float(out.split("mean accepted length ")[1].split(",")[0])
    assert mean > 1.5  # the head's drafts are accepted: the loop really speculates


def test_blocks_are_handed_out_scattered_as_the_sequence_grows(example):
    pool = example.BlockPool(8, 16, 8, "cpu")
    pool.reserve(1)
    assert pool.held == 1 and (pool.table[0, 1:] == -1).all()
    pool.reserve(40)
    blocks = pool.table[0, :3].tolist()
    assert pool.held == 3 and len(set(blocks)) == 3 and blocks != [0, 1, 2] and len(pool.free) == 5
    cache = pool.cache(2, 3, 4, torch.float32)
    assert cache.data.shape == (2, 2, 8, 3, 16, 4) and cache.data.stride(-2) == 3 * 4  # NHD memory
    assert cache.block_table is pool.table


def test_a_wrong_block_table_changes_the_tokens_and_check_fails(example, monkeypatch, capsys):
    """Every logical block aliased to the sequence's first one: later rows overwrite earlier ones."""
    reserve = example.BlockPool.reserve

    def aliased(self, rows):
        reserve(self, rows)
        self.table[0, : self.held] = self.table[0, 0]

    monkeypatch.setattr(example.BlockPool, "reserve", aliased)
    args = ["--check", "--prompt", PROMPTS[0], "--max-new-tokens", NEW, "--block-size", "4"]
    assert example.main(args) == 1
    assert "EagleEngine.generate gives DIFFERENT tokens" in capsys.readouterr().out
