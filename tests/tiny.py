"""Tiny random Hugging Face checkpoints of every supported architecture, and comparison helpers."""

from __future__ import annotations

import os
import warnings

import torch
import transformers as tf

VOCAB = 256

# Weights are drawn wide (initializer_range 0.2) so greedy text is varied rather than one repeated token.
COMMON = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=VOCAB,
    initializer_range=0.2,
    max_position_embeddings=1024,
)
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}

ARCHS = {
    "llama": (tf.LlamaConfig, tf.LlamaForCausalLM, {}),
    "llama3": (tf.LlamaConfig, tf.LlamaForCausalLM, dict(rope_scaling=LLAMA3_ROPE, rope_theta=500000.0)),
    "llama-bias": (tf.LlamaConfig, tf.LlamaForCausalLM, dict(attention_bias=True, mlp_bias=True)),
    "mistral": (tf.MistralConfig, tf.MistralForCausalLM, dict(sliding_window=4096)),
    "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM, dict(tie_word_embeddings=True)),
    "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM, dict(head_dim=24)),
}


def make_hf_model(arch: str, seed: int = 0, logit_scale: float = 1.0, **overrides) -> tf.PreTrainedModel:
    """A random fp32 model of ``arch`` (a key of :data:`ARCHS`) in eval mode.

    ``logit_scale`` multiplies an untied lm_head: greedy text is unchanged, next-token distributions get
    as peaked as a trained model's (random ones are nearly flat).
    """
    config_cls, model_cls, extra = ARCHS[arch]
    torch.manual_seed(seed)
    config = config_cls(**{**COMMON, **extra, **overrides})
    model = model_cls(config).eval()
    if logit_scale != 1.0:
        assert not config.tie_word_embeddings
        with torch.no_grad():
            model.lm_head.weight.mul_(logit_scale)
    return model


def save(model: tf.PreTrainedModel, directory: str, fmt: str = "safetensors") -> str:
    """Save as ``safetensors``, ``sharded`` (several safetensors + index) or ``bin`` (pytorch_model.bin)."""
    os.makedirs(directory, exist_ok=True)
    if fmt == "safetensors":
        model.save_pretrained(directory)
    elif fmt == "sharded":
        model.save_pretrained(directory, max_shard_size="60KB")
        assert os.path.isfile(os.path.join(directory, "model.safetensors.index.json"))
    elif fmt == "bin":
        model.config.save_pretrained(directory)
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        torch.save(state, os.path.join(directory, "pytorch_model.bin"))
    else:
        raise ValueError(fmt)
    return directory


def model_store(tmp_path_factory, **defaults):
    """``get(arch, **overrides) -> (hf_model, saved_dir)``, each model built and saved once (for a
    module-scoped fixture); ``defaults`` apply to every model."""
    cache = {}

    def get(arch, **overrides):
        key = (arch, tuple(sorted(overrides.items())))
        if key not in cache:
            hf = make_hf_model(arch, **{**defaults, **overrides})
            cache[key] = (hf, save(hf, str(tmp_path_factory.mktemp(arch))))
        return cache[key]

    return get


def random_prompts(lengths, seed: int = 1, vocab: int = VOCAB) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def repeated_prompts(segment_lengths, repeats: int = 3, seed: int = 1, vocab: int = VOCAB) -> list[list[int]]:
    """Prompts made of a random segment repeated ``repeats`` times (content that candidates copied from the
    context can match)."""
    return [segment * repeats for segment in random_prompts(segment_lengths, seed, vocab)]


def mean_accept_length(results) -> float:
    """Tokens kept per round over all rounds of ``results`` (a list of :class:`GenerationResult`)."""
    lengths = [n for r in results for n in r.accept_lengths]
    return sum(lengths) / len(lengths)


def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad():  # an explicit mask: a prompt may contain the pad id, which generate would mask
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
            min_new_tokens=max_new_tokens,
        )
    return out[0, len(prompt) :].tolist()


