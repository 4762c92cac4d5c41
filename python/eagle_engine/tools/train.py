"""The ``eagle train-draft`` workflow: data, target, head, training, checkpoints, evaluation.

One process, or one per rank under ``torchrun`` (data parallel, :mod:`.data_parallel`). The losses live in
:mod:`.train_losses`, the optimisation loop in :mod:`.train_loop`, the data in :mod:`.training_data`, and
cached features in :mod:`.feature_store`.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import asdict, dataclass

import torch

from ..errors import TrainingInputError
from ..models.llama import LlamaModel
from ..models.medusa import MAX_HEADS, MAX_LAYERS
from ..models.vocab import load_frequencies, most_frequent
from .checks import check_number, check_output_dir, flag
from .corpus import code_prompts, corpus_files, prompt_pool, read_documents
from .data_parallel import DataParallel, join
from .train_loop import (
    TrainConfig,
    find_checkpoint,
    load_checkpoint,
    make_optimizer,
    save_checkpoint,
    train_head,
)
from .training_data import TrainingRows, read_rows, token_frequencies

__all__ = ["DraftTrainJob", "TrainConfig", "TrainingInputError", "train_draft", "train_head"]


@dataclass
class DraftTrainJob:
    """One ``eagle train-draft`` run: train a head for ``base`` on ``corpus`` (text, ShareGPT or ``messages``
    data: ``data_format``, detected when None); write it to ``out``. ``method="eagle"``: an EAGLE head of
    ``kind``; ``method="medusa"``: ``medusa_heads`` Medusa-1 heads of ``medusa_layers`` residual blocks each
    (started from the target's lm_head, as Medusa does).

    ``out`` receives the final head (official format), ``eval.json`` and ``train_log.jsonl``;
    ``out/checkpoint`` the head, the optimizer state and the step every ``checkpoint_every`` steps
    (``resume`` continues from there, with any number of ranks). ``features``: a directory of
    ``eagle prepare-features`` to train from instead of running the target. ``eval_every``: steps between
    acceptance measurements during training (0: only at the end). ``draft_vocab_size`` (EAGLE-3): the draft
    vocabulary's size, its tokens the most frequent trained tokens (of ``token_frequencies``, a file of
    ``eagle prepare-data``, or of the training data).
    """

    base: str
    corpus: list[str] | None
    out: str
    kind: str = "eagle1"
    method: str = "eagle"
    medusa_heads: int = 4
    medusa_layers: int = 1
    steps: int = 1000
    seq_len: int = 256
    batch_size: int = 8
    accumulation_steps: int = 1
    lr: float = 1e-3
    warmup_steps: int | None = None  # None: min(100, steps // 10)
    resume: bool = False
    data_format: str | None = None
    chat_template: str | None = None
    features: str | None = None
    eval_corpus: list[str] | None = None
    eval_prompts: int = 8
    eval_prompt_chars: int = 400
    eval_new_tokens: int = 64
    eval_every: int = 0
    draft_vocab_size: int | None = None
    token_frequencies: str | None = None
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
        ints = (
            ("steps", 1),
            ("seq_len", 3 if medusa else 2),
            ("batch_size", 1),
            ("checkpoint_every", 1),
            ("eval_prompts", 0),
            ("eval_prompt_chars", 1),
            ("eval_new_tokens", 1),
            ("seed", None),
            ("medusa_heads", 1),
            ("medusa_layers", 0),
            ("accumulation_steps", 1),
            ("eval_every", 0),
        )
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
        if not self.corpus and self.features is None:
            raise TrainingInputError("no training data given (--data, or --features from prepare-features)")
        if self.corpus and self.features is not None:
            raise TrainingInputError("--data and --features both given: the features already hold their rows")
        if self.corpus:
            corpus_files(self.corpus, "--data")  # every path exists
        if self.eval_corpus is not None:
            corpus_files(self.eval_corpus, "--eval-data")
        if self.draft_vocab_size is not None:
            check_number("draft_vocab_size", self.draft_vocab_size, "int", low=1)
            if self.method != "eagle" or self.kind != "eagle3":
                raise TrainingInputError(
                    "--draft-vocab-size is for EAGLE-3 heads (--kind eagle3); EAGLE-1/2 heads reduce their "
                    "draft LM head at inference instead (eagle generate/serve --draft-vocab-size)"
                )
        if self.token_frequencies is not None and self.draft_vocab_size is None:
            raise TrainingInputError("--token-frequencies is read for --draft-vocab-size only")
        if self.eval_every and not self.eval_prompts:
            raise TrainingInputError("--eval-every needs evaluation prompts (--eval-prompts is 0)")
        if self.features is not None and not self.eval_corpus:
            for name in ("data_format", "doc_separator"):
                if getattr(self, name) is not None:
                    raise TrainingInputError(
                        f"{flag(name)} reads --data or --eval-data; --features holds its rows already"
                    )
        if not self.out:
            raise TrainingInputError("no output directory given (--out)")

    def train_config(self) -> TrainConfig:
        warm = min(100, self.steps // 10) if self.warmup_steps is None else self.warmup_steps
        return TrainConfig(
            steps=self.steps,
            lr=self.lr,
            batch_size=self.batch_size,
            warmup_steps=warm,
            seed=self.seed,
            schedule="cosine",
            accumulation_steps=self.accumulation_steps,
        )


# ------------------------------------------------------------------------------------------ evaluation

TREE_ROOM = 80  # positions an evaluation prompt leaves free for a draft tree beyond its new tokens


def evaluate_acceptance(engine, prompts: list[list[int]], new_tokens: int) -> dict:
    """Greedy speculative decoding (the head's method) of token ``prompts``: the mean acceptance length."""
    rounds, generated, seconds = [], 0, 0.0
    keep = max(1, engine.max_length - new_tokens - TREE_ROOM)  # room for the output and a tree
    for ids in prompts:
        result = engine.generate(ids[-keep:], new_tokens)
        rounds.extend(result.accept_lengths)
        generated += len(result.tokens)
        seconds += result.total_seconds
    return {
        "mean_accept_length": sum(rounds) / max(1, len(rounds)),
        "prompts": len(prompts),
        "rounds": len(rounds),
        "new_tokens": generated,
        "tokens_per_second": generated / max(seconds, 1e-9),
        "method": engine.method,
        **_settings_summary(engine),
    }


def _settings_summary(engine) -> dict:
    if engine.method == "medusa":
        heads = engine.draft
        nodes = engine.settings.tree(heads.num_heads).num_nodes
        return {"medusa": {"heads": heads.num_heads, "layers": heads.num_layers, "tree_nodes": nodes}}
    return {"tree": {k: v for k, v in asdict(engine.tree).items() if k != "choices"}}


def _chat_prompts(tokenizer, paths, job: DraftTrainJob, fmt: str | None) -> list[list[int]]:
    """Evaluation prompts from conversations: each rendered up to its first assistant turn, with the
    generation prompt (seeded choice of ``job.eval_prompts`` conversations)."""
    import random

    from jinja2 import TemplateError

    from .conversations import read_conversations

    flag_name = "--eval-data" if job.eval_corpus else "--data"
    found = read_conversations(paths, fmt, flag_name)
    order = list(range(len(found.conversations)))
    random.Random(job.seed).shuffle(order)
    prompts = []
    for i in order:  # distinct conversations while there are enough
        messages = found.conversations[i].messages
        first = next(i for i, m in enumerate(messages) if m["role"] == "assistant")
        try:
            text = tokenizer.apply_chat_template(messages[:first], tokenize=False, add_generation_prompt=True)
        except TemplateError:
            continue  # the template refuses this conversation (e.g. no system role): another one
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if ids:
            prompts.append(ids)
        if len(prompts) == job.eval_prompts:
            break
    if not prompts:
        raise TrainingInputError(
            f"{flag_name}: no conversation gives an evaluation prompt (--eval-prompts 0 skips the evaluation)"
        )
    return [prompts[i % len(prompts)] for i in range(job.eval_prompts)]


def _say(job: DraftTrainJob, dp: DataParallel, line: str) -> None:
    if job.show_progress and dp.is_main:
        print(f"train-draft: {line}", file=sys.stderr)


# --------------------------------------------------------------------------------------------- checks


@dataclass
class PreparedJob:
    """What :func:`prepare_job` checked and built before the first training step."""

    tokenizer: object
    rows: TrainingRows | None  # None: the rows come from --features
    eval_prompts: list[list[int]]
    report: dict


def prepare_job(job: DraftTrainJob, dp: DataParallel | None = None) -> PreparedJob:
    """Every check that can fail, before any training step: the model directory and its tokenizer, --seq-len
    against the model's max_position_embeddings, the data (readable, non-empty, enough tokens; rendered with
    the chat template for conversations), the evaluation prompts, a writable --out. Reports what was used,
    cut and skipped on stderr."""
    from .common import check_model_dir, load_tokenizer

    dp = dp or DataParallel()
    config = check_model_dir(job.base)
    if job.seq_len > config.max_length:
        raise TrainingInputError(
            f"--seq-len {job.seq_len} exceeds the model's maximum length {config.max_length} "
            f"(max_position_embeddings {config.max_position_embeddings} in {job.base}/config.json): "
            f"use --seq-len <= {config.max_length}"
        )
    tokenizer = load_tokenizer(job.base)
    rows, report = None, {}
    if job.corpus:
        rows = read_rows(
            tokenizer,
            job.corpus,
            job.seq_len,
            data_format=job.data_format,
            doc_separator=job.doc_separator,
            chat_template=job.chat_template,
            model_dir=job.base,
        )
        report = dict(rows.report)
        _say(job, dp, f"data: {json.dumps(report)}")
    elif job.chat_template is not None:
        from .chat_template import apply_template_file

        apply_template_file(tokenizer, job.chat_template, job.base)
    if job.draft_vocab_size is not None and job.draft_vocab_size > config.vocab_size:
        raise TrainingInputError(
            f"--draft-vocab-size {job.draft_vocab_size} exceeds the model's vocabulary of {config.vocab_size}"
        )
    if job.token_frequencies is not None:
        load_frequencies(job.token_frequencies, config.vocab_size)  # readable, of this vocabulary
    prompts = []
    if job.eval_prompts:
        prompts = _evaluation_prompts(job, tokenizer, report, dp)
        report["eval_prompts"] = len(prompts)
    check_output_dir(job.out)
    return PreparedJob(tokenizer, rows, prompts, report)


def _evaluation_prompts(job: DraftTrainJob, tokenizer, report: dict, dp: DataParallel) -> list[list[int]]:
    """Token prompts the acceptance is measured on, from --eval-data or the training data."""
    from .conversations import detect_format

    paths = job.eval_corpus or job.corpus
    if not paths:
        raise TrainingInputError(
            "training from --features: give --eval-data to measure the acceptance on, or --eval-prompts 0"
        )
    fmt = job.data_format or detect_format(paths, "--eval-data" if job.eval_corpus else "--data")
    if fmt != "text":
        from .chat_template import apply_template_file

        apply_template_file(tokenizer, job.chat_template, job.base)
        return _chat_prompts(tokenizer, paths, job, fmt)
    texts = _check_evaluation(job, paths, report, dp)
    chosen = code_prompts(texts, job.eval_prompts, job.eval_prompt_chars, seed=job.seed)
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in chosen]


