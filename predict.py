"""Thin wrapper: `python predict.py --help`. The command lives in llm_unitscale.cli."""

from llm_unitscale.cli import predict_main

if __name__ == "__main__":
    raise SystemExit(predict_main())
