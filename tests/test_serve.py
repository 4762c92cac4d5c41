"""`eagle serve`: the real HTTP server (uvicorn on a free loopback port, in a background thread) against the
official `openai` client: completions and chat, streamed and not, 16 concurrent mixed clients, seeds, a
client dropped mid-stream, every bad input, /metrics."""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import socket
import threading
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("prometheus_client")

from launch import wait_until  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from serving import TIMEOUT, Server, make_serve_model  # noqa: E402

from eagle_engine import EagleEngine  # noqa: E402

PROMPTS = ["def main(", "import json\n", "class Foo:", "x = [", "return None", "for i in", "# note", "if a:"]


@pytest.fixture(scope="module")
def reference_env():
    """Every op through its PyTorch reference, on every thread (the engine thread too): fast on CPU."""
    old = os.environ.get("EAGLE_KERNELS_BACKEND")
    os.environ["EAGLE_KERNELS_BACKEND"] = "reference"
    yield
    if old is None:
        os.environ.pop("EAGLE_KERNELS_BACKEND")
    else:
        os.environ["EAGLE_KERNELS_BACKEND"] = old


@pytest.fixture(scope="module")
def model(tmp_path_factory, reference_env):
    return make_serve_model(str(tmp_path_factory.mktemp("serve_model")), str(tmp_path_factory.mktemp("head")))


@pytest.fixture(scope="module")
def server(model):
    s = Server(*model, max_batch_size=4, max_queue=32)
    yield s
    s.stop()


def _ids(server, text: str) -> list[int]:
    return server.tokenizer(text)["input_ids"]


def reference(server, ids: list[int], max_tokens: int, **sampling) -> str:
    """The engine alone on this prompt: ``engine.generate`` (EAGLE), decoded."""
    result = server.reference.generate(ids, max_tokens, **sampling)
    return server.tokenizer.decode(result.tokens, skip_special_tokens=True)


