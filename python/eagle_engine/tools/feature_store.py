"""Cached target features: ``eagle prepare-features`` writes them once, training reads them back without
loading the target's decoder layers.

A feature directory holds ``features.json`` (what was cached, for which model) and shards
``shard-NNNNN.safetensors``, each with ``ids`` long ``[n, T]``, ``loss_mask`` uint8 ``[n, T]``, ``hidden``
``[n, T, H]`` (the top layer after the final norm, in the target's dtype) and, for EAGLE-3, ``aux``
``[n, T, 3H]`` (the residual stream entering the head's three layers). The target's next-token
distributions are recomputed from ``hidden`` with its output projection, exactly as online training does,
so cached and online features train the same head. Only the target's embedding, final norm and output
projection are loaded for training (:func:`~eagle_engine.models.loading.load_output_layers`).
``eagle prepare-features`` itself is :mod:`.prepare_features`.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass

import torch

from ..errors import TrainingInputError
from ..models.draft import eagle3_aux_layers
from ..models.llama import LlamaModel
from .train_losses import FeatureBatch, batch_from_features
from .training_data import TrainingRows

MANIFEST = "features.json"
FORMAT_VERSION = 1


def aux_layers_of(kind: str, num_layers: int) -> tuple[int, ...]:
    """The target layers a head of ``kind`` reads besides the top one (EAGLE-3's three; else none)."""
    return eagle3_aux_layers(num_layers) if kind == "eagle3" else ()


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
    shard_rows: int = 256,
    report: dict | None = None,
    show_progress: bool = True,
) -> dict:
    """Run ``target`` over every row and write the features ``kind`` needs into ``out`` (``shard_rows`` rows
    a shard, or the batch that reaches it); returns the manifest. The disk size is printed first."""
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
    writer = FeatureWriter(out, kind, shard_rows)
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
        layers = list(aux_layers_of(kind, target.config.num_hidden_layers))
        if kind == "eagle3" and manifest["aux_layers"] != layers:
            raise TrainingInputError(
                f"--features {directory} hold layers {manifest['aux_layers']}; this head reads {layers}"
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
