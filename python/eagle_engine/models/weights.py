"""Reading checkpoint tensors: safetensors (single or sharded) and ``pytorch_model.bin`` (weights only)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import torch

from ..errors import CheckpointMismatchError, ModelLoadError, NonFiniteWeightsError
from .config import read_json

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``torch.float32``/``"fp32"``/``"float32"``... -> a supported torch dtype."""
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ModelLoadError(f"unsupported dtype {dtype}; use float32, float16 or bfloat16")
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in DTYPES:
        raise ModelLoadError(f"unsupported dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[key]


def iter_checkpoint(
    model_dir: str, order: tuple[str, ...] = WEIGHT_FILES, shard=None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` on the CPU from the first weight file of ``order`` found in ``model_dir``.

    Pickled ``.bin`` files are read with ``weights_only=True``: no code from a checkpoint ever runs.
    ``shard(name, shape)``: an index selecting the part of a tensor to read (None: all of it); safetensors
    read only that part from the file (tensor parallelism: no rank holds the whole model).
    """
    for name in order:
        path = os.path.join(model_dir, name)
        if os.path.isfile(path):
            break
    else:
        raise ModelLoadError(f"no weights in {model_dir}: looked for {', '.join(order)}")
    if name.endswith(".index.json"):
        shards = sorted(set(read_json(path, "weight index").get("weight_map", {}).values()))
        if not shards:
            raise ModelLoadError(f"weight index {path} lists no shards")
        for file in shards:
            shard_path = os.path.join(model_dir, file)
            if not os.path.isfile(shard_path):
                raise ModelLoadError(f"weight shard listed in {name} not found: {shard_path}")
            yield from _read_file(shard_path, shard)
    else:
        yield from _read_file(path, shard)


def _read_file(path: str, shard=None) -> Iterator[tuple[str, torch.Tensor]]:
    try:
        if path.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(path, framework="pt", device="cpu") as f:
                for key in f.keys():
                    if shard is None:
                        yield key, f.get_tensor(key)
                        continue
                    part = f.get_slice(key)
                    index = shard(key, tuple(part.get_shape()))
                    yield key, part[index] if index is not None else part[:]
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(state, dict):
                raise ModelLoadError(f"{path} does not hold a state dict")
            for key, tensor in state.items():
                # A pickle cannot be read in parts: the whole file is loaded, then sliced (and freed).
                index = None if shard is None else shard(key, tuple(tensor.shape))
                yield key, tensor if index is None else tensor[index].clone()
    except ModelLoadError:
        raise
    except Exception as e:  # corrupt file, unsupported pickle content, truncated download...
        raise ModelLoadError(f"cannot read weights from {path}: {type(e).__name__}: {e}") from None


def check_finite(name: str, source: torch.Tensor, loaded: torch.Tensor) -> None:
    """Raise :class:`NonFiniteWeightsError` naming ``name`` when ``loaded`` holds NaN or inf values."""
    if not loaded.is_floating_point() or bool(torch.isfinite(loaded).all()):
        return
    if source.is_floating_point() and not bool(torch.isfinite(source).all()):
        why = "holds NaN or infinite values"
    else:
        why = f"overflows {loaded.dtype} (finite in the checkpoint's {source.dtype})"
    raise NonFiniteWeightsError(f"checkpoint tensor {name} {why}")


def load_into(
    module: torch.nn.Module,
    tensors: Iterator[tuple[str, torch.Tensor]],
    *,
    rename=lambda k: k,
    ignore=lambda k: False,
    optional=(),
) -> set[str]:
    """Copy checkpoint tensors into ``module``'s parameters/buffers (which may be on ``meta``: they are
    materialised on ``device`` of the first real one). Every parameter must be found with its exact shape.

    Returns the set of loaded names. Raises :class:`CheckpointMismatchError` naming missing, unexpected or
    misshapen tensors, and its subclass :class:`NonFiniteWeightsError` naming a tensor with NaN or infinite
    values (checked once per tensor, after conversion to the model's dtype, so overflow is caught too).
    """
    own = dict(module.named_parameters())
    own.update(dict(module.named_buffers()))
    loaded, unexpected = set(), []
    for raw_name, tensor in tensors:
        name = rename(raw_name)
        if name is None or ignore(raw_name):
            continue
        if name not in own:
            unexpected.append(raw_name)
            continue
        target = own[name]
        if tuple(tensor.shape) != tuple(target.shape):
            raise CheckpointMismatchError(
                f"checkpoint tensor {raw_name} has shape {tuple(tensor.shape)}, "
                f"the config implies {tuple(target.shape)}"
            )
        with torch.no_grad():
            target.copy_(tensor.to(target.dtype))
        check_finite(raw_name, tensor, target)
        loaded.add(name)
    missing = sorted(set(own) - loaded - set(optional))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s), e.g. {', '.join(missing[:5])}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensor(s), e.g. {', '.join(unexpected[:5])}")
        raise CheckpointMismatchError("checkpoint does not fit its config: " + "; ".join(parts))
    return loaded