def complete(server, prompt, stream=False, **kwargs):
    kwargs.setdefault("temperature", 0)
    if not stream:
        r = server.client.completions.create(model="tiny", prompt=prompt, **kwargs)
        return r.choices[0].text, r.choices[0].finish_reason, r.usage
    chunks = list(
        server.client.completions.create(
            model="tiny", prompt=prompt, stream=True, stream_options={"include_usage": True}, **kwargs
        )
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
    return text, finish, chunks[-1].usage


def test_models_and_health(server):
    models = server.client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert models.data[0].max_model_len == server.engine.max_length  # the context length
    assert httpx.get(server.url + "/health", timeout=TIMEOUT).json() == {"status": "ok"}
    assert httpx.head(server.url + "/health", timeout=TIMEOUT).status_code == 200
    server.scheduler.stop()  # the engine thread down: unhealthy, in the OpenAI shape, until a request
    r = httpx.get(server.url + "/health", timeout=TIMEOUT)
    assert r.status_code == 503 and r.json()["error"]["code"] == "unhealthy" and r.headers["retry-after"]
    assert complete(server, PROMPTS[0], max_tokens=2)[1] == "length"  # a request starts it again
    assert httpx.get(server.url + "/health", timeout=TIMEOUT).status_code == 200


def test_a_stop_string_in_the_first_token_ends_the_request_once(server):
    """The prefill's own token holds the stop string: an empty completion, finished and counted once (its
    sequence runs on until the next plan ends it; nothing more reaches the client or the metrics)."""
    for prompt in PROMPTS:
        first = server.tokenizer.decode(server.reference.generate(_ids(server, prompt), 1).tokens)
        if first and "\ufffd" not in first:
            break
    before = server.metrics()
    for stream in (False, True):
        text, finish, use = complete(server, prompt, stream=stream, max_tokens=20, stop=[first[0]])
        assert (text, finish, use.completion_tokens) == ("", "stop", 0)
    after = server.metrics()
    stops = 'eagle_requests_total{"finish_reason": "stop"}'
    assert after[stops] - before.get(stops, 0) == 2
    e2e = "eagle_e2e_request_latency_seconds_count{}"
    assert after[e2e] - before[e2e] == 2


def test_chat_messages_take_a_name_and_refuse_unknown_fields(server):
    messages = [{"role": "user", "content": "hi", "name": "ann"}]
    assert server.client.chat.completions.create(model="tiny", messages=messages, max_tokens=2, temperature=0)
    r = httpx.post(server.url + "/v1/chat/completions", timeout=TIMEOUT, json={
        "messages": [{"role": "assistant", "content": "", "tool_calls": []}], "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["code"] == "unknown_field"
    assert r.json()["error"]["param"] == "messages.0.tool_calls"


def test_completion_streamed_and_not(server):
    ids = _ids(server, PROMPTS[0])
    want = reference(server, ids, 16)
    text, finish, usage = complete(server, PROMPTS[0], max_tokens=16)
    assert text == want and finish == "length"
    assert (usage.prompt_tokens, usage.completion_tokens) == (len(ids), 16)
    streamed, finish, usage = complete(server, PROMPTS[0], stream=True, max_tokens=16)
    assert streamed == want and finish == "length" and usage.completion_tokens == 16


@pytest.mark.parametrize("path", ["completions", "chat/completions"])
def test_continuous_usage_stats(server, path):
    """``stream_options.continuous_usage_stats`` (vLLM's): every chunk carries the usage so far, whose
    tokens make the text streamed so far; an unknown stream option is refused."""
    body = {"max_tokens": 20, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    body.update({"prompt": PROMPTS[1]} if path == "completions" else
                {"messages": [{"role": "user", "content": PROMPTS[1]}]})
    with httpx.stream("POST", f"{server.url}/v1/{path}", json=body, timeout=TIMEOUT) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    chunks, last = events[:-1], events[-1]
    used = [e["usage"]["completion_tokens"] for e in chunks]
    assert used == sorted(used) and used[-1] == last["usage"]["completion_tokens"] == 20
    assert all(e["usage"]["prompt_tokens"] == last["usage"]["prompt_tokens"] for e in chunks)
    ids = _ids(server, PROMPTS[1]) if path == "completions" else None
    if ids is not None:  # the text so far is the decoding of the tokens counted so far
        tokens = server.reference.generate(ids, 20).tokens
        text = ""
        for e, n in zip(chunks, used):
            text += e["choices"][0]["text"]
            assert text == server.tokenizer.decode(tokens[:n])
        # With a stop string the counts still never go back: held-back text is counted once delivered.
        full = server.tokenizer.decode(tokens)
        for cut in range(3, len(full) - 2):
            with httpx.stream("POST", f"{server.url}/v1/{path}", json=dict(body, stop=[full[cut:cut + 2]]),
                              timeout=TIMEOUT) as r:
                events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
            used = [e["usage"]["completion_tokens"] for e in events]
            assert used == sorted(used), (cut, used)
    body["stream_options"] = {"include_usage": True, "bogus": True}
    r = httpx.post(f"{server.url}/v1/{path}", json=body, timeout=TIMEOUT)
    assert r.status_code == 400 and "bogus" in r.json()["error"]["message"]


def test_chat_streamed_and_not(server):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "def f(x):"}]
    rendered = server.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = server.tokenizer(rendered, add_special_tokens=False)["input_ids"]
    want = reference(server, ids, 12)
    r = server.client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0)
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == want
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 12
    chunks = list(
        server.client.chat.completions.create(
            model="tiny", messages=messages, max_tokens=12, temperature=0, stream=True
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason == "length"


def test_stop_strings_and_stop_ids(server):
    ids = _ids(server, PROMPTS[1])
    full = reference(server, ids, 30)
    stop = full[10:13]
    text, finish, _ = complete(server, PROMPTS[1], max_tokens=30, stop=[stop])
    assert text == full[: full.find(stop)] and finish == "stop"
    streamed, finish, _ = complete(server, PROMPTS[1], stream=True, max_tokens=30, stop=stop)
    assert streamed == text and finish == "stop"
    tokens = server.reference.generate(ids, 30).tokens
    r = server.client.completions.create(
        model="tiny",
        prompt=PROMPTS[1],
        max_tokens=30,
        temperature=0,
        extra_body={"stop_token_ids": [tokens[5]]},
    )
    cut = tokens.index(tokens[5])
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == cut + 1
    assert r.choices[0].text == server.tokenizer.decode(tokens[:cut])


def test_usage_counts_the_tokens_returned_before_a_stop_string(server):
    """A round keeps several tokens; a stop string cuts the text inside them: usage counts the tokens whose
    text begins before the cut (those that made the returned text), not the rest of the round."""
    from eagle_engine.tools.detokenize import decode_new

    ids = _ids(server, PROMPTS[2])
    tokens = server.reference.generate(ids, 30).tokens
    starts = [len(decode_new(server.tokenizer, ids, tokens[:i])) for i in range(len(tokens))]
    full = decode_new(server.tokenizer, ids, tokens)
    cut = next(i for i in range(8, len(full) - 3) if full[i:i + 3] not in full[:i + 2] and full[i] != " ")
    for stream in (False, True):
        stop = [full[cut : cut + 3]]
        text, finish, use = complete(server, PROMPTS[2], stream=stream, max_tokens=30, stop=stop)
        assert finish == "stop" and text == full[:cut]
        assert use.completion_tokens == sum(1 for s in starts if s < cut) < 30


def test_sixteen_concurrent_clients(server):
    """Greedy and seeded sampled requests mixed in one batch (4 slots, the rest queued): every one
    completes, and each equals the engine alone on its prompt (greedy: the same tokens; seeded: the same
    draws)."""
    jobs = []
    for i in range(16):
        sampled = i % 2 == 1
        kw = dict(max_tokens=6 + (i % 4) * 2, temperature=0.9 if sampled else 0)
        if sampled:
            kw.update(top_p=0.9, extra_body={"top_k": 40}, seed=i)
        jobs.append((PROMPTS[i % len(PROMPTS)], i % 3 == 0, kw))

    def run(job):
        prompt, stream, kw = job
        return complete(server, prompt, stream=stream, **kw)

    t0 = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(run, jobs, timeout=TIMEOUT * 2))
    assert time.monotonic() - t0 < TIMEOUT * 2
    for (prompt, _, kw), (text, finish, usage) in zip(jobs, results):
        assert finish == "length" and usage.completion_tokens == kw["max_tokens"]
        if kw["temperature"] == 0:
            assert text == reference(server, _ids(server, prompt), kw["max_tokens"]), prompt
        else:  # a seeded sequence samples from its own generator: the same in any batch
            sampling = dict(temperature=0.9, top_p=0.9, top_k=40, seed=kw["seed"])
            assert text == reference(server, _ids(server, prompt), kw["max_tokens"], **sampling), prompt
    assert server.scheduler.num_running == 0 and server.engine.runner.free_slots() == 4


def test_seeded_sampling_is_reproducible(server):
    kw = dict(max_tokens=10, temperature=1.0, top_p=0.95, seed=1234)
    first = complete(server, PROMPTS[2], **kw)[0]
    assert complete(server, PROMPTS[2], **kw)[0] == first
    assert complete(server, PROMPTS[2], stream=True, **kw)[0] == first


def test_dropped_client_frees_its_slot(server):
    """A client that leaves mid-stream is cancelled at once; the requests around it are not disturbed."""
    before = server.metrics().get('eagle_requests_total{"finish_reason": "cancelled"}', 0.0)
    others = [(p, reference(server, _ids(server, p), 10)) for p in PROMPTS[3:6]]
    body = {"model": "tiny", "prompt": PROMPTS[6], "max_tokens": 900, "temperature": 0, "stream": True}
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(complete, server, p, max_tokens=10) for p, _ in others]
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=TIMEOUT) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            for _ in range(3):
                assert next(lines).startswith("data: ") or True
        # the connection is closed here, long before 900 tokens
        for f, (_, want) in zip(futures, others):
            assert f.result(timeout=TIMEOUT)[0] == want
    _wait_for_every_slot(server)
    after = server.metrics()['eagle_requests_total{"finish_reason": "cancelled"}']
    assert after == before + 1
    assert complete(server, PROMPTS[0], max_tokens=4)[1] == "length"


