"""Entry point: `torchrun --nproc_per_node=N -m grailcore.train --cfg configs/x.py [overrides]`
(or `python -m grailcore.train ...` for one process). Parse, build, run the loop."""

from __future__ import annotations

import logging
import sys

from grailcore import dist
from grailcore.cli import parse_config, save_config
from grailcore.config import validate


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_config(sys.argv[1:] if argv is None else argv, description=__doc__)
    validate(cfg)
    from pathlib import Path

    from grailcore.loop import train
    from grailcore.setup import build

    # Logging before build(), or what it reports (resumed from, skipped rows) is lost.
    rank = dist.init_distributed().rank  # idempotent: build() joins the same group
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parts = build(cfg)
    if parts.dist.rank == 0:
        save_config(cfg, Path(cfg.run_dir), notes=[parts.engine.precision.note()])
    try:
        if cfg.dry_run:
            from grailcore.dry_run import dry_run

            result = dry_run(parts, cfg)
        else:
            result = train(parts, cfg)
        # Only after a clean run (a failed rank would leave its peers waiting here): no rank
        # tears its group down while a peer's gloo work may still be in flight, which can
        # abort the peer at exit ("terminate called without an active exception", seen once
        # in CI after a finished 2-rank dry run).
        dist.barrier()
        return result
    finally:
        if parts.engine is not None:
            parts.engine.close()
        dist.shutdown()


if __name__ == "__main__":
    main()
    dist.exit_finished_worker()
