"""`python -m llm_unitscale.train` (and the `llm-unitscale-train` console script): see llm_unitscale.cli."""

from llm_unitscale.cli import exit_with, train_main


def main() -> None:
    exit_with(train_main)


if __name__ == "__main__":
    main()
