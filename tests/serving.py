"""Shared pieces of the server tests: a tiny model with a chat template, an endpoint's `openai` client and
metrics, and the in-process server (uvicorn in a background thread)."""

from __future__ import annotations

import json
import threading

import httpx
import openai
from launch import free_port, wait_until
from prometheus_client.parser import text_string_to_metric_families
from tiny import make_head_dir, make_hf_model, make_tokenizer, save

from eagle_engine import EagleEngine

TIMEOUT = 30.0
CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def make_serve_model(directory: str, head_directory: str) -> tuple[str, str]:
    """A tiny qwen2 model with its own tokenizer (with a chat template) and a random EAGLE head. No eos id:
    sequences end at their budget, a stop string or a requested stop id, so lengths are under control."""
    from transformers import AutoTokenizer

    make_tokenizer(directory, vocab_size=300)
    tok = AutoTokenizer.from_pretrained(directory)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(directory)
    vocab = len(tok) + len(tok) % 2  # even: two tensor-parallel ranks split it
    hf = make_hf_model("qwen2", vocab_size=vocab, eos_token_id=None, bos_token_id=None)
    save(hf, directory)
    head = make_head_dir(EagleEngine.from_pretrained(directory), "eagle1", head_directory)
    return directory, head


class Endpoint:
    """A server at ``http://127.0.0.1:port``: its `openai` client and its parsed /metrics."""

    def __init__(self, port: int):
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="none", timeout=TIMEOUT, max_retries=0)

    def metrics(self) -> dict:
        """``{name + json(labels): value}`` of every sample."""
        text = httpx.get(self.url + "/metrics", timeout=TIMEOUT).text
        return {
            s.name + json.dumps(s.labels, sort_keys=True): s.value
            for f in text_string_to_metric_families(text)
            for s in f.samples
        }


class Server(Endpoint):
    """uvicorn serving ``create_app(...)`` in a background thread on a free loopback port."""

    def __init__(self, directory, head, name="tiny", tokenizer=None, max_batch_size=4, max_queue=32,
                 max_request_bytes=2 * 1024 * 1024, **method):
        import uvicorn

        from eagle_engine.serve import create_app
        from eagle_engine.tools.common import load_tokenizer

        method = method or {"tree": "chain"}  # default: EAGLE with a chain
        self.engine = EagleEngine.from_pretrained(directory, head, max_batch_size=max_batch_size, **method)
        # references come from a second engine: the server's engine thread owns the first one's runner
        self.reference = EagleEngine.from_pretrained(directory, head, **method)
        self.tokenizer = tokenizer or load_tokenizer(directory)
        self.app = create_app(self.engine, self.tokenizer, name, max_queue=max_queue,
                              max_request_bytes=max_request_bytes)
        super().__init__(free_port())
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        wait_until(lambda: self.server.started or not self.thread.is_alive(), "server did not start",
                   TIMEOUT, 0.02)
        assert self.server.started, "server did not start"

    @property
    def scheduler(self):
        return self.app.state.serve.scheduler

    def stop(self):
        self.server.should_exit = True
        self.thread.join(TIMEOUT)
