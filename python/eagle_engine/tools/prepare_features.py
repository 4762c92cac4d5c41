"""``eagle prepare-features``: the target's features for a dataset, written once (:mod:`.feature_store`)."""

from __future__ import annotations

import json
import os
import sys

from ..errors import TrainingInputError
from .feature_store import write_features
from .training_data import read_rows


def prepare_features(args) -> dict:
    """``eagle prepare-features``: check everything, read the data as training would, run the target over
    it and write the feature directory (refusing a non-empty ``--out``)."""
    from ..engine.engine import resolve_device
    from ..models import load_target
    from .common import check_model_dir, load_tokenizer

    config = check_model_dir(args.base)
    if args.seq_len > config.max_length:
        raise TrainingInputError(
            f"--seq-len {args.seq_len} exceeds the model's maximum length {config.max_length}"
        )
    if os.path.isdir(args.out) and os.listdir(args.out):
        raise TrainingInputError(f"--out {args.out} is not empty: give a new directory for the features")
    if args.kind == "eagle3" and config.num_hidden_layers < 3:
        raise TrainingInputError(
            f"EAGLE-3 features need a target of >= 3 layers, got {config.num_hidden_layers}"
        )
    tokenizer = load_tokenizer(args.base)
    rows = read_rows(
        tokenizer,
        args.data,
        args.seq_len,
        data_format=args.data_format,
        doc_separator=args.doc_separator,
        chat_template=args.chat_template,
        model_dir=args.base,
    )
    print(f"prepare-features: data: {json.dumps(rows.report)}", file=sys.stderr)
    device = resolve_device(args.device)
    dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    target = load_target(args.base, device=device, dtype=dtype)
    target.fuse()  # the matmul path online training and its evaluation run
    return write_features(
        target,
        rows,
        args.kind,
        args.out,
        batch_size=args.batch_size,
        shard_rows=args.shard_rows,
        report=rows.report,
    )
