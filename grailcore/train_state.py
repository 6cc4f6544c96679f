"""What a run saves and restores: the loop's own state (`TrainState`) and the
`Checkpointer`, which saves the model, optimizer and scheduler plus every stateful part
(the train state, the learned rewards) through their `state_dict()`, and restores them
all at `--resume` (grailcore.checkpoint does the atomic file work)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from grailcore import checkpoint as ckpt
from grailcore.sampler import MixtureSampler, PromptSampler

log = logging.getLogger(__name__)


class Stateful(Protocol):
    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


@dataclass
class TrainState:
    """Where the run is: steps done, the prompt sampler's position, the best evaluation so
    far and the current run of non-finite steps. JSON-serialisable state."""

    sampler: PromptSampler | MixtureSampler
    step: int = 0
    """Optimizer steps completed (the next step's index)."""
    best: dict | None = None
    """{"value", "step", "metric"} of the best evaluation (eval.best_metric), exported as RUN_DIR/best."""
    bad_in_a_row: int = 0
    """Consecutive steps whose every update was skipped (non-finite loss or gradient)."""

    def state_dict(self) -> dict:
        return {"step": self.step, "sampler": self.sampler.state_dict(), "best_metric": self.best,
                "bad_in_a_row": self.bad_in_a_row}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.sampler.load_state_dict(state["sampler"])
        self.best = state.get("best_metric")
        self.bad_in_a_row = int(state.get("bad_in_a_row", 0))


class Checkpointer:
    """Saves and restores one run's checkpoints in run_dir/checkpoints.

    The train state goes to trainer_state.json (readable), every other stateful part to
    extra.pt under its name; model and optimizer to every rank's shards (or gathered files),
    scheduler and each rank's RNG state to their own files. Collectives: every rank calls
    `save` and `load` together.
    """

    def __init__(self, run_dir: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler,
                 state: TrainState, parts: dict[str, Stateful], *, keep: int, trainable_only: bool,
                 sharded: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.state, self.parts = state, parts
        self.keep, self.trainable_only, self.sharded = keep, trainable_only, sharded

    def save(self) -> Path:
        """Checkpoint of the current step; returns its dir."""
        return ckpt.save_checkpoint(self.run_dir, self.state.step, self.model, self.optimizer, self.scheduler,
                                    self.state.state_dict(),
                                    extra={name: part.state_dict() for name, part in self.parts.items()},
                                    keep=self.keep, trainable_only=self.trainable_only, sharded=self.sharded)

    def load(self) -> Path | None:
        """Restore the newest good checkpoint into everything; its dir, or None when there is none."""
        loaded = ckpt.load_checkpoint(self.run_dir, self.model, self.optimizer, self.scheduler)
        if loaded is None:
            return None
        self.state.load_state_dict(loaded.trainer_state)
        for name, part in self.parts.items():  # a part with nothing to restore checks that itself
            part.load_state_dict(loaded.extra.get(name, {}))
        return loaded.path
