"""A stand-in runner over ``EagleEngine.stream`` with the step-wise runner's contract (``add``/``step``/
``release``), for engines without ``engine.runner``: each sequence runs alone (its own caches, one round per
step), so there is no batched compute, but requests still join and leave between rounds."""

from __future__ import annotations

from ..errors import InvalidRequestError


class SerialSequence:
    """The runner contract's sequence: ``tokens``, ``accept_lengths``, ``stop_reason``, ``done``,
    ``finish``."""

    def __init__(self, prompt, params, max_new_tokens: int, stop_ids: frozenset[int], seed: int):
        self.prompt, self.params, self.max_new_tokens = list(prompt), params, max_new_tokens
        self.stop_ids, self.seed = frozenset(stop_ids), seed
        self.tokens: list[int] = []
        self.accept_lengths: list[int] = []
        self.stop_reason: str | None = None

    @property
    def done(self) -> bool:
        return self.stop_reason is not None

    def finish(self, reason: str) -> None:
        if self.stop_reason is None:
            self.stop_reason = reason


class SerialRunner:
    def __init__(self, engine, max_batch_size: int = 8):
        self.engine, self.max_batch_size = engine, max_batch_size
        self.max_model_len = engine.max_length
        self._running: dict[SerialSequence, object] = {}

    def free_slots(self) -> int:
        return self.max_batch_size - len(self._running)

    def has_running(self) -> bool:
        return bool(self._running)

    def release(self, seq: SerialSequence) -> None:
        it = self._running.pop(seq, None)
        if it is not None and hasattr(it, "close"):
            it.close()

    def _rounds(self, seq: SerialSequence):
        p = seq.params
        kwargs = dict(temperature=p.temperature, top_p=p.top_p, top_k=p.top_k, seed=seq.seed)
        kwargs["stop_token_ids"] = sorted(seq.stop_ids)
        if self.engine.draft is None:  # vanilla: the whole answer in one step
            yield self.engine.generate_vanilla(seq.prompt, seq.max_new_tokens, **kwargs).tokens
            return
        yield from self.engine.stream(seq.prompt, seq.max_new_tokens, **kwargs)

    def _take(self, seq: SerialSequence, tokens: list[int], first: bool) -> list[int]:
        seq.tokens.extend(tokens)
        if not first and self.engine.draft is not None:
            seq.accept_lengths.append(len(tokens))
        if seq.tokens and seq.tokens[-1] in seq.stop_ids:
            seq.finish("stop_token")
        elif len(seq.tokens) >= seq.max_new_tokens:
            seq.finish("max_new_tokens")
        elif len(seq.prompt) + len(seq.tokens) >= self.max_model_len:
            seq.finish("max_length")
        return tokens

    def add(self, seqs: list[SerialSequence]) -> dict[SerialSequence, list[int]]:
        for seq in seqs:
            if len(seq.prompt) >= self.max_model_len:
                raise InvalidRequestError(
                    f"prompt has {len(seq.prompt)} tokens; the model's maximum length is {self.max_model_len}"
                )
        out = {}
        for seq in seqs:
            it = self._rounds(seq)
            self._running[seq] = it
            out[seq] = self._take(seq, list(next(it, [])), first=True)
        return out

    def step(self) -> dict[SerialSequence, list[int]]:
        out = {}
        for seq, it in list(self._running.items()):
            if not seq.done:
                out[seq] = self._take(seq, list(next(it, [])), first=False)
            if seq.done:
                self.release(seq)
        return out
