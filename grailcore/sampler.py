"""Deterministic, resumable prompt order: a seeded permutation per epoch (PromptSampler),
or weighted draws over several sources (MixtureSampler); the state goes into checkpoints
so `--resume` draws the same next batch. A run's exports record where its order stopped
(PROMPT_ORDER_FILE) so a later stage on the same rows can continue it (`continue_order`)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from grailcore.data.schema import Example


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
        if "mixture" in state:
            raise ValueError(f"checkpoint was taken on the mixture {state['mixture']}, this run has one "
                             "dataset: resume with the same data.mixture")
        if state["num_examples"] != self.num_examples or state["seed"] != self.seed:
            raise ValueError(
                f"checkpoint was taken on {state['num_examples']} examples with seed {state['seed']}, "
                f"this run has {self.num_examples} with seed {self.seed}: resume with the same data"
            )
        self.epoch, self.position = state["epoch"], state["position"]


@dataclass
class MixtureSampler:
    """Prompts from several sources in proportion to their weights, resumable like PromptSampler.

    `sources[k]` is the example indices of source k (into the concatenated training list).
    Each draw goes to the source furthest below its weighted share so far (largest deficit,
    ties to the earlier source), so every window of draws matches the weights to within
    one prompt per source, with less spread than i.i.d. draws; within a source the order
    is that source's own seeded PromptSampler (its epochs advance independently).
    """

    sources: list[list[int]]
    weights: list[float]
    seed: int
    names: list[str]
    drawn: list[int] | None = None
    """Prompts drawn from each source so far."""

    def __post_init__(self) -> None:
        if not (len(self.sources) == len(self.weights) == len(self.names)) or not self.sources:
            raise ValueError(f"{len(self.sources)} sources, {len(self.weights)} weights, {len(self.names)} names: "
                             "give one weight and name per non-empty list of sources")
        if empty := [n for n, s in zip(self.names, self.sources) if not s]:
            raise ValueError(f"mixture source(s) {empty} have no usable training examples")
        if any(not w > 0 for w in self.weights):
            raise ValueError(f"mixture weights must be > 0, got {dict(zip(self.names, self.weights))}")
        total = sum(self.weights)
        self._shares = [w / total for w in self.weights]
        self._samplers = [PromptSampler(len(s), self.seed * 7_919 + k) for k, s in enumerate(self.sources)]
        self.drawn = list(self.drawn or [0] * len(self.sources))

    @property
    def num_examples(self) -> int:
        return sum(len(s) for s in self.sources)

    def _pick(self) -> int:
        step = sum(self.drawn) + 1
        deficits = [share * step - drawn for share, drawn in zip(self._shares, self.drawn)]
        return max(range(len(deficits)), key=lambda k: (deficits[k], -k))

    def next(self, count: int) -> list[int]:
        """The next `count` example indices (every rank draws the same global list)."""
        out = []
        for _ in range(count):
            k = self._pick()
            self.drawn[k] += 1
            out.append(self.sources[k][self._samplers[k].next(1)[0]])
        return out

    def state_dict(self) -> dict:
        return {"seed": self.seed, "num_examples": self.num_examples, "drawn": list(self.drawn),
                "mixture": {name: {"weight": w, "size": len(s)}
                            for name, w, s in zip(self.names, self.weights, self.sources)},
                "sources": [s.state_dict() for s in self._samplers]}

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        if "mixture" not in state or state["mixture"] != mine["mixture"] or state["seed"] != self.seed:
            raise ValueError(
                f"checkpoint was taken with mixture {state.get('mixture', 'none (a single dataset)')} and seed "
                f"{state['seed']}, this run has {mine['mixture']} with seed {self.seed}: resume with the same data"
            )
        for sampler, sub in zip(self._samplers, state["sources"]):
            sampler.load_state_dict(sub)
        self.drawn = list(state["drawn"])


PROMPT_ORDER_FILE = "grailcore_prompt_order.json"
"""Written into a run's exports: the training rows (a digest of their ids, in order) and the
sampler's state when the export was taken."""


def rows_digest(examples: Sequence[Example]) -> str:
    """sha256 of the training rows' ids in their order: equal only for the same rows."""
    return hashlib.sha256("\n".join(ex.example_id for ex in examples).encode()).hexdigest()


def prompt_order_record(sampler: PromptSampler | MixtureSampler, examples: Sequence[Example]) -> dict:
    return {"rows": rows_digest(examples), "num_examples": len(examples), "sampler": sampler.state_dict()}


def _drawn(state: dict) -> int:
    return sum(state["drawn"]) if "drawn" in state else state["epoch"] * state["num_examples"] + state["position"]


def continue_order(sampler: PromptSampler | MixtureSampler, model_dir: str | Path,
                   examples: Sequence[Example]) -> str | None:
    """Continue `sampler` where the run that exported `model_dir` stopped, when that run drew
    from these same rows with the same order seed; what was done, for the log (None: the model
    is not a grailcore export)."""
    path = Path(model_dir) / PROMPT_ORDER_FILE
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    mine = sampler.state_dict()
    theirs = record["sampler"]
    if (record["rows"], theirs["seed"], theirs.get("mixture")) != (rows_digest(examples), mine["seed"],
                                                                   mine.get("mixture")):
        return (f"{model_dir} was trained on other rows ({record['num_examples']}) or another order: "
                "this run's prompt order starts afresh")
    sampler.load_state_dict(record["sampler"])
    return (f"{model_dir} was trained on the first {_drawn(record['sampler'])} prompts of this data's order: "
            "this run continues the order from there (data.continue_order)")
