"""Draft heads in the official format (keys, config fields, kinds, fit checks) and draft-tree construction."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny import make_hf_model, save

from eagle_engine import DraftMismatchError, EagleEngine, InvalidRequestError, ModelLoadError
from eagle_engine.models.draft import init_random_head
from eagle_engine.models.loading import load_draft, save_draft
from eagle_engine.speculative.tree import MC_SIM_7B_63, TreeConfig
from eagle_engine.speculative.tree_build import DraftTree, build_tree
from eagle_kernels import unpack_tree_mask

pytestmark = pytest.mark.usefixtures("reference_ops")

EAGLE1_KEYS = {
    "fc.weight",
    "fc.bias",
    "layers.0.self_attn.q_proj.weight",
    "layers.0.self_attn.k_proj.weight",
    "layers.0.self_attn.v_proj.weight",
    "layers.0.self_attn.o_proj.weight",
    "layers.0.mlp.gate_proj.weight",
    "layers.0.mlp.up_proj.weight",
    "layers.0.mlp.down_proj.weight",
    "layers.0.post_attention_layernorm.weight",
}
EAGLE3_KEYS = {
    "fc.weight",
    "midlayer.input_layernorm.weight",
    "midlayer.hidden_norm.weight",
    "midlayer.post_attention_layernorm.weight",
    "midlayer.self_attn.q_proj.weight",
    "midlayer.self_attn.k_proj.weight",
    "midlayer.self_attn.v_proj.weight",
    "midlayer.self_attn.o_proj.weight",
    "midlayer.mlp.gate_proj.weight",
    "midlayer.mlp.up_proj.weight",
    "midlayer.mlp.down_proj.weight",
    "norm.weight",
    "lm_head.weight",
    "d2t",
    "t2d",
}


@pytest.fixture(scope="module")
def target(tmp_path_factory, reference_ops):
    path = save(make_hf_model("llama"), str(tmp_path_factory.mktemp("t")))
    return path, EagleEngine.from_pretrained(path).target


def weights(directory):
    if os.path.isfile(os.path.join(directory, "pytorch_model.bin")):
        return torch.load(os.path.join(directory, "pytorch_model.bin"), weights_only=True)
    return load_file(os.path.join(directory, "model.safetensors"))


@pytest.mark.parametrize("kind, keys", [("eagle1", EAGLE1_KEYS), ("eagle3", EAGLE3_KEYS)])
@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_official_format_round_trip(target, tmp_path, kind, keys, fmt):
    _, model = target
    head = init_random_head(kind, model, seed=3, std=0.1)
    directory = save_draft(head, str(tmp_path), fmt)
    assert set(weights(directory)) == keys  # exactly the official names; the embedding comes from the target
    loaded = load_draft(directory, model)
    assert loaded.kind == kind
    for name, tensor in head.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor, rtol=0, atol=0)
    assert loaded.embed_tokens.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_bin_is_tried_before_safetensors(target, tmp_path):
    _, model = target
    directory = save_draft(init_random_head("eagle1", model, seed=1), str(tmp_path), "bin")
    save_draft(init_random_head("eagle1", model, seed=2), str(tmp_path / "other"), "safetensors")
    os.replace(tmp_path / "other" / "model.safetensors", tmp_path / "model.safetensors")
    loaded = load_draft(directory, model)
    expected = init_random_head("eagle1", model, seed=1).fc.weight
    torch.testing.assert_close(loaded.fc.weight, expected, rtol=0, atol=0)


def test_bias_field_and_own_embedding(target, tmp_path):
    _, model = target
    directory = save_draft(init_random_head("eagle1", model), str(tmp_path))
    config_path = os.path.join(directory, "config.json")
    cfg = json.load(open(config_path))
    cfg.pop("bias")  # absent -> true, as in the official code
    json.dump(cfg, open(config_path, "w"))
    assert load_draft(directory, model).fc.bias is not None
    # "bias": false (the LLaMA-3 heads) -> no fc.bias in the checkpoint, and none expected
    state = weights(directory)
    state.pop("fc.bias")
    state["embed_tokens.weight"] = torch.randn(model.config.vocab_size, model.config.hidden_size)
    save_file(state, os.path.join(directory, "model.safetensors"))
    json.dump({**cfg, "bias": False}, open(config_path, "w"))
    head = load_draft(directory, model)
    assert head.fc.bias is None and head.owns_embedding
    torch.testing.assert_close(head.embed_tokens.weight, state["embed_tokens.weight"])


def test_heads_that_do_not_fit(target, tmp_path):
    path, model = target
    directory = save_draft(init_random_head("eagle1", model), str(tmp_path / "h"))
    cfg = json.load(open(os.path.join(directory, "config.json")))
    json.dump({**cfg, "hidden_size": 48}, open(os.path.join(directory, "config.json"), "w"))
    with pytest.raises(DraftMismatchError, match="hidden_size 48 .* hidden_size 64"):
        EagleEngine.from_pretrained(path, directory)
    json.dump({**cfg, "vocab_size": 300}, open(os.path.join(directory, "config.json"), "w"))
    with pytest.raises(DraftMismatchError, match="vocab_size 300 .* vocab_size 256"):
        load_draft(directory, model)
    eagle3 = save_draft(init_random_head("eagle3", model), str(tmp_path / "h3"))
    state = weights(eagle3)
    state["d2t"] = torch.full_like(state["d2t"], 1000)
    save_file(state, os.path.join(eagle3, "model.safetensors"))
    with pytest.raises(DraftMismatchError, match="d2t"):
        load_draft(eagle3, model)
    with pytest.raises(ModelLoadError, match="not found"):
        load_draft(str(tmp_path / "missing"), model)
    not_a_head = str(tmp_path / "nah")
    os.makedirs(not_a_head)
    json.dump(cfg, open(os.path.join(not_a_head, "config.json"), "w"))
    save_file({"something.weight": torch.zeros(2)}, os.path.join(not_a_head, "model.safetensors"))
    with pytest.raises(ModelLoadError, match="not an EAGLE head"):
        load_draft(not_a_head, model)


def test_generate_without_a_head_is_an_error(target):
    path, _ = target
    with pytest.raises(Exception, match="needs a speculative method: a draft head"):
        EagleEngine.from_pretrained(path).generate([1, 2], 4)


def test_eagle3_draft_vocabulary_maps_to_target_ids(target):
    _, model = target
    head = init_random_head("eagle3", model, draft_vocab=40, std=0.1)
    head.d2t.copy_(torch.arange(40) * 5)  # draft id d -> target id 6d
    _, ids = head.topk(torch.randn(3, model.config.hidden_size), 4)
    assert bool((ids % 6 == 0).all()) and int(ids.max()) < 240


# ------------------------------------------------------------------------------------------------ trees


class FakeDraft:
    """A draft whose top-k is fixed: the rank-r child of token t is token 10 t + r, with given logprobs."""

    def __init__(self, logprobs):
        self.logprobs = torch.tensor(logprobs)
        self.calls = []

    def step(self, tokens, features, level, packed_mask, rows):
        self.calls.append((tokens.clone(), level, unpack_tree_mask(packed_mask, rows)))
        return tokens.unsqueeze(-1).float()  # the "hidden" carries the node's token

    def topk(self, hidden, k):
        parent = hidden[..., 0].long()
        ids = parent.unsqueeze(-1) * 10 + torch.arange(k)
        return self.logprobs[:k].expand(*parent.shape, k) - 0.01 * (parent % 7).unsqueeze(-1), ids


def test_dynamic_tree_hand_case():
    # top_k 2, one expansion: root children 1 (-0.1), 2 (-1.0); grandchildren of 1: 11 (-0.2), 12 (-3.0);
    # of 2: 21 (-1.1), 22 (-3.9). The best 3 by cumulative score: 1 (-0.1), 11 (-0.3), 2 (-1.0).
    draft = FakeDraft([0.0, -0.9])
    root_hidden = torch.tensor([[0.0]])
    lp = torch.tensor([[-0.1, -1.0]])

    def topk(hidden, k):
        if hidden.shape[1] == 1 and float(hidden[0, 0, 0]) == 0.0:
            return lp.view(1, 1, 2), torch.tensor([[[1, 2]]])
        parent = hidden[..., 0].long()
        return torch.tensor([[[-0.2, -3.0], [-0.1, -2.9]]]), parent.unsqueeze(-1) * 10 + torch.tensor([1, 2])

    tree = build_tree(
        TreeConfig(total_tokens=4, depth=1, top_k=2), torch.tensor([7]), root_hidden, draft.step, topk
    )
    assert tree.tokens.tolist() == [[7, 1, 2, 11]]
    assert tree.parents.tolist() == [[-1, 0, 0, 1]]
    assert tree.depths.tolist() == [[0, 1, 1, 2]]
    assert tree.paths(0) == [[0, 2], [0, 1, 3]]  # by leaf index
    ((tokens, level, row_mask),) = draft.calls
    assert (
        tokens.tolist() == [[1, 2]] and level == 1 and row_mask.tolist() == [[[True, False], [False, True]]]
    )


@pytest.mark.parametrize(
    "cfg",
    [
        TreeConfig(),
        TreeConfig(total_tokens=25, depth=4, top_k=3),
        TreeConfig(kind="chain", depth=5),
        TreeConfig(kind="static"),
    ],
)
def test_tree_invariants(cfg):
    b = 3
    draft = FakeDraft([-0.05 * i for i in range(10)])
    tree = build_tree(
        cfg, torch.tensor([1, 2, 3]), torch.tensor([[1.0], [2.0], [3.0]]), draft.step, draft.topk
    )
    assert tree.tokens.shape == (b, cfg.num_nodes)
    parents = tree.parents
    assert bool((parents[:, 0] == -1).all())
    assert bool((parents[:, 1:] < torch.arange(1, cfg.num_nodes)).all()) and bool((parents[:, 1:] >= 0).all())
    rebuilt = DraftTree.from_parents(tree.tokens, tree.parents)
    assert torch.equal(rebuilt.mask, tree.mask) and torch.equal(rebuilt.depths, tree.depths)
    for s in range(b):  # the device-built mask equals a walk up the parents
        walked = torch.zeros(cfg.num_nodes, cfg.num_nodes, dtype=torch.bool)
        for i in range(cfg.num_nodes):
            a = i
            while a >= 0:
                walked[i, a] = True
                a = int(parents[s, a])
        assert torch.equal(tree.mask[s], walked)
    assert torch.equal(tree.mask.sum(-1) - 1, tree.depths)  # a node sees itself and its depth ancestors
    assert int(tree.depths.max()) <= cfg.max_depth
    for s in range(b):  # siblings have distinct tokens, and a child token derives from its parent's
        for i in range(1, cfg.num_nodes):
            p = int(parents[s, i])
            assert int(tree.tokens[s, i]) // 10 == int(tree.tokens[s, p])
    if cfg.kind == "chain":
        assert tree.paths(0) == [list(range(cfg.num_nodes))]


def test_static_tree_is_mc_sim_7b_63():
    cfg = TreeConfig(kind="static")
    assert cfg.num_nodes == 26 and cfg.max_depth == 5
    per_level = [sum(1 for c in MC_SIM_7B_63 if len(c) == d) for d in range(1, 6)]
    assert per_level == [4, 8, 8, 3, 2]
    draft = FakeDraft([-0.1 * i for i in range(10)])
    tree = build_tree(cfg, torch.tensor([5]), torch.tensor([[5.0]]), draft.step, draft.topk)
    # A path of ranks (r1, r2, ...) holds token 5 r1 r2 ... in decimal: the tree is exactly the choices.
    expected = sorted(int("5" + "".join(map(str, c))) for c in MC_SIM_7B_63)
    assert sorted(tree.tokens[0].tolist()) == sorted([5] + expected)
    assert cfg.draft_rows == sum(len(call[0][0]) for call in draft.calls)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(kind="bushy"), "kind"),
        (dict(total_tokens=1), "total_tokens"),
        (dict(total_tokens=1000), "total_tokens"),
        (dict(top_k=0), "top_k"),
        (dict(depth=-1), "depth"),
        (dict(kind="static", choices=((0,), (1, 0))), "parent"),
    ],
)
def test_bad_tree_configs(kwargs, match):
    with pytest.raises(InvalidRequestError, match=match):
        TreeConfig(**kwargs)
