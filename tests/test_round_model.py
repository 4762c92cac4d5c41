"""The round model at real shapes (Llama-3.1-8B on ``meta`` tensors, the engine's own step code): structural
facts of the draft path and the sampling path, its predictions against their floors, the memory table, and
the CLI's JSON."""

import json
import os
import subprocess
import sys

import pytest
import torch

from eagle_engine.engine.batch import Mode
from eagle_engine.tools import round_model as rm
from eagle_engine.tools.shapes import model_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = "llama3.1-8b"
VOCAB = model_config(MODEL).vocab_size


@pytest.mark.parametrize("step", ["eagle2_dynamic", "eagle3_dynamic", "eagle1_static"])
@pytest.mark.parametrize("batch", [1, 8, 64])
def test_the_draft_lm_head_weight_is_read_once_per_level(step, batch):
    row = rm.summary_row(rm.model_step(MODEL, step, batch))
    assert row["draft_levels"] == (5 if step == "eagle1_static" else 7)  # the root's top-k, then each level
    assert row["draft_lm_head_weight_reads"] == row["draft_levels"]


@pytest.mark.parametrize("step", ["vanilla", "eagle2_dynamic"])
def test_sampling_allocates_no_fp32_vocabulary_tensor_beyond_the_logits(step):
    sampling = Mode(greedy=False, max_top_k=16, top_p=True)
    record = rm.model_step(MODEL, step, 8, sampling=sampling).record
    vocab_fp32 = [shape for shape, dtype in record.allocations
                  if dtype == torch.float32 and shape[-1:] == (VOCAB,)]
    assert len(vocab_fp32) == 1, vocab_fp32  # the logits the target's lm_head produced
    verify = {x.name for x in record.launches if x.phase in ("verify", "bookkeeping")}
    assert {"top_p_threshold", "masked_softmax_"} <= verify and "sort" not in verify


def test_predictions_at_batch_1_are_near_their_floors():
    vanilla = rm.summary_row(rm.model_step(MODEL, "vanilla", 1))
    eagle2 = rm.summary_row(rm.model_step(MODEL, "eagle2_dynamic", 1))
    assert vanilla["predicted_ms"] <= 1.1 * vanilla["floor_ms"], vanilla
    assert eagle2["predicted_ms"] <= 1.3 * eagle2["floor_ms"], eagle2
    # The floor counts the target's weights once (16.1 GB in bf16, less the embedding table it gathers from).
    assert 4.9 < vanilla["floor_ms"] < 5.4


def test_peak_memory_holds_the_weights_and_every_slots_cache():
    cfg = model_config(MODEL)
    weights = 8.03e9 * 2
    kv_per_token = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.head_dim * 2
    peaks = [rm.model_step(MODEL, "eagle2_dynamic", b, context=4096, max_model_len=8192).record.peak_bytes
             for b in (1, 8)]
    for b, peak in zip((1, 8), peaks):
        assert weights + b * 8192 * kv_per_token < peak < weights + b * 8192 * kv_per_token + 3e9


def test_cli_prints_one_json_object():
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "round_model.py"), "--model", MODEL, "--json",
           "--steps", "vanilla,eagle2_dynamic", "--batches", "1", "--memory-batches", "1"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    result = json.loads(out)
    assert result["model"] == MODEL
    assert [(r["step"], r["batch"]) for r in result["rows"]] == [("vanilla", 1), ("eagle2_dynamic", 1)]
    for row in result["rows"]:
        assert {"launches", "predicted_ms", "floor_ms", "draft_lm_head_weight_reads"} <= set(row)
    assert result["memory"][0]["max_model_len"] == 8192 and result["memory"][0]["peak_bytes"] > 16e9


def test_the_model_knows_every_kernel_op_the_launch_counter_does():
    """round_cost counts each kernel op's launches, the model costs them: the same ops, and no modelled op
    launches more often than the counter allows."""
    from eagle_engine.tools.round_cost import KERNEL_LAUNCHES

    assert set(rm.KERNEL_COSTS) == set(KERNEL_LAUNCHES)
    for step in ("vanilla", "eagle2_dynamic"):
        for launch in rm.model_step(MODEL, step, 8).record.launches:
            if launch.name in KERNEL_LAUNCHES:
                assert launch.launches <= KERNEL_LAUNCHES[launch.name], launch
