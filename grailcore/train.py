"""Entry point: `torchrun --nproc_per_node=N -m grailcore.train --cfg configs/x.py [overrides]`
(or `python -m grailcore.train ...` for one process). GRPO, or GRAIL when rewards.names
lists `gail`; `--dry-run` runs one step with its update withheld. A configuration error
prints as one line (exit 2); `--debug` shows its traceback. Parse, validate, build, run."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from grailcore import cli
from grailcore import dist as gdist
from grailcore.build import build_trainer
from grailcore.dry_run import dry_run
from grailcore.rollout.precision import cpu_note
from grailcore.validation import Mode, validate


def launch(argv: list[str], mode: Mode, description: str) -> dict:
    """Parse and validate the config, then build and run a `mode` run (or its dry run);
    every rank calls it. Returns the run's summary."""
    cfg = cli.parse_config(argv, description=description)
    dist = gdist.init_distributed(cfg.collective_timeout_s)  # idempotent: build_trainer joins the same group
    validate(cfg, dist.world_size, mode)
    # Logging before the build, or what it reports (resumed from, skipped rows) is lost.
    logging.basicConfig(level=logging.INFO if dist.rank == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    trainer = build_trainer(cfg, mode)
    if dist.rank == 0:
        cli.save_config(cfg, Path(cfg.run_dir), notes=[cpu_note(), trainer.rollout.engine.precision.note()])
    try:
        result = dry_run(trainer) if cfg.dry_run else trainer.run()
        # Only after a clean run (a failed rank would leave its peers waiting here): no rank
        # tears its group down while a peer's gloo work may still be in flight, which can
        # abort the peer at exit ("terminate called without an active exception", seen once
        # in CI after a finished 2-rank dry run).
        gdist.barrier()
        return result
    finally:
        trainer.close()
        gdist.shutdown()


def main(argv: list[str] | None = None) -> dict:
    return launch(sys.argv[1:] if argv is None else argv, "grpo", __doc__)


if __name__ == "__main__":
    cli.command(main)
