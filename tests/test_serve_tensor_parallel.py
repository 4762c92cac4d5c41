"""`torchrun --nproc-per-node 2 -m eagle_engine serve --tensor-parallel-size 2` (gloo on CPU, loopback):
rank 0 serves HTTP and schedules, rank 1 follows its plans. To the official `openai` client it answers as the
single-process server does (greedy, seeded sampling, chat, streams, concurrent requests); dropped clients and
bad requests behave the same; SIGTERM stops every rank."""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("prometheus_client")

from launch import free_port, torchrun_command, torchrun_env, wait_until  # noqa: E402
from serving import TIMEOUT, Endpoint, Server, make_serve_model  # noqa: E402

START_TIMEOUT = 120.0  # two ranks import torch and load the model (seconds, on a loaded 2-core machine)
CANCELLED = 'eagle_requests_total{"finish_reason": "cancelled"}'
REQUESTS = [  # (API, body): what the two servers must answer alike
    ("completions", {"prompt": "def main(", "max_tokens": 24}),
    ("completions", {"prompt": "import json\n", "max_tokens": 16, "stream": True}),
    ("completions", {"prompt": "class Foo:", "max_tokens": 20, "temperature": 0.9, "top_p": 0.9, "seed": 11}),
    ("completions", {"prompt": "x = [", "max_tokens": 20, "temperature": 1.0, "seed": 5, "stream": True}),
    ("chat", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 12}),
    ("chat", {"messages": [{"role": "user", "content": "yo"}], "max_tokens": 12, "stream": True}),
]


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (torchrun's ranks), from /proc."""
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                kids.append(int(entry))
    return kids


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class TorchrunServer(Endpoint):
    """``eagle serve`` on two tensor-parallel ranks under ``torchrun``, its output in ``log``."""

    def __init__(self, directory, head, log_path):
        super().__init__(free_port())
        self.model, self.log_path = (directory, head), log_path
        args = ["-m", "eagle_engine", "serve", "--base", directory, "--draft", head, "--tree", "chain",
                "--max-batch-size", "2", "--tensor-parallel-size", "2", "--port", str(self.port),
                "--shutdown-timeout", "1", "--log-level", "warning"]
        with open(log_path, "w") as log:
            self.proc = subprocess.Popen(torchrun_command(2, *args), env=torchrun_env(), stdout=log,
                                         stderr=subprocess.STDOUT)
        wait_until(self._serving, lambda: f"no server after {START_TIMEOUT} s:\n{self.log()}", START_TIMEOUT,
                   0.2)
        self.ranks = _children(self.proc.pid)
        assert len(self.ranks) == 2, self.ranks

    def _serving(self) -> bool:
        assert self.proc.poll() is None, f"torchrun exited {self.proc.returncode}:\n{self.log()}"
        try:
            return httpx.get(self.url + "/health", timeout=1.0).status_code == 200
        except httpx.HTTPError:
            return False

    def log(self) -> str:
        with open(self.log_path) as f:
            return f.read()[-6000:]

    def kill(self) -> None:
        """Whatever a test left running (its ranks too), at once."""
        for pid in [self.proc.pid, *self.ranks]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(TIMEOUT)


@pytest.fixture(scope="module")
def servers(tmp_path_factory, reference_ops):
    """(the torchrun server, the single-process server) on the same model."""
    tmp = tmp_path_factory.mktemp("serve_tp")
    model = make_serve_model(str(tmp / "model"), str(tmp / "head"))  # served as "model": its directory's name
    tp = TorchrunServer(*model, str(tmp / "torchrun.log"))
    try:
        single = Server(*model, name="model", max_batch_size=2, tree="chain")
        try:
            yield tp, single
        finally:
            single.stop()
    finally:
        tp.kill()


def ask(endpoint: Endpoint, path: str, body: dict) -> tuple[int, object]:
    """``(status, answer)`` through the `openai` client: the answer without its id and time, a stream's
    text, finish reason and usage, or an error's body."""
    body = dict(body, temperature=body.get("temperature", 0))
    extra = {k: body.pop(k) for k in ("ignore_eos", "bogus", "tools") if k in body}
    api = endpoint.client.chat.completions if path == "chat" else endpoint.client.completions
    try:
        if body.get("stream"):
            chunks = list(api.create(model="model", stream_options={"include_usage": True}, extra_body=extra,
                                     **body))
            pieces = [c for chunk in chunks for c in chunk.choices]
            text = "".join((c.delta.content or "") if path == "chat" else c.text for c in pieces)
            return 200, (text, pieces[-1].finish_reason, chunks[-1].usage)
        answer = api.create(model="model", extra_body=extra, **body).model_dump()
    except openai.APIStatusError as e:
        return e.status_code, e.body
    return 200, {k: v for k, v in answer.items() if k not in ("id", "created")}


def test_answers_equal_the_single_process_server(servers):
    """Greedy, seeded sampling, chat and streams: each alone, then all at once (two slots: some queue)."""
    tp, single = servers
    expected = [ask(single, path, body) for path, body in REQUESTS]
    assert all(status == 200 for status, _ in expected)
    assert [ask(tp, path, body) for path, body in REQUESTS] == expected
    with concurrent.futures.ThreadPoolExecutor(len(REQUESTS)) as pool:
        together = list(pool.map(lambda request: ask(tp, *request), REQUESTS))
    assert together == expected


def test_stop_strings_answer_as_on_one_process(servers):
    """A stop string found in the prefill's text, and one found in a later round, alone and beside a
    running neighbour: rank 0 decides them on the host, and the ranks stay in step (the next answers too)."""
    tp, single = servers
    for prompt in ("def main(", "import json\n", "class Foo:", "x = [", "return None", "for i in"):
        first_text = ask(single, "completions", {"prompt": prompt, "max_tokens": 1})[1]["choices"][0]["text"]
        if first_text and "\ufffd" not in first_text:  # the prefill's token makes text of its own (not a
            break  # part of a multi-byte character, which only the end of a request flushes)
    _, plain = ask(single, "completions", {"prompt": prompt, "max_tokens": 24})
    text = plain["choices"][0]["text"]
    assert text.startswith(first_text) and len(text) > 9
    stops = [{"prompt": prompt, "max_tokens": 24, "stop": [first_text[:1]]},
             {"prompt": prompt, "max_tokens": 24, "stop": [text[6:9]], "stream": True}]
    expected = [ask(single, "completions", body) for body in stops]
    first = expected[0][1]["choices"][0]
    assert first["text"] == "" and first["finish_reason"] == "stop"
    assert [ask(tp, "completions", body) for body in stops] == expected
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        neighbour = pool.submit(ask, tp, *REQUESTS[0])
        assert list(pool.map(lambda body: ask(tp, "completions", body), stops)) == expected
        assert neighbour.result() == ask(single, *REQUESTS[0])
    for path, body in REQUESTS[:2]:
        assert ask(tp, path, body) == ask(single, path, body)


@pytest.mark.parametrize("body", [
    {"prompt": "x", "max_tokens": 4, "bogus": 1},  # an unknown field
    {"prompt": "x", "max_tokens": 4, "tools": []},  # an unsupported one
    {"prompt": "x " * 2000, "max_tokens": 4},  # longer than the context
    {"prompt": [10**6], "max_tokens": 4},  # a token id outside the vocabulary
    {"prompt": "x", "max_tokens": 4, "temperature": -1},
])
def test_bad_requests_answer_as_on_one_process(servers, body):
    tp, single = servers
    status, answer = ask(tp, "completions", body)
    assert status == 400 and (status, answer) == ask(single, "completions", body)


def _wait_for_metrics(endpoint: Endpoint, condition) -> None:
    seen = {}

    def holds():
        seen.update(endpoint.metrics())
        return condition(seen)

    wait_until(holds, lambda: {k: v for k, v in seen.items() if k.startswith("eagle_r")}, TIMEOUT, 0.05)


def test_dropped_clients_free_their_slots_on_every_rank(servers):
    """A stream closed after its first chunk and a non-streaming client hanging up: both cancelled, both
    slots free, and the ranks still in step (the next answers equal the single-process server's)."""
    tp, single = servers
    before = tp.metrics().get(CANCELLED, 0)
    long = {"prompt": "def main(", "max_tokens": 900, "temperature": 0, "ignore_eos": True}
    with httpx.stream("POST", tp.url + "/v1/completions", json=dict(long, stream=True), timeout=TIMEOUT) as r:
        next(r.iter_lines())
    _wait_for_metrics(tp, lambda m: m.get(CANCELLED, 0) - before == 1 and m["eagle_running_batch{}"] == 0)
    with socket.create_connection(("127.0.0.1", tp.port), timeout=TIMEOUT) as sock:
        body = json.dumps(long).encode()
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        _wait_for_metrics(tp, lambda m: m["eagle_running_batch{}"] == 1)  # it runs; then it hangs up
    _wait_for_metrics(tp, lambda m: m.get(CANCELLED, 0) - before == 2 and m["eagle_running_batch{}"] == 0)
    for path, body in REQUESTS[:2]:
        assert ask(tp, path, body) == ask(single, path, body)


def _rank_of(pid: int) -> int:
    with open(f"/proc/{pid}/environ", "rb") as f:
        env = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
    return int(env[b"RANK"])


def _sigterm_during_a_stream(tp: TorchrunServer, pid: int) -> list[str]:
    """SIGTERM to ``pid`` while a long stream runs; then torchrun and both ranks exit within the bound.
    Returns the stream's events after the first."""
    body = {"prompt": "def main(", "max_tokens": 900, "temperature": 0, "ignore_eos": True, "stream": True}
    rest = []
    with httpx.stream("POST", tp.url + "/v1/completions", json=body, timeout=TIMEOUT) as r:
        lines = r.iter_lines()
        next(lines)
        os.kill(pid, signal.SIGTERM)
        try:
            rest.extend(line for line in lines if line)
        except httpx.RemoteProtocolError:  # the server cut the stream
            pass
    tp.proc.wait(60)
    wait_until(lambda: not any(_alive(rank) for rank in tp.ranks),
               lambda: f"ranks still running:\n{tp.log()}", TIMEOUT, 0.1)
    return rest


def test_sigterm_to_torchrun_stops_every_rank(tmp_path, servers):
    """What a process manager does: torchrun passes SIGTERM to both ranks; rank 1 ends at once, rank 0's
    plans stop reaching it, so rank 0 fails what runs (an error event ends the stream) and shuts down."""
    tp = TorchrunServer(*servers[0].model, str(tmp_path / "torchrun.log"))
    try:
        rest = _sigterm_during_a_stream(tp, tp.proc.pid)
        assert rest[-1] == "data: [DONE]" and '"error"' in rest[-2], rest[-3:]
    finally:
        tp.kill()


def test_sigterm_to_rank_0_stops_every_rank_in_order(servers):
    """Rank 0 alone: its server lets the running stream go on for --shutdown-timeout (1 s), then cuts it;
    its shutdown sends the stop plan, rank 1 leaves with it, and the launch ends cleanly (exit 0). Last in
    this file: it ends the module's server."""
    tp, _ = servers
    rank0 = next(pid for pid in tp.ranks if _rank_of(pid) == 0)
    t0 = time.monotonic()
    rest = _sigterm_during_a_stream(tp, rank0)
    assert not any('"finish_reason": "length"' in line for line in rest)  # cut, not run to its end
    assert tp.proc.returncode == 0, tp.log()
    assert time.monotonic() - t0 < TIMEOUT
