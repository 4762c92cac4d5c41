"""A model of a decoding step's GPU time and memory at real shapes, from the engine's own step code run on
``meta`` tensors on any machine (no weights, no memory, no GPU).

The target and its heads are built from configs alone (:mod:`.shapes`) on the ``meta`` device, and the
engine's step functions (:mod:`eagle_engine.engine.batch`: a vanilla step, a speculative round, a prefill)
run unchanged. Every launch is recorded with the bytes it moves and its FLOPs:

- an ``eagle_kernels`` op is one GPU kernel (or a fixed few): its cost comes from its contract and its real
  launch plan (tree attention's query tiles and splits, the LM head's grid), see :data:`KERNEL_COSTS`; what
  its CPU reference does inside is not counted;
- any other torch op that launches work counts one launch: ``2 M N K`` FLOPs for matrix products, and the
  bytes of its inputs and outputs (gathers count the rows they gather, not the table).

Predicted time per launch: ``max(bytes / bandwidth, flops / peak)`` plus a per-launch cost
(:class:`Device`: H100 defaults 3.0 TB/s measured copy bandwidth, 790 TFLOP/s bf16, 1 us per launch inside a
CUDA graph, 5 us outside). This is a prediction, not a measurement; ``benchmarks/bench_round.py`` measures
the same steps on a GPU. The *floor* is the bytes a step must read at that bandwidth: the target's weights
once, its KV cache, and for speculation the draft head's weights for each of its dependent steps and its KV
cache. Allocations are tracked too, so a step's peak device memory comes out (weights and caches included).
"""

from __future__ import annotations

import contextlib
import importlib
import weakref
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import eagle_kernels

from ..engine import batch
from ..engine.batch import BatchState, Mode
from ..models.llama import LlamaModel
from ..speculative.methods import make_drafter
from ..speculative.tree import TreeConfig
from .round_cost import FREE_OPS
from .shapes import build_eagle_head, build_target, model_config

META = torch.device("meta")
PHASES = ("target", "draft", "verify", "bookkeeping")


@dataclass(frozen=True)
class Device:
    """The rates a prediction uses (defaults: an H100 SXM, as measured on the lent machines)."""

    name: str = "H100"
    bandwidth: float = 3.0e12  # bytes/s, device copy (read + write)
    flops: float = 790e12  # bf16 dense matrix products
    vector_ops: float = 30e12  # elementwise ops off the tensor cores (an assumption, not measured)
    launch_s_graph: float = 1e-6  # per kernel node replayed from a CUDA graph
    launch_s_eager: float = 5e-6  # per launch from Python (eager)


H100 = Device()


@dataclass
class Launch:
    name: str
    phase: str
    bytes: float
    flops: float
    launches: int = 1
    weight_reads: int = 0  # times an LM-head weight streams from memory (lm_head_topk only)
    vector_ops: float = 0.0  # elementwise work off the tensor cores, where it can bound a kernel


@dataclass
class Record:
    """Everything a modelled step recorded."""

    launches: list[Launch] = field(default_factory=list)
    allocations: list[tuple[tuple, torch.dtype]] = field(default_factory=list)  # (shape, dtype) of the step's
    peak_bytes: int = 0
    live_bytes: int = 0
    head_steps: int = 0  # dependent draft forwards
    head_topks: int = 0  # draft LM-head calls

    def count(self) -> int:
        return sum(x.launches for x in self.launches)

    def seconds(self, device: Device = H100, graphs: bool = True, phase: str | None = None) -> float:
        per_launch = device.launch_s_graph if graphs else device.launch_s_eager
        return sum(max(x.bytes / device.bandwidth, x.flops / device.flops, x.vector_ops / device.vector_ops)
                   + x.launches * per_launch for x in self.launches if phase is None or x.phase == phase)


def nbytes(t: torch.Tensor) -> int:
    """Bytes an op touches in ``t``: its elements, or its storage where it is broadcast (stride 0)."""
    return min(t.numel() * t.element_size(), t.untyped_storage().nbytes())


# ----------------------------------------------------------------------------------- eagle_kernels ops


