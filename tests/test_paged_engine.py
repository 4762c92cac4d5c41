"""The engine on its paged KV cache: every method at block sizes 1, 64 and one block per sequence (the
contiguous layout as a special case) gives the default engine's tokens (block size 16, itself held to
transformers by the greedy tests), greedy and seeded sampling; prefix-cache hits equal cold runs; chunked
prefill equals whole prefill and lets running streams go on; preemption under a pool too small for the
batch loses nothing; 64 sequences of max_model_len 32,768 start on a pool holding only what they use."""

import pytest
from tiny import hf_greedy, make_hf_model, save

from eagle_engine import EagleEngine, demo_paths
from eagle_engine.engine.sequence import Sequence
from eagle_engine.models import load_target
from eagle_engine.models.medusa import init_random_medusa, save_medusa
from eagle_engine.speculative.sampling import SamplingParams
from eagle_engine.tools.common import load_tokenizer
from eagle_engine.tools.corpus import code_prompts, read_corpus, stdlib_files

pytestmark = pytest.mark.usefixtures("reference_ops")

NEW = 24
ONE_BLOCK = 2048  # more than max_model_len (1,024) and a tree: one block per sequence, the contiguous layout


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo pair, its EAGLE-3 head, random Medusa heads for its target, and held-out code prompts."""
    base, head = demo_paths()
    _, head3 = demo_paths("eagle3")
    medusa = str(tmp_path_factory.mktemp("medusa"))
    save_medusa(init_random_medusa(load_target(base), 3, seed=2, std=0.05), medusa)
    tokenizer = load_tokenizer(base)
    texts = code_prompts(read_corpus(stdlib_files("heldout")[:40]), 3, 160, seed=4)
    prompts = [tokenizer(t)["input_ids"][: 20 + 17 * i] for i, t in enumerate(texts)]
    return {"base": base, "head": head, "head3": head3, "medusa": medusa, "prompts": prompts}


METHODS = {
    "eagle2-dynamic": ("head", dict(tree="dynamic")),
    "eagle1-static": ("head", dict(tree="static")),
    "eagle3-chain": ("head3", dict(tree="chain")),
    "medusa": ("medusa", {}),
    "lookahead": (None, dict(method="lookahead")),
    "prompt_lookup": (None, dict(method="prompt_lookup")),
}


def engine_for(demo, method: str, **settings) -> EagleEngine:
    head, kwargs = METHODS[method]
    return EagleEngine.from_pretrained(demo["base"], demo[head] if head else None, threads=0,
                                       **{**kwargs, **settings})  # fmt: skip


def tokens(results) -> list[list[int]]:
    return [r.tokens for r in results]


@pytest.mark.parametrize("method", list(METHODS))
def test_every_block_size_gives_the_same_tokens(demo, method):
    prompts = demo["prompts"]
    reference = engine_for(demo, method, enable_prefix_caching=False)
    greedy = tokens(reference.generate(prompts, NEW, stop_token_ids=[]))
    sampled = tokens(reference.generate(prompts, NEW, temperature=0.8, seed=7, stop_token_ids=[]))
    vanilla = tokens(reference.generate_vanilla(prompts, NEW, stop_token_ids=[]))
    assert greedy == vanilla  # lossless at the default block size
    reference.close()
    for block_size in (1, 64, ONE_BLOCK):
        engine = engine_for(demo, method, block_size=block_size, enable_prefix_caching=False)
        assert engine.runner.blocks.block_size == block_size
        assert tokens(engine.generate(prompts, NEW, stop_token_ids=[])) == greedy, block_size
        assert tokens(engine.generate(prompts, NEW, temperature=0.8, seed=7, stop_token_ids=[])) == sampled
        engine.close()


def test_the_contiguous_layout_is_one_block_per_sequence(demo):
    engine = engine_for(demo, "eagle2-dynamic", block_size=ONE_BLOCK, max_batch_size=3)
    runner = engine.runner
    assert runner.blocks.num_blocks == 3 and runner.state.tcache.data.shape[4] == ONE_BLOCK
    engine.close()


def test_prefix_cache_hits_give_the_cold_tokens(demo):
    shared = (demo["prompts"][2] + demo["prompts"][1])[:40]
    prompts = [shared + demo["prompts"][0][:9], shared + demo["prompts"][1][:5], shared]
    cold = engine_for(demo, "eagle2-dynamic", enable_prefix_caching=False)
    expected = [tokens(cold.generate([p], NEW, stop_token_ids=[])) for p in prompts]
    warm = engine_for(demo, "eagle2-dynamic")
    blocks = warm.runner.blocks
    got = [tokens(warm.generate([p], NEW, stop_token_ids=[])) for p in prompts]
    assert got == expected
    # The first prompt computed everything; the second reused the shared 2 full blocks (32 rows); the third
    # (the 40 shared tokens alone) those, and 7 rows of a copy of the second's partly filled block (copy on
    # write: rows 32..38, whose next tokens match; row 39, its last, is computed for its logits).
    assert blocks.stats.hits == 32 + 32 + 7 and blocks.stats.queries == sum(len(p) for p in prompts)
    again = tokens(warm.generate([prompts[0]], NEW, stop_token_ids=[]))  # the same prompt: all but one row
    assert again == expected[0] and blocks.stats.hits == 71 + len(prompts[0]) - 1
    sampled_cold = tokens(cold.generate(prompts, NEW, temperature=0.9, seed=3, stop_token_ids=[]))
    assert tokens(warm.generate(prompts, NEW, temperature=0.9, seed=3, stop_token_ids=[])) == sampled_cold
    cold.close()
    warm.close()


@pytest.mark.parametrize("method", ["eagle2-dynamic", "lookahead"])
def test_chunked_prefill_equals_whole_prefill(demo, method):
    prompts = demo["prompts"]
    whole = engine_for(demo, method, enable_prefix_caching=False)
    chunked = engine_for(demo, method, enable_prefix_caching=False, max_prefill_tokens=7)
    for sampling in ({}, {"temperature": 0.8, "seed": 11}):
        expected = tokens(whole.generate(prompts, NEW, stop_token_ids=[], **sampling))
        assert tokens(chunked.generate(prompts, NEW, stop_token_ids=[], **sampling)) == expected
    whole.close()
    chunked.close()


def test_running_streams_decode_while_a_long_prompt_joins_in_chunks(demo):
    engine = engine_for(demo, "eagle2-dynamic", enable_prefix_caching=False, max_prefill_tokens=8)
    runner = engine.runner
    short, long_ = demo["prompts"][0][:6], demo["prompts"][2]
    running = Sequence(short, SamplingParams(), 200, frozenset(), 0, runner.max_model_len)
    joining = Sequence(long_, SamplingParams(), 5, frozenset(), 0, runner.max_model_len)
    runner.add([running])
    runner.step()
    runner.add([joining])  # longer than a step's budget: it joins in chunks
    steps, delivered = 0, []
    while not joining.tokens:
        before = len(running.tokens)
        delivered += runner.step().get(joining, [])
        steps += 1
        assert len(running.tokens) > before  # the running stream got tokens in every step
    assert steps == -(-len(long_) // 8)  # one chunk of at most 8 prompt tokens per step
    expected = engine.generate_vanilla([long_], 5, stop_token_ids=[])[0].tokens
    while not joining.done:
        delivered += runner.step().get(joining, [])
    assert joining.tokens == expected and delivered == expected  # the first token too (the text needs it)
    runner.release(running)
    engine.close()


def test_preemption_under_a_small_pool_loses_nothing(demo):
    prompts = [p[:30] for p in demo["prompts"]] + [demo["prompts"][2][5:45]]
    roomy = engine_for(demo, "eagle2-dynamic", enable_prefix_caching=False)
    row_bytes = 4 * 2 * 2 * 64 * 4 + 2 * 2 * 64 * 4  # demo target (4 layers, 2 KV heads of 64, fp32) + head
    tight = engine_for(demo, "eagle2-dynamic", kv_cache_memory=13 * 16 * row_bytes,
                       enable_prefix_caching=False)
    runner = tight.runner
    # A sequence holds 6 blocks when it starts (30 or 40 prompt rows and a 61-row tree) and 9 at its end:
    # two start together, and cannot both finish.
    assert runner.blocks.num_blocks == 13
    for sampling in ({}, {"temperature": 0.7, "seed": 5}):
        expected = tokens(roomy.generate(prompts, 40, stop_token_ids=[], **sampling))
        before = runner.num_preemptions
        assert tokens(tight.generate(prompts, 40, stop_token_ids=[], **sampling)) == expected
        assert runner.num_preemptions > before
    assert runner.blocks.num_free == 13  # every block came back
    roomy.close()
    tight.close()


def test_a_request_that_never_fits_the_pool_is_refused(demo):
    from eagle_engine.engine.blocks import KVCacheTooSmallError

    row_bytes = 4 * 2 * 2 * 64 * 4 + 2 * 2 * 64 * 4
    engine = engine_for(demo, "eagle2-dynamic", kv_cache_memory=12 * 16 * row_bytes)
    with pytest.raises(KVCacheTooSmallError, match="raise kv_cache_memory"):
        engine.generate(demo["prompts"][2], 200)
    assert len(engine.generate(demo["prompts"][0][:10], 8).tokens) == 8  # a small one still runs
    # One that needs every block of the pool (it would not leave the 1% kept free while others run).
    scratch = engine.runner.scratch_rows
    assert len(engine.generate(demo["prompts"][0][:5], 12 * 16 - scratch - 5, stop_token_ids=[]).tokens) > 100
    engine.close()


def test_a_sequence_preempted_twice_mid_prefill_samples_as_if_never_preempted(demo):
    prompts = [demo["prompts"][1], demo["prompts"][2]]
    params = SamplingParams(temperature=0.9)
    results = []
    for preempt in (False, True):
        engine = engine_for(demo, "eagle2-dynamic", enable_prefix_caching=False, max_prefill_tokens=8)
        runner = engine.runner
        first, second = (Sequence(p, params, 30, frozenset(), 17 + i, runner.max_model_len)
                         for i, p in enumerate(prompts))  # fmt: skip
        runner.add([first])
        while not first.tokens:
            runner.step()
        runner.add([second])
        runner.step()
        if preempt:  # mid-prefill, resumed, and again mid-prefill
            runner._preempt(second)
            runner.step()
            runner.step()
            assert second in runner.prefilling
            runner._preempt(second)
            assert runner.num_preemptions == 2
        while not (first.done and second.done):
            runner.step()
        results.append((first.tokens, second.tokens))
        engine.close()
    assert results[0] == results[1]


def test_deep_draft_levels_stay_in_the_sequences_blocks(demo):
    """A dynamic tree of depth 12 and top-k 3 writes 36 draft rows past the committed length, more than its
    16 nodes: every block size gives the same drafts, so the same accepted lengths."""
    tree = {"kind": "dynamic", "total_tokens": 16, "depth": 12, "top_k": 3}
    lengths = []
    for block_size in (1, 16, ONE_BLOCK):
        engine = engine_for(demo, "eagle2-dynamic", tree=tree, block_size=block_size)
        lengths.append([r.accept_lengths for r in engine.generate(demo["prompts"], NEW, stop_token_ids=[])])
        engine.close()
    assert lengths[0] == lengths[1] == lengths[2]


def test_64_long_context_sequences_start_on_a_pool_of_what_they_use(tmp_path):
    hf = make_hf_model("llama", max_position_embeddings=32768, num_hidden_layers=2, hidden_size=32)
    path = save(hf, str(tmp_path / "long"))
    row_bytes = 2 * 2 * 2 * 8 * 4  # 2 layers, 2 KV heads of 8, fp32
    budget = 256 * 16 * row_bytes  # 256 blocks of 16 rows: 4 MiB... of the 64 x 32,768 rows (537 MiB)
    engine = EagleEngine.from_pretrained(path, max_batch_size=64, max_model_len=32768, kv_cache_memory=budget,
                                         threads=0)  # fmt: skip
    runner = engine._runner(False)
    assert runner.state.tcache.data.numel() * 4 == budget
    prompts = [[(7 * i + 3 * b) % 250 + 1 for i in range(10 + b % 7)] for b in range(64)]
    results = engine.generate_vanilla(prompts, 6, stop_token_ids=[])
    assert all(len(r.tokens) == 6 for r in results)
    assert runner.num_preemptions == 0
    for prompt, r in list(zip(prompts, results))[:3]:
        assert r.tokens == hf_greedy(hf, prompt, 6)
    engine.close()


def test_server_reports_the_prefix_cache_and_the_pool_and_refuses_what_never_fits(tmp_path):
    import openai
    from serving import Server, make_serve_model

    directory, head = make_serve_model(str(tmp_path / "model"), str(tmp_path / "head"))
    # qwen2 tiny: 3 layers, 2 KV heads of 16, fp32, and its head's layer: 1 KiB a row, 4 KiB a block of 4
    server = Server(directory, head, tree="chain", block_size=4, kv_cache_memory=48 * 4 * 1024)
    try:
        shared = "def add(a, b):\n    return a + b\n\n"
        for suffix in ("print(add(1, 2))", "x = add(3, 4)"):
            done = server.client.completions.create(model="tiny", prompt=shared + suffix, max_tokens=3)
            assert done.choices[0].finish_reason == "length"
        m = server.metrics()
        queries, hits = m["eagle_prefix_cache_queries_total{}"], m["eagle_prefix_cache_hits_total{}"]
        assert 0 < hits < queries and hits % 4 == 0
        assert m["eagle_kv_cache_blocks{}"] == 48 and 0 <= m["eagle_kv_cache_usage{}"] <= 1
        assert m["eagle_num_preemptions_total{}"] == 0
        with pytest.raises(openai.APIStatusError) as e:  # more tokens than the pool could ever hold
            server.client.completions.create(model="tiny", prompt=shared, max_tokens=300)
        assert e.value.status_code == 503 and e.value.body["code"] == "kv_cache_too_small"
    finally:
        server.stop()


def test_block_manager_counts_shares_and_evicts_least_recently_used_first():
    from eagle_engine.engine.blocks import BlockManager

    m = BlockManager(8, 4, prefix_caching=True)
    a = list(range(10, 23))  # 13 tokens: 3 full blocks have a next token, 1 token in the 4th
    assert m.match_prefix("a", a) == (0, None) and m.grow("a", 16) and m.num_free == 4
    m.register_prefix("a", a)
    b = a[:9] + [99, 98]  # 2 full blocks shared, the third differs
    assert m.cost(b, 12) == 3 - 2
    assert m.match_prefix("b", b) == (8, None) and m.blocks("b") == m.blocks("a")[:2]
    assert not m.grow("b", 8 * 4 + 1)  # more than is free: nothing taken
    assert m.grow("b", 12) and m.num_used == 5
    m.release("a")  # its first two blocks are still b's; its third stays cached, its fourth is free
    assert m.num_used == 3 and m.num_free == 5
    m.release("b")
    assert m.num_used == 0 and m.num_free == 8
    # A cached block is handed out only when no free one is left; then the least recently used goes first.
    taken = [m._take() for _ in range(m.num_free)]
    assert len(set(taken)) == 8 and m.match_prefix("c", a) == (0, None)  # every cached prefix evicted
    for block in taken:
        m._unref(block)
    # A partly filled last block is shared by copy: the rows whose next token matches, not the last one.
    m.release("c")
    m.reset_prefix_cache()
    d = list(range(30, 37))  # one full block (with its next token), then 3 tokens in a partly filled one
    m.match_prefix("d", d)
    m.grow("d", 12)
    m.register_prefix("d", d)
    rows, copy = m.match_prefix("e", d[:6] + [5, 6])
    assert rows == 4 + 1 and copy == (m.blocks("d")[1], m.blocks("e")[1])  # row 4's next token (35) matched


def test_bad_cache_flags_are_named_before_anything_loads(monkeypatch, capsys):
    from eagle_engine.tools.cli import main

    def refuse(*args, **kwargs):
        raise AssertionError("loaded before the flags were checked")

    monkeypatch.setattr(EagleEngine, "from_pretrained", refuse)
    assert main(["serve", "--kv-cache-memory", "lots"]) == 2
    assert "kv_cache_memory must be a number of bytes or a size like '8GiB'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["serve", "--block-size", "0"])
