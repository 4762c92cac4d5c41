"""Training EAGLE draft heads on a target's own features.

EAGLE-1/2 (eagle-facts.md): the head reads ``(feature_i, token_{i+1})`` and predicts ``feature_{i+1}``;
loss ``feature_weight * SmoothL1(pred, f_{i+1}) + ce_weight * CE(lm_head(pred), softmax(lm_head(f_{i+1})))``
with uniform noise on the input features, AdamW(0.9, 0.95), warm-up then constant, gradient clipping.
EAGLE-3: the head reads ``(fc(aux_i), token_{i+1})`` and is trained by cross-entropy against the target's
next-token distribution, unrolled over ``unroll`` steps that feed back its own output (training-time test),
the i-th step weighted ``0.8 ** i``.
Medusa-1 heads (:func:`medusa_loss`): head ``i`` reads the target's feature at ``t`` and is trained by
cross-entropy against the text's token at ``t + i + 2``, weighted ``0.8 ** i``.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import sys
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

import eagle_kernels as ops

from ..errors import TrainingInputError
from ..models.draft import Eagle1Head, Eagle3Head
from ..models.llama import LlamaModel
from ..models.medusa import MAX_HEADS, MAX_LAYERS
from .checks import check_number, check_output_dir, flag
from .corpus import code_prompts, corpus_files, prompt_pool, read_documents, token_stream


@dataclass
class TrainConfig:
    """Optimisation settings (published EAGLE values where they apply; tiny models want a larger lr)."""

    steps: int = 1000
    lr: float = 3e-4
    batch_size: int = 4
    warmup_steps: int = 100
    feature_weight: float = 1.0
    ce_weight: float = 0.1
    noise: float = 0.2  # uniform noise U(-noise/2, noise/2) added to input features
    grad_clip: float = 0.5
    unroll: int = 3  # EAGLE-3 training-time-test steps
    seed: int = 0
    schedule: str = "constant"  # after warm-up: "constant" (published) or "cosine" (decay to 10% of lr)

    def __post_init__(self):
        check_number("steps", self.steps, "int", low=0)
        check_number("batch_size", self.batch_size, "int", low=1)
        check_number("warmup_steps", self.warmup_steps, "int", low=0)
        check_number("unroll", self.unroll, "int", low=1)
        check_number("seed", self.seed, "int")
        check_number("lr", self.lr, "float", positive=True)
        for name in ("feature_weight", "ce_weight", "noise", "grad_clip"):
            check_number(name, getattr(self, name), "float", low=0)
        if self.schedule not in ("constant", "cosine"):
            raise TrainingInputError(f"unknown lr schedule {self.schedule!r}: use 'constant' or 'cosine'")

    def lr_at(self, step: int) -> float:
        """Learning rate of 0-based ``step``: linear warm-up, then constant or cosine decay to 10%."""
        warm = min(1.0, (step + 1) / max(1, self.warmup_steps))
        if self.schedule == "constant" or step < self.warmup_steps:
            return self.lr * warm
        t = (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps)
        return self.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, t))))


@dataclass
class FeatureBatch:
    """Teacher-forcing data for one batch of equal-length sequences: ``ids`` long ``[B, T]``, ``hidden``
    ``[B, T, H]`` (the target's top-layer features), ``aux`` ``[B, T, 3H]`` or None, ``target_logp`` fp32
    ``[B, T, V]``: the target's next-token log-distribution after each position (None when not asked for:
    Medusa's loss uses the text's tokens)."""

    ids: torch.Tensor
    hidden: torch.Tensor
    aux: torch.Tensor | None
    target_logp: torch.Tensor | None


@torch.no_grad()
def collect_features(target: LlamaModel, ids: torch.Tensor, aux_layers: tuple[int, ...] = (),
                     with_logp: bool = True) -> FeatureBatch:
    """Run the target over ``ids`` long ``[B, T]`` (no padding) and keep what training needs (the
    full-vocabulary ``target_logp`` only ``with_logp``)."""
    b, t = ids.shape
    cache = target.allocate_cache(b, t)
    target.ensure_positions(t)
    out = target(ids, torch.arange(t, device=ids.device).expand(b, t), cache, None, aux_layers)
    logp = torch.log_softmax(target.logits(out.hidden), -1) if with_logp else None
    return FeatureBatch(ids, out.hidden.float(), None if out.aux is None else out.aux.float(), logp)


def _run_head(head, tokens, features):
    """Causal head forward over fresh caches, with autograd (reference ops)."""
    b, t = tokens.shape
    cache = head.allocate_cache(b, t)
    head.ensure_positions(t)
    positions = torch.arange(t, device=tokens.device).expand(b, t)
    return head.step(tokens, features, positions, cache)


def medusa_loss(heads, batch: FeatureBatch, decay: float = 0.8) -> torch.Tensor:
    """Medusa-1's loss: ``sum_i decay ** i * CE(head_i(f_t), x_{t+i+2})`` over positions ``t`` that have
    that token, ``decay`` the official ``medusa_decay_coefficient``.

    Labels are the text's own tokens, as in Medusa-1 (whose data is the target's own generations, so that
    they are the target's next tokens); the target's soft distribution after ``t + i + 1`` would be the
    self-distillation alternative. The heads see the target's features exactly (no noise)."""
    b, t, h = batch.hidden.shape
    features = heads.features(batch.hidden.to(heads.projection(0).dtype).reshape(b * t, h)).view(-1, b, t, h)
    loss = 0.0
    for i in range(min(heads.num_heads, t - 2)):
        n = t - (i + 2)  # positions whose token i + 2 ahead is in the sequence
        logits = F.linear(features[i, :, :n], heads.projection(i)).float()
        loss = loss + decay**i * F.cross_entropy(logits.flatten(0, 1), batch.ids[:, i + 2 :].flatten())
    return loss


