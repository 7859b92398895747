"""`python -m llm_unitscale.evaluate` (and the `llm-unitscale-evaluate` console script): see llm_unitscale.cli."""

from llm_unitscale.cli import evaluate_main as main
from llm_unitscale.cli import exit_with


def console() -> None:
    """The ``llm-unitscale-evaluate`` console script: :func:`main` ending through ``cli.exit_with``."""
    exit_with(main)


if __name__ == "__main__":
    console()
