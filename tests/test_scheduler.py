"""The one driver of an engine's runners (engine/scheduler.py), as the Python API and the server use it:
concurrent callers queue and batch instead of racing, the caller's thread stays out of inference mode, waiting
requests start by priority then arrival, and one that waits past its timeout never starts. Bounded in count
and time."""

import threading
import time

import pytest
import torch
from tiny import make_hf_model, save

from eagle_engine import EagleEngine
from eagle_engine.engine.handles import Request
from eagle_engine.engine.scheduler import QueueTimeoutError

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
    deadline = time.monotonic() + TIMEOUT
    while sched.num_running < 1:
        assert time.monotonic() < deadline
        time.sleep(0.005)
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
