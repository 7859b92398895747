"""`python -m llm_unitscale.predict` (and the `llm-unitscale-predict` console script): see llm_unitscale.cli."""

from llm_unitscale.cli import exit_with
from llm_unitscale.cli import predict_main as main


def console() -> None:
    """The ``llm-unitscale-predict`` console script: :func:`main` ending through ``cli.exit_with``."""
    exit_with(main)


if __name__ == "__main__":
    console()
