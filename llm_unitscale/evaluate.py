"""`python -m llm_unitscale.evaluate` (and the `llm-unitscale-evaluate` console script): see llm_unitscale.cli."""

from llm_unitscale.cli import evaluate_main as main

if __name__ == "__main__":
    raise SystemExit(main())
