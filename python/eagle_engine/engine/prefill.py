"""The first step shared by vanilla and EAGLE decoding: the target over the prompts, and the first token."""

from __future__ import annotations

import torch

from ..kv_cache import KVCache
from ..models.llama import ForwardOutput, LlamaModel
from ..spec.sampling import SamplingParams, sample_tokens
from .sequence import SequenceState


def pad_prompts(states: list[SequenceState], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded prompt ids long ``[B, P]`` (pad 0) and prompt lengths int32 ``[B]``, on ``device``."""
    longest = max(len(s.prompt) for s in states)
    ids = torch.zeros(len(states), longest, dtype=torch.long)
    for b, s in enumerate(states):
        ids[b, : len(s.prompt)] = torch.tensor(s.prompt)
    prompt_lens = torch.tensor([len(s.prompt) for s in states], dtype=torch.int32)
    return ids.to(device), prompt_lens.to(device)


def prefill(
    target: LlamaModel,
    cache: KVCache,
    ids: torch.Tensor,
    prompt_lens: torch.Tensor,
    sampling: SamplingParams,
    generators: list[torch.Generator],
    aux_layers: tuple[int, ...] = (),
) -> tuple[ForwardOutput, torch.Tensor]:
    """Run the right-padded prompts causally (padding rows land past each prompt and are overwritten later),
    commit ``cache.lengths = prompt_lens``, and draw the first new token per sequence (long ``[B]``)."""
    b, p = ids.shape
    positions = torch.arange(p, device=ids.device).expand(b, p)
    out = target(ids, positions, cache, None, aux_layers)
    cache.lengths.copy_(prompt_lens)
    last = out.hidden[torch.arange(b, device=ids.device), prompt_lens.long() - 1]
    return out, sample_tokens(target.logits(last), sampling, generators)
