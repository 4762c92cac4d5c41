"""Tensor parallelism (N=2, gloo on CPU): the same tokens as N=1 and transformers, on every rank.

One ``torchrun`` launch of ``tests/tp_worker.py`` runs every job (greedy EAGLE and vanilla on a GQA Llama and
a Qwen2 with q/k/v bias and tied embeddings, seeded and unseeded sampling, bad sizes) and each rank writes its
results; this process runs the same jobs with N=1 and compares.
"""

import json
import os
import subprocess

import pytest
from launch import ROOT, torchrun_command, torchrun_env
from tiny import hf_greedy, make_head_dir, make_hf_model, random_prompts, save

import eagle_engine.speculative.auto_tree as auto_tree
from eagle_engine import EagleEngine
from eagle_engine.models.parallel import count_parameters

pytestmark = pytest.mark.usefixtures("reference_ops")

WORKER = os.path.join(ROOT, "tests", "tp_worker.py")
NEW_TOKENS = 40
PROMPTS = random_prompts([5, 17, 9], seed=3)


def torchrun(jobs: list[dict], tmp_path, nproc: int = 2) -> list[dict]:
    """Run the jobs on ``nproc`` ranks; returns each rank's results (rank order)."""
    jobs_path = tmp_path / "jobs.json"
    jobs_path.write_text(json.dumps(jobs))
    out = tmp_path / "out"
    out.mkdir()
    cmd = torchrun_command(nproc, WORKER, str(jobs_path), str(out))
    proc = subprocess.run(cmd, env=torchrun_env(), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(nproc)]


