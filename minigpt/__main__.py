"""`python -m minigpt`: the `minigpt` command (minigpt/cli.py)."""

import sys

from minigpt.cli import main

sys.exit(main())
