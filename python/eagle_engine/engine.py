"""EagleEngine: load a target (and optionally an EAGLE draft head) and generate, vanilla or speculative."""

from __future__ import annotations

import torch

from .errors import EagleError
from .kv_cache import KVCache
from .models import LlamaModel, load_target
from .models.weights import resolve_dtype
from .requests import (
    SequenceState,
    Timer,
    check_max_new_tokens,
    normalize_prompts,
    normalize_stop_ids,
)
from .sampling import SamplingParams, make_generators, sample_tokens


def resolve_device(device: str | torch.device) -> torch.device:
    """A torch device that exists here; ``cuda`` without a GPU is an :class:`EagleError`."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise EagleError(f"invalid device {device!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise EagleError(f"device {device!r} requested but no CUDA GPU is available")
    if dev.type not in ("cpu", "cuda"):
        raise EagleError(f"unsupported device {device!r}; use cpu or cuda")
    return dev


class EagleEngine:
    """Holds a target model (and a draft head for speculative decoding) on one device.

    Example
    -------
    >>> engine = EagleEngine.from_pretrained("path/to/llama", device="cuda", dtype="bf16")  # doctest: +SKIP
    >>> engine.generate_vanilla([1, 15043, 29892], max_new_tokens=32).tokens  # doctest: +SKIP
    """

    def __init__(self, target: LlamaModel, draft=None, tree=None):
        self.target = target
        self.draft = draft
        self.tree = tree
        self.device = target.model.embed_tokens.weight.device
        self.dtype = target.model.embed_tokens.weight.dtype

    @classmethod
    def from_pretrained(
        cls,
        base_path: str,
        draft_path: str | None = None,
        *,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = torch.float32,
        tree=None,
    ) -> "EagleEngine":
        """Load a Hugging Face target directory and, if given, an EAGLE head directory.

        ``dtype``: ``torch.float32``/``float16``/``bfloat16`` or a name (``"fp32"``, ``"bf16"``, ...).
        ``tree``: draft tree configuration for :meth:`generate` (default: the EAGLE-2 dynamic tree).
        """
        dev, dt = resolve_device(device), resolve_dtype(dtype)
        target = load_target(base_path, device=dev, dtype=dt)
        draft = None
        if draft_path is not None:
            from .models.draft import load_draft

            draft = load_draft(draft_path, target, device=dev, dtype=dt)
        return cls(target, draft, tree)

    @property
    def max_length(self) -> int:
        return self.target.config.max_length

    # ------------------------------------------------------------------------------------ shared steps

    def _start(self, input_ids, max_new_tokens, sampling: SamplingParams, stop_token_ids):
        cfg = self.target.config
        prompts, is_batch = normalize_prompts(input_ids, cfg.vocab_size, cfg.max_length)
        max_new_tokens = check_max_new_tokens(max_new_tokens)
        stop_ids = normalize_stop_ids(stop_token_ids, cfg.eos_token_ids)
        states = [SequenceState(p, max_new_tokens, cfg.max_length, stop_ids) for p in prompts]
        return states, is_batch

    def _prefill(self, states: list[SequenceState], cache: KVCache, aux_layers=()):
        """Run the right-padded prompts causally; commit their rows; return the output and last-token rows."""
        longest = max(len(s.prompt) for s in states)
        ids = torch.zeros(len(states), longest, dtype=torch.long)
        for b, s in enumerate(states):
            ids[b, : len(s.prompt)] = torch.tensor(s.prompt)
        ids = ids.to(self.device)
        positions = torch.arange(longest, device=self.device).expand(len(states), longest)
        out = self.target(ids, positions, cache, None, aux_layers)
        prompt_lens = torch.tensor([len(s.prompt) for s in states], dtype=torch.int32, device=self.device)
        cache.lengths.copy_(prompt_lens)
        return out, ids, prompt_lens

    @staticmethod
    def _finish(states, is_batch, prefill_s, decode_s):
        results = [s.result(prefill_s, decode_s) for s in states]
        return results if is_batch else results[0]

    # --------------------------------------------------------------------------------------- vanilla

    @torch.inference_mode()
    def generate_vanilla(
        self,
        input_ids,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        stop_token_ids=None,
    ):
        """Plain autoregressive decoding with the target alone: the baseline EAGLE is measured against.

        Parameters
        ----------
        input_ids : list[int] | list[list[int]] | 1-D/2-D int tensor: one prompt or a batch (any lengths)
        max_new_tokens : tokens to generate at most per sequence
        temperature, top_p, top_k : sampling (temperature 0 = greedy)
        seed : seeds each sequence's ``torch.Generator`` (so a sequence samples alike alone or in a batch)
        stop_token_ids : ids that end a sequence (kept in its output); None = the model's eos ids

        Returns
        -------
        :class:`GenerationResult` for one prompt, a list of them for a batch.
        """
        sampling = SamplingParams(temperature, top_p, top_k)
        states, is_batch = self._start(input_ids, max_new_tokens, sampling, stop_token_ids)
        timer = Timer(self.device)
        t0 = timer.now()
        capacity = max(len(s.prompt) + max(s.limit, 1) for s in states)
        cache = self.target.allocate_cache(len(states), capacity)
        gens = make_generators(seed, len(states), self.device)
        out, _, prompt_lens = self._prefill(states, cache)
        last = out.hidden[torch.arange(len(states), device=self.device), prompt_lens.long() - 1]
        next_tokens = sample_tokens(self.target.logits(last), sampling, gens)
        t1 = timer.now()
        while True:
            token_list = next_tokens.tolist()
            for s, tok in zip(states, token_list):
                s.append([tok])
            active = [not s.done for s in states]
            if not any(active):
                break
            # Finished sequences keep running (their row is rewritten in place) so shapes stay fixed.
            positions = cache.lengths.view(-1, 1).long()
            out = self.target(next_tokens.view(-1, 1), positions, cache)
            cache.lengths += torch.tensor(active, dtype=torch.int32, device=self.device)
            next_tokens = sample_tokens(self.target.logits(out.hidden[:, 0]), sampling, gens)
        t2 = timer.now()
        return self._finish(states, is_batch, t1 - t0, t2 - t1)
