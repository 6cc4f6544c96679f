"""SFT warm start: `python -m grailcore.sft --cfg configs/x.py [overrides]` fine-tunes the
policy on (prompt, gold target) pairs with a completion-only loss (grailcore.steps.sft_step)
in the same trainer shell as GRPO: signals, non-finite guard, evaluation, checkpoints,
resume, export. `--dry-run` runs one step with its update withheld. A configuration error
prints as one line (exit 2); `--debug` shows its traceback."""

from __future__ import annotations

import sys

from grailcore import cli
from grailcore.train import launch


def main(argv: list[str] | None = None) -> dict:
    return launch(sys.argv[1:] if argv is None else argv, "sft", __doc__)


if __name__ == "__main__":
    cli.command(main)