def head_loss(head, target: LlamaModel, batch: FeatureBatch, cfg: TrainConfig) -> torch.Tensor:
    """The training loss of ``head`` on one batch (see the module docstring)."""
    if getattr(head, "kind", "") == "medusa":
        return medusa_loss(head, batch)
    tokens = batch.ids[:, 1:]  # row i pairs position i's feature with token i + 1
    target_logp = batch.target_logp[:, 1:]  # the distribution row i must predict (after token i + 1)
    dtype = head.fc.weight.dtype
    if isinstance(head, Eagle1Head):
        feats = batch.hidden[:, :-1]
        noisy = feats + (torch.rand_like(feats) - 0.5) * cfg.noise
        pred = _run_head(head, tokens, noisy.to(dtype)).float()
        feature_loss = F.smooth_l1_loss(pred, batch.hidden[:, 1:])
        logp = torch.log_softmax(F.linear(pred, target.lm_head_weight.float()), -1)
        ce = -(target_logp.exp() * logp).sum(-1).mean()
        return cfg.feature_weight * feature_loss + cfg.ce_weight * ce
    assert isinstance(head, Eagle3Head)
    feats = head.fc(batch.aux[:, :-1].to(dtype))
    loss = 0.0
    for i in range(cfg.unroll):
        n = tokens.shape[1] - i
        if n <= 0:
            break
        pred = _run_head(head, tokens[:, i:], feats[:, :n])
        logp = torch.log_softmax(head.lm_head(head.norm(pred)).float(), -1)
        goal = _to_draft_vocab(head, target_logp[:, i:]).exp()
        loss = loss + (0.8**i) * -(goal * logp).sum(-1).mean()
        feats = pred[:, :-1]  # the next step reads the head's own prediction (training-time test)
    return loss


def _to_draft_vocab(head: Eagle3Head, logp: torch.Tensor) -> torch.Tensor:
    """Target log-probs ``[..., V]`` -> renormalised log-probs over the draft vocabulary ``[..., Vd]``."""
    draft_ids = torch.arange(head.d2t.numel(), device=logp.device) + head.d2t
    return torch.log_softmax(logp[..., draft_ids], -1)


