"""Medusa-1 heads (Cai et al., 2024) in the official checkpoint format.

``K`` heads read the target's top-layer feature (after the final norm) at one position; head ``i`` (0-based)
is ``num_layers`` residual blocks ``x + SiLU(W x + b)`` followed by its own vocabulary projection (no bias),
and predicts the token ``i + 2`` positions after the feature's (the target's own ``lm_head`` predicts the
one right after).

Official format (FasterDecoding/Medusa): a directory with ``config.json`` holding ``medusa_num_heads`` and
``medusa_num_layers`` (``base_model_name_or_path`` too, ignored here) and the weights in
``medusa_lm_head.safetensors`` or ``medusa_lm_head.pt``, keyed ``{head}.{layer}.linear.weight``,
``{head}.{layer}.linear.bias`` and ``{head}.{num_layers}.weight`` (the projection).
"""

from __future__ import annotations

import json
import os
import re

import torch
import torch.nn.functional as F
from torch import nn

import eagle_kernels as ops

from ..errors import DraftMismatchError, ModelLoadError
from .config import ConfigReader, check_int, read_json
from .llama import LlamaModel
from .parallel import whole_vocab_weight
from .weights import iter_checkpoint, load_into

MEDUSA_WEIGHT_FILES = ("medusa_lm_head.safetensors", "medusa_lm_head.pt")
MEDUSA_CONFIG = "Medusa config.json"
MAX_HEADS = 64
MAX_LAYERS = 64


class ResBlock(nn.Module):
    """``x + SiLU(linear(x))``."""

    def __init__(self, hidden: int):
        super().__init__()
        self.linear = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.silu(self.linear(x))


class MedusaHeads(nn.Module):
    """``num_heads`` Medusa heads over ``[..., H]`` features; ``heads[i]`` is the official ``i``-th head
    (``num_layers`` :class:`ResBlock` then ``Linear(H, V, bias=False)``), so ``heads.state_dict()`` has the
    official keys.

    :meth:`fuse` stacks the heads' weights so that each residual layer of all heads is one batched matmul;
    the parameters become views of the stacked tensors and keep their names (so an update of a parameter is
    an update of the stack). With autograd on, the heads run one by one over their parameters (training).
    """

    kind = "medusa"

    def __init__(self, hidden_size: int, vocab_size: int, num_heads: int, num_layers: int):
        super().__init__()
        self.hidden_size, self.vocab_size = hidden_size, vocab_size
        self.num_heads, self.num_layers = num_heads, num_layers
        self.heads = nn.ModuleList(
            nn.Sequential(*[ResBlock(hidden_size) for _ in range(num_layers)],
                          nn.Linear(hidden_size, vocab_size, bias=False))
            for _ in range(num_heads)
        )  # fmt: skip
        self._stacked: tuple | None = None  # set by fuse(): ([W [K, H, H]], [b [K, H]]) per layer, proj

    def aux_layers(self, num_target_layers: int) -> tuple[int, ...]:
        return ()  # the heads read the top-layer feature only

    def official_state(self) -> dict[str, torch.Tensor]:
        """The weights under the official keys, each in its own contiguous CPU storage."""
        return {k: v.detach().cpu().clone().contiguous() for k, v in self.heads.state_dict().items()}

    def fuse(self) -> None:
        """Stack every head's layer ``j`` weights (and projections) into one tensor (idempotent)."""
        if self._stacked is not None:
            return
        layers = []
        for j in range(self.num_layers):
            blocks = [head[j].linear for head in self.heads]
            weight = torch.stack([b.weight.detach() for b in blocks])
            bias = torch.stack([b.bias.detach() for b in blocks])
            for i, b in enumerate(blocks):
                b.weight = nn.Parameter(weight[i], requires_grad=False)
                b.bias = nn.Parameter(bias[i], requires_grad=False)
            layers.append((weight, bias))
        projections = [head[-1] for head in self.heads]
        proj = torch.stack([p.weight.detach() for p in projections])
        for i, p in enumerate(projections):
            p.weight = nn.Parameter(proj[i], requires_grad=False)
        self._stacked = (tuple(layers), proj)

    def _batched(self) -> bool:
        return self._stacked is not None and not torch.is_grad_enabled()

    def features(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[N, H]`` -> each head's feature before its projection, ``[K, N, H]``."""
        if not self._batched():
            return torch.stack([head[:-1](hidden) for head in self.heads])
        x = hidden.unsqueeze(0).expand(self.num_heads, -1, -1)
        for weight, bias in self._stacked[0]:
            x = x + F.silu(torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2)))
        return x

    def projection(self, i: int) -> torch.Tensor:
        """Head ``i``'s vocabulary projection ``[V, H]``."""
        return self.heads[i][-1].weight

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[..., H]`` -> every head's logits ``[..., K, V]`` (the heads' dtype)."""
        lead = hidden.shape[:-1]
        x = self.features(hidden.reshape(-1, self.hidden_size))
        if not self._batched():
            out = torch.stack([F.linear(x[i], self.projection(i)) for i in range(self.num_heads)], 1)
        else:
            out = torch.bmm(x, self._stacked[1].transpose(1, 2)).transpose(0, 1)
        return out.reshape(*lead, self.num_heads, self.vocab_size)

    def topk(self, hidden: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``[..., H]`` -> every head's top-k ``(logprobs fp32 [..., K, k], token ids long [..., K, k])``,
        sorted by decreasing log-probability."""
        lead = hidden.shape[:-1]
        x = self.features(hidden.reshape(-1, self.hidden_size))
        pairs = [ops.lm_head_topk(x[i], self.projection(i), k) for i in range(self.num_heads)]
        logprobs = torch.stack([p[0] for p in pairs], 1).reshape(*lead, self.num_heads, k)
        ids = torch.stack([p[1] for p in pairs], 1).reshape(*lead, self.num_heads, k)
        return logprobs, ids


