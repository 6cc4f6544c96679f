"""The run's rollout side: one engine, whether it holds the policy's current weights, and
the weight sync that brings it up to date."""

from __future__ import annotations

from typing import Callable

import torch

from grailcore.data.schema import Example
from grailcore.rollout.base import RolloutEngine
from grailcore.rollout.collect import Rollouts, Scorer, collect_rollouts
from grailcore.rollout.sync import push_weights
from grailcore.types import SamplingParams


class RolloutWorker:
    """Samples from `engine`; `policy_lm` is the trained HF model whose weights it follows.

    Invariant: `stale` is True exactly when the policy changed since the engine last
    received its weights. Training marks it (`mark_stale`) after each update and syncs every
    rollout.sync_every steps; evaluation syncs first (`sync_if_stale`), so it always scores
    the current policy. Collectives: `sync` gathers FSDP shards (every rank calls it).
    """

    def __init__(self, engine: RolloutEngine, policy_lm: torch.nn.Module) -> None:
        self.engine = engine
        self.policy_lm = policy_lm
        self.stale = False

    def collect(self, examples: list[Example], prompt_ids: list[list[int]], params: SamplingParams,
                scorer: Scorer | Callable, **resampling) -> Rollouts:
        """Groups of params.n scored completions per prompt (see collect_rollouts)."""
        return collect_rollouts(self.engine, examples, prompt_ids, params, scorer, **resampling)

    def mark_stale(self) -> None:
        self.stale = True

    def sync(self) -> None:
        """Push the policy's weights into the engine (a no-op copy when it shares them)."""
        push_weights(self.policy_lm, self.engine)
        self.stale = False

    def sync_if_stale(self) -> None:
        if self.stale:
            self.sync()

    def close(self) -> None:
        self.engine.close()
