"""The chat-training workflow end to end on the demo pair: conversations, regenerated answers, a head
trained on them, and its acceptance with and without a reduced draft vocabulary.

    python benchmarks/demo_chat.py                    # about 10 minutes on 2 CPU cores
    python benchmarks/demo_chat.py --conversations 200 --steps 300 --prompts 4     # a quick look

1. Conversations (ShareGPT JSON) cut from the demo corpus: the user sends 8 to 16 lines of a standard-library
   module with a request to continue it, the assistant answers with the next lines. Training conversations
   come from the demo's training split, evaluation ones from its held-out split (modules never trained on).
2. ``eagle prepare-data --regenerate``: the demo target rewrites every answer (greedy, with the demo EAGLE
   head), so the head learns the target's own continuations; ``--token-frequencies`` counts the tokens.
3. ``eagle train-draft --data regenerated.jsonl --chat-template ...``: an EAGLE-1/2 head, loss on the
   answers only, evaluated on held-out conversations every ``--eval-every`` steps.
4. Greedy decoding of held-out conversations (rendered up to the answer) with: the shipped demo head
   (trained on plain code), the chat-trained head, and the chat-trained head over a reduced draft vocabulary
   (``--draft-vocab-size``), each engine once per repeat and prompt in turn: mean acceptance length,
   tokens/s (median), and whether every output equals vanilla decoding's.

Every step is an ``eagle`` command run in this process (its command line is printed). Outputs go to
``--work`` (default ``benchmarks/.work/chat``, ignored by git); the measured rows are appended to
``benchmarks/results/demo_chat.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import append_results, format_table, interleaved_decode, parse  # noqa: E402

from eagle_engine import EagleEngine, demo_paths  # noqa: E402
from eagle_engine.tools.cli import main as eagle  # noqa: E402
from eagle_engine.tools.common import load_tokenizer  # noqa: E402
from eagle_engine.tools.corpus import read_corpus, stdlib_files  # noqa: E402

TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'user' %}### Request:\n{{ m['content'] }}\n"
    "{% elif m['role'] == 'assistant' %}### Response:\n{{ m['content'] }}{{ eos_token }}\n"
    "{% else %}{{ m['content'] }}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}### Response:\n{% endif %}"
)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--conversations", type=int, default=800, help="training conversations (800)")
    ap.add_argument("--steps", type=int, default=600, help="training steps (600)")
    ap.add_argument("--seq-len", type=int, default=384, help="tokens per training row (384)")
    ap.add_argument("--prompts", type=int, default=12, help="held-out conversations decoded (12)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--draft-vocab-size", type=int, default=1024, help="reduced draft vocabulary (1024)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--measure-only",
        action="store_true",
        help="skip steps 1-3: measure the head and frequencies an earlier run left in --work",
    )
    ap.add_argument(
        "--work", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), ".work", "chat")
    )
    return parse(ap, argv)


def conversations(files: list[str], n: int, seed: int) -> list[dict]:
    """``n`` ShareGPT conversations: 8-16 lines of a module, then the next 8 lines as the answer."""
    rng = random.Random(seed)
    texts = [t for t in read_corpus(files) if t.count("\n") > 60]
    out = []
    while len(out) < n:
        lines = rng.choice(texts).splitlines()
        start, shown = rng.randrange(len(lines) - 40), rng.randrange(8, 17)
        code, answer = (
            "\n".join(lines[start : start + shown]),
            "\n".join(lines[start + shown : start + shown + 8]),
        )
        if not answer.strip():
            continue
        ask = f"Continue this Python code:\n{code}"
        out.append(
            {
                "id": f"s{seed}-{len(out)}",
                "conversations": [{"from": "human", "value": ask}, {"from": "gpt", "value": answer}],
            }
        )
    return out


def run(command: list[str]) -> None:
    print("$ eagle " + " ".join(command), flush=True)
    started = time.perf_counter()
    if eagle(command) != 0:
        raise SystemExit(f"eagle {command[0]} failed")
    print(f"  ({time.perf_counter() - started:.0f} s)", flush=True)


def measure(args, base, heads: dict, prompts: list[list[int]]) -> list[dict]:
    engines = {
        name: EagleEngine.from_pretrained(base, head, tree="dynamic", threads=args.threads, **extra)
        for name, (head, extra) in heads.items()
    }
    first = next(iter(engines.values()))
    vanilla = [first.generate_vanilla(p, args.new_tokens, stop_token_ids=[]).tokens for p in prompts]
    runs = interleaved_decode(engines, prompts, args.new_tokens, args.repeats, vanilla)
    for engine in engines.values():
        engine.close()
    return [
        {
            "head": name,
            **runs[name],
            "prompts": len(prompts),
            "repeats": args.repeats,
            "threads": args.threads,
            "new_tokens": args.new_tokens,
        }
        for name in engines
    ]


def prepare_and_train(args, base, demo_head, template, regenerated, freq, head) -> None:
    """Steps 1-3 (see the module docstring), each an ``eagle`` command."""
    w = args.work
    for name, files, n, seed in (
        ("train", stdlib_files("train"), args.conversations, 0),
        ("heldout", stdlib_files("heldout"), max(64, args.prompts), 1),
    ):
        with open(os.path.join(w, f"{name}.json"), "w") as f:
            json.dump(conversations(files, n, seed), f)
    for path in (regenerated, regenerated + ".prepare.json", freq):
        if os.path.exists(path):
            os.remove(path)
    common = ["--base", base, "--chat-template", template]
    run(
        [
            "prepare-data",
            *common,
            "--data",
            os.path.join(w, "train.json"),
            "--out",
            regenerated,
            "--regenerate",
            "--draft",
            demo_head,
            "--max-new-tokens",
            "96",
            "--batch-size",
            "16",
            "--token-frequencies",
            freq,
            "--seq-len",
            str(args.seq_len),
            "--threads",
            str(args.threads),
        ]
    )
    run(
        [
            "train-draft",
            *common,
            "--data",
            regenerated,
            "--out",
            head,
            "--steps",
            str(args.steps),
            "--seq-len",
            str(args.seq_len),
            "--batch-size",
            "8",
            "--lr",
            "3e-3",
            "--checkpoint-every",
            str(args.steps),
            "--eval-data",
            os.path.join(w, "heldout.json"),
            "--eval-prompts",
            "8",
            "--eval-new-tokens",
            "48",
            "--eval-every",
            str(max(1, args.steps // 3)),
            "--threads",
            str(args.threads),
        ]
    )


def main(argv=None) -> int:
    args = parse_args(argv)
    base, demo_head = demo_paths()
    w = args.work
    os.makedirs(w, exist_ok=True)
    template = os.path.join(w, "template.jinja")
    with open(template, "w") as f:
        f.write(TEMPLATE)
    regenerated, freq, head = (os.path.join(w, x) for x in ("regenerated.jsonl", "freq.json", "head"))
    if not args.measure_only:
        prepare_and_train(args, base, demo_head, template, regenerated, freq, head)
    tokenizer = load_tokenizer(base)
    with open(template) as f:
        tokenizer.chat_template = f.read()
    with open(os.path.join(w, "heldout.json")) as f:
        held = json.load(f)[: args.prompts]
    prompts = []
    for record in held:
        messages = [{"role": "user", "content": record["conversations"][0]["value"]}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        prompts.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    reduced = {"draft_vocab_size": args.draft_vocab_size, "token_frequencies": freq}
    heads = {
        "demo head (plain code)": (demo_head, {}),
        "chat-trained": (head, {}),
        f"chat-trained, draft vocab {args.draft_vocab_size}": (head, reduced),
    }
    rows = measure(args, base, heads, prompts)
    print(format_table(rows, ["head", "mean_accept_length", "tokens_per_second", "lossless"]))
    with open(os.path.join(head, "eval.json")) as f:
        trained = json.load(f)
    for row in rows:
        row["training"] = {
            "steps": args.steps,
            "conversations": args.conversations,
            "final_loss": trained["final_loss"],
            "eval_accept_length": trained["mean_accept_length"],
        }
    append_results("demo_chat", rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
