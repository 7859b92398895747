"""`python -m llm_unitscale.train` (and the `llm-unitscale-train` console script): see llm_unitscale.cli."""

from llm_unitscale.cli import train_main as main

if __name__ == "__main__":
    raise SystemExit(main())
