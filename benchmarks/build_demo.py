"""Rebuild the embedded demo pair from a seed: a small Llama target trained on Python's standard library,
its EAGLE-1/2 head and its EAGLE-3 head.

    python benchmarks/build_demo.py                       # CPU preset (2 cores: about an hour)
    python benchmarks/build_demo.py --stages head3        # only the EAGLE-3 head, on the shipped target
    python benchmarks/build_demo.py --preset gpu --device cuda --out /some/dir

Stages (all by default; ``--stages target``, ``--stages head`` or ``--stages head3`` run one of them):

1. ``target``: train a byte-level BPE tokenizer (``tokenizers``) on the training split of the standard
   library (see :mod:`eagle_engine.demo` for the split), train a ``LlamaForCausalLM`` on random windows of
   the tokenized corpus (AdamW, warm-up then cosine decay), save it in fp16 safetensors with the tokenizer
   to ``OUT/target``.
2. ``head``: train an EAGLE-1/2 head on the target's features with :func:`eagle_engine.train.train_draft`
   (the ``eagle train-draft`` workflow: checkpoints under ``WORK/head/checkpoint``, acceptance on held-out
   modules in ``WORK/head/eval.json``), then save it in fp16 in the official format to ``OUT/head``.
3. ``head3``: the same workflow with ``kind="eagle3"`` (features of three target layers, cross-entropy
   against the target's next-token distribution, training-time test over 3 steps; draft vocabulary = the
   target's, ``d2t`` all zero), saved in fp16 in the official EAGLE-3 format to ``OUT/head3``.

Each head stage merges its settings and its held-out evaluation into ``OUT/build.json`` (``head_eval``,
``head3_*`` and ``head3_eval``), keeping what the other stages wrote.

Transformers is used here for training the target only; the engine never runs transformers modules.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "python"))
sys.path.insert(0, ROOT)

from eagle_engine.tools import corpus, demo  # noqa: E402
from eagle_engine.tools.corpus import read_corpus  # noqa: E402


@dataclass
class Preset:
    """Sizes and schedules of one build."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    layers: int
    heads: int
    kv_heads: int
    max_positions: int
    target_steps: int
    target_batch: int
    target_seq_len: int
    target_lr: float
    head_steps: int
    head_batch: int
    head_seq_len: int
    head_lr: float
    eval_prompts: int
    head3_steps: int
    head3_batch: int
    head3_seq_len: int
    head3_lr: float

    def __post_init__(self):
        counts = (self.target_steps, self.head_steps, self.head3_steps, self.target_batch, self.head_batch,
                  self.head3_batch)  # fmt: skip
        if min(counts) < 1:
            raise ValueError(f"bad preset: {self}")
        if max(self.target_seq_len, self.head_seq_len, self.head3_seq_len) > self.max_positions:
            raise ValueError("sequence length beyond max_position_embeddings")


# head3 (EAGLE-3): each step unrolls the head 3 times (training-time test), about twice an EAGLE-1/2 step on a
# CPU (about 1.8 s at 6 x 384 tokens, one thread): the CPU preset's 550 steps took 19 minutes, eval included.
# fmt: off
PRESETS = {
    "cpu": Preset(4096, 256, 512, 4, 4, 2, 1024, 1600, 4, 512, 2e-3, 1000, 6, 384, 2e-3, 16,
                  head3_steps=550, head3_batch=6, head3_seq_len=384, head3_lr=2e-3),
    "gpu": Preset(8192, 512, 1408, 8, 8, 4, 1024, 6000, 32, 1024, 1e-3, 6000, 16, 1024, 5e-4, 32,
                  head3_steps=6000, head3_batch=16, head3_seq_len=1024, head3_lr=5e-4),
}
# fmt: on
HEAD_KINDS = {"head": "eagle1", "head3": "eagle3"}  # stage -> head kind
STAGES = ("target", "head", "head3")