def assert_same_greedy(
    hf_model, prompt: list[int], ours: list[int], reference: list[int], tie_tol=1e-5
) -> str:
    """Token-for-token equality, except a divergence at a near tie (top-2 logits within ``tie_tol`` under
    the Hugging Face model at that position), which is reported as a warning.

    Returns "equal" or "near-tie"."""
    assert len(ours) == len(reference), (len(ours), len(reference))
    for i, (a, b) in enumerate(zip(ours, reference)):
        if a == b:
            continue
        with torch.no_grad():
            logits = hf_model(torch.tensor([prompt + reference[:i]])).logits[0, -1]
        top2 = torch.topk(logits, 2).values
        gap = float(top2[0] - top2[1])
        assert gap <= tie_tol, f"tokens differ at new token {i}: ours {a}, reference {b}; top-2 gap {gap:.3g}"
        warnings.warn(f"near tie at new token {i} (top-2 gap {gap:.2g}); sequences diverge from there")
        return "near-tie"
    return "equal"


def make_tokenizer(directory: str, vocab_size: int = VOCAB) -> None:
    """Train a tiny byte-level BPE tokenizer on Python's own sources and save it in HF format."""
    import inspect
    import json

    from eagle_engine.tools.demo import train_tokenizer

    train_tokenizer([inspect.getsource(json) + inspect.getsource(warnings)], vocab_size, directory)


def make_head_dir(
    engine, kind: str, directory: str, fmt: str = "safetensors", seed: int = 0, std: float = 0.1
) -> str:
    """A random EAGLE head of ``kind`` for ``engine``'s target, saved in the official format."""
    from eagle_engine.models.draft import init_random_head
    from eagle_engine.models.loading import save_draft

    return save_draft(init_random_head(kind, engine.target, seed=seed, std=std), directory, fmt)


def train_agreeing_head(
    engine,
    kind: str,
    num_prompts: int = 32,
    length: int = 96,
    steps: int = 300,
    seed: int = 7,
    lr: float = 3e-3,
    warmup_steps: int = 20,
):
    """Train a head (an EAGLE ``kind``, or ``"medusa"``: 4 Medusa heads of one block from Medusa's start) on
    the target's own greedy text so that it agrees often; returns (head, prompts)."""
    from eagle_engine.models.draft import init_random_head
    from eagle_engine.models.medusa import init_random_medusa
    from eagle_engine.tools.train import TrainConfig, train_head

    prompts = random_prompts([4] * num_prompts, seed=seed, vocab=engine.target.config.vocab_size)
    outs = engine.generate_vanilla(prompts, length, stop_token_ids=[])
    sequences = torch.tensor([p + o.tokens for p, o in zip(prompts, outs)])
    if kind == "medusa":
        head = init_random_medusa(engine.target, from_lm_head=True)
    else:
        head = init_random_head(kind, engine.target, std=0.05)
    train_head(
        head,
        engine.target,
        sequences,
        TrainConfig(steps=steps, lr=lr, batch_size=8, warmup_steps=warmup_steps, seed=seed),
    )
    return head, prompts


def check_greedy_against_transformers(hf, engine, prompts, new_tokens: int, min_accept: float):
    """``engine.generate`` of ``prompts``: every token from a round, each output transformers' greedy (tie-
    aware), and a mean accept length above ``min_accept`` (the drafts were really used). Returns results."""
    results = engine.generate(prompts, new_tokens, stop_token_ids=[])
    for prompt, r in zip(prompts, results):
        assert len(r.tokens) == new_tokens and sum(r.accept_lengths) + 1 == new_tokens
        assert_same_greedy(hf, prompt, r.tokens, hf_greedy(hf, prompt, new_tokens))
    assert mean_accept_length(results) > min_accept
    return results


def count_moves(runner, monkeypatch) -> list:
    """Record the runner's slot moves (a finished sequence's slot taken by the last running one)."""
    moves, move = [], runner._move
    monkeypatch.setattr(runner, "_move", lambda src, dst: (moves.append((src, dst)), move(src, dst)))
    return moves
