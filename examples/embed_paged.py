"""Another engine embedding eagle_kernels and an EAGLE drafter: a speculative decoding loop on its own paged
KV cache, outside eagle_engine's runner.

What this file owns, as a host engine (vLLM, SGLang, ...) would: a block pool per model in the "NHD" layout of
vLLM and FlashInfer, ``[layers, 2, num_blocks, block_size, Hkv, D]``, handed to the kernels as a permuted view
(no copy); a tiny allocator (a free list in shuffled order; blocks join the sequence's table row as it grows);
and a Llama forward written with eagle_kernels ops (``rms_norm``, ``add_rms_norm``, ``rotary_store_kv``,
``tree_attention``, ``silu_mul``; ``F.linear`` for the projections) over a loaded target's weights. What it
borrows: the EAGLE head (its cache paged through the same block table) and the tree builder. Each round: the
head drafts a tree, the target verifies it in one forward (``tree_verify_greedy``), ``kv_compact`` moves the
accepted rows into place through the table, the head re-reads the accepted path. Greedy, batch 1.

The tokens are those of ``EagleEngine.generate`` (greedy); ``--check`` compares them (exit status 1 if not).

Usage: ``python examples/embed_paged.py [--prompt TEXT] [--max-new-tokens N] [--block-size B] [--check]``
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _path in (ROOT, os.path.join(ROOT, "python")):  # run from a plain checkout too
    if _path not in sys.path:
        sys.path.insert(0, _path)

import eagle_kernels as ops  # noqa: E402
from eagle_engine import EagleEngine, TreeConfig, demo_paths  # noqa: E402
from eagle_engine.kv_cache import KVCache  # noqa: E402
from eagle_engine.models import load_target  # noqa: E402
from eagle_engine.models.llama import ForwardOutput  # noqa: E402
from eagle_engine.models.loading import load_draft  # noqa: E402
from eagle_engine.speculative.tree_build import build_tree  # noqa: E402
from eagle_engine.tools.common import load_tokenizer  # noqa: E402
from eagle_engine.tools.demo import DEMO_PROMPT  # noqa: E402
from eagle_engine.tools.detokenize import decode_new  # noqa: E402


class BlockPool:
    """The host engine's allocator: ``num_blocks`` blocks of ``block_size`` rows, a free list, and the block
    table (int32 ``[1, max_blocks]``, -1 where no block is held) that every model's pool is read through."""

    def __init__(self, num_blocks: int, block_size: int, max_blocks: int, device, seed: int = 0):
        self.num_blocks, self.block_size, self.device = num_blocks, block_size, device
        order = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed))
        self.free = order.tolist()  # shuffled: a sequence's blocks are scattered, as in a shared pool
        self.table = torch.full((1, max_blocks), -1, dtype=torch.int32, device=device)
        self.held = 0

    def reserve(self, rows: int) -> None:
        """Give the sequence blocks until its logical rows ``0 .. rows - 1`` all have one."""
        while self.held * self.block_size < rows:
            self.table[0, self.held] = self.free.pop()
            self.held += 1

    def cache(self, num_layers: int, kv_heads: int, head_dim: int, dtype) -> KVCache:
        """One model's KV memory over these blocks, NHD ``[L, 2, num_blocks, block_size, Hkv, D]``, as the
        kernels address it: the view ``[L, 2, num_blocks, Hkv, block_size, D]`` with this pool's table."""
        shape = (num_layers, 2, self.num_blocks, self.block_size, kv_heads, head_dim)
        nhd = torch.zeros(shape, dtype=dtype, device=self.device)
        lengths = torch.zeros(1, dtype=torch.int32, device=self.device)
        return KVCache(nhd.permute(0, 1, 2, 4, 3, 5), lengths, self.table)


def linear(module, x):
    return F.linear(x, module.weight, module.bias)


