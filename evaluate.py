"""Thin wrapper: `python evaluate.py --help`. The command lives in llm_unitscale.cli."""

from llm_unitscale.cli import evaluate_main

if __name__ == "__main__":
    raise SystemExit(evaluate_main())