def _wait_for_every_slot(server):
    """Until nothing runs and every one of the server's 4 slots is free (bounded)."""
    wait_until(lambda: not server.scheduler.num_running and server.engine.runner.free_slots() == 4,
               "a dropped client's slot never came back", TIMEOUT, 0.02)


def test_dropped_non_streaming_clients_free_their_slots(server):
    """Four plain (non-streaming) requests for 900 tokens fill the four slots; their clients hang up: every
    slot comes back long before 900 tokens, and each is counted as cancelled."""
    before = server.metrics().get('eagle_requests_total{"finish_reason": "cancelled"}', 0.0)
    body = json.dumps({"model": "tiny", "prompt": "x = 1", "max_tokens": 900, "temperature": 0,
                       "ignore_eos": True}).encode()
    request = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    socks = [socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT) for _ in range(4)]
    try:
        for sock in socks:
            sock.sendall(request)
        wait_until(lambda: server.scheduler.num_running == 4, "all four decoding", TIMEOUT)
    finally:
        for sock in socks:
            sock.close()
    _wait_for_every_slot(server)
    after = server.metrics()['eagle_requests_total{"finish_reason": "cancelled"}']
    assert after == before + 4
    generated = server.metrics()["eagle_generation_tokens_total{}"]
    assert complete(server, PROMPTS[0], max_tokens=4)[1] == "length"
    assert generated < 4 * 900