def trainable_parameters(head) -> list[torch.nn.Parameter]:
    """The head's trained parameters, in a fixed order (a borrowed target embedding stays frozen)."""
    return [p for n, p in head.named_parameters() if n != "embed_tokens.weight" or head.owns_embedding]


def make_optimizer(head, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW(0.9, 0.95) over :func:`trainable_parameters` (the published EAGLE setting)."""
    return torch.optim.AdamW(trainable_parameters(head), lr=cfg.lr, betas=(0.9, 0.95))


def train_head(
    head,
    target: LlamaModel,
    sequences: torch.Tensor,
    cfg: TrainConfig,
    *,
    progress=None,
    start_step: int = 0,
    optimizer=None,
):
    """Train ``head`` in place on long ``[N, T]`` token sequences; returns ``(losses, optimizer)``.

    ``progress(step, loss)`` is called after each step (a progress bar, checkpoints). The target's features
    are computed per batch under no_grad; the head runs the reference ops so that autograd flows.
    """
    rng = random.Random(cfg.seed + start_step)
    params = trainable_parameters(head)
    for p in params:
        p.requires_grad_(True)
    if optimizer is None:
        optimizer = make_optimizer(head, cfg)
    aux_layers = head.aux_layers(target.config.num_hidden_layers)
    with_logp = getattr(head, "kind", "") != "medusa"  # Medusa learns the text's tokens (medusa_loss)
    head.train()
    losses = []
    with ops.reference_backend():
        for step in range(start_step, cfg.steps):
            for group in optimizer.param_groups:
                group["lr"] = cfg.lr_at(step)
            rows = [rng.randrange(sequences.shape[0]) for _ in range(cfg.batch_size)]
            batch = collect_features(target, sequences[rows], aux_layers, with_logp)
            loss = head_loss(head, target, batch, cfg)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            optimizer.step()
            losses.append(float(loss.detach()))
            if progress is not None:
                progress(step, losses[-1])
    head.eval()
    for p in params:
        p.requires_grad_(False)
    if not all(math.isfinite(x) for x in losses):
        raise FloatingPointError("training diverged: non-finite loss")
    return losses, optimizer


# ------------------------------------------------------------------------------------- the workflow


@dataclass
class DraftTrainJob:
    """One ``eagle train-draft`` run: train a head for ``base`` on the text files ``corpus``; write it to
    ``out``. ``method="eagle"``: an EAGLE head of ``kind``; ``method="medusa"``: ``medusa_heads`` Medusa-1
    heads of ``medusa_layers`` residual blocks each (started from the target's lm_head, as Medusa does).

    ``out`` receives the final head (official format) and ``eval.json``; ``out/checkpoint`` the head, the
    optimizer state and the step every ``checkpoint_every`` steps (``resume`` continues from there).
    ``eval_corpus``: text files the held-out acceptance is measured on (None: the training corpus itself).
    """

    base: str
    corpus: list[str]
    out: str
    kind: str = "eagle1"
    method: str = "eagle"
    medusa_heads: int = 4
    medusa_layers: int = 1
    steps: int = 1000
    seq_len: int = 256
    batch_size: int = 8
    lr: float = 1e-3
    warmup_steps: int | None = None  # None: min(100, steps // 10)
    resume: bool = False
    eval_corpus: list[str] | None = None
    eval_prompts: int = 8
    eval_prompt_chars: int = 400
    eval_new_tokens: int = 64
    doc_separator: str | None = None
    checkpoint_every: int = 100
    device: str = "cpu"
    seed: int = 0
    show_progress: bool = True

    def __post_init__(self):
        if self.method not in ("eagle", "medusa"):
            raise TrainingInputError(f"unknown method {self.method!r} (--method): use eagle or medusa")
        if self.kind not in ("eagle1", "eagle3"):
            raise TrainingInputError(f"unknown head kind {self.kind!r} (--kind): use eagle1 or eagle3")
        medusa = self.method == "medusa"
        ints = (("steps", 1), ("seq_len", 3 if medusa else 2), ("batch_size", 1), ("checkpoint_every", 1),
                ("eval_prompts", 0), ("eval_prompt_chars", 1), ("eval_new_tokens", 1), ("seed", None),
                ("medusa_heads", 1), ("medusa_layers", 0))  # fmt: skip
        for name, low in ints:
            check_number(name, getattr(self, name), "int", low=low)
        for name, most in (("medusa_heads", MAX_HEADS), ("medusa_layers", MAX_LAYERS)):
            value = getattr(self, name)
            if value > most:
                raise TrainingInputError(f"{name} ({flag(name)}) must be <= {most}, got {value}")
        if self.warmup_steps is not None:
            check_number("warmup_steps", self.warmup_steps, "int", low=0)
        check_number("lr", self.lr, "float", positive=True)
        if isinstance(self.corpus, str) or isinstance(self.eval_corpus, str):
            raise TrainingInputError("corpus and eval_corpus are lists of paths, not one string")
        if not self.corpus:
            raise TrainingInputError("no corpus given (--corpus)")
        corpus_files(self.corpus, "--corpus")  # every path exists
        if self.eval_corpus is not None:
            corpus_files(self.eval_corpus, "--eval-corpus")
        if not self.out:
            raise TrainingInputError("no output directory given (--out)")

    def train_config(self) -> TrainConfig:
        warm = min(100, self.steps // 10) if self.warmup_steps is None else self.warmup_steps
        return TrainConfig(
            steps=self.steps, lr=self.lr, batch_size=self.batch_size, warmup_steps=warm,
            seed=self.seed, schedule="cosine",
        )  # fmt: skip


def make_sequences(tokenizer, texts: list[str], seq_len: int) -> torch.Tensor:
    """Tokenize ``texts`` into one stream (:func:`~.corpus.token_stream`: BOS at every document start when the
    tokenizer has one) and cut it into non-overlapping rows: long ``[N, seq_len]``."""
    stream = token_stream(tokenizer, texts)
    n = len(stream) // seq_len
    if n == 0:
        raise TrainingInputError(
            f"the corpus has {len(stream)} tokens: fewer than one sequence of --seq-len {seq_len}; "
            "give more text or a smaller --seq-len"
        )
    return torch.tensor(stream[: n * seq_len], dtype=torch.long).view(n, seq_len)


def save_checkpoint(head, optimizer, step: int, losses: list[float], directory: str) -> None:
    """Head (official format) + ``trainer_state.pt`` (step, optimizer state, losses), replaced atomically."""
    from ..models.loading import save_draft

    tmp = directory + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_draft(head, tmp)
    torch.save(
        {"step": step, "optimizer": optimizer.state_dict(), "losses": losses}, f"{tmp}/trainer_state.pt"
    )
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(tmp, directory)


def load_checkpoint(directory: str, target: LlamaModel, cfg: TrainConfig):
    """``(head, optimizer, step, losses)`` from :func:`save_checkpoint`'s directory."""
    from ..models.loading import load_draft

    head = load_draft(directory, target, dtype=torch.float32)
    state = torch.load(f"{directory}/trainer_state.pt", map_location=target.lm_head_weight.device)
    optimizer = make_optimizer(head, cfg)
    optimizer.load_state_dict(state["optimizer"])
    return head, optimizer, int(state["step"]), list(state["losses"])


def evaluate_acceptance(engine, tokenizer, texts: list[str], job: DraftTrainJob) -> dict:
    """Greedy speculative decoding (the head's method) on ``job.eval_prompts`` prompts cut from ``texts``:
    the mean acceptance length."""

    prompts = code_prompts(texts, job.eval_prompts, job.eval_prompt_chars, seed=job.seed)
    rounds, new_tokens, seconds = [], 0, 0.0
    keep = max(1, engine.max_length - job.eval_new_tokens - TREE_ROOM)  # room for the output and a tree
    for text in prompts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][-keep:]
        result = engine.generate(ids, job.eval_new_tokens)
        rounds.extend(result.accept_lengths)
        new_tokens += len(result.tokens)
        seconds += result.total_seconds
    return {
        "mean_accept_length": sum(rounds) / max(1, len(rounds)),
        "prompts": len(prompts),
        "rounds": len(rounds),
        "new_tokens": new_tokens,
        "tokens_per_second": new_tokens / max(seconds, 1e-9),
        "method": engine.method,
        **_settings_summary(engine),
    }


def _settings_summary(engine) -> dict:
    if engine.method == "medusa":
        heads = engine.draft
        nodes = engine.settings.tree(heads.num_heads).num_nodes
        return {"medusa": {"heads": heads.num_heads, "layers": heads.num_layers, "tree_nodes": nodes}}
    return {"tree": {k: v for k, v in asdict(engine.tree).items() if k != "choices"}}


TREE_ROOM = 80  # positions an evaluation prompt leaves free for a draft tree beyond its new tokens


@dataclass
class PreparedJob:
    """What :func:`prepare_job` checked and built before the first training step."""

    tokenizer: object
    sequences: torch.Tensor
    eval_texts: list[str]
    report: dict


def _say(job: DraftTrainJob, line: str) -> None:
    if job.show_progress:
        print(f"train-draft: {line}", file=sys.stderr)


def prepare_job(job: DraftTrainJob) -> PreparedJob:
    """Every check that can fail, before any training step: the model directory and its tokenizer, --seq-len
    against the model's max_position_embeddings, the corpora (readable, non-empty, enough tokens), the
    evaluation prompts (some text long enough to cut them from), a writable --out.
    Reports documents used and skipped on stderr."""
    from .common import check_model_dir, load_tokenizer

    config = check_model_dir(job.base)
    if job.seq_len > config.max_length:
        raise TrainingInputError(
            f"--seq-len {job.seq_len} exceeds the model's maximum length {config.max_length} "
            f"(max_position_embeddings {config.max_position_embeddings} in {job.base}/config.json): "
            f"use --seq-len <= {config.max_length}"
        )
    tokenizer = load_tokenizer(job.base)
    corpus = read_documents(job.corpus, job.doc_separator, "--corpus")
    report = {"corpus": corpus.describe()}
    _say(job, f"corpus: {report['corpus']}")
    sequences = make_sequences(tokenizer, corpus.documents, job.seq_len)
    report["sequences"] = int(sequences.shape[0])
    _say(job, f"{sequences.shape[0]} training sequences of {job.seq_len} tokens")
    eval_texts = []
    if job.eval_prompts:
        eval_texts = _check_evaluation(job, corpus)
        report["eval_texts"] = len(eval_texts)
    check_output_dir(job.out)
    return PreparedJob(tokenizer, sequences, eval_texts, report)


def _check_evaluation(job: DraftTrainJob, corpus) -> list[str]:
    """The texts evaluation prompts are cut from; raise naming the flags when there are none."""
    source = corpus if job.eval_corpus is None else read_documents(job.eval_corpus, job.doc_separator,
                                                                     "--eval-corpus")  # fmt: skip
    flag_name = "--corpus (used for evaluation without --eval-corpus)" if job.eval_corpus is None else (
        "--eval-corpus")  # fmt: skip
    pool = prompt_pool(source.documents, job.eval_prompt_chars)
    need = 2 * job.eval_prompt_chars
    if not pool:
        longest = max(len(t) for t in source.documents)
        raise TrainingInputError(
            f"{flag_name}: no text of at least {need} characters (2 x --eval-prompt-chars "
            f"{job.eval_prompt_chars}) to cut evaluation prompts from; the longest has {longest}. Lower "
            "--eval-prompt-chars, give longer texts, or skip the evaluation with --eval-prompts 0"
        )
    skipped = len(source.documents) - len(pool)
    _say(job, f"evaluation prompts: cut from {len(pool)} of {len(source.documents)} document(s) "
              f"({skipped} shorter than {need} characters skipped; {source.describe()})")  # fmt: skip
    return pool


def _initial_head(job: DraftTrainJob, target: LlamaModel):
    """The head a fresh run starts from, in fp32: Medusa's start (the target's lm_head, identity blocks)
    or a small random EAGLE head."""
    from ..models.draft import init_random_head
    from ..models.medusa import init_random_medusa

    if job.method == "medusa":
        return init_random_medusa(target, job.medusa_heads, job.medusa_layers, from_lm_head=True).float()
    return init_random_head(job.kind, target, seed=job.seed, std=0.02).float()


def _check_resumed(head, job: DraftTrainJob) -> None:
    """A checkpoint resumed by a job asking for another head is an error, not a silent switch."""

    def name(kind: str, num_heads: int = 0, num_layers: int = 0) -> str:
        return f"medusa ({num_heads} heads, {num_layers} layers)" if kind == "medusa" else kind

    found = name(head.kind, *((head.num_heads, head.num_layers) if head.kind == "medusa" else ()))
    asked = name(job.kind if job.method == "eagle" else "medusa", job.medusa_heads, job.medusa_layers)
    if found != asked:
        raise TrainingInputError(
            f"--resume: the checkpoint in {job.out}/checkpoint holds a {found} head; this run asks for "
            f"{asked}"
        )


def train_draft(job: DraftTrainJob) -> dict:
    """The ``eagle train-draft`` workflow (see :class:`DraftTrainJob`); returns what ``eval.json`` holds.

    Everything that can be checked is checked before the first step (:func:`prepare_job`)."""
    from tqdm import tqdm

    from ..engine.engine import EagleEngine, resolve_device
    from ..models import load_target
    from ..models.loading import load_draft, save_draft

    device = resolve_device(job.device)
    prep = prepare_job(job)
    tokenizer, sequences = prep.tokenizer, prep.sequences
    target = load_target(job.base, device=device, dtype=torch.float32)
    cfg = job.train_config()
    ckpt = os.path.join(job.out, "checkpoint")
    if job.resume and os.path.isfile(os.path.join(ckpt, "trainer_state.pt")):
        head, optimizer, start, losses = load_checkpoint(ckpt, target, cfg)
        _check_resumed(head, job)
    else:
        head = _initial_head(job, target)
        optimizer, start, losses = make_optimizer(head, cfg), 0, []
    torch.manual_seed(job.seed + start)  # feature noise
    bar = tqdm(total=job.steps, initial=start, desc="train-draft", file=sys.stderr,
               disable=not job.show_progress, mininterval=2)  # fmt: skip

    def progress(step: int, loss: float) -> None:
        losses.append(loss)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        if (step + 1) % job.checkpoint_every == 0 or step + 1 == job.steps:
            save_checkpoint(head, optimizer, step + 1, losses, ckpt)

    if start < job.steps:
        train_head(head, target, sequences.to(device), cfg, progress=progress, start_step=start,
                   optimizer=optimizer)  # fmt: skip
    bar.close()
    save_draft(head, job.out)
    held_out = job.eval_corpus is not None
    summary = {"steps": job.steps, "final_loss": losses[-1] if losses else None, "held_out": held_out}
    summary["inputs"] = prep.report
    if job.eval_prompts:
        engine = EagleEngine(target, load_draft(job.out, target))
        summary.update(evaluate_acceptance(engine, tokenizer, prep.eval_texts, job))
        _say(job, f"mean acceptance length: {summary['mean_accept_length']:.2f}")
    with open(os.path.join(job.out, "eval.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary
