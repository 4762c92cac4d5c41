"""One rank of a tensor-parallel test run, launched by ``torchrun`` (see tests/test_tensor_parallel.py).

``python -m torch.distributed.run --nproc-per-node N tp_worker.py JOBS.json OUT_DIR``: runs every job of
JOBS.json on this rank and writes ``OUT_DIR/rank<r>.json`` with each job's tokens (or error), so the test can
compare ranks with each other, with N=1 and with transformers. A job:
``{"name", "model", "head" (or null), "tree", "method" ("generate" | "vanilla" | "error"), "prompts",
"new_tokens", "temperature", "seed", "tp"}``; "error" jobs record the EagleError's message instead.
"""

import json
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "python"))
sys.path.insert(0, ROOT)

from eagle_engine import EagleEngine  # noqa: E402
from eagle_engine.errors import EagleError  # noqa: E402
from eagle_engine.models.parallel import count_parameters, shutdown  # noqa: E402

torch.set_num_threads(1)


def run_job(job: dict, engines: dict) -> dict:
    if job["method"] == "error":
        try:
            EagleEngine.from_pretrained(job["model"], tensor_parallel_size=job["tp"])
        except EagleError as e:
            return {"error": str(e)}
        return {"error": None}
    key = (job["model"], job.get("head"), job.get("tree", "dynamic"))
    if "calibration_tokens" in job:  # a short auto-tree measurement
        import eagle_engine.speculative.auto_tree as auto_tree

        auto_tree.CALIBRATION_TOKENS = job["calibration_tokens"]
    if key not in engines:
        engines[key] = EagleEngine.from_pretrained(
            job["model"], job.get("head"), tree=key[2], tensor_parallel_size=job["tp"]
        )
    engine = engines[key]
    run = engine.generate if job["method"] == "generate" else engine.generate_vanilla
    results = run(
        job["prompts"],
        job["new_tokens"],
        temperature=job.get("temperature", 0.0),
        seed=job.get("seed"),
        stop_token_ids=[],
    )
    return {
        "tokens": [r.tokens for r in results],
        "target_parameters": count_parameters(engine.target),
        "kv_heads": engine.runner.state.tcache.data.shape[3],
        "tree_nodes": engine.tree.num_nodes if engine.method == "eagle" else None,
    }


def main() -> None:
    jobs_path, out_dir = sys.argv[1], sys.argv[2]
    with open(jobs_path) as f:
        jobs = json.load(f)
    engines, out = {}, {}
    for job in jobs:
        out[job["name"]] = run_job(job, engines)
    rank = int(os.environ.get("RANK", 0))
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(out, f)
    for engine in engines.values():  # every rank's engine thread ends before the process group does
        engine.close()
    shutdown()


if __name__ == "__main__":
    main()