def target_forward(target, ids, positions, cache: KVCache, tree_mask=None, aux_layers=()) -> ForwardOutput:
    """The target (Llama) over new tokens ``ids`` long ``[1, T]`` at ``positions``: their K/V go to logical
    rows ``cache.lengths ..`` through the table; each query sees the committed rows and, by ``tree_mask``
    (None: causal), the new ones. Returns the final hidden states and the residual streams at
    ``aux_layers``."""
    m, cfg = target.model, target.config
    b, t = ids.shape
    hq, hkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    h, residual, aux = F.embedding(ids, m.embed_tokens.weight), None, []
    for i, layer in enumerate(m.layers):
        if i in aux_layers:
            aux.append(h if residual is None else h + residual)
        attn, mlp, norm = layer.self_attn, layer.mlp, layer.input_layernorm
        if residual is None:
            x, residual = ops.rms_norm(h, norm.weight, norm.eps), h
        else:
            x, residual = ops.add_rms_norm(h, residual, norm.weight, norm.eps)
        q = linear(attn.q_proj, x).view(b, t, hq, d)
        k, v = linear(attn.k_proj, x).view(b, t, hkv, d), linear(attn.v_proj, x).view(b, t, hkv, d)
        qk_norms = (attn.q_norm.weight, attn.k_norm.weight, attn.q_norm.eps) if attn.qk_norm else ()
        k_pool, v_pool = cache.layer(i)  # [num_blocks, Hkv, block_size, D] views of the NHD pool
        q = ops.rotary_store_kv(q, k, v, positions, target.cos_sin, k_pool, v_pool, cache.lengths, *qk_norms,
                                block_table=cache.block_table)
        o = ops.tree_attention(q, k_pool, v_pool, cache.lengths, tree_mask, block_table=cache.block_table)
        norm = layer.post_attention_layernorm
        x, residual = ops.add_rms_norm(linear(attn.o_proj, o.reshape(b, t, hq * d)), residual, norm.weight,
                                       norm.eps)
        h = linear(mlp.down_proj, ops.silu_mul(linear(mlp.gate_proj, x), linear(mlp.up_proj, x)))
    hidden, _ = ops.add_rms_norm(h, residual, m.norm.weight, m.norm.eps)
    return ForwardOutput(hidden, torch.cat(aux, -1) if aux else None)