def _check_evaluation(job: DraftTrainJob, paths, report: dict, dp: DataParallel) -> list[str]:
    """The texts evaluation prompts are cut from; raise naming the flags when there are none."""
    source = read_documents(paths, job.doc_separator, "--eval-data" if job.eval_corpus else "--data")
    flag_name = "--eval-data" if job.eval_corpus else "--data (used for evaluation without --eval-data)"
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
    report["eval_texts"] = len(pool)
    _say(
        job,
        dp,
        f"evaluation prompts: cut from {len(pool)} of {len(source.documents)} document(s) "
        f"({skipped} shorter than {need} characters skipped; {source.describe()})",
    )
    return pool


# ------------------------------------------------------------------------------------------- the run


def _initial_head(job: DraftTrainJob, target: LlamaModel, rows: TrainingRows):
    """The head a fresh run starts from, in fp32: Medusa's start (the target's lm_head, identity blocks)
    or a small random EAGLE head (EAGLE-3 with ``--draft-vocab-size``: over the most frequent tokens)."""
    from ..models.draft import init_random_head
    from ..models.medusa import init_random_medusa

    if job.method == "medusa":
        return init_random_medusa(target, job.medusa_heads, job.medusa_layers, from_lm_head=True).float()
    vocab = job.draft_vocab_size
    head = init_random_head(job.kind, target, seed=job.seed, std=0.02, draft_vocab=vocab).float()
    if vocab is not None:
        size = target.config.vocab_size
        if job.token_frequencies is not None:
            counts = load_frequencies(job.token_frequencies, size)
        else:
            counts = token_frequencies(rows, size)
        head.set_draft_vocab(most_frequent(counts, vocab))
    return head


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
    if job.draft_vocab_size is not None and head.lm_head.out_features != job.draft_vocab_size:
        raise TrainingInputError(
            f"--resume: the checkpoint's draft vocabulary has {head.lm_head.out_features} tokens; this run "
            f"asks for --draft-vocab-size {job.draft_vocab_size}"
        )


