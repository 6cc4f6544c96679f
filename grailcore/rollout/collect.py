"""Sample `group_size` completions per prompt, score them, and resample groups that
carry no signal (dynamic sampling) or whose best reward is too low (reject sampling)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch

from grailcore.data.schema import Example
from grailcore.rng import derive_seed
from grailcore.rollout.base import RolloutEngine
from grailcore.types import Completion, RewardOutput, SamplingParams

Scorer = Callable[..., RewardOutput]
"""`scorer(examples, texts, tokens=[(prompt ids, completion ids)] per completion,
sampled=completions)`: a `RewardStack` (its slot rewards read the completions' tokens)."""


@dataclass(frozen=True)
class Rollouts:
    """Flat, prompt-major: entry p * group_size + g is completion g of prompt p."""

    examples: list[Example]
    """[P*G] each prompt's example repeated group_size times."""
    prompt_ids: list[list[int]]
    """[P*G] chat-templated prompt token ids."""
    completions: list[Completion]
    """[P*G]"""
    rewards: RewardOutput
    """[P*G] scores of the final completions."""
    resampled_groups: int
    """Groups replaced by a resample that met the criterion."""
    resample_attempts: int


def _needs_resample(totals: torch.Tensor, dynamic_sampling: bool, reject_threshold: float | None) -> torch.Tensor:
    """[P] bool from the group-major reward totals [P, G]."""
    needs = torch.zeros(totals.shape[0], dtype=torch.bool)
    if dynamic_sampling:
        needs |= totals.amax(dim=1) == totals.amin(dim=1)
    if reject_threshold is not None:
        needs |= totals.amax(dim=1) < reject_threshold
    return needs


def _score(scorer: Scorer, flat_examples: list[Example], prompt_ids: list[list[int]],
           groups: list[list[Completion]]) -> RewardOutput:
    """Score the groups (prompt-major, flat) with their texts, token ids and completions."""
    tokens = [(ids, c.token_ids) for ids, group in zip(prompt_ids, groups, strict=True) for c in group]
    flat = [c for g in groups for c in g]
    return scorer(flat_examples, [c.text for c in flat], tokens=tokens, sampled=flat)


def collect_rollouts(
    engine: RolloutEngine,
    examples: list[Example],
    prompt_ids: list[list[int]],
    params: SamplingParams,
    scorer: Scorer,
    *,
    dynamic_sampling: bool = False,
    reject_threshold: float | None = None,
    max_resample_attempts: int = 0,
) -> Rollouts:
    """Rollouts for P prompts with params.n = group_size completions each."""
    group_size = params.n
    groups = engine.generate(prompt_ids, params)  # P x [G]
    flat_examples = [ex for ex in examples for _ in range(group_size)]
    rewards = _score(scorer, flat_examples, prompt_ids, groups)
    resampled = attempts = 0
    for attempt in range(1, max_resample_attempts + 1):
        needs = _needs_resample(rewards.total.view(-1, group_size), dynamic_sampling, reject_threshold)
        if not needs.any():
            break
        attempts = attempt
        redo = needs.nonzero().flatten().tolist()
        seed = None if params.seed is None else params.seed + 7919 * attempt
        seeds = None if params.seeds is None else tuple(derive_seed(params.seeds[p], "resample", attempt) for p in redo)
        new_groups = engine.generate([prompt_ids[p] for p in redo], dataclasses.replace(params, seed=seed, seeds=seeds))
        new_rewards = _score(scorer, [examples[p] for p in redo for _ in range(group_size)],
                             [prompt_ids[p] for p in redo], new_groups)
        new_totals = new_rewards.total.view(-1, group_size)
        still = _needs_resample(new_totals, dynamic_sampling, reject_threshold)
        replaced = [(k, p) for k, p in enumerate(redo) if not still[k]]
        for k, p in replaced:
            groups[p] = new_groups[k]
        resampled += len(replaced)
        if replaced:
            rewards = _score(scorer, flat_examples, prompt_ids, groups)
    return Rollouts(
        examples=flat_examples,
        prompt_ids=[ids for ids in prompt_ids for _ in range(group_size)],
        completions=[c for g in groups for c in g],
        rewards=rewards,
        resampled_groups=resampled,
        resample_attempts=attempts,
    )
