"""EagleEngine: load a target (and optionally an EAGLE draft head) and generate, vanilla or speculative."""

from __future__ import annotations

import queue
from collections.abc import Iterator

import torch

from ..errors import EagleError, InvalidDeviceError
from ..models import LlamaModel, load_target, parallel
from ..models.config import load_model_config
from ..models.weights import resolve_dtype
from ..speculative.methods import (
    SETTINGS_KEYWORD,
    head_method,
    make_drafter,
    resolve_method,
    resolve_settings,
)
from ..speculative.sampling import SamplingParams
from ..speculative.tree import TreeConfig
from .batch import scratch_rows
from .cpu_threads import set_threads
from .handles import Request
from .inputs import check_max_new_tokens, check_seeds, normalize_prompts, normalize_stop_ids
from .kv_budget import kv_budget, pool_blocks
from .plan import PlanChannel
from .runner import Runner
from .scheduler import Scheduler

DEFAULT_MAX_BATCH_SIZE = 8
DEFAULT_MAX_MODEL_LEN = 4096  # capped by the model's own maximum length
DEFAULT_BLOCK_SIZE = 16
DEFAULT_MAX_PREFILL_TOKENS = 2048
NO_METHOD = (
    "{} needs a speculative method: a draft head (from_pretrained(base, draft_path)) or "
    "method='lookahead' / 'prompt_lookup'"
)


def resolve_tree(tree) -> TreeConfig:
    """``None`` -> the EAGLE-2 dynamic default; a kind name (``"dynamic"``, ``"static"``, ``"chain"``) or
    ``"auto"`` (``TreeConfig(total_tokens="auto")``);
    a dict of :class:`TreeConfig` fields; or a :class:`TreeConfig`."""
    if tree is None:
        return TreeConfig()
    if isinstance(tree, TreeConfig):
        return tree
    if isinstance(tree, str):
        return TreeConfig(total_tokens="auto") if tree == "auto" else TreeConfig(kind=tree)
    if isinstance(tree, dict):
        return TreeConfig.from_dict(tree)
    raise EagleError(f"tree must be a TreeConfig, a kind name or a dict, got {type(tree).__name__}")


