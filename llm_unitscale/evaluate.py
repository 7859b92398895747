"""`python -m llm_unitscale.evaluate` (and the `llm-unitscale-evaluate` console script): see llm_unitscale.cli."""

from llm_unitscale.cli import evaluate_main, exit_with


def main() -> None:
    exit_with(evaluate_main)


if __name__ == "__main__":
    main()
