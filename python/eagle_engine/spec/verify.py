"""Verification of a draft tree against the target's outputs at every node (greedy and sampling)."""

from __future__ import annotations

import torch

import eagle_kernels as ops

from .sampling import SamplingParams, target_probs
from .tree import DraftTree


def verify_tree(
    tree: DraftTree, logits: torch.Tensor, sampling: SamplingParams, generators: list[torch.Generator]
):
    """Accept the longest valid path of each tree.

    Parameters
    ----------
    tree : the drafted trees, ``T`` nodes each
    logits : fp32 ``[B, T, V]``: the target's next-token logits after each node
    sampling : greedy (``temperature == 0``) or the target distribution's temperature/top-p/top-k
    generators : one per sequence; sampling draws ``T`` uniforms from each per round

    Returns
    -------
    ``(num_accepted int32 [B], accepted_nodes int32 [B, T] (-1 padded, root first), bonus int64 [B])``;
    see :func:`eagle_kernels.reference.tree_verify_sampling` for the exact rule, which keeps the output
    distribution equal to the target's.
    """
    if sampling.greedy:
        return ops.tree_verify_greedy(tree.tokens, tree.parents, logits.argmax(-1))
    probs = target_probs(logits, sampling)
    t = tree.tokens.shape[1]
    uniforms = torch.stack([torch.rand(t, generator=g, device=g.device) for g in generators]).to(probs.device)
    return ops.tree_verify_sampling(tree.tokens, tree.parents, probs, uniforms)