def generate(target, head, prompt: list[int], max_new_tokens: int, block_size: int = 16,
             tree: TreeConfig | None = None) -> tuple[list[int], list[int]]:
    """Greedy EAGLE decoding of one prompt: ``(new tokens, tokens kept per round)``, stopping as
    ``EagleEngine.generate`` does (an eos token, ``max_new_tokens``, the model's maximum length)."""
    cfg, tree = target.config, tree or TreeConfig()
    dev, dtype = target.lm_head_weight.device, target.lm_head_weight.dtype
    width = tree.max_depth + 1  # the root and the longest accepted path
    scratch = max(tree.num_nodes, tree.draft_rows, width) + 1  # rows a round writes past the committed ones
    limit = min(max_new_tokens, cfg.max_length - len(prompt))
    max_blocks = -(-(len(prompt) + limit + scratch) // block_size)
    pool = BlockPool(max_blocks, block_size, max_blocks, dev)
    tcache = pool.cache(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, dtype)
    dcache = pool.cache(1, head.config.num_key_value_heads, head.config.head_dim, dtype)  # the same table
    aux_layers = head.aux_layers(cfg.num_hidden_layers)

    # Prefill. Draft row i pairs the target feature of position i with token i + 1 (the last: the new token).
    ids = torch.tensor([prompt], device=dev)
    p = ids.shape[1]
    pool.reserve(p + scratch)
    positions = torch.arange(p, device=dev).view(1, p)
    out = target_forward(target, ids, positions, tcache, None, aux_layers)
    tcache.lengths.fill_(p)
    root = F.linear(out.hidden[:, -1], target.lm_head_weight).float().argmax(-1)  # no KV until next round
    draft_ids = torch.cat([ids[:, 1:], root.view(1, 1)], 1)
    root_hidden = head.step(draft_ids, head.target_features(out), positions, dcache)[:, -1]
    dcache.lengths.fill_(p)
    tokens, kept_per_round, stop = [int(root)], [], set(cfg.eos_token_ids)
    done = tokens[0] in stop or limit <= 1

    while not done:
        pool.reserve(int(tcache.lengths) + scratch)
        level_positions = dcache.lengths.long().view(1, 1) - 1

        def draft_step(tok, features, level, packed_mask, rows):  # a tree level: the head's rows R-n .. R-1
            pos = (level_positions + level).expand(1, tok.shape[1])
            return head.step(tok, features, pos, dcache, packed_mask, rows)

        drafted = build_tree(tree, root, root_hidden, draft_step, head.topk)
        positions = tcache.lengths.long().view(1, 1) + drafted.depths
        out = target_forward(target, drafted.tokens, positions, tcache, drafted.packed_mask, aux_layers)
        argmax = F.linear(out.hidden, target.lm_head_weight).float().argmax(-1)
        num_accepted, nodes, bonus = ops.tree_verify_greedy(drafted.tokens, drafted.parents, argmax)
        path = nodes[:, :width].clamp(min=0).long()  # accepted nodes from the root, padded with 0
        counts = (num_accepted + 1).to(torch.int32)  # the root's row and the accepted ones are committed
        ops.kv_compact(tcache.data, tcache.lengths, path, counts, tcache.block_table)
        tcache.lengths += counts
        # Kept: the accepted draft tokens, then the bonus token; the head re-reads the path with the target's
        # features (row j: node path[j]'s feature, the token after it), at fixed width.
        path_tokens = torch.gather(drafted.tokens, 1, path)
        next_tokens = torch.cat([path_tokens[:, 1:], path_tokens[:, :1]], 1)
        next_tokens.scatter_(1, num_accepted.long().view(1, 1), bonus.view(1, 1))
        aux = None if out.aux is None else out.aux.index_select(1, path[0])
        features = head.target_features(ForwardOutput(out.hidden.index_select(1, path[0]), aux))
        positions = dcache.lengths.long().view(1, 1) + torch.arange(width, device=dev)
        hidden = head.step(next_tokens, features, positions, dcache)
        dcache.lengths += counts
        root, root_hidden = bonus, hidden[:, int(num_accepted)]
        kept = []
        for tok in next_tokens[0, : int(counts)].tolist():
            kept.append(tok)
            if tok in stop or len(tokens) + len(kept) >= limit:
                done = True
                break
        tokens += kept
        kept_per_round.append(len(kept))
    return tokens, kept_per_round


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompt", default=DEMO_PROMPT)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--check", action="store_true", help="compare with EagleEngine.generate (greedy)")
    args = parser.parse_args(argv)
    target_dir, head_dir = demo_paths()
    target = load_target(target_dir)
    head = load_draft(head_dir, target)
    tokenizer = load_tokenizer(target_dir)
    prompt = tokenizer(args.prompt, add_special_tokens=False)["input_ids"]
    tokens, kept = generate(target, head, prompt, args.max_new_tokens, args.block_size)
    print(args.prompt + decode_new(tokenizer, prompt, tokens))
    mean = sum(kept) / len(kept) if kept else float("nan")
    print(f"[embed_paged] {len(tokens)} tokens in {len(kept)} rounds, mean accepted length {mean:.2f}, "
          f"block size {args.block_size}")
    if not args.check:
        return 0
    engine = EagleEngine(target, head, TreeConfig(), max_batch_size=1)
    expected = engine.generate(prompt, args.max_new_tokens).tokens
    engine.close()
    same = tokens == expected
    print(f"[embed_paged] EagleEngine.generate gives {'the same' if same else 'DIFFERENT'} tokens")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
