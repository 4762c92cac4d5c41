"""Cached target features: ``eagle prepare-features`` writes them once, training reads them back without
loading the target's decoder layers.

A feature directory holds ``features.json`` (what was cached, for which model) and shards
``shard-NNNNN.safetensors``, each with ``ids`` long ``[n, T]``, ``loss_mask`` uint8 ``[n, T]``, ``hidden``
``[n, T, H]`` (the top layer after the final norm, in the target's dtype) and, for EAGLE-3, ``aux``
``[n, T, 3H]`` (the residual stream entering the head's three layers). The target's next-token
distributions are recomputed from ``hidden`` with its output projection, exactly as online training does,
so cached and online features train the same head. Only the target's embedding, final norm and output
projection are loaded for training (:func:`load_output_layers`).
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass

import torch

from ..errors import TrainingInputError
from ..models.config import load_model_config
from ..models.llama import LlamaModel
from ..models.weights import iter_checkpoint, resolve_dtype
from .train_losses import FeatureBatch, batch_from_features
from .training_data import TrainingRows, read_rows

MANIFEST = "features.json"
FORMAT_VERSION = 1
OUTPUT_LAYERS = ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")


def aux_layers_of(kind: str, num_layers: int) -> tuple[int, ...]:
    """The target layers an EAGLE-3 head reads (``()`` for EAGLE-1/2 and Medusa): as ``Eagle3Head``."""
    return (2, num_layers // 2, num_layers - 3) if kind == "eagle3" else ()


def bytes_per_row(seq_len: int, hidden: int, kind: str, dtype: torch.dtype) -> int:
    """Disk bytes one cached row takes: ids (8 B) and mask (1 B) per token, ``H`` (``4H`` for EAGLE-3)
    feature elements per token."""
    width = hidden * (4 if kind == "eagle3" else 1)
    return seq_len * (9 + width * torch.finfo(dtype).bits // 8)


def model_identity(config) -> dict:
    """What a feature directory must match in the model that trains from it."""
    return {
        "model_type": config.model_type,
        "hidden_size": config.hidden_size,
        "vocab_size": config.vocab_size,
        "num_hidden_layers": config.num_hidden_layers,
    }


@dataclass
class FeatureWriter:
    """Writes rows' features shard by shard, then the manifest (last, so a directory with a manifest is
    complete)."""

    out: str
    kind: str
    shard_rows: int = 256

    def __post_init__(self):
        self.shards, self._pending, self.rows = [], [], 0

    def add(self, ids, loss_mask, hidden, aux) -> None:
        """One batch: ``ids``/``loss_mask`` ``[B, T]``, ``hidden`` ``[B, T, H]``, ``aux`` ``[B, T, 3H]`` or
        None."""
        self._pending.append((ids.cpu(), loss_mask.cpu(), hidden.cpu(), None if aux is None else aux.cpu()))
        if sum(p[0].shape[0] for p in self._pending) >= self.shard_rows:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        from safetensors.torch import save_file

        parts = list(zip(*self._pending))
        tensors = {
            "ids": torch.cat(parts[0]),
            "loss_mask": torch.cat(parts[1]).to(torch.uint8),
            "hidden": torch.cat(parts[2]),
        }
        if parts[3][0] is not None:
            tensors["aux"] = torch.cat(parts[3])
        name = f"shard-{len(self.shards):05d}.safetensors"
        save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(self.out, name))
        self.shards.append({"file": name, "rows": int(tensors["ids"].shape[0])})
        self.rows += int(tensors["ids"].shape[0])
        self._pending = []

    def finish(self, config, seq_len: int, dtype: torch.dtype, report: dict) -> dict:
        self._flush()
        manifest = {
            "version": FORMAT_VERSION,
            "kind": self.kind,
            "model": model_identity(config),
            "aux_layers": list(aux_layers_of(self.kind, config.num_hidden_layers)),
            "seq_len": seq_len,
            "rows": self.rows,
            "dtype": str(dtype).removeprefix("torch."),
            "shards": self.shards,
            "data": report,
        }
        tmp = os.path.join(self.out, MANIFEST + ".tmp")
        with open(tmp, "w") as f:
            json.dump(manifest, f, indent=2)
        os.replace(tmp, os.path.join(self.out, MANIFEST))
        return manifest


@torch.no_grad()
def write_features(
    target: LlamaModel,
    rows: TrainingRows,
    kind: str,
    out: str,
    *,
    batch_size: int = 8,
    report: dict | None = None,
    show_progress: bool = True,
) -> dict:
    """Run ``target`` over every row and write the features ``kind`` needs into ``out``; returns the
    manifest. The disk size is printed before the first batch."""
    from tqdm import tqdm

    cfg = target.config
    aux_layers = aux_layers_of(kind, cfg.num_hidden_layers)
    dtype = target.lm_head_weight.dtype
    size = len(rows) * bytes_per_row(rows.ids.shape[1], cfg.hidden_size, kind, dtype)
    if show_progress:
        print(
            f"prepare-features: {len(rows)} rows of {rows.ids.shape[1]} tokens, {kind} features in "
            f"{str(dtype).removeprefix('torch.')}: about {size / 2**30:.2f} GiB on disk",
            file=sys.stderr,
        )
    os.makedirs(out, exist_ok=True)
    writer = FeatureWriter(out, kind)
    device = target.lm_head_weight.device
    bar = tqdm(
        total=len(rows), desc="prepare-features", unit="row", file=sys.stderr, disable=not show_progress
    )
    for start in range(0, len(rows), batch_size):
        ids = rows.ids[start : start + batch_size].to(device)
        b, t = ids.shape
        cache = target.allocate_cache(b, t)
        target.ensure_positions(t)
        res = target(ids, torch.arange(t, device=device).expand(b, t), cache, None, aux_layers)
        writer.add(ids, rows.loss_mask[start : start + batch_size], res.hidden, res.aux)
        bar.update(b)
    bar.close()
    return writer.finish(cfg, rows.ids.shape[1], dtype, report or {})


def load_output_layers(model_dir: str, *, device="cpu", dtype=torch.float32) -> LlamaModel:
    """The target with only its embedding, final norm and output projection loaded (its decoder layers stay
    on the meta device: no memory, and any use of them fails loudly). Enough to start, train and save a
    head from cached features."""
    config = load_model_config(model_dir)
    dtype = resolve_dtype(dtype)
    with torch.device("meta"):
        model = LlamaModel(config)
    own = dict(model.named_parameters())
    wanted = [n for n in OUTPUT_LAYERS if n in own]
    for name in wanted:
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        setattr(
            module,
            attr,
            torch.nn.Parameter(torch.empty(own[name].shape, device=device, dtype=dtype), requires_grad=False),
        )

    def only_wanted(name, shape):
        return None if name in wanted else tuple(slice(0, 0) for _ in shape)

    found = set()
    for name, tensor in iter_checkpoint(model_dir, shard=only_wanted):
        if name in wanted:
            with torch.no_grad():
                model.get_parameter(name).copy_(tensor.to(dtype))
            found.add(name)
    missing = set(wanted) - found
    if missing:
        raise TrainingInputError(f"{model_dir}: the checkpoint lacks {', '.join(sorted(missing))}")
    return model.eval()


class FeatureStore:
    """Cached features read back for training (see the module docstring). ``rows``: the cached rows'
    ids and loss masks; :meth:`batch` reads the features of some of them."""

    def __init__(self, directory: str, target: LlamaModel, kind: str):
        path = os.path.join(directory, MANIFEST)
        if not os.path.isfile(path):
            raise TrainingInputError(
                f"--features {directory}: no {MANIFEST} (not a feature directory, or eagle prepare-features "
                "did not finish)"
            )
        with open(path) as f:
            self.manifest = manifest = json.load(f)
        if manifest.get("version") != FORMAT_VERSION:
            raise TrainingInputError(f"--features {directory}: format version {manifest.get('version')}")
        if manifest["model"] != model_identity(target.config):
            raise TrainingInputError(
                f"--features {directory} were computed by another model ({manifest['model']}); --base has "
                f"{model_identity(target.config)}"
            )
        if kind == "eagle3" and manifest["kind"] != "eagle3":
            raise TrainingInputError(
                f"--features {directory} hold top-layer features only; an EAGLE-3 head needs "
                "eagle prepare-features --kind eagle3"
            )
        from safetensors import safe_open

        self.files = [
            safe_open(os.path.join(directory, s["file"]), framework="pt", device="cpu")
            for s in manifest["shards"]
        ]
        self.where = [(i, r) for i, s in enumerate(manifest["shards"]) for r in range(s["rows"])]
        ids = torch.cat([f.get_tensor("ids") for f in self.files])
        mask = torch.cat([f.get_tensor("loss_mask") for f in self.files]).bool()
        self.rows = TrainingRows(ids, mask, {"features": directory, **manifest["data"]})
        self.kind = kind
        self.lm_head_weight = target.lm_head_weight
        self.with_logp = kind != "medusa"

    def _read(self, name: str, index: list[int]) -> torch.Tensor:
        parts = []
        for i in index:
            shard, row = self.where[i]
            parts.append(self.files[shard].get_slice(name)[row : row + 1])
        return torch.cat(parts)

    def batch(self, rows: TrainingRows, index: list[int]) -> FeatureBatch:
        device = self.lm_head_weight.device
        pick = torch.tensor(index, dtype=torch.long)
        hidden = self._read("hidden", index).to(device=device, dtype=self.lm_head_weight.dtype)
        aux = self._read("aux", index).to(device) if self.kind == "eagle3" else None
        return batch_from_features(
            rows.ids[pick].to(device),
            hidden,
            aux,
            self.lm_head_weight,
            self.with_logp,
            rows.loss_mask[pick].to(device),
        )


def prepare_features(args) -> dict:
    """``eagle prepare-features``: check everything, read the data as training would, run the target over
    it and write the feature directory (refusing a non-empty ``--out``)."""
    from ..engine.engine import resolve_device
    from ..models import load_target
    from .common import check_model_dir, load_tokenizer

    config = check_model_dir(args.base)
    if args.seq_len > config.max_length:
        raise TrainingInputError(
            f"--seq-len {args.seq_len} exceeds the model's maximum length {config.max_length}"
        )
    if os.path.isdir(args.out) and os.listdir(args.out):
        raise TrainingInputError(f"--out {args.out} is not empty: give a new directory for the features")
    if args.kind == "eagle3" and config.num_hidden_layers < 3:
        raise TrainingInputError(
            f"EAGLE-3 features need a target of >= 3 layers, got {config.num_hidden_layers}"
        )
    tokenizer = load_tokenizer(args.base)
    rows = read_rows(
        tokenizer,
        args.data,
        args.seq_len,
        data_format=args.data_format,
        doc_separator=args.doc_separator,
        chat_template=args.chat_template,
        model_dir=args.base,
    )
    print(f"prepare-features: data: {json.dumps(rows.report)}", file=sys.stderr)
    device = resolve_device(args.device)
    dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    target = load_target(args.base, device=device, dtype=dtype)
    return write_features(target, rows, args.kind, args.out, batch_size=args.batch_size, report=rows.report)