def resolve_device(device: str | torch.device) -> torch.device:
    """A torch device that exists here; ``cuda`` without a GPU is an :class:`EagleError`."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise InvalidDeviceError(f"invalid device {device!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InvalidDeviceError(f"device {device!r} requested but no CUDA GPU is available")
    if dev.type not in ("cpu", "cuda"):
        raise InvalidDeviceError(f"unsupported device {device!r}; use cpu or cuda")
    return dev


def reduce_draft_vocab(head, size: int | None, frequencies: str | None, vocab_size: int) -> None:
    """Give an EAGLE-1/2 ``head`` a draft vocabulary of the ``size`` most frequent tokens of the frequency
    file ``frequencies`` (both needed; see :mod:`eagle_engine.models.vocab`)."""
    from ..models.draft import Eagle1Head
    from ..models.vocab import load_frequencies, most_frequent

    if size is None or frequencies is None:
        raise EagleError("a reduced draft vocabulary needs both draft_vocab_size and token_frequencies")
    if not isinstance(head, Eagle1Head):
        kind = "no draft head" if head is None else f"a {getattr(head, 'kind', type(head).__name__)} head"
        raise EagleError(
            f"draft_vocab_size reduces an EAGLE-1/2 head's LM head; this engine has {kind} (EAGLE-3 heads "
            "carry their own draft vocabulary, chosen at training: train-draft --draft-vocab-size)"
        )
    head.reduce_vocab(most_frequent(load_frequencies(frequencies, vocab_size), size))


class EagleEngine:
    """Holds a target model (and a draft head for speculative decoding) on one device, and a
    :class:`~eagle_engine.engine.runner.Runner` whose caches are allocated once and reused by every call.

    Example
    -------
    >>> engine = EagleEngine.from_pretrained("llama", "head", device="cuda", dtype="bf16")  # doctest: +SKIP
    >>> engine.generate([1, 15043, 29892], max_new_tokens=32).tokens  # doctest: +SKIP
    """

    def __init__(
        self,
        target: LlamaModel,
        draft=None,
        tree=None,
        *,
        method: str | None = None,
        medusa=None,
        lookahead=None,
        prompt_lookup=None,
        max_batch_size: int | None = None,
        max_model_len: int | None = None,
        cuda_graphs: bool | None = None,
        kv_cache_memory=None,
        block_size: int = DEFAULT_BLOCK_SIZE,
        enable_prefix_caching: bool = True,
        max_prefill_tokens: int = DEFAULT_MAX_PREFILL_TOKENS,
    ):
        given = {"tree": tree, "medusa": medusa, "lookahead": lookahead, "prompt_lookup": prompt_lookup}
        self.method = resolve_method(method, draft, given)
        self.target = target
        self._draft = draft
        self.tree = resolve_tree(tree)
        self.settings = self._method_settings(given)
        self.device = target.model.embed_tokens.weight.device
        self.dtype = target.model.embed_tokens.weight.dtype
        if max_model_len is None:
            max_model_len = min(target.config.max_length, DEFAULT_MAX_MODEL_LEN)
        self._runner_args = dict(
            max_batch_size=DEFAULT_MAX_BATCH_SIZE if max_batch_size is None else max_batch_size,
            max_model_len=max_model_len,
            cuda_graphs=self.device.type == "cuda" if cuda_graphs is None else cuda_graphs,
            block_size=block_size,
            prefix_caching=bool(enable_prefix_caching),
            max_prefill_tokens=max_prefill_tokens,
        )
        # The pools' budget, decided once, here, where every tensor-parallel rank is at the same point: the
        # ranks must make the same block decisions, so they agree on the smallest.
        self._kv_left = kv_budget(self.device, kv_cache_memory)
        if target.tp is not None:
            self._kv_left = target.tp.min_int(self._kv_left, self.device)
        self._runners: dict[bool, Runner] = {}
        self.runner  # allocate the caches now: a size that does not fit fails here, not mid-request
        # The one driver of the runners, for this API and the server alike (one engine thread).
        self.scheduler = Scheduler(self._runner, max_model_len, PlanChannel(target.tp))

    @classmethod
    def from_pretrained(
        cls,
        base_path: str,
        draft_path: str | None = None,
        *,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = torch.float32,
        method: str | None = None,
        tree=None,
        medusa=None,
        lookahead=None,
        prompt_lookup=None,
        max_batch_size: int | None = None,
        max_model_len: int | None = None,
        cuda_graphs: bool | None = None,
        tensor_parallel_size: int = 1,
        threads: int | None = None,
        draft_vocab_size: int | None = None,
        token_frequencies: str | None = None,
        kv_cache_memory=None,
        block_size: int = DEFAULT_BLOCK_SIZE,
        enable_prefix_caching: bool = True,
        max_prefill_tokens: int = DEFAULT_MAX_PREFILL_TOKENS,
    ) -> "EagleEngine":
        """Load a Hugging Face target directory and, if given, a draft head directory: an EAGLE-1/2 or
        EAGLE-3 head (official EAGLE format) or Medusa-1 heads (official Medusa format), told apart by their
        files.

        ``dtype``: ``torch.float32``/``float16``/``bfloat16`` or a name (``"fp32"``, ``"bf16"``, ...).
        ``method``: ``"eagle"``, ``"medusa"`` (both implied by the head), ``"lookahead"`` or
        ``"prompt_lookup"`` (no head); None with no head: vanilla only. See
        :mod:`eagle_engine.speculative.methods`. Each method takes its own settings (a settings object or a
        dict of its fields): ``tree`` (EAGLE): a :class:`~eagle_engine.speculative.tree.TreeConfig`,
        ``"dynamic"`` (EAGLE-2, default: 60 nodes, depth 6, top-k 10), ``"static"`` (EAGLE-1
        ``mc_sim_7b_63``), ``"chain"``, or ``"auto"`` (sized to the device, see
        :mod:`eagle_engine.speculative.auto_tree`); ``medusa``: a
        :class:`~eagle_engine.speculative.methods.MedusaConfig`; ``lookahead``: a
        :class:`~eagle_engine.speculative.methods.LookaheadConfig`; ``prompt_lookup``: a
        :class:`~eagle_engine.speculative.methods.PromptLookupConfig`.
        ``max_batch_size`` (default 8): sequences decoded together; more prompts than that are queued and
        join as others finish. ``max_model_len`` (default: the model's maximum length, at most 4096): prompt
        plus generated tokens per sequence. The caches for both are allocated once, here.
        ``cuda_graphs`` (default: on for CUDA without tensor parallelism): replay each step from a CUDA graph.
        ``tensor_parallel_size`` N > 1: shard the target over N processes launched by ``torchrun
        --nproc-per-node N`` (the process group is initialised from torchrun's environment unless the caller
        did; on CUDA each rank uses ``cuda:LOCAL_RANK``); every rank calls the same methods with the same
        arguments and gets the same tokens. See :mod:`eagle_engine.models.parallel`.
        ``threads``: torch's CPU threads, a process-wide setting made here, before any loading or measuring:
        None (default) on a CPU device sets the ``eagle`` commands' default, ``min(4, max(1, cores // 2))``,
        and logs it (logger ``eagle_engine``); an int sets that many; 0 leaves torch's setting alone (the
        default on CUDA). torch's own default, every core, is many times slower for this engine's small
        matrix products on a shared machine.
        ``draft_vocab_size`` with ``token_frequencies`` (a file of ``eagle prepare-data``): an EAGLE-1/2 head
        ranks its drafts over that many most frequent tokens only (:meth:`Eagle1Head.reduce_vocab`; lossless:
        the target verifies). EAGLE-3 heads carry their own draft vocabulary.
        The KV cache is paged (:mod:`eagle_engine.kv_cache`): blocks of ``block_size`` tokens (16) in one
        pool per runner, from a budget of ``kv_cache_memory`` bytes (or a size like ``"8GiB"``; default: 90%
        of the device memory free now on CUDA, 1 GiB on a CPU) that each runner, when built, takes what its
        ``max_batch_size`` sequences of ``max_model_len`` need of, at most what is left (see
        :mod:`.kv_budget`); ``max_model_len`` limits each request and reserves nothing.
        ``enable_prefix_caching``: prompts reuse the blocks of prefixes computed before.
        ``max_prefill_tokens`` (2048): prompt tokens prefilled per step at most, so that a long prompt joins
        in chunks while the others keep decoding. When the running sequences outgrow the pool, the newest
        is preempted and resumes later with identical output (:class:`~eagle_engine.engine.runner.Runner`).
        """
        dev, dt = resolve_device(device), resolve_dtype(dtype)
        if threads != 0 and (threads is not None or dev.type == "cpu"):
            set_threads(threads)
        tp, dev = parallel.setup(tensor_parallel_size, load_model_config(base_path), dev)
        target = load_target(base_path, device=dev, dtype=dt, tp=tp)
        if tp is not None and cuda_graphs is None:
            cuda_graphs = False  # collectives inside captured graphs: not yet tried on GPUs
        draft = None
        if draft_path is not None:
            from ..models.loading import load_draft

            draft = load_draft(draft_path, target, device=dev, dtype=dt)
        if draft_vocab_size is not None or token_frequencies is not None:
            reduce_draft_vocab(draft, draft_vocab_size, token_frequencies, target.config.vocab_size)
        return cls(target, draft, tree, method=method, medusa=medusa, lookahead=lookahead,
                   prompt_lookup=prompt_lookup, max_batch_size=max_batch_size, max_model_len=max_model_len,
                   cuda_graphs=cuda_graphs, kv_cache_memory=kv_cache_memory, block_size=block_size,
                   enable_prefix_caching=enable_prefix_caching, max_prefill_tokens=max_prefill_tokens)

    @property
    def runner(self) -> Runner:
        """The runner :meth:`generate` uses (the method's rounds, else vanilla steps)."""
        return self._runner(self.method is not None)

    @property
    def draft(self):
        """The draft head (EAGLE or Medusa; None for the other methods). Setting a head (default settings
        for Medusa) switches the method to the head's and rebuilds the speculative runner's caches."""
        return self._draft

    @draft.setter
    def draft(self, head) -> None:
        if self.method in ("lookahead", "prompt_lookup"):
            raise EagleError(f"method {self.method!r} takes no draft head; build a new engine instead")
        if self.scheduler.num_running or self.scheduler.queue_depth:
            raise EagleError("the engine is generating: set the draft head between calls")
        self.scheduler.stop()  # the next request starts it again, over the new runner
        self.method = head_method(head)
        self.settings = self._method_settings({})
        self._draft = head
        old = self._runners.pop(True, None)
        if old is not None:  # its pool's bytes go back to the budget
            self._kv_left += old.state.tcache.data.numel() * old.state.tcache.data.element_size()
            for cache in old.drafter.caches() if old.drafter is not None else ():
                self._kv_left += cache.data.numel() * cache.data.element_size()
        self.scheduler = Scheduler(self._runner, self.max_length, self.scheduler.channel)

    def _method_settings(self, given: dict):
        """The settings object of ``self.method``: the tree for EAGLE, else the one ``given`` under the
        method's keyword (its defaults when absent); None without a method."""
        if self.method in (None, "eagle"):
            return self.tree if self.method else None
        return resolve_settings(self.method, given.get(SETTINGS_KEYWORD[self.method]))

    def _runner(self, speculative: bool) -> Runner:
        if speculative not in self._runners:
            drafter = self._make_drafter() if speculative else None
            table = self.target.cos_sin.data_ptr()
            blocks, nbytes = self._pool_blocks(drafter)
            self._runners[speculative] = Runner(self.target, drafter, num_blocks=blocks, **self._runner_args)
            self._kv_left -= nbytes
            if self.target.cos_sin.data_ptr() != table:  # grown: graphs read the old table
                for other in self._runners.values():
                    other.graphs.clear()
        return self._runners[speculative]

    def _pool_blocks(self, drafter) -> tuple[int, int]:
        """``(blocks, bytes)`` of a runner's pool for ``drafter``, from what is left of the budget (see
        :mod:`.kv_budget`)."""
        cfg, w = self.target.config, self.target.lm_head_weight
        kv_heads = cfg.num_key_value_heads // (1 if self.target.tp is None else self.target.tp.size)
        row = cfg.num_hidden_layers * 2 * kv_heads * cfg.head_dim * w.element_size()
        row += drafter.kv_bytes_per_row() if drafter is not None else 0
        args = self._runner_args
        size = args["block_size"]
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise EagleError(f"block_size must be an integer >= 1, got {size!r}")
        scratch = scratch_rows(drafter)
        per_sequence = -(-(args["max_model_len"] + scratch) // size)
        batch, least = args["max_batch_size"], -(-(2 + scratch) // size)  # a 1-token prompt, 1 new token
        blocks = pool_blocks(row * size, per_sequence, batch, self._kv_left, least)
        return blocks, blocks * row * size

    def _make_drafter(self):
        if self.method == "eagle" and self.tree.is_auto:
            from ..speculative.auto_tree import auto_tree

            graphs = self._runner_args["cuda_graphs"]
            self.tree = self.settings = auto_tree(self.target, self.draft, cuda_graphs=graphs)
        return make_drafter(self.method, self.target, self.draft, self.settings)

    @property
    def max_length(self) -> int:
        """Longest sequence (prompt + generated tokens) a request may reach: ``max_model_len``."""
        return self._runner_args["max_model_len"]

    # ------------------------------------------------------------------------------------ requests

    def _requests(self, input_ids, max_new_tokens, temperature, top_p, top_k, seed, stop_token_ids,
                  speculative: bool) -> tuple[list[Request], bool]:
        """Validated requests (every check here, on the caller's thread, before anything is queued)."""
        if speculative and self.method is None:
            raise EagleError(NO_METHOD.format("generate()"))
        cfg = self.target.config
        prompts, is_batch = normalize_prompts(input_ids, cfg.vocab_size, self.max_length)
        max_new_tokens = check_max_new_tokens(max_new_tokens)
        stop_ids = frozenset(normalize_stop_ids(stop_token_ids, cfg.eos_token_ids, cfg.vocab_size))
        params = SamplingParams(temperature, top_p, top_k)
        # None: each request's seed is drawn when it starts (rank 0's, under tensor parallelism).
        seeds = [None] * len(prompts) if seed is None else check_seeds(seed, len(prompts))
        requests = [Request(p, max_new_tokens, params, sd, stop_ids, speculative=speculative)
                    for p, sd in zip(prompts, seeds)]
        return requests, is_batch

    def _submit(self, requests: list[Request]) -> tuple[list, queue.SimpleQueue]:
        """Submit ``requests``; their outputs arrive, as ``(index, Output)``, in the returned queue."""
        outputs: queue.SimpleQueue = queue.SimpleQueue()
        delivers = [lambda out, i=i: outputs.put((i, out)) for i in range(len(requests))]
        return self.scheduler.submit_all(requests, delivers), outputs

    def _run(self, requests: list[Request], is_batch: bool):
        """Every request to its end (queued and batched with any other caller's); the results."""
        handles, outputs = self._submit(requests)
        for _ in self._outputs(handles, outputs):
            pass
        return self._results(handles, is_batch)

    def _outputs(self, handles, outputs: queue.SimpleQueue) -> Iterator[list[tuple[int, object]]]:
        """Yields what arrived, a list of ``(index, Output)`` at a time, until every request ended; raises a
        request's error; cancels what is left if the caller stops early (or is interrupted)."""
        pending = set(range(len(handles)))
        try:
            while pending:
                batch = [outputs.get()]
                while not outputs.empty():
                    batch.append(outputs.get())
                for i, out in batch:
                    if out.error is not None:
                        raise out.error
                    if out.finish_reason is not None:
                        pending.discard(i)
                yield batch
        finally:
            for i in pending:
                self.scheduler.cancel(handles[i])

    @staticmethod
    def _results(handles, is_batch: bool):
        results = [h.seq.result() for h in handles]
        return results if is_batch else results[0]

    # ------------------------------------------------------------------------------------ public API

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
        seed : an int seeds every sequence alike (a sequence samples the same alone or in a batch), a list
            gives one seed per prompt, None a random seed
        stop_token_ids : ids that end a sequence (kept in its output); None = the model's eos ids

        Returns
        -------
        :class:`GenerationResult` for one prompt, a list of them for a batch.
        """
        return self._run(*self._requests(input_ids, max_new_tokens, temperature, top_p, top_k, seed,
                                         stop_token_ids, speculative=False))

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
        """Speculative decoding with the engine's method (EAGLE, Medusa, Lookahead or prompt lookup): the
        target's own output (greedy: identical tokens; sampling: the identical distribution), several tokens
        per target forward.

        Parameters are those of :meth:`generate_vanilla`.

        Returns
        -------
        :class:`GenerationResult` (a list for a batch) whose ``accept_lengths[i]`` is the number of tokens
        the i-th verification round kept: accepted draft tokens plus the bonus token, so >= 1, fewer when a
        stop ends the round. The prefill's first token is not a round and is not counted.
        """
        return self._run(*self._requests(input_ids, max_new_tokens, temperature, top_p, top_k, seed,
                                         stop_token_ids, speculative=True))

    def stream(
        self,
        input_ids,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | list[int] | None = None,
        stop_token_ids=None,
    ) -> Iterator:
        """Like :meth:`generate`, but yield tokens as each round finishes: a list of new token ids for one
        prompt (empty lists are skipped), a list of such lists (one per prompt) for a batch. The request is
        validated here, before the iterator is returned.

        >>> for tokens in engine.stream(ids, 64):  # doctest: +SKIP
        ...     print(tokenizer.decode(tokens), end="", flush=True)
        """
        if self.method is None:
            raise EagleError(NO_METHOD.format("stream()"))
        requests, is_batch = self._requests(input_ids, max_new_tokens, temperature, top_p, top_k, seed,
                                            stop_token_ids, speculative=True)
        return self._stream(requests, is_batch)

    def _stream(self, requests: list[Request], is_batch: bool) -> Iterator:
        handles, outputs = self._submit(requests)
        for batch in self._outputs(handles, outputs):
            chunks = [[] for _ in requests]
            for i, out in batch:
                chunks[i].extend(out.token_ids)
            if is_batch:
                yield chunks
            elif chunks[0]:
                yield chunks[0]

    def close(self) -> None:
        """Stop the engine thread (on every rank under tensor parallelism: call it on each, like every other
        method); requests still queued or running fail. A later call starts it again."""
        self.scheduler.stop()
