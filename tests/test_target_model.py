"""The target model and vanilla generation against Hugging Face transformers (CPU, fp32)."""

import json
import os

import pytest
import torch
from tiny import ARCHS, assert_same_greedy, hf_greedy, make_hf_model, random_prompts, save

from eagle_engine import EagleEngine
from eagle_engine.models import load_target

pytestmark = pytest.mark.usefixtures("reference_ops")  # the engine on the reference ops (fast)


@pytest.fixture(scope="module", params=sorted(ARCHS))
def pair(request, tmp_path_factory, reference_ops):
    """(hf_model, our engine) for one architecture."""
    hf = make_hf_model(request.param)
    path = save(hf, str(tmp_path_factory.mktemp(request.param)))
    return hf, EagleEngine.from_pretrained(path)


def our_logits(engine, ids: torch.Tensor) -> torch.Tensor:
    model = engine.target
    cache = model.allocate_cache(ids.shape[0], ids.shape[1])
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    return model.logits(model(ids, positions, cache).hidden)


def test_logits_match_transformers(pair):
    hf, engine = pair
    ids = torch.tensor(random_prompts([200])[0]).view(1, -1)  # past llama3's original 64 positions
    with torch.no_grad():
        ref = hf(ids).logits
    ours = our_logits(engine, ids)
    rel = float((ours - ref).abs().max() / ref.abs().max())
    assert rel < 1e-4, rel


def test_decode_and_tree_mode_match_prefill(pair):
    """Prefill, one-token decode and tree mode (explicit positions + mask) agree on the same text."""
    _, engine = pair
    model = engine.target
    ids = torch.tensor(random_prompts([40])[0]).view(1, -1)
    full = our_logits(engine, ids)
    cache = model.allocate_cache(1, 64)
    model(ids[:, :30], torch.arange(30).view(1, -1), cache)
    cache.lengths += 30
    step = model.logits(model(ids[:, 30:31], torch.tensor([[30]]), cache).hidden)
    torch.testing.assert_close(step[0, 0], full[0, 30], rtol=1e-4, atol=1e-4)
    # Tree mode: rows 31..39 as a chain drawn in scrambled order with an explicit ancestor mask.
    from eagle_kernels import pack_tree_mask

    order = torch.tensor([0, 3, 1, 4, 2, 5, 6, 7, 8])  # tree row -> chain index
    chain_pos = torch.arange(31, 40)
    tokens = ids[0, 31:40][order].view(1, -1)
    positions = chain_pos[order].view(1, -1)
    mask = order.view(-1, 1) >= order.view(1, -1)  # row i sees row j when j's chain index <= i's
    cache.lengths += 1
    tree = model.logits(model(tokens, positions, cache, pack_tree_mask(mask)).hidden)
    torch.testing.assert_close(tree[0], full[0, 31:40][order], rtol=1e-4, atol=1e-4)


def test_aux_layers_match_hidden_states(pair):
    hf, engine = pair
    ids = torch.tensor(random_prompts([12])[0]).view(1, -1)
    with torch.no_grad():
        states = hf(ids, output_hidden_states=True).hidden_states
    model = engine.target
    layers = (0, 1, model.config.num_hidden_layers - 1)
    cache = model.allocate_cache(1, 12)
    out = model(ids, torch.arange(12).view(1, -1), cache, aux_layers=layers)
    expected = torch.cat([states[i] for i in layers], -1)
    torch.testing.assert_close(out.aux, expected, rtol=1e-4, atol=1e-4)


def test_greedy_matches_transformers_generate(pair):
    hf, engine = pair
    prompt = random_prompts([7], seed=5)[0]
    result = engine.generate_vanilla(prompt, 64, stop_token_ids=[])
    assert result.stop_reason == "max_new_tokens" and len(result.tokens) == 64
    assert len(set(result.tokens)) > 8, "degenerate model: greedy text repeats one token"
    assert_same_greedy(hf, prompt, result.tokens, hf_greedy(hf, prompt, 64))


def test_batch_of_three_equals_each_alone(pair):
    _, engine = pair
    prompts = random_prompts([5, 23, 11], seed=2)
    batch = engine.generate_vanilla(prompts, 24, stop_token_ids=[])
    for prompt, result in zip(prompts, batch):
        assert result.tokens == engine.generate_vanilla(prompt, 24, stop_token_ids=[]).tokens


@pytest.mark.parametrize("fmt", ["safetensors", "sharded", "bin"])
@pytest.mark.parametrize("dtype", [torch.float32, "bf16", "float16"])
def test_checkpoint_formats_and_dtypes(tmp_path, fmt, dtype):
    hf = make_hf_model("qwen2")
    model = load_target(save(hf, str(tmp_path), fmt), dtype=dtype)
    expected = hf.model.layers[1].mlp.up_proj.weight
    got = model.model.layers[1].mlp.up_proj.weight
    assert (
        got.dtype == {torch.float32: torch.float32, "bf16": torch.bfloat16, "float16": torch.float16}[dtype]
    )
    torch.testing.assert_close(got.float(), expected.to(got.dtype).float(), rtol=0, atol=0)
    ids = torch.tensor([[1, 2, 3]])
    cache = model.allocate_cache(1, 3)
    assert torch.isfinite(model.logits(model(ids, torch.arange(3).view(1, -1), cache).hidden)).all()


def test_seeded_sampling_reproduces_and_batches(tmp_path):
    engine = EagleEngine.from_pretrained(save(make_hf_model("llama"), str(tmp_path)))
    prompts = random_prompts([4, 9])
    kwargs = dict(temperature=0.8, top_p=0.9, top_k=50, seed=11, stop_token_ids=[])
    alone = engine.generate_vanilla(prompts[1], 30, **kwargs)
    assert alone.tokens == engine.generate_vanilla(prompts[1], 30, **kwargs).tokens
    assert alone.tokens == engine.generate_vanilla(prompts, 30, **kwargs)[1].tokens
    other = engine.generate_vanilla(prompts[1], 30, **{**kwargs, "seed": 12})
    assert other.tokens != alone.tokens


def test_stops_at_stop_token_and_max_length(tmp_path):
    hf = make_hf_model("llama", max_position_embeddings=40)
    engine = EagleEngine.from_pretrained(save(hf, str(tmp_path)))
    prompt = random_prompts([10])[0]
    free = engine.generate_vanilla(prompt, 1000, stop_token_ids=[])
    assert free.stop_reason == "max_length" and len(free.tokens) == 30  # 10 + 30 = 40 positions
    stop = free.tokens[5]
    first = free.tokens.index(stop)
    stopped = engine.generate_vanilla(prompt, 1000, stop_token_ids=[stop])
    assert stopped.stop_reason == "stop_token" and stopped.tokens == free.tokens[: first + 1]
    capped = engine.generate_vanilla(prompt, 3, stop_token_ids=[])
    assert capped.stop_reason == "max_new_tokens" and capped.tokens == free.tokens[:3]
    # An absurd request is capped by the model's maximum length, never allocated.
    assert engine.generate_vanilla(prompt, 10**15, stop_token_ids=[]).tokens == free.tokens
    # Default stop ids come from the config (eos_token_id).
    eos_cfg = json.load(open(os.path.join(str(tmp_path), "config.json")))["eos_token_id"]
    assert engine.target.config.eos_token_ids == (eos_cfg,)
