"""Thin wrapper: `python evaluate.py --help`. The command lives in llm_unitscale.cli."""

from llm_unitscale.cli import evaluate_main, exit_with

if __name__ == "__main__":
    exit_with(evaluate_main)
