"""Thin wrapper: `python train.py --help`. The command lives in llm_unitscale.cli."""

from llm_unitscale.cli import train_main

if __name__ == "__main__":
    raise SystemExit(train_main())