# ------------------------------------------------------------------------------------------ the format


def is_medusa_dir(directory: str) -> bool:
    """A Medusa heads directory: a ``medusa_lm_head.*`` weight file, or ``medusa_num_heads`` in its config."""
    if any(os.path.isfile(os.path.join(directory, f)) for f in MEDUSA_WEIGHT_FILES):
        return True
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        return False
    try:
        with open(path) as f:
            raw = json.load(f)
    except (OSError, ValueError):
        return False  # the EAGLE loader names the unreadable file
    return isinstance(raw, dict) and "medusa_num_heads" in raw


def read_medusa_config(directory: str) -> tuple[int, int]:
    """``(num_heads, num_layers)`` from a Medusa ``config.json`` (``medusa_num_layers`` defaults to 1, as
    in the official code). Errors name the file and the field: :class:`ModelLoadError` for a missing or
    unreadable file, :class:`UnsupportedModelError` for a missing or bad field."""
    raw = read_json(os.path.join(directory, "config.json"), MEDUSA_CONFIG)
    reader = ConfigReader(raw, MEDUSA_CONFIG)
    heads = check_int(reader.get("medusa_num_heads"), "medusa_num_heads", MEDUSA_CONFIG, lo=1, hi=MAX_HEADS)
    layers = check_int(reader.get("medusa_num_layers", 1), "medusa_num_layers", MEDUSA_CONFIG, lo=0,
                       hi=MAX_LAYERS)  # fmt: skip
    return heads, layers


_KEY = re.compile(r"(\d+)\.(\d+)\.(linear\.weight|linear\.bias|weight)")


def _check_fits(tensors: dict[str, torch.Tensor], num_layers: int, hidden: int, vocab: int) -> None:
    """:class:`DraftMismatchError` naming both sizes when the heads' hidden or vocabulary size is not the
    target's (read off the tensors: the config does not hold them). Other problems are left to
    :func:`load_into`."""
    for name, t in tensors.items():
        m = _KEY.fullmatch(name)
        if m is None or t.dim() < 1:
            continue
        if m.group(3) != "linear.bias" and t.dim() == 2 and t.shape[1] != hidden:
            raise DraftMismatchError(
                f"Medusa heads hidden size {t.shape[1]} (tensor {name}) does not fit the target's "
                f"hidden_size {hidden}"
            )
        if m.group(3) == "weight" and int(m.group(2)) == num_layers and t.shape[0] != vocab:
            raise DraftMismatchError(
                f"Medusa heads vocabulary size {t.shape[0]} (tensor {name}) does not fit the target's "
                f"vocab_size {vocab}"
            )