def _tree_attention(ctx, q, k_cache, v_cache, lengths, tree_mask=None, tree_len=None, scale=None,
                    block_table=None):
    ta = importlib.import_module("eagle_kernels.tree_attention")  # the module (the package's is the op)
    b, tq, hq, d = q.shape
    hkv, capacity = ta.paged_geometry(k_cache, v_cache, block_table, b)[0::2]
    tree = tq if tree_len is None else int(tree_len)
    plan = ta.launch_plan(b, tq, hq, hkv, capacity, q.dtype, "meta")
    m_blocks, splits = plan[4], plan[5]
    causal = tree_mask is None and tq > 1
    keys = min(ctx.context + (tree / 2 if causal else tree), capacity)  # a causal tile reads to its diagonal
    kv = b * hkv * keys * d * 2 * k_cache.element_size() * m_blocks  # K and V, once per query tile
    rest = 2 * nbytes(q) + (nbytes(tree_mask) if tree_mask is not None else 0)
    if block_table is not None:  # each key tile's block ids
        rest += b * hkv * m_blocks * -(-int(keys) // k_cache.shape[2]) * 4
    return torch.empty_like(q), kv + rest, 4.0 * b * tq * hq * keys * d, 1 + (splits > 1)


def _lm_head_topk(ctx, hidden, weight, k):
    lm = importlib.import_module("eagle_kernels.lm_head_topk")
    n, h = hidden.shape
    plan = lm.launch_plan(n, weight.shape[0], k)
    partials = n * plan["num_tiles"] * (plan["k_pad"] * 8 + 8) * 2  # candidates + stats, written then read
    out = (torch.empty(n, k, device=META), torch.empty(n, k, dtype=torch.int64, device=META))
    cost = nbytes(weight) * plan["weight_reads"] + nbytes(hidden) + partials
    return out, cost, 2.0 * n * h * weight.shape[0], 3, plan["weight_reads"]


def _draft_fc(ctx, ids, embed, features, fc_weight, fc_bias=None):
    n = ids.shape[0]
    out = torch.empty(n, fc_weight.shape[0], dtype=features.dtype, device=META)
    row = embed.shape[1] * embed.element_size()
    cost = n * row + nbytes(features) + nbytes(fc_weight) + 2 * nbytes(out)  # weight once: see lm_head_topk
    return out, cost, 2.0 * n * fc_weight.shape[0] * fc_weight.shape[1], 1


def _elementwise(reads, writes, make):
    def cost(ctx, *args, **kwargs):
        out = make(*args, **kwargs)
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        read = sum(nbytes(t) for t in tensors[:reads])
        outs = out if isinstance(out, tuple) else (out,)
        written = sum(nbytes(t) for t in outs[:writes] if isinstance(t, torch.Tensor))
        return out, read + written, 0.0, 1

    return cost


def _rotary_store_kv(ctx, q, k, v, positions, cos_sin, k_cache, v_cache, rows, *norms_eps, block_table=None):
    out = torch.empty(q.shape, dtype=q.dtype, device=META)
    cost = 2 * nbytes(q) + 2 * (nbytes(k) + nbytes(v)) + positions.numel() * cos_sin.shape[1] * 4
    return out, cost, 0.0, 1


def _kv_compact(ctx, cache, lengths, src, counts, block_table=None):
    layers, _, _, hkv, _, d = cache.shape
    b = lengths.shape[0]
    rows = b * src.shape[1]  # every accepted row at most: the model counts the full width
    return None, 2 * layers * 2 * hkv * rows * d * cache.element_size(), 0.0, 1


def _verify_outputs(tokens):
    b, t = tokens.shape
    return (torch.empty(b, dtype=torch.int32, device=META), torch.empty(b, t, dtype=torch.int32, device=META),
            torch.empty(b, dtype=torch.int64, device=META))


def _tree_verify_greedy(ctx, tokens, parents, target_argmax):
    return _verify_outputs(tokens), 3 * nbytes(tokens), 0.0, 1


def _tree_verify_sampling(ctx, tokens, parents, target_probs, uniforms):
    return _verify_outputs(tokens), nbytes(target_probs) + 3 * nbytes(tokens), 0.0, 1


def _top_p_threshold(ctx, logits, top_p, floor):
    # Nine reads of each row; the radix select compares, selects and adds 15 candidates per entry, 8 passes.
    work = 8 * 15 * 3 * logits.numel()
    return torch.empty(logits.shape[:-1], device=META), 9 * nbytes(logits), 0.0, 1, 0, work


def _masked_softmax_(ctx, logits, threshold):
    return logits, 3 * nbytes(logits), 0.0, 1


def _counter_uniform(ctx, seeds, offsets, n):
    return torch.empty(seeds.shape[0], n, device=META), 16 * seeds.shape[0] + 4 * seeds.shape[0] * n, 0.0, 1


def _like(x, *args, **kwargs):
    return torch.empty_like(x)


def _two_like(x, *args, **kwargs):
    return torch.empty_like(x), torch.empty_like(x)


# op -> cost(ctx, *args) -> (outputs, bytes, flops, launches[, weight_reads[, vector_ops]])
KERNEL_COSTS = {
    "tree_attention": _tree_attention,
    "lm_head_topk": _lm_head_topk,
    "draft_fc": _draft_fc,
    "rms_norm": _elementwise(1, 1, _like),
    "add_rms_norm": _elementwise(2, 2, _two_like),
    "silu_mul": _elementwise(2, 1, lambda g, u: torch.empty(g.shape, dtype=g.dtype, device=META)),
    "rotary_store_kv": _rotary_store_kv,
    "kv_compact": _kv_compact,
    "tree_verify_greedy": _tree_verify_greedy,
    "tree_verify_sampling": _tree_verify_sampling,
    "top_p_threshold": _top_p_threshold,
    "masked_softmax_": _masked_softmax_,
    "counter_uniform": _counter_uniform,
}

# ------------------------------------------------------------------------------------------ recording

_FREE_OPS = FREE_OPS | {"_local_scalar_dense"}  # (no sync can happen on meta tensors anyway)
_GATHERS = {"embedding", "index_select", "gather", "index", "take"}
_MATMULS = {"mm", "addmm", "bmm", "baddbmm"}


def _flops(name: str, args, out) -> float:
    if name in _MATMULS:
        a = args[1] if name in ("addmm", "baddbmm") else args[0]
        return 2.0 * out.numel() * a.shape[-1]
    return float(out.numel()) if isinstance(out, torch.Tensor) else 0.0


class _Recorder(TorchDispatchMode):
    """Records every torch op that launches work, and every allocation (freed when its tensor dies)."""

    def __init__(self, ctx: "_Context"):
        super().__init__()
        self.ctx = ctx

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        ctx = self.ctx
        if ctx.paused:
            return out
        schema = func._schema
        outs = out if isinstance(out, (tuple, list)) else (out,)
        for ret, t in zip(schema.returns, outs):
            if isinstance(t, torch.Tensor) and ret.alias_info is None:
                ctx.allocate(t)
        name = func.overloadpacket.__name__
        if func.is_view or name in _FREE_OPS:
            return out
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        written = sum(nbytes(t) for t in outs if isinstance(t, torch.Tensor))
        if name in _GATHERS:
            read = written + sum(nbytes(t) for t in tensors if not t.is_floating_point())
        else:
            read = sum(nbytes(t) for t in tensors)
        first = outs[0] if outs and isinstance(outs[0], torch.Tensor) else None
        ctx.record(Launch(name, ctx.phase, read + written, _flops(name, args, first)))
        return out


class _Context:
    def __init__(self, context: int):
        self.context = context  # committed rows per sequence that attention reads
        self.record_ = Record()
        self.paused = 0
        self.phases = ["bookkeeping"]
        self.live: set[int] = set()  # storages counted and not yet freed

    @property
    def phase(self) -> str:
        return self.phases[-1]

    def start_step(self) -> None:
        """Forget the launches and allocations so far and restart the peak from what is live now."""
        self.record_.launches.clear()
        self.record_.allocations.clear()
        self.record_.peak_bytes = self.record_.live_bytes

    def record(self, launch: Launch) -> None:
        self.record_.launches.append(launch)

    def allocate(self, t: torch.Tensor) -> None:
        """Count ``t``'s storage as live until the storage dies (its Python object lives exactly as long:
        torch preserves it, while tensor objects over it come and go, e.g. a Parameter's)."""
        storage = t.untyped_storage()
        if storage._cdata in self.live:
            return
        size = storage.nbytes()
        self.live.add(storage._cdata)
        rec = self.record_
        rec.live_bytes += size
        rec.peak_bytes = max(rec.peak_bytes, rec.live_bytes)
        rec.allocations.append((tuple(t.shape), t.dtype))
        weakref.finalize(storage, self._free, storage._cdata, size)

    def _free(self, key: int, size: int) -> None:
        self.live.discard(key)
        self.record_.live_bytes -= size

    @contextlib.contextmanager
    def in_phase(self, phase: str):
        self.phases.append(phase)
        try:
            yield
        finally:
            self.phases.pop()


@contextlib.contextmanager
def _patched(patches):
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
    for owner, name, value in patches:
        setattr(owner, name, value)
    try:
        yield
    finally:
        for owner, name, value in reversed(saved):
            setattr(owner, name, value)


def _kernel_op(ctx: _Context, name: str):
    cost = KERNEL_COSTS[name]

    def op(*args, **kwargs):
        ctx.paused += 1
        try:
            result = cost(ctx, *args, **kwargs)
        finally:
            ctx.paused -= 1
        out, nbytes_, flops, launches = result[:4]
        outs = out if isinstance(out, tuple) else (out,)
        for t in outs:
            if isinstance(t, torch.Tensor) and not any(t is a for a in args):
                ctx.allocate(t)
        weight_reads, vector_ops = (tuple(result[4:]) + (0, 0.0))[:2]
        ctx.record(Launch(name, ctx.phase, nbytes_, flops, launches, weight_reads, vector_ops))
        return out

    return op


def _in_phase(ctx: _Context, phase: str, fn):
    def wrapped(*args, **kwargs):
        with ctx.in_phase(phase):
            return fn(*args, **kwargs)

    return wrapped


@contextlib.contextmanager
def recording(context: int = 0):
    """Record launches and allocations inside the block (tensors on ``meta``): yields the context whose
    ``record_`` fills as it runs; ``context`` is the committed rows attention reads per sequence."""
    ctx = _Context(context)
    patches = [(eagle_kernels, name, _kernel_op(ctx, name)) for name in KERNEL_COSTS]
    patches += [(LlamaModel, "forward", _in_phase(ctx, "target", LlamaModel.forward)),
                (LlamaModel, "logits", _in_phase(ctx, "target", LlamaModel.logits)),
                (batch, "verify", _in_phase(ctx, "verify", batch.verify))]
    with _patched(patches), _Recorder(ctx), torch.no_grad():
        yield ctx


def _count_head_calls(ctx: _Context, drafter) -> list:
    """Patches on the drafter (its propose/observe run in the draft phase) and its head (calls counted)."""
    patches = [(drafter, "propose", _in_phase(ctx, "draft", drafter.propose)),
               (drafter, "observe", _in_phase(ctx, "draft", drafter.observe))]
    head = getattr(drafter, "head", None)
    if head is not None:
        step, topk = head.step, head.topk

        def counted_step(*a, **k):
            ctx.record_.head_steps += 1
            return step(*a, **k)

        def counted_topk(*a, **k):
            ctx.record_.head_topks += 1
            return topk(*a, **k)

        patches += [(head, "step", counted_step), (head, "topk", counted_topk)]
    return patches


# --------------------------------------------------------------------------------------------- steps

STEPS = {
    "vanilla": None,
    "eagle2_dynamic": ("eagle1", TreeConfig(kind="dynamic")),  # EAGLE-2: 60 nodes, depth 6, top-k 10
    "eagle1_static": ("eagle1", TreeConfig(kind="static")),  # EAGLE-1: mc_sim_7b_63
    "eagle3_dynamic": ("eagle3", TreeConfig(kind="dynamic")),
}


@dataclass
class StepModel:
    """One modelled step: what it recorded and the floor it is held to."""

    step: str
    batch: int
    record: Record
    floor_bytes: float

    def floor_seconds(self, device: Device = H100) -> float:
        return self.floor_bytes / device.bandwidth


def _weights_read(module: torch.nn.Module, skip=()) -> int:
    """Bytes of the parameters a forward reads whole (embedding tables are gathered, not read whole)."""
    seen, total = set(), 0
    for name, p in module.named_parameters():
        if id(p) in seen or any(s in name for s in skip):
            continue
        seen.add(id(p))
        total += p.numel() * p.element_size()
    return total


def _kv_bytes_per_row(cfg, layers: int, dtype: torch.dtype) -> int:
    return layers * 2 * cfg.num_key_value_heads * cfg.head_dim * torch.empty(0, dtype=dtype).element_size()


def model_step(model: str, step: str, batch_size: int, context: int = 1024, max_model_len: int | None = None,
               sampling: Mode | None = None, dtype: torch.dtype = torch.bfloat16,
               draft_vocab: int | None = None) -> StepModel:
    """Run one ``step`` (a key of :data:`STEPS`) of ``model`` at ``batch_size`` sequences each holding
    ``context`` committed tokens, on ``meta`` tensors, and record it. Caches are sized for ``max_model_len``
    (default: ``context`` + 1024). ``sampling``: a sampling :class:`Mode` (default greedy). ``draft_vocab``:
    an EAGLE-1/2 head's reduced draft vocabulary size (:meth:`Eagle1Head.reduce_vocab`; None: whole)."""
    cfg = model_config(model)
    max_len = max_model_len or context + 1024
    mode = sampling or Mode()
    with recording(context) as ctx:
        target = build_target(cfg, META, dtype)
        head = drafter = None
        if STEPS[step] is not None:
            kind, tree = STEPS[step]
            head = build_eagle_head(target, kind)
            if draft_vocab is not None and kind == "eagle1":  # reduce_vocab's checks need real ids
                head.lm_head_weight = head.lm_head_weight[:draft_vocab]
                head.draft_token_ids = torch.arange(draft_vocab, device=META)
            drafter = make_drafter("eagle", target, head, tree)
            target.fuse()
            drafter.fuse()
        else:
            target.fuse()
        state = BatchState(target, drafter, batch_size, max_len)
        target.ensure_positions(state.tcache.capacity + 1)
        if head is not None:
            head.ensure_positions(state.tcache.capacity + 1)
        ctx.start_step()  # building the model and its buffers is not the step (they stay live)
        if drafter is None:
            batch.vanilla_step(target, state, batch_size, mode)
        else:
            with _patched(_count_head_calls(ctx, drafter)):
                batch.speculative_round(target, state, batch_size, mode)
        record = ctx.record_
    kv_row = _kv_bytes_per_row(cfg, cfg.num_hidden_layers, dtype)
    floor = _weights_read(target, skip=() if cfg.tie_word_embeddings else ("embed_tokens",))
    floor += batch_size * context * kv_row
    if head is not None:
        head_layer = _weights_read(head, skip=("embed_tokens", "lm_head"))
        lm_head = head.lm_head.weight if kind == "eagle3" else head.lm_head_weight
        floor += record.head_steps * (head_layer + batch_size * context * _kv_bytes_per_row(cfg, 1, dtype))
        floor += record.head_topks * lm_head.numel() * lm_head.element_size()
    return StepModel(step, batch_size, record, floor)


def model_prefill(model: str, prompt_len: int, max_model_len: int, batch_size: int = 1,
                  head_kind: str | None = "eagle1", dtype: torch.dtype = torch.bfloat16) -> Record:
    """Record the prefill of one ``prompt_len`` prompt into a runner sized for ``batch_size`` sequences of
    ``max_model_len`` (with an EAGLE head of ``head_kind``, whose prefill runs too): its peak memory."""
    cfg = model_config(model)
    with recording(0) as ctx:
        target = build_target(cfg, META, dtype)
        drafter = None
        if head_kind is not None:
            head = build_eagle_head(target, head_kind)
            drafter = make_drafter("eagle", target, head, TreeConfig())
            drafter.fuse()
        target.fuse()
        state = BatchState(target, drafter, batch_size, max_model_len)
        target.ensure_positions(state.tcache.capacity + 1)
        if drafter is not None:
            head.ensure_positions(state.tcache.capacity + 1)
        ctx.start_step()
        ids = torch.empty(1, prompt_len, dtype=torch.long, device=META)
        lens = torch.empty(1, dtype=torch.int32, device=META)
        batch.prefill(target, state, 0, ids, lens, Mode())
        return ctx.record_


def summary_row(m: StepModel, device: Device = H100) -> dict:
    """The JSON row of a modelled step (times in ms)."""
    rec = m.record
    draft_lm = [x for x in rec.launches if x.name == "lm_head_topk" and x.phase == "draft"]
    return {
        "step": m.step,
        "batch": m.batch,
        "launches": rec.count(),
        "predicted_ms": 1e3 * rec.seconds(device, graphs=True),
        "predicted_eager_ms": 1e3 * rec.seconds(device, graphs=False),
        "floor_ms": 1e3 * m.floor_seconds(device),
        "phases_ms": {p: 1e3 * rec.seconds(device, graphs=True, phase=p) for p in PHASES},
        "draft_levels": rec.head_topks,
        "draft_lm_head_weight_reads": sum(x.weight_reads for x in draft_lm),
    }


__all__ = ["Device", "H100", "STEPS", "PHASES", "KERNEL_COSTS", "Record", "Launch", "StepModel", "recording",
           "model_step", "model_prefill", "summary_row"]
