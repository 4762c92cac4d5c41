"""What a decoding step costs the host, counted through the public API (see eagle_engine.tools.round_cost):
at most one host synchronisation and a bounded number of launches per round, for every tree kind at batch 1
and 4, whatever the head accepts; and the persistent runner: caches reused across calls give the same tokens
as fresh engines, sequences join and leave, CUDA-graph bookkeeping runs each step exactly once."""

import contextlib

import pytest
import torch

from eagle_engine import EagleEngine, demo_paths
from eagle_engine.engine.graphs import GraphCache
from eagle_engine.engine.sequence import Sequence
from eagle_engine.speculative.sampling import SamplingParams
from eagle_engine.tools.round_cost import count_round_cost, step_costs

pytestmark = pytest.mark.usefixtures("reference_ops")  # counts do not depend on the backend; this one is fast

LAUNCH_BUDGET = 300  # per EAGLE round on the demo pair (4 target layers, 1 draft layer)
VANILLA_BUDGET = 60  # per vanilla token


@pytest.fixture(scope="module")
def demo_engines(reference_ops):
    target, head = demo_paths()
    trees = ("dynamic", "static", "chain")
    return {tree: EagleEngine.from_pretrained(target, head, tree=tree) for tree in trees}


def _sequences(batch: int, params=SamplingParams(), new_tokens: int = 48) -> list[Sequence]:
    prompts = [[(7 * i + 3 * b) % 4000 + 2 for i in range(30 + 5 * b)] for b in range(batch)]
    return [Sequence(p, params, new_tokens, frozenset(), b, 1024) for b, p in enumerate(prompts)]


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("tree", ["dynamic", "static", "chain"])
def test_eagle_round_syncs_once_within_the_launch_budget(demo_engines, tree, batch):
    runner = demo_engines[tree].runner
    seqs = _sequences(batch)
    runner.add(seqs)
    runner.step()  # the first round builds per-engine constants (static plan, bit tables)
    costs = step_costs(runner, 3)
    for seq in list(runner.running):
        runner.release(seq)
    assert len(costs) == 3
    for cost in costs:
        assert cost.syncs <= 1, cost
        assert cost.launches <= LAUNCH_BUDGET, sorted(cost.by_op.items(), key=lambda x: -x[1])
    # Fixed shapes: the same work every round, whatever was accepted.
    assert len({c.launches for c in costs}) == 1


def test_sampled_round_syncs_once(demo_engines):
    runner = demo_engines["dynamic"].runner
    runner.add(_sequences(2, SamplingParams(temperature=0.8, top_p=0.9, top_k=20)) + _sequences(1))
    runner.step()
    (cost,) = step_costs(runner, 1)
    for seq in list(runner.running):
        runner.release(seq)
    assert cost.syncs <= 1 and cost.launches <= LAUNCH_BUDGET + 40, cost


def test_vanilla_step_syncs_once(demo_engines):
    engine = demo_engines["chain"]
    runner = engine._runner(speculative=False)
    runner.add(_sequences(4))
    runner.step()
    costs = step_costs(runner, 3)
    for seq in list(runner.running):
        runner.release(seq)
    assert all(c.syncs <= 1 and c.launches <= VANILLA_BUDGET for c in costs), costs


def test_counter_sees_syncs_and_launches():
    """The counter can fail: it sees a host read and counts torch launches."""
    x = torch.arange(10)
    with count_round_cost() as cost:
        y = (x * 2 + 1).sum()
        int(y)
        x.tolist()
    assert cost.syncs == 2 and cost.launches >= 3


def test_caches_are_reused_across_calls_of_any_shape(demo_engines):
    """One engine, calls of different prompt lengths and batch sizes in sequence, equals fresh engines."""
    target, head = demo_paths()
    engine = demo_engines["dynamic"]
    data = engine.runner.state.tcache.data
    calls = [([list(range(5, 40))], 24), ([list(range(100, 110)), list(range(9, 60)), [4, 5]], 30),
             ([list(range(200, 203))], 40)]
    for prompts, n in calls:
        reused = engine.generate(prompts, n, stop_token_ids=[])
        fresh = EagleEngine.from_pretrained(target, head).generate(prompts, n, stop_token_ids=[])
        assert [r.tokens for r in reused] == [r.tokens for r in fresh]
    assert engine.runner.state.tcache.data is data  # never reallocated