def torchrun_module(args: list[str], tmp_path, nproc: int = 2) -> str:
    """``torchrun -m eagle_engine ARGS`` on ``nproc`` ranks; returns the ranks' stdout."""
    cmd = torchrun_command(nproc, "-m", "eagle_engine", *args)
    proc = subprocess.run(cmd, env=torchrun_env(), capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


@pytest.fixture(scope="module")
def run(tmp_path_factory, reference_ops):
    """Models, heads and jobs; the N=2 results of every rank and the N=1 results, by job name."""
    tmp = tmp_path_factory.mktemp("tp")
    llama = make_hf_model("llama", num_attention_heads=8, num_key_value_heads=2, hidden_size=64)
    qwen2 = make_hf_model("qwen2")  # q/k/v bias, tied embeddings
    bias = make_hf_model("llama-bias")  # o_proj and down_proj biases: added once, after the all-reduce
    qwen3 = make_hf_model("qwen3")  # q/k RMSNorm (whole on every rank), head_dim 24
    bad = make_hf_model("llama", num_attention_heads=6, num_key_value_heads=3, hidden_size=48)
    models = {"llama": llama, "qwen2": qwen2, "llama-bias": bias, "qwen3": qwen3, "bad": bad}
    dirs = {name: save(m, str(tmp / name)) for name, m in models.items()}
    for fmt in ("bin", "sharded"):  # pytorch_model.bin: loaded whole, then sliced; sharded safetensors
        dirs[f"llama-{fmt}"] = save(llama, str(tmp / f"llama-{fmt}"), fmt)
    heads = {}
    for model, kind in (("llama", "eagle1"), ("qwen2", "eagle1"), ("qwen2", "eagle3")):
        base = EagleEngine.from_pretrained(dirs[model])
        heads[model, kind] = make_head_dir(base, kind, str(tmp / f"{model}-{kind}"))
    jobs = []

    def job(name, model, method, head=None, tree="dynamic", **kw):
        jobs.append(dict(name=name, model=dirs[model], head=heads.get((model, head)), tree=tree,
                         method=method, prompts=PROMPTS, new_tokens=NEW_TOKENS, tp=2, **kw))

    job("bad-kv-heads", "bad", "error")  # first: before any process group exists
    job("llama-vanilla", "llama", "vanilla")
    job("llama-eagle1", "llama", "generate", "eagle1")
    job("llama-bin-vanilla", "llama-bin", "vanilla")
    job("llama-sharded-vanilla", "llama-sharded", "vanilla")
    job("llama-sampled", "llama", "generate", "eagle1", temperature=0.8, seed=[7, 8, 9])
    job("llama-vanilla-sampled", "llama", "vanilla", temperature=0.8, seed=11)
    job("llama-unseeded", "llama", "generate", "eagle1", temperature=1.0, seed=None)
    job("qwen2-vanilla", "qwen2", "vanilla")
    job("llama-bias-vanilla", "llama-bias", "vanilla")
    job("qwen3-vanilla", "qwen3", "vanilla")
    job("qwen2-eagle1-static", "qwen2", "generate", "eagle1", tree="static")
    job("qwen2-eagle3", "qwen2", "generate", "eagle3")
    job("llama-eagle1-auto", "llama", "generate", "eagle1", tree="auto", calibration_tokens=8)
    job("world-size", "llama", "error")
    jobs[-1]["tp"] = 4
    ranks = torchrun(jobs, tmp)

    single, engines = {}, {}
    for j in jobs:
        if j["method"] == "error" or ("seed" in j and j["seed"] is None) or "-bin" in j["name"] or (
                "-sharded" in j["name"]):
            continue
        key = (j["model"], j["head"], j["tree"])
        if key not in engines:
            calibration = auto_tree.CALIBRATION_TOKENS
            auto_tree.CALIBRATION_TOKENS = j.get("calibration_tokens", calibration)
            engines[key] = EagleEngine.from_pretrained(j["model"], j["head"], tree=j["tree"])
            auto_tree.CALIBRATION_TOKENS = calibration
        engine = engines[key]
        method = engine.generate if j["method"] == "generate" else engine.generate_vanilla
        res = method(PROMPTS, NEW_TOKENS, temperature=j.get("temperature", 0.0), seed=j.get("seed"),
                     stop_token_ids=[])
        single[j["name"]] = {"tokens": [r.tokens for r in res], "target_parameters": count_parameters(
            engine.target), "kv_heads": engine.runner.state.tcache.data.shape[3]}
    return ranks, single, models


GREEDY = {  # job name: model
    "llama-vanilla": "llama",
    "llama-eagle1": "llama",
    "qwen2-vanilla": "qwen2",
    "qwen2-eagle1-static": "qwen2",
    "qwen2-eagle3": "qwen2",
    "llama-eagle1-auto": "llama",
    "llama-bias-vanilla": "llama-bias",
    "qwen3-vanilla": "qwen3",
}


def test_auto_tree_is_rank_zeros_choice_on_every_rank(run):
    ranks, _, _ = run
    nodes = [r["llama-eagle1-auto"]["tree_nodes"] for r in ranks]
    assert nodes[0] is not None and nodes[0] == nodes[1]


@pytest.mark.parametrize("name", GREEDY)
def test_greedy_matches_single_device_and_transformers(run, name):
    ranks, single, hf = run
    assert ranks[0][name]["tokens"] == ranks[1][name]["tokens"]
    assert ranks[0][name]["tokens"] == single[name]["tokens"]
    model = hf[GREEDY[name]]
    for prompt, tokens in zip(PROMPTS, ranks[0][name]["tokens"]):
        assert tokens == hf_greedy(model, prompt, NEW_TOKENS)


def test_every_checkpoint_format_loads_its_shard(run):
    ranks, _, _ = run
    for r in ranks:
        assert r["llama-bin-vanilla"]["tokens"] == r["llama-sharded-vanilla"]["tokens"] == r["llama-vanilla"][
            "tokens"]


@pytest.mark.parametrize("name", ["llama-sampled", "llama-vanilla-sampled"])
def test_seeded_sampling_matches_single_device(run, name):
    ranks, single, _ = run
    assert ranks[0][name]["tokens"] == ranks[1][name]["tokens"] == single[name]["tokens"]


def test_unseeded_sampling_is_the_same_on_every_rank(run):
    ranks, _, _ = run
    tokens = ranks[0]["llama-unseeded"]["tokens"]
    assert len(tokens) == len(PROMPTS) and tokens == ranks[1]["llama-unseeded"]["tokens"]


@pytest.mark.parametrize("model", ["llama", "qwen2"])
def test_each_rank_holds_half_the_target(run, model):
    ranks, single, _ = run
    total = single[f"{model}-vanilla"]["target_parameters"]
    for r in ranks:
        held = r[f"{model}-vanilla"]["target_parameters"]
        assert 0.5 * total <= held <= 0.52 * total, (held, total)  # norms and row-parallel biases are whole
        assert r[f"{model}-vanilla"]["kv_heads"] * 2 == single[f"{model}-vanilla"]["kv_heads"]


def test_bad_sizes_raise_on_every_rank(run):
    ranks, _, _ = run
    for r in ranks:
        assert "num_key_value_heads (3)" in r["bad-kv-heads"]["error"]
        assert "differs from the world size 2" in r["world-size"]["error"]


def test_cli_generate_prints_once(tmp_path):
    """``torchrun --nproc-per-node 2 -m eagle_engine generate --tensor-parallel-size 2``: rank 0 prints."""
    from tiny import make_tokenizer
    from transformers import AutoTokenizer

    directory = str(tmp_path / "model")
    make_tokenizer(directory, vocab_size=300)
    vocab = len(AutoTokenizer.from_pretrained(directory))
    save(make_hf_model("qwen2", vocab_size=vocab + vocab % 2), directory)
    head = make_head_dir(EagleEngine.from_pretrained(directory), "eagle1", str(tmp_path / "head"))
    args = ["generate", "--base", directory, "--draft", head, "--prompt", "import os",
            "--max-new-tokens", "12", "--compare", "--tensor-parallel-size", "2"]
    out = torchrun_module(args, tmp_path)
    assert out.count("[eagle] 12 tokens") == 1 and out.count("[vanilla] 12 tokens") == 1, out
    assert "outputs identical: yes" in out and out.count("import os") == 1  # the text, once


@pytest.mark.parametrize(
    "field, value, others",
    [
        ("num_attention_heads", 3, dict(num_key_value_heads=1)),
        ("num_key_value_heads", 3, dict(num_attention_heads=6)),
        ("intermediate_size", 129, {}),
        ("vocab_size", 255, {}),
    ],
)
def test_every_split_size_is_checked(field, value, others):
    from eagle_engine.errors import EagleError
    from eagle_engine.models.config import ModelConfig
    from eagle_engine.models.parallel import check_divisible

    fields = dict(model_type="llama", hidden_size=48, intermediate_size=128, num_hidden_layers=1,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=256, head_dim=8)
    fields.update(others, **{field: value})
    cfg = ModelConfig.from_dict(fields, "test")
    with pytest.raises(EagleError, match=f"{field} \\({value}\\)"):
        check_divisible(cfg, 2)


def test_tensor_parallel_outside_torchrun_is_an_error(tmp_path, monkeypatch):
    from eagle_engine.errors import EagleError

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    directory = save(make_hf_model("qwen2"), str(tmp_path / "m"))
    with pytest.raises(EagleError, match="launch with torchrun --nproc-per-node 2"):
        EagleEngine.from_pretrained(directory, tensor_parallel_size=2)
    with pytest.raises(EagleError, match="tensor_parallel_size must be an integer >= 1"):
        EagleEngine.from_pretrained(directory, tensor_parallel_size=0)
