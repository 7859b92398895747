"""`python -m llm_unitscale.export RUN [OUT]` (and the `llm-unitscale-export` console script): see
llm_unitscale.cli; the export itself is llm_unitscale.serving."""

from llm_unitscale.cli import exit_with
from llm_unitscale.cli import export_main as main


def console() -> None:
    """The ``llm-unitscale-export`` console script: :func:`main` ending through ``cli.exit_with``."""
    exit_with(main)


if __name__ == "__main__":
    console()