def test_more_prompts_than_slots_join_as_others_finish():
    target, head = demo_paths()
    engine = EagleEngine.from_pretrained(target, head, tree="chain", max_batch_size=2)
    prompts = [list(range(10 + i, 30 + i)) for i in range(5)]
    lengths = [8, 30, 5, 12, 20]
    batched = [engine.generate(p, n, stop_token_ids=[]).tokens for p, n in zip(prompts, lengths)]
    together = engine.generate(prompts, max(lengths), stop_token_ids=[])
    assert [r.tokens[: len(b)] for r, b in zip(together, batched)] == batched
    assert not engine.runner.running and engine.runner.free_slots() == 2


def test_released_slot_moves_the_last_sequence_intact(demo_engines):
    """Finishing the first of three sequences moves the third into its slot; all still decode exactly."""
    engine = demo_engines["static"]
    runner = engine.runner
    seqs = _sequences(3, new_tokens=40)
    alone = [engine.generate(s.prompt, 40, stop_token_ids=[]).tokens for s in seqs]
    runner.add(seqs)
    runner.step()
    seqs[0].finish("cancelled")
    while runner.has_running():
        runner.step()
    assert seqs[0].stop_reason == "cancelled"
    assert seqs[1].tokens == alone[1] and seqs[2].tokens == alone[2]


class _FakeStream:
    """Stands in for a CUDA stream; ``current`` is what ``torch.cuda.current_stream`` returns."""

    current = None

    def __init__(self, device=None):
        pass

    def wait_stream(self, other):
        pass


@contextlib.contextmanager
def _enter_stream(stream):
    before, _FakeStream.current = _FakeStream.current, stream
    try:
        yield
    finally:
        _FakeStream.current = before


def test_graph_cache_runs_each_step_exactly_once(monkeypatch):
    """Eager first call, capture + replay on the second, replay after; a failing capture runs eagerly, and
    the caller's stream is current again after it."""
    current = {}

    class FakeGraph:
        def __init__(self):
            self.step = None

        def capture_begin(self, pool=None, capture_error_mode="global"):
            assert capture_error_mode == "thread_local"  # the caller's threads may use the GPU meanwhile
            current["graph"] = self

        def capture_end(self):
            current.pop("graph")
            if self.step is None:  # nothing was recorded: the capture was invalidated
                raise RuntimeError("capture invalidated")

        def replay(self):
            self.step()

        def pool(self):
            return None

    caller = _FakeStream()
    _FakeStream.current = caller
    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
    monkeypatch.setattr(torch.cuda, "Stream", _FakeStream)
    monkeypatch.setattr(torch.cuda, "stream", _enter_stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a: _FakeStream.current)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    runs = []

    def step():
        if "graph" in current:  # capturing: record, run nothing
            current["graph"].step = lambda: runs.append("replay")
            return
        runs.append("eager")

    cache = GraphCache(torch.device("cuda"), enabled=True)
    for _ in range(4):
        cache.run(("eagle", 1), step)
    assert runs == ["eager", "replay", "replay", "replay"]

    def broken():
        if "graph" in current:
            raise RuntimeError("operation not permitted when stream is capturing")
        runs.append("eager-broken")

    runs.clear()
    with pytest.warns(UserWarning, match="capture failed"):
        for _ in range(3):
            cache.run(("eagle", 2), broken)
    assert runs == ["eager-broken"] * 3
    assert _FakeStream.current is caller


def test_a_released_slot_is_reset_and_a_failed_prefill_frees_its_slots(demo_engines, monkeypatch):
    runner = demo_engines["chain"].runner
    seqs = _sequences(2, new_tokens=6)
    runner.add(seqs)
    while runner.has_running():
        runner.step()
    assert int(runner.state.tcache.lengths[:2].abs().sum()) == 0 and not bool(runner.state.active.any())

    import eagle_engine.engine.runner as runner_module

    def broken(*args, **kwargs):
        raise RuntimeError("prefill failed")

    monkeypatch.setattr(runner_module, "prefill", broken)
    with pytest.raises(RuntimeError):
        runner.add(_sequences(1))
    assert runner.free_slots() == runner.max_batch_size and not runner.running
