"""`python -m llm_unitscale.predict` (and the `llm-unitscale-predict` console script): see llm_unitscale.cli."""

from llm_unitscale.cli import predict_main as main

if __name__ == "__main__":
    raise SystemExit(main())
