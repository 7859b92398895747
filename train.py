"""Thin wrapper: `python train.py --help`. The command lives in llm_unitscale.cli."""

from llm_unitscale.cli import exit_with, train_main

if __name__ == "__main__":
    exit_with(train_main)
