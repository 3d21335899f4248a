"""minigpt's entry point: `python main.py` does what config_run.py (beside this file) says, and
command-line flags override it. The flags, the tasks and the exit codes are in minigpt/cli.py,
which is also the `minigpt` command of an installed package; `python main.py --help` lists them.

    python main.py                                   # pretrain, quick mode (see config_run.py)
    python main.py --task generate --checkpoint runs/pretrain-quick --prompt "Every effort moves you"
"""

import sys

import config_run
from minigpt import cli
from minigpt.cli import PIPELINES, parse_args  # noqa: F401  (main.PIPELINES, main.parse_args: as before)


def main(argv: list[str] | None = None) -> int:
    """Run what config_run.py and the flags say; returns the exit code (see minigpt.cli.main)."""
    return cli.main(argv, config_run)


def graph_settings(flags: dict) -> tuple[dict, dict | None, str]:
    """config_run.py's settings with a studio graph's model, data and training goal on top, the graph
    when it is not the standard chain, and its name."""
    return cli.graph_settings(flags, config_run)


if __name__ == "__main__":
    sys.exit(main())