class _Evaluator:
    """Held-out acceptance of the head as it trains: saved and loaded as the engine loads it, then decoded
    greedily by ``target`` (the whole model; rank 0 only)."""

    def __init__(self, job: DraftTrainJob, target: LlamaModel | None, prompts: list[list[int]]):
        self.job, self.target, self.prompts = job, target, prompts

    def __call__(self, head) -> dict:
        from ..engine.engine import EagleEngine
        from ..models.loading import load_draft, save_draft

        where = os.path.join(self.job.out, "eval-head.tmp")
        save_draft(head, where)
        engine = EagleEngine(self.target, load_draft(where, self.target))
        try:
            return evaluate_acceptance(engine, self.prompts, self.job.eval_new_tokens)
        finally:
            engine.close()
            shutil.rmtree(where, ignore_errors=True)


def _keep_log(path: str, step: int) -> None:
    """Start ``train_log.jsonl`` afresh (``step`` 0) or keep its records up to a resumed ``step``."""
    kept = []
    if step and os.path.isfile(path):
        with open(path) as f:
            kept = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= step]
    with open(path, "w") as f:
        f.writelines(kept)


def _log(path: str, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def train_draft(job: DraftTrainJob) -> dict:
    """The ``eagle train-draft`` workflow (see :class:`DraftTrainJob`); returns what ``eval.json`` holds
    (every rank returns it; only rank 0 writes it).

    Everything that can be checked is checked before the first step (:func:`prepare_job`)."""
    from tqdm import tqdm

    from ..engine.engine import resolve_device
    from ..models import load_target
    from ..models.loading import load_output_layers, save_draft
    from .feature_store import FeatureStore

    dp, device = join(resolve_device(job.device))
    prep = prepare_job(job, dp)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    evaluated = None  # the whole target the evaluation runs (rank 0 only)
    if job.features is not None:
        target = load_output_layers(job.base, device=device, dtype=dtype)
        features = FeatureStore(job.features, target, job.kind if job.method == "eagle" else "medusa")
        rows = features.rows
        prep.report = {**features.rows.report, **prep.report}
        _say(job, dp, f"features: {len(rows)} cached rows from {job.features}")
        if job.eval_prompts and dp.is_main:
            evaluated = load_target(job.base, device=device, dtype=dtype)
            evaluated.fuse()
    else:
        target = load_target(job.base, device=device, dtype=dtype)
        target.fuse()  # as the evaluation's engine runs it (and prepare-features): one matmul path throughout
        features, rows, evaluated = None, prep.rows, target
    cfg = job.train_config()
    if rows.ids.shape[1] < 3 and job.method == "medusa":
        raise TrainingInputError("Medusa heads need rows of at least 3 tokens")
    ckpt = os.path.join(job.out, "checkpoint")
    found = find_checkpoint(ckpt) if job.resume else None
    if found is not None:
        head, optimizer, start, losses = load_checkpoint(found, target, cfg)
        _check_resumed(head, job)
    else:
        if job.resume:
            _say(job, dp, f"--resume: no checkpoint in {ckpt}; starting from step 0")
        head = _initial_head(job, target, rows)
        optimizer, start, losses = make_optimizer(head, cfg), 0, []
    dp.check_same(start, "the step to resume from")
    log_path = os.path.join(job.out, "train_log.jsonl")
    if dp.is_main:
        _keep_log(log_path, start)
    global_batch = cfg.batch_size * dp.world * cfg.accumulation_steps
    _say(
        job,
        dp,
        f"{len(rows)} rows of {rows.ids.shape[1]} tokens; global batch {global_batch} = "
        f"{cfg.batch_size} per rank x {dp.world} rank(s) x {cfg.accumulation_steps} accumulation step(s)",
    )
    evaluate = _Evaluator(job, evaluated, prep.eval_prompts)
    bar = tqdm(
        total=job.steps,
        initial=start,
        desc="train-draft",
        file=sys.stderr,
        disable=not (job.show_progress and dp.is_main),
        mininterval=2,
    )
    evaluations = []

    def progress(step: int, loss: float) -> None:
        losses.append(loss)
        bar.update(1)
        done = step + 1
        record = {"step": done, "loss": loss, "lr": cfg.lr_at(step)}
        if job.eval_every and job.eval_prompts and done % job.eval_every == 0 and done < job.steps:
            if dp.is_main:
                record["eval"] = evaluate(head)
                evaluations.append(record["eval"] | {"step": done})
                bar.set_postfix(
                    loss=f"{loss:.4f}", accept=f"{record['eval']['mean_accept_length']:.2f}", refresh=False
                )
            dp.barrier()
        else:
            bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        if dp.is_main:
            _log(log_path, record)
        if done % job.checkpoint_every == 0 or done == job.steps:
            if dp.is_main:
                save_checkpoint(head, optimizer, done, losses, ckpt)
            dp.barrier()

    if start < job.steps:
        train_head(
            head,
            target,
            rows,
            cfg,
            progress=progress,
            start_step=start,
            optimizer=optimizer,
            features=features,
            data_parallel=dp,
        )
    bar.close()
    held_out = job.eval_corpus is not None
    summary = {
        "steps": job.steps,
        "final_loss": losses[-1] if losses else None,
        "held_out": held_out,
        "ranks": dp.world,
        "global_batch": global_batch,
        "inputs": prep.report,
    }
    if dp.is_main:
        save_draft(head, job.out)
        if job.eval_prompts:
            summary.update(evaluate(head))
            summary["during_training"] = evaluations
            _log(log_path, {"step": job.steps, "eval": {k: v for k, v in summary.items() if k != "inputs"}})
            _say(job, dp, f"mean acceptance length: {summary['mean_accept_length']:.2f}")
        with open(os.path.join(job.out, "eval.json"), "w") as f:
            json.dump(summary, f, indent=2)
    dp.barrier()
    return summary
