"""Writes a small random Llama/Qwen2 checkpoint in HF format (see
services/executor/model/tiny_checkpoint.py): `python -m tools.make_tiny_checkpoint OUT_DIR`."""

from __future__ import annotations

import argparse
from pathlib import Path

from services.executor.model.config import SUPPORTED_MODEL_TYPES
from services.executor.model.tiny_checkpoint import DEFAULT_VOCAB, make_tiny_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description="Writes a small random HF checkpoint.")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--arch", choices=SUPPORTED_MODEL_TYPES, default="llama")
    parser.add_argument("--shards", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=DEFAULT_VOCAB)
    args = parser.parse_args()
    out = make_tiny_checkpoint(
        args.out_dir,
        seed=args.seed,
        arch=args.arch,
        num_layers=args.layers,
        hidden=args.hidden,
        heads=args.heads,
        kv_heads=args.kv_heads,
        vocab=args.vocab,
        shards=args.shards,
    )
    print(out)


if __name__ == "__main__":
    main()