BAD = [
    ({"temperature": -0.5}, 400, "temperature"),
    ({"top_p": 0}, 400, "top_p"),
    ({"top_p": 1.5}, 400, "top_p"),
    ({"top_k": -1}, 400, "top_k"),
    ({"max_tokens": 0}, 400, "max_tokens"),
    ({"max_tokens": 5000}, 400, "max_tokens"),
    ({"prompt": ""}, 400, "prompt"),
    ({"prompt": [5] * 1024}, 400, "prompt"),
    ({"prompt": [999999]}, 400, "prompt"),
    ({"model": "gpt-17"}, 404, "model"),
    ({"temperature": "hot"}, 400, "temperature"),
    ({"n": 3}, 400, "n"),
    ({"seed": 2**70}, 400, "seed"),
    ({"stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
]


@pytest.mark.parametrize(
    "change,status,param", BAD, ids=[next(iter(c)) + str(i) for i, (c, _, _) in enumerate(BAD)]
)
def test_bad_input(server, change, status, param):
    body = {"model": "tiny", "prompt": "x = 1", "max_tokens": 4, **change}
    r = httpx.post(server.url + "/v1/completions", json=body, timeout=TIMEOUT)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param
    assert param in error["message"]


def test_bad_input_through_the_client(server):
    with pytest.raises(openai.BadRequestError, match="top_p"):
        server.client.completions.create(model="tiny", prompt="x", top_p=2.0)
    with pytest.raises(openai.NotFoundError, match="gpt-17"):
        server.client.chat.completions.create(model="gpt-17", messages=[{"role": "user", "content": "hi"}])


@pytest.mark.parametrize("method, path, kwargs, status, code", [
    ("GET", "/v2/nothing", {}, 404, "not_found"),
    ("GET", "/v1/completions", {}, 405, "method_not_allowed"),
    ("POST", "/v1/completions", {"content": b'{"prompt": "\xff\xfe"}'}, 400, "invalid_json"),
    ("POST", "/v1/completions", {"json": {"prompt": "x", "frobnicate": 1}}, 400, "unknown_field"),
    ("POST", "/v1/chat/completions", {"json": {"messages": [{"role": "user", "content": "hi"}],
                                               "tools": [{"type": "function"}]}}, 400, "unsupported_field"),
    ("POST", "/v1/completions", {"json": {"prompt": "x", "response_format": {"type": "json_object"}}}, 400,
     "unsupported_field"),
])
def test_every_error_has_the_openai_shape(server, method, path, kwargs, status, code):
    headers = {"content-type": "application/json"} if "content" in kwargs else {}
    r = httpx.request(method, server.url + path, timeout=TIMEOUT, headers=headers, **kwargs)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == code and error["message"]


def test_oversized_bodies_are_refused_at_once(model):
    s = Server(*model, max_request_bytes=64 * 1024)
    try:
        r = httpx.post(s.url + "/v1/completions", json={"prompt": "x" * 1_000_000}, timeout=TIMEOUT)
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
        assert "--max-request-bytes" in r.json()["error"]["message"]
        # An 8 MB body announced but never sent: the answer comes without waiting for it.
        with socket.create_connection(("127.0.0.1", s.port), timeout=TIMEOUT) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 8000000\r\n\r\n")
            assert sock.recv(4096).startswith(b"HTTP/1.1 413")
        assert s.metrics()['eagle_requests_rejected_total{"status": "413"}'] == 2
    finally:
        s.stop()


def test_a_long_tokenization_stalls_no_stream(server):
    """A prompt whose tokenization blocks (held on an event here) holds up neither the event loop nor the
    engine: a stream started before runs to its end meanwhile."""
    state = server.app.state.serve
    release, entered = threading.Event(), threading.Event()
    real = state.encoder

    class Blocking:
        has_chat_template = real.has_chat_template

        def encode(self, text, **kwargs):
            if text.startswith("BLOCK"):
                entered.set()
                assert release.wait(TIMEOUT)
            return real.encode(text, **kwargs)

    state.encoder = Blocking()
    try:
        stream = server.client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=24,
                                                  temperature=0, stream=True)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            blocked = pool.submit(complete, server, "BLOCK " + "x" * 1000, max_tokens=2)
            assert entered.wait(TIMEOUT)
            finish = [c.choices[0].finish_reason for c in stream if c.choices][-1]
            assert finish == "length" and not blocked.done()  # the stream ended while the encode waited
            release.set()
            assert blocked.result(TIMEOUT)[1] == "length"
    finally:
        release.set()
        state.encoder = real


def test_malformed_json_and_missing_fields(server):
    r = httpx.post(
        server.url + "/v1/completions",
        content=b'{"prompt": "x",',
        timeout=TIMEOUT,
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 400 and "malformed JSON" in r.json()["error"]["message"]
    r = httpx.post(server.url + "/v1/completions", json={"model": "tiny"}, timeout=TIMEOUT)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    r = httpx.post(
        server.url + "/v1/chat/completions", json={"model": "tiny", "messages": []}, timeout=TIMEOUT
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"


def test_full_queue_and_missing_chat_template(model):
    """One slot and one waiting place: a third request is 503. A tokenizer without a chat template: chat
    is 400."""
    from eagle_engine.tools.common import load_tokenizer

    tok = load_tokenizer(model[0])
    tok.chat_template = None
    s = Server(*model, tokenizer=tok, max_batch_size=1, max_queue=1)
    try:
        r = httpx.post(
            s.url + "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "hi"}]},
            timeout=TIMEOUT,
        )
        assert r.status_code == 400 and "chat template" in r.json()["error"]["message"]
        long = {"prompt": "x", "max_tokens": 900, "temperature": 0, "stream": True}
        short = {"prompt": "y", "max_tokens": 2, "temperature": 0}
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            with httpx.stream("POST", s.url + "/v1/completions", json=long, timeout=TIMEOUT) as running:
                lines = running.iter_lines()  # (dropping this iterator would close the stream)
                next(lines)  # it holds the only slot now
                waiting = pool.submit(httpx.post, s.url + "/v1/completions", json=short, timeout=TIMEOUT)
                wait_until(lambda: s.scheduler.queue_depth >= 1, "a request waiting", TIMEOUT, 0.02)
                r = httpx.post(s.url + "/v1/completions", json=short, timeout=TIMEOUT)
                assert r.status_code == 503 and "queue is full" in r.json()["error"]["message"]
                assert int(r.headers["retry-after"]) >= 1
            # the streaming client left: its slot goes to the waiting request
            assert waiting.result(timeout=TIMEOUT).json()["choices"][0]["finish_reason"] == "length"
    finally:
        s.stop()


def test_one_failing_request_fails_alone(server):
    """An exception inside one request (here its detokenizer) fails that request only."""
    from eagle_engine.engine.scheduler import Request

    class Broken:
        def push(self, ids):
            raise RuntimeError("broken detokenizer")

        def flush(self):
            return ""

    outputs = {}
    done = threading.Event()

    def collect(name):
        def deliver(out):
            outputs.setdefault(name, []).append(out)
            if (
                out.finish_reason is not None
                and len([k for k in outputs if outputs[k][-1].finish_reason]) == 2
            ):
                done.set()

        return deliver

    ids = _ids(server, PROMPTS[4])
    server.scheduler.submit(Request(ids, 12, detokenizer=Broken()), collect("bad"))
    server.scheduler.submit(Request(ids, 12), collect("good"))
    assert done.wait(TIMEOUT)
    assert outputs["bad"][-1].finish_reason == "error" and "broken" in str(outputs["bad"][-1].error)
    good = [t for o in outputs["good"] for t in o.token_ids]
    assert good == server.reference.generate(ids, 12).tokens and outputs["good"][-1].finish_reason == "length"


def test_metrics_parse(server):
    complete(server, PROMPTS[0], max_tokens=4)
    text = httpx.get(server.url + "/metrics", timeout=TIMEOUT).text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in (
        "eagle_requests",
        "eagle_generation_tokens",
        "eagle_queue_depth",
        "eagle_running_batch",
        "eagle_mean_acceptance_length",
        "eagle_round_seconds",
    ):
        assert name in families, name
    samples = {s.name: s.value for f in families.values() for s in f.samples if not s.labels}
    assert samples["eagle_generation_tokens_total"] >= 4 and samples["eagle_round_seconds_count"] >= 1
    assert samples["eagle_mean_acceptance_length"] >= 1.0
    assert samples["eagle_queue_depth"] == 0 and samples["eagle_running_batch"] == 0
    # The latency histograms users chart: each request observed once (queue, TTFT, e2e), tokens for ITL.
    finished = sum(s.value for s in families["eagle_requests"].samples
                   if s.name == "eagle_requests_total" and s.labels["finish_reason"] in ("stop", "length"))
    assert samples["eagle_e2e_request_latency_seconds_count"] == finished
    assert samples["eagle_time_to_first_token_seconds_count"] >= finished
    assert samples["eagle_request_queue_seconds_count"] >= finished
    assert samples["eagle_inter_token_latency_seconds_count"] >= 3  # 4 tokens: 3 gaps (at least)
    assert samples["eagle_time_per_output_token_seconds_count"] >= 1


def test_bench_serve_level_counts_what_the_server_histograms_count(server, monkeypatch):
    """benchmarks/bench_serve.py's measurement of one level against this server: for TTFT, ITL, TPOT and
    e2e the clients and the server's histograms (the level's share: two scrapes apart) count the same
    observations, and the clients' TTFT and e2e contain the server's (a request is sent before it arrives;
    a chunk is read after the server delivered it)."""
    monkeypatch.syspath_prepend(os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks"))
    import bench_serve

    args = argparse.Namespace(requests_per_client=2, max_tokens=12)
    row = bench_serve.run_level(server.url, "tiny", PROMPTS[:4], 2, args)
    assert (row["requests"], row["completion_tokens"]) == (4, 48)
    assert [row[f"{k}_count"] for k in ("ttft", "itl", "tpot", "e2e")] == [4, 44, 4, 4]
    assert all(row[f"server_{k}_count"] == row[f"{k}_count"] for k in ("ttft", "itl", "tpot", "e2e"))
    assert row["server_queue_count"] == 4
    assert row["ttft_mean_ms"] >= row["server_ttft_mean_ms"] > 0
    assert row["e2e_mean_ms"] >= row["server_e2e_mean_ms"] > 0
    assert row["itl_mean_ms"] * 44 == pytest.approx(row["tpot_mean_ms"] * 4 * 11)  # the same gaps, twice


def test_priority_order_and_queue_timeouts_over_http(model):
    """One slot, held by a stream: a request whose timeout passes while it waits answers 503 (Retry-After);
    waiting requests start by priority (lower first); one cancelled while queued is counted."""
    s = Server(*model, max_batch_size=1, max_queue=8)
    runner, step = s.engine.runner, s.engine.runner.step

    stalled = threading.Event()

    def stalling_step():  # while stalled, rounds of 20 ms keep nothing: the stream holds its slot for good
        if stalled.is_set():
            time.sleep(0.02)
            return {}
        return step()

    admitted, add = [], runner.add

    def recording_add(seqs):
        admitted.extend(s.tokenizer.decode(q.prompt) for q in seqs)
        return add(seqs)

    runner.step, runner.add = stalling_step, recording_add
    try:
        hold = {"prompt": "x", "max_tokens": 100, "temperature": 0, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", s.url + "/v1/completions", json=hold, timeout=TIMEOUT) as running:
            lines = running.iter_lines()
            stalled.set()
            next(lines)  # its first token came with the prefill; it holds the only slot
            r = httpx.post(s.url + "/v1/completions", json={"prompt": "y", "max_tokens": 2, "timeout": 0.2},
                           timeout=TIMEOUT)
            assert r.status_code == 503 and r.json()["error"]["code"] == "queue_timeout"
            assert int(r.headers["retry-after"]) >= 1
            with concurrent.futures.ThreadPoolExecutor(2) as pool:
                later = pool.submit(httpx.post, s.url + "/v1/completions", timeout=TIMEOUT,
                                    json={"prompt": "a", "max_tokens": 2, "temperature": 0, "priority": 1})
                wait_until(lambda: s.scheduler.queue_depth >= 1, "'a' waiting", TIMEOUT)
                first = pool.submit(httpx.post, s.url + "/v1/completions", timeout=TIMEOUT,
                                    json={"prompt": "b", "max_tokens": 2, "temperature": 0, "priority": -1})
                wait_until(lambda: s.scheduler.queue_depth >= 2, "'b' waiting", TIMEOUT)
                # A third waiting client hangs up: counted as cancelled though it never started.
                sock = socket.create_connection(("127.0.0.1", s.port), timeout=TIMEOUT)
                body = json.dumps({"prompt": "c", "max_tokens": 2}).encode()
                sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                             b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
                wait_until(lambda: s.scheduler.queue_depth >= 3, "'c' waiting", TIMEOUT)
                sock.close()
                wait_until(lambda: s.scheduler.queue_depth <= 2, "'c' gone from the queue", TIMEOUT)
                running.close()  # the stream hangs up: cancelled at the next boundary, the waiting ones run
                stalled.clear()
        # the stream left: the waiting ones start, priority -1 first
        a, b = later.result(TIMEOUT).json(), first.result(TIMEOUT).json()
        assert a["choices"][0]["finish_reason"] == b["choices"][0]["finish_reason"] == "length"
        assert admitted == ["x", "b", "a"]
        metrics = s.metrics()
        assert metrics['eagle_requests_total{"finish_reason": "timeout"}'] == 1
        assert metrics['eagle_requests_total{"finish_reason": "cancelled"}'] == 2  # stream and hang-up
    finally:
        s.stop()


def test_cli_serve_flags():
    from eagle_engine.tools.cli import build_parser

    args = build_parser().parse_args(["serve", "--port", "8123", "--max-batch-size", "16", "--tree", "chain"])
    assert (args.command, args.port, args.max_batch_size, args.tree, args.host) == (
        "serve",
        8123,
        16,
        "chain",
        "127.0.0.1",
    )
    assert (args.shutdown_timeout, args.queue_timeout, args.tensor_parallel_size) == (30.0, 300.0, 1)
    for bad in (["--max-batch-size", "0"], ["--shutdown-timeout", "-1"], ["--shutdown-timeout", "inf"],
                ["--queue-timeout", "0"], ["--queue-timeout", "nan"], ["--tensor-parallel-size", "0"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["serve", *bad])


def test_serve_loads_the_method_its_flags_name(reference_env):
    """``eagle serve --method prompt_lookup`` without --base: the demo target, no head, that method."""
    from eagle_engine.serve.server import load
    from eagle_engine.tools.cli import build_parser

    flags = ["serve", "--method", "prompt_lookup", "--method-settings", '{"num_tokens": 5}']
    engine, _, name = load(build_parser().parse_args(flags), 2)
    assert (name, engine.method, engine.draft) == ("eagle-demo", "prompt_lookup", None)
    assert engine.settings.num_tokens == 5
    engine, _, _ = load(build_parser().parse_args(["serve", "--tree", "chain"]), 1)  # the demo's EAGLE head
    assert engine.method == "eagle" and engine.tree.kind == "chain"


@pytest.mark.parametrize("method", ["medusa", "lookahead", "prompt_lookup"])
def test_every_method_serves(model, tmp_path, method):
    """The server runs whichever method its engine has: 4 concurrent greedy clients, one streamed, each
    text the engine's own (which the method tests show equals the target's greedy output)."""
    directory, _ = model
    head = None
    if method == "medusa":
        from eagle_engine.models.medusa import init_random_medusa, save_medusa

        heads = init_random_medusa(EagleEngine.from_pretrained(directory).target, 3, 1, seed=0)
        head = save_medusa(heads, str(tmp_path / "medusa"))
    s = Server(directory, head, max_batch_size=2, method=method)
    try:
        assert s.engine.method == method
        want = [reference(s, _ids(s, p), 12) for p in PROMPTS[:4]]
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            got = list(pool.map(lambda p: complete(s, p, max_tokens=12)[0], PROMPTS[:4]))
        assert got == want
        assert complete(s, PROMPTS[0], stream=True, max_tokens=12)[0] == want[0]
    finally:
        s.stop()