def load_medusa(directory: str, target: LlamaModel, *, device=None, dtype=None) -> MedusaHeads:
    """Load official-format Medusa heads for ``target`` (on its device and dtype unless given).

    Raises :class:`ModelLoadError` (no directory, config or weight file), ``UnsupportedModelError`` (a bad
    config field), :class:`DraftMismatchError` (hidden or vocabulary size not the target's),
    ``CheckpointMismatchError`` (missing, unexpected or misshapen tensors) or its subclass
    ``NonFiniteWeightsError``; pickled ``.pt`` files are read with ``weights_only=True``.
    """
    if not os.path.isdir(directory):
        raise ModelLoadError(f"Medusa heads directory not found: {directory}")
    num_heads, num_layers = read_medusa_config(directory)
    tensors = dict(iter_checkpoint(directory, MEDUSA_WEIGHT_FILES))
    cfg = target.config
    _check_fits(tensors, num_layers, cfg.hidden_size, cfg.vocab_size)
    ref = target.lm_head_weight
    device = ref.device if device is None else device
    dtype = ref.dtype if dtype is None else dtype
    with torch.device("meta"):
        heads = MedusaHeads(cfg.hidden_size, cfg.vocab_size, num_heads, num_layers)
    heads = heads.to_empty(device=device).to(dtype)
    load_into(heads.heads, iter(tensors.items()))
    return heads.eval().requires_grad_(False)


def save_medusa(
    heads: MedusaHeads, directory: str, fmt: str = "safetensors", base_model: str | None = None
) -> str:
    """Write ``config.json`` and ``medusa_lm_head.safetensors`` (or ``medusa_lm_head.pt``) in the official
    format; ``base_model`` goes to ``base_model_name_or_path`` when given."""
    if fmt not in ("safetensors", "pt"):
        raise ValueError(f"unknown format {fmt!r}: use 'safetensors' or 'pt'")
    os.makedirs(directory, exist_ok=True)
    raw = {"medusa_num_heads": heads.num_heads, "medusa_num_layers": heads.num_layers}
    if base_model is not None:
        raw["base_model_name_or_path"] = base_model
    for stale in MEDUSA_WEIGHT_FILES:  # the loader prefers safetensors: never leave an older one beside
        if os.path.isfile(os.path.join(directory, stale)):
            os.remove(os.path.join(directory, stale))
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(raw, f, indent=2)
    state = heads.official_state()
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(state, os.path.join(directory, "medusa_lm_head.safetensors"))
    else:
        torch.save(state, os.path.join(directory, "medusa_lm_head.pt"))
    return directory


def init_random_medusa(
    target: LlamaModel,
    num_heads: int = 4,
    num_layers: int = 1,
    *,
    seed: int = 0,
    std: float = 0.02,
    from_lm_head: bool = False,
) -> MedusaHeads:
    """Heads shaped for ``target``, on its device and dtype.

    Default: every weight drawn from ``N(0, std^2)`` (tests, benchmarks). ``from_lm_head=True``: Medusa's
    training start: each projection a copy of the target's ``lm_head`` and each residual linear zero (weight
    and bias, so that every block starts as the identity), ``seed``/``std`` unused.
    """
    cfg = target.config
    check_int(num_heads, "num_heads", "init_random_medusa", lo=1, hi=MAX_HEADS)
    check_int(num_layers, "num_layers", "init_random_medusa", lo=0, hi=MAX_LAYERS)
    heads = MedusaHeads(cfg.hidden_size, cfg.vocab_size, num_heads, num_layers)
    lm_head = whole_vocab_weight(target.lm_head_weight.detach(), target.tp)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in heads.parameters():
            if from_lm_head:
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
        for i in range(num_heads if from_lm_head else 0):
            heads.projection(i).copy_(lm_head)
    return heads.to(device=lm_head.device, dtype=lm_head.dtype).eval()