def tokenize_stream(tokenizer, texts: list[str]) -> torch.Tensor:
    """All ``texts`` as one long stream ``[N]``: each file starts with bos."""
    ids = []
    for enc in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        ids.append(tokenizer.bos_token_id)
        ids.extend(enc)
    return torch.tensor(ids, dtype=torch.long)


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10% of ``peak``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def build_target(p: Preset, out_dir: str, device: str, seed: int) -> None:
    """Stage 1: tokenizer + target model, saved to ``out_dir`` (fp16 safetensors)."""
    import transformers as tf
    from tqdm import tqdm

    t0 = time.time()
    texts = read_corpus(corpus.stdlib_files("train"))
    tokenizer = demo.train_tokenizer(texts, p.vocab_size, out_dir)
    stream = tokenize_stream(tokenizer, texts)
    print(
        f"tokenizer: {len(tokenizer)} tokens; corpus: {len(texts)} files, {stream.numel()} tokens "
        f"({time.time() - t0:.0f} s)",
        file=sys.stderr,
    )
    torch.manual_seed(seed)
    config = tf.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=p.hidden_size,
        intermediate_size=p.intermediate_size,
        num_hidden_layers=p.layers,
        num_attention_heads=p.heads,
        num_key_value_heads=p.kv_heads,
        max_position_embeddings=p.max_positions,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        rope_theta=10000.0,
    )
    model = tf.LlamaForCausalLM(config).to(device).train()
    nparams = sum(x.numel() for x in model.parameters())
    print(f"target: {nparams / 1e6:.2f} M parameters", file=sys.stderr)
    decay = [x for n, x in model.named_parameters() if x.dim() >= 2]
    other = [x for n, x in model.named_parameters() if x.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
        lr=p.target_lr,
        betas=(0.9, 0.95),
    )
    gen = torch.Generator().manual_seed(seed)
    span = p.target_seq_len + 1
    bar = tqdm(range(p.target_steps), desc="target", file=sys.stderr, mininterval=5)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, p.target_steps, p.target_lr, max(1, p.target_steps // 20))
        starts = torch.randint(0, stream.numel() - span, (p.target_batch,), generator=gen)
        batch = torch.stack([stream[s : s + span] for s in starts.tolist()]).to(device)
        logits = model(input_ids=batch[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    model = model.eval().to("cpu", torch.float16)
    model.generation_config.pad_token_id = tokenizer.eos_token_id
    model.save_pretrained(out_dir, safe_serialization=True)
    print(f"target saved to {out_dir} ({time.time() - t0:.0f} s)", file=sys.stderr)


def head_settings(p: Preset, stage: str) -> dict:
    """The preset's fields of one head stage (``head``: ``head_*``; ``head3``: ``head3_*``), unprefixed."""
    return {k[len(stage) + 1 :]: v for k, v in asdict(p).items() if k.startswith(stage + "_")}


def build_head(
    p: Preset, target_dir: str, out_dir: str, work_dir: str, device: str, seed: int, stage: str = "head"
) -> dict:
    """Stages 2 and 3: train the EAGLE-1/2 (``head``) or EAGLE-3 (``head3``) head with the ``eagle
    train-draft`` workflow, held-out modules for its evaluation; save it fp16 in ``out_dir``."""
    from eagle_engine.models import load_target
    from eagle_engine.models.loading import load_draft, save_draft
    from eagle_engine.tools.train import DraftTrainJob, train_draft

    train_files = corpus.stdlib_files("train")
    eval_files = corpus.stdlib_files("heldout")
    settings = head_settings(p, stage)
    job = DraftTrainJob(
        base=target_dir,
        corpus=train_files,
        out=work_dir,
        kind=HEAD_KINDS[stage],
        steps=settings["steps"],
        seq_len=settings["seq_len"],
        batch_size=settings["batch"],
        lr=settings["lr"],
        eval_corpus=eval_files,
        eval_prompts=p.eval_prompts,
        device=device,
        seed=seed,
        resume=True,
    )
    result = train_draft(job)
    target = load_target(target_dir, dtype=torch.float16)
    head = load_draft(work_dir, target, dtype=torch.float16)
    save_draft(head, out_dir)
    return result


def update_build_record(path: str, updates: dict) -> dict:
    """Merge ``updates`` into the JSON record at ``path`` (created when absent), keeping the other keys."""
    record = {}
    if os.path.isfile(path):
        with open(path) as f:
            record = json.load(f)
    record.update(updates)
    with open(path, "w") as f:
        json.dump(record, f, indent=2)
    return record


def stage_record(p: Preset, args, stage: str, result: dict, seconds: float) -> dict:
    """What a head stage writes to ``build.json``: ``head`` the shared preset fields and ``head_eval`` (as
    before ``head3`` existed), ``head3`` its ``head3_*`` fields, its head's size and ``head3_eval``."""
    if stage == "head":
        shared = {k: v for k, v in asdict(p).items() if not k.startswith("head3_")}
        record = {"preset": args.preset, **shared, "seed": args.seed, "python": sys.version.split()[0]}
        return {**record, "head_eval": result, "head_seconds": round(seconds)}
    head_dir = os.path.join(args.out, stage)
    with open(os.path.join(head_dir, "config.json")) as f:
        draft_vocab = json.load(f)["draft_vocab_size"]
    record = {k: v for k, v in asdict(p).items() if k.startswith(stage + "_")}
    record.update({f"{stage}_kind": HEAD_KINDS[stage], f"{stage}_draft_vocab": draft_vocab})
    record[f"{stage}_bytes"] = os.path.getsize(os.path.join(head_dir, "model.safetensors"))
    record.update({f"{stage}_seed": args.seed, f"{stage}_python": sys.version.split()[0]})
    return {**record, f"{stage}_seconds": round(seconds), f"{stage}_eval": result}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=os.path.join(ROOT, "python", "eagle_engine", "data", "demo"))
    ap.add_argument(
        "--work",
        default=None,
        help="head training work dirs WORK/head, WORK/head3 (checkpoints, eval.json); default: temp dirs",
    )
    ap.add_argument("--stages", default=",".join(STAGES), help="comma-separated: target, head, head3")
    ap.add_argument("--target-steps", type=int, default=None)
    ap.add_argument("--head-steps", type=int, default=None)
    ap.add_argument("--head3-steps", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = ap.parse_args(argv)
    stages = args.stages.split(",")
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        ap.error(f"unknown stage(s) {', '.join(unknown)}: choose from {', '.join(STAGES)}")
    preset = PRESETS[args.preset]
    for name in ("target_steps", "head_steps", "head3_steps"):
        if getattr(args, name) is not None:
            setattr(preset, name, getattr(args, name))
    if args.threads:
        torch.set_num_threads(args.threads)
    target_dir = os.path.join(args.out, "target")
    print(json.dumps({"preset": args.preset, **asdict(preset), "seed": args.seed}), file=sys.stderr)
    if "target" in stages:
        os.makedirs(target_dir, exist_ok=True)
        build_target(preset, target_dir, args.device, args.seed)
    for stage in ("head", "head3"):
        if stage not in stages:
            continue
        t0 = time.time()
        if args.work:
            work = os.path.join(args.work, stage)
        else:
            work = tempfile.mkdtemp(prefix=f"eagle-demo-{stage}-")
        head_dir = os.path.join(args.out, stage)
        result = build_head(preset, target_dir, head_dir, work, args.device, args.seed, stage)
        record = stage_record(preset, args, stage, result, time.time() - t0)
        update_build_record(os.path.join(args.out, "build.json"), record)
        print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
