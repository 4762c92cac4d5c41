"""EagleEngine: load a target (and optionally an EAGLE draft head) and generate, vanilla or speculative."""

from __future__ import annotations

import torch

from ..errors import EagleError
from ..models import LlamaModel, load_target
from ..models.weights import resolve_dtype
from ..spec.sampling import SamplingParams, make_generators, sample_tokens
from ..spec.tree import TreeConfig
from .inputs import check_max_new_tokens, normalize_prompts, normalize_stop_ids
from .prefill import pad_prompts, prefill
from .runner import eagle_stream
from .sequence import SequenceState, Timer


def resolve_tree(tree) -> TreeConfig:
    """``None`` -> the EAGLE-2 dynamic default; a kind name (``"dynamic"``, ``"static"``, ``"chain"``);
    a dict of :class:`TreeConfig` fields; or a :class:`TreeConfig`."""
    if tree is None:
        return TreeConfig()
    if isinstance(tree, TreeConfig):
        return tree
    if isinstance(tree, str):
        return TreeConfig(kind=tree)
    if isinstance(tree, dict):
        return TreeConfig(**tree)
    raise EagleError(f"tree must be a TreeConfig, a kind name or a dict, got {type(tree).__name__}")


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
        self.tree = resolve_tree(tree)
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
        ``tree``: draft tree for :meth:`generate`: a :class:`~eagle_engine.tree.TreeConfig`, ``"dynamic"``
        (EAGLE-2, default: 60 nodes, depth 6, top-k 10), ``"static"`` (EAGLE-1 ``mc_sim_7b_63``), ``"chain"``.
        """
        dev, dt = resolve_device(device), resolve_dtype(dtype)
        target = load_target(base_path, device=dev, dtype=dt)
        draft = None
        if draft_path is not None:
            from ..models.loading import load_draft

            draft = load_draft(draft_path, target, device=dev, dtype=dt)
        return cls(target, draft, tree)

    @property
    def max_length(self) -> int:
        return self.target.config.max_length

    # ------------------------------------------------------------------------------------ shared steps

    def _start(self, input_ids, max_new_tokens, stop_token_ids):
        cfg = self.target.config
        prompts, is_batch = normalize_prompts(input_ids, cfg.vocab_size, cfg.max_length)
        max_new_tokens = check_max_new_tokens(max_new_tokens)
        stop_ids = normalize_stop_ids(stop_token_ids, cfg.eos_token_ids)
        states = [SequenceState(p, max_new_tokens, cfg.max_length, stop_ids) for p in prompts]
        return states, is_batch

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
        seed: int | list[int] | None = None,
        stop_token_ids=None,
    ):
        """Plain autoregressive decoding with the target alone: the baseline EAGLE is measured against.

        Parameters
        ----------
        input_ids : list[int] | list[list[int]] | 1-D/2-D int tensor: one prompt or a batch (any lengths)
        max_new_tokens : tokens to generate at most per sequence
        temperature, top_p, top_k : sampling (temperature 0 = greedy)
        seed : seeds each sequence's ``torch.Generator``: an int seeds all alike (a sequence samples the same
            alone or in a batch), a list gives one seed per prompt, None a random seed
        stop_token_ids : ids that end a sequence (kept in its output); None = the model's eos ids

        Returns
        -------
        :class:`GenerationResult` for one prompt, a list of them for a batch.
        """
        sampling = SamplingParams(temperature, top_p, top_k)
        states, is_batch = self._start(input_ids, max_new_tokens, stop_token_ids)
        timer = Timer(self.device)
        t0 = timer.now()
        capacity = max(len(s.prompt) + max(s.limit, 1) for s in states)
        cache = self.target.allocate_cache(len(states), capacity)
        gens = make_generators(seed, len(states), self.device)
        _, next_tokens = prefill(self.target, cache, *pad_prompts(states, self.device), sampling, gens)
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

    # ----------------------------------------------------------------------------------------- EAGLE

    def _eagle(self, input_ids, max_new_tokens, temperature, top_p, top_k, seed, stop_token_ids):
        if self.draft is None:
            raise EagleError("generate() needs a draft head: load one with from_pretrained(base, draft_path)")
        sampling = SamplingParams(temperature, top_p, top_k)
        states, is_batch = self._start(input_ids, max_new_tokens, stop_token_ids)
        gens = make_generators(seed, len(states), self.device)
        timings = {"prefill_seconds": 0.0, "decode_seconds": 0.0}
        rounds = eagle_stream(
            self.target,
            self.draft,
            self.tree,
            states,
            sampling,
            gens,
            pad_prompts(states, self.device),
            Timer(self.device),
            timings,
        )
        return states, is_batch, rounds, timings

    @torch.inference_mode()
    def generate(
        self,
        input_ids,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | list[int] | None = None,
        stop_token_ids=None,
    ):
        """EAGLE speculative decoding: the target's own output (greedy: identical tokens; sampling: the
        identical distribution), several tokens per target forward.

        Parameters are those of :meth:`generate_vanilla`.

        Returns
        -------
        :class:`GenerationResult` (a list for a batch) whose ``accept_lengths[i]`` is the number of tokens the
        i-th verification forward produced: accepted draft tokens plus the bonus token, so >= 1 (the prefill's
        first token is not a round and is not counted; a stop may keep fewer tokens of the last round).
        """
        states, is_batch, rounds, timings = self._eagle(
            input_ids, max_new_tokens, temperature, top_p, top_k, seed, stop_token_ids
        )
        for _ in rounds:
            pass
        return self._finish(states, is_batch, timings["prefill_seconds"], timings["decode_seconds"])

    def stream(
        self,
        input_ids,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | list[int] | None = None,
        stop_token_ids=None,
    ):
        """Like :meth:`generate`, but yield tokens as each round finishes: a list of new token ids for one
        prompt (empty lists are skipped), a list of such lists (one per prompt) for a batch.

        >>> for tokens in engine.stream(ids, 64):  # doctest: +SKIP
        ...     print(tokenizer.decode(tokens), end="", flush=True)
        """
        states, is_batch, rounds, _ = self._eagle(
            input_ids, max_new_tokens, temperature, top_p, top_k, seed, stop_token_ids
        )
        with torch.inference_mode():
            for kept in rounds:
                if is_batch:
                    yield kept
                elif kept[0]:
                    yield kept[0]
