"""The one driver of an engine's runners (engine/scheduler.py), as the Python API and the server use it:
concurrent callers queue and batch instead of racing, the caller's thread stays out of inference mode, waiting
requests start by priority then arrival, and one that waits past its timeout never starts. Bounded in count
and time."""

import queue
import threading

import pytest
import torch
from launch import wait_until
from tiny import make_hf_model, save

from eagle_engine import EagleEngine
from eagle_engine.engine.handles import Request
from eagle_engine.engine.plan import PlanChannel
from eagle_engine.engine.scheduler import QueueTimeoutError, Scheduler

pytestmark = pytest.mark.usefixtures("reference_ops")
TIMEOUT = 60


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, reference_ops):
    return save(make_hf_model("llama", max_position_embeddings=512), str(tmp_path_factory.mktemp("m")))


def prompts(n: int, offset: int = 0) -> list[list[int]]:
    return [[(7 * i + 3 * j + offset) % 200 + 2 for j in range(5 + i % 7)] for i in range(n)]


def test_concurrent_callers_batch_together_and_get_their_own_tokens(model_dir):
    """Two threads call generate_vanilla on one engine at once, 8 times each, greedy and seeded sampling
    alternately: every result equals the same request made alone."""
    engine = EagleEngine.from_pretrained(model_dir, max_batch_size=4)

    def sampling(i):
        return {"temperature": 0.9, "seed": i} if (i // 2) % 2 else {}  # each thread mixes both

    alone = {i: engine.generate_vanilla(p, 12, stop_token_ids=[], **sampling(i)).tokens
             for i, p in enumerate(prompts(16))}
    got, errors = {}, []

    def caller(indices):
        try:
            for i in indices:
                p = prompts(16)[i]
                got[i] = engine.generate_vanilla(p, 12, stop_token_ids=[], **sampling(i)).tokens
        except BaseException as e:  # noqa: BLE001 (reported by the test)
            errors.append(e)

    threads = [threading.Thread(target=caller, args=(range(k, 16, 2),)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    assert not errors and got == alone
    engine.close()


def test_a_callers_batch_starts_together(model_dir):
    engine = EagleEngine.from_pretrained(model_dir, max_batch_size=4)
    prefills = []
    class Watch:
        def round(self, kind, seconds, batch):
            if kind == "prefill":
                prefills.append(batch)

        def admitted(self, *a):
            pass

        delivered = finished = admitted

    engine.scheduler.observer = Watch()
    engine.generate_vanilla(prompts(3), 4)
    assert prefills == [3]
    engine.close()


def test_stream_leaves_the_callers_thread_out_of_inference_mode(model_dir):
    engine = EagleEngine.from_pretrained(model_dir, max_batch_size=2, method="prompt_lookup")
    chunks = 0
    for _ in engine.stream(prompts(1)[0], 12, stop_token_ids=[]):
        assert not torch.is_inference_mode_enabled()
        x = torch.ones(3, requires_grad=True)
        (2 * x).sum().backward()  # autograd works between chunks
        assert x.grad.tolist() == [2.0, 2.0, 2.0]
        chunks += 1
    assert chunks > 1
    engine.close()


def run_one_slot(engine, requests):
    """Submit ``requests`` behind a long request holding the only slot; the order they start in and what
    each delivered last."""
    sched = engine.scheduler
    last = {}
    done = threading.Event()

    def deliver(name):
        def d(out):
            if out.finish_reason is not None:
                last[name] = out
                if len(last) == len(requests) + 1:
                    done.set()
        return d

    blocker = Request(prompts(1)[0], 120, stop_ids=frozenset(), speculative=False)
    sched.submit(blocker, deliver("blocker"))
    wait_until(lambda: sched.num_running >= 1, "the blocker running", TIMEOUT, 0.005)
    handles = {name: sched.submit(r, deliver(name)) for name, r in requests.items()}
    assert done.wait(TIMEOUT)
    order = sorted((h.admitted, name) for name, h in handles.items() if h.admitted is not None)
    return [name for _, name in order], last


def test_waiting_requests_start_by_priority_then_arrival(model_dir):
    engine = EagleEngine.from_pretrained(model_dir, max_batch_size=1)
    ps = prompts(4, offset=11)
    reqs = {name: Request(p, 3, priority=prio, stop_ids=frozenset(), speculative=False)
            for (name, prio), p in zip([("b", 0), ("c", -1), ("d", 0), ("e", 5)], ps)}
    order, last = run_one_slot(engine, reqs)
    assert order == ["c", "b", "d", "e"]
    assert all(last[name].finish_reason == "length" for name in reqs)
    engine.close()


def test_a_request_waiting_past_its_timeout_never_starts(model_dir):
    engine = EagleEngine.from_pretrained(model_dir, max_batch_size=1)
    reqs = {"late": Request(prompts(1)[0], 3, timeout=0.01, stop_ids=frozenset(), speculative=False),
            "patient": Request(prompts(2)[1], 3, stop_ids=frozenset(), speculative=False)}
    order, last = run_one_slot(engine, reqs)
    assert order == ["patient"]  # the late one never started
    assert last["late"].finish_reason == "timeout" and isinstance(last["late"].error, QueueTimeoutError)
    assert last["patient"].finish_reason == "length" and last["blocker"].finish_reason == "length"
    engine.close()


class _Angles:
    """A detokenizer that writes token t as ``<t>``: stop strings can name exact tokens."""

    def push(self, ids):
        return "".join(f"<{t}>" for t in ids)

    def flush(self):
        return ""


def _leader_and_follower_channels():
    """A leader's plans to a follower in one process, through a queue: what PlanChannel's broadcast does."""
    pipe = queue.Queue()

    class Leader(PlanChannel):
        def exchange(self, plan):
            pipe.put(plan)
            return plan

    class Follower(PlanChannel):
        leader = False

        def __init__(self):
            super().__init__()
            self.leader = False

        def exchange(self, plan):
            return pipe.get(timeout=TIMEOUT)

    return Leader(), Follower()


def test_ranks_stay_in_step_through_stop_strings_and_cancels(model_dir):
    """Rank 0's scheduler and a follower's, in one process: whatever rank 0 decides on the host (a stop
    string in a prefill's text, one in a round, a caller cancelling right after its stop, a stop string in
    the round that reaches the budget) ends with a plan, so at every step both runners hold the same
    sequences; each request ends once; queued requests get the slots freed; nothing is left behind."""
    engines = [EagleEngine.from_pretrained(model_dir, max_batch_size=2) for _ in range(2)]
    ps = prompts(5, offset=40)
    greedy = [engines[0].generate_vanilla(p, 4, stop_token_ids=[]).tokens for p in ps]
    engines[0].close()  # the test's two schedulers drive the engines' runners from here on
    steps = {0: [], 1: []}
    for rank, engine in enumerate(engines):
        runner, step = engine._runner(False), engine._runner(False).step

        def recording_step(runner=runner, step=step, rank=rank):
            kept = step()
            steps[rank].append(sorted(tuple(q.prompt) for q in kept))
            return kept

        runner.step = recording_step
    lead_channel, follow_channel = _leader_and_follower_channels()
    finished = []

    class Observer:
        def finished(self, h, out):
            finished.append(h.id)

        def __getattr__(self, name):
            return lambda *args: None

    lead = Scheduler(engines[0]._runner, engines[0].max_length, lead_channel, observer=Observer())
    follow = Scheduler(engines[1]._runner, engines[1].max_length, follow_channel)
    follow.local_submissions = False
    follow.start()

    specs = {  # name: (prompt, max_tokens, stop strings)
        "long": (ps[0], 16, ()),
        "stop_at_prefill": (ps[1], 16, (f"<{greedy[1][0]}>",)),
        "stop_in_a_round_then_cancel": (ps[2], 16, (f"<{greedy[2][2]}>",)),
        "queued": (ps[3], 6, ()),
        "stop_at_the_budget": (ps[4], 3, (f"<{greedy[4][2]}>",)),
    }
    finals, handles, done = {}, {}, threading.Event()

    def deliver(name):
        def d(out):
            if out.finish_reason is not None:
                finals.setdefault(name, []).append(out)
                if name == "stop_in_a_round_then_cancel":
                    lead.cancel(handles[name])  # what the server's stream does as it closes
                if len(finals) == len(specs):
                    done.set()
        return d

    requests = [Request(p, n, stop_ids=frozenset(), stop_strings=stops, detokenizer=_Angles(),
                        speculative=False) for p, n, stops in specs.values()]
    for name, h in zip(specs, lead.submit_all(requests, [deliver(name) for name in specs])):
        handles[name] = h
    assert done.wait(TIMEOUT)
    lead.stop()
    follow.stop()
    ends = {name: [(o.finish_reason, o.completion_tokens) for o in outs] for name, outs in finals.items()}
    assert ends == {"long": [("length", 16)], "stop_at_prefill": [("stop", 0)],
                    "stop_in_a_round_then_cancel": [("stop", 2)], "queued": [("length", 6)],
                    "stop_at_the_budget": [("stop", 2)]}
    assert sorted(finished) == sorted(h.id for h in handles.values())  # each counted once
    assert steps[0] == steps[1] and len(steps[0]) > 5
    for sched, engine in ((lead, engines[0]), (follow, engines[1])):
        assert not sched._handles and not sched._running and not engine._runner(False).running


def test_a_follower_whose_callers_submit_out_of_order_fails_them_loudly(model_dir):
    """Under tensor parallelism the Python API needs every rank to submit alike: a follower whose callers
    submitted rank 0's requests in another order gets errors saying so, never another request's tokens,
    and still runs what rank 0 runs."""
    engines = [EagleEngine.from_pretrained(model_dir, max_batch_size=2) for _ in range(2)]
    lead_channel, follow_channel = _leader_and_follower_channels()
    lead = Scheduler(engines[0]._runner, engines[0].max_length, lead_channel)
    follow = Scheduler(engines[1]._runner, engines[1].max_length, follow_channel)
    ps = prompts(2, offset=70)
    outs = {}

    def collect(key):
        return lambda out: out.finish_reason is not None and outs.setdefault(key, out)

    follow.submit_all([Request(p, 4, stop_ids=frozenset(), speculative=False) for p in reversed(ps)],
                      [collect(("follower", i)) for i in (1, 0)])
    lead.submit_all([Request(p, 4, stop_ids=frozenset(), speculative=False) for p in ps],
                    [collect(("leader", i)) for i in (0, 1)])
    wait_until(lambda: len(outs) >= 4, lambda: outs, TIMEOUT)
    lead.stop()
    follow.stop()
    assert all(outs["leader", i].finish_reason == "length" for i in (0, 1))
    for i in (0, 1):
        assert outs["follower", i].finish_reason == "error" and "same order" in str(outs["follower", i].error)
    assert not follow._handles and not engines[1]._runner(False).running
