"""Typed hand-offs between the stages of a step: rollout -> rewards -> advantages -> loss."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


MAX_WATCHED_IDS = 128
"""vLLM 0.32's cap on one request's `logprob_token_ids` (MAX_LOGPROB_TOKEN_IDS)."""


@dataclass(frozen=True)
class SamplingParams:
    """How an engine samples; n completions per prompt."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 128
    greedy: bool = False
    """Greedy decoding (requires n == 1)."""
    seed: int | None = None
    """One seed for the whole call (evaluation); None leaves the engine's own RNG running."""
    seeds: tuple[int, ...] | None = None
    """One seed per prompt of the call (training: `grailcore.rng.derive_seed` of run seed,
    step, example id and slot), overriding `seed`: a prompt's samples then depend on its own
    seed only, not on the other prompts, the rank or how the engine batches them."""
    watch_token_ids: tuple[int, ...] = ()
    """Token ids whose log-probs (under logits / T, as the sampled token's) the engine reports
    at every decode step, in `Completion.watched`, where it can (vLLM; at most 128 ids). The
    evaluation reads a sampled answer slot from them instead of a scoring pass. Only with
    temperature sampling and top_p = 1, where they are log_softmax(logits / T)."""

    def __post_init__(self) -> None:
        if self.watch_token_ids and (self.greedy or self.temperature <= 0 or self.top_p < 1.0
                                     or len(self.watch_token_ids) > MAX_WATCHED_IDS):
            raise ValueError(f"watch_token_ids ({len(self.watch_token_ids)} ids) need temperature sampling with "
                             f"top_p = 1 and at most {MAX_WATCHED_IDS} ids: only then are the reported log-probs "
                             "log_softmax(logits / T)")


@dataclass(frozen=True)
class Completion:
    """One sampled completion of one prompt."""

    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...] | None
    """Engine log-prob of each sampled token under the sampling temperature, if available."""
    finish_reason: str
    """'stop' (EOS / stop string) or 'length' (hit max_tokens: truncated)."""
    watched: tuple[dict[int, float], ...] | None = None
    """Per decode step j, log p_T(id | prompt + token_ids[:j]) of each id of
    `SamplingParams.watch_token_ids` (and of the sampled token); None if not reported."""


@dataclass(frozen=True)
class RewardOutput:
    """Scores of a flat list of completions (len = prompts * group_size)."""

    total: torch.Tensor
    """[N] float32, weighted sum of the rewards."""
    per_reward: dict[str, torch.Tensor]
    """name -> [N] float32, unweighted."""
    errors: dict[str, int] = field(default_factory=dict)
    """name -> completions whose reward raised or timed out (scored 0)."""
