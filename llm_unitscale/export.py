"""`python -m llm_unitscale.export RUN [OUT]` (and the `llm-unitscale-export` console script): see
llm_unitscale.cli; the export itself is llm_unitscale.serving."""

from llm_unitscale.cli import exit_with, export_main


def main() -> None:
    exit_with(export_main)


if __name__ == "__main__":
    main()
