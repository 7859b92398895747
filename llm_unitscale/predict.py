"""`python -m llm_unitscale.predict` (and the `llm-unitscale-predict` console script): see llm_unitscale.cli."""

from llm_unitscale.cli import exit_with, predict_main


def main() -> None:
    exit_with(predict_main)


if __name__ == "__main__":
    main()
