"""Deterministic, resumable prompt order: a seeded permutation per epoch; the state
(epoch, position) goes into checkpoints so `--resume` draws the same next batch."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PromptSampler:
    num_examples: int
    seed: int
    epoch: int = 0
    position: int = 0

    def _order(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_examples, generator=generator).tolist()

    def next(self, count: int) -> list[int]:
        """The next `count` example indices (every rank draws the same global list)."""
        if self.num_examples == 0:
            raise ValueError("no training examples to sample from")
        out: list[int] = []
        order = self._order(self.epoch)
        while len(out) < count:
            if self.position >= self.num_examples:
                self.epoch, self.position = self.epoch + 1, 0
                order = self._order(self.epoch)
            take = min(count - len(out), self.num_examples - self.position)
            out.extend(order[self.position:self.position + take])
            self.position += take
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "num_examples": self.num_examples}

    def load_state_dict(self, state: dict) -> None:
        if state["num_examples"] != self.num_examples or state["seed"] != self.seed:
            raise ValueError(
                f"checkpoint was taken on {state['num_examples']} examples with seed {state['seed']}, "
                f"this run has {self.num_examples} with seed {self.seed}: resume with the same data"
            )
        self.epoch, self.position = state["epoch"], state["position"]
