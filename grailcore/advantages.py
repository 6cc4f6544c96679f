"""Group-relative advantages: rewards [P*G] float32 (prompt-major, G completions per
prompt) -> advantages [P*G] float32. Pure; the step calls it through
`grailcore.steps.step_advantages`, which gathers every rank's rewards for "batch"."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import torch

Scale = Literal["group", "batch", "none"]
SCALES = ("group", "batch", "none")
AGGREGATIONS = ("sum_then_normalize", "normalize_then_sum")


@dataclass(frozen=True)
class AdvantageOutput:
    advantages: torch.Tensor
    """[P*G] float32; exactly 0 for every completion of a zero-variance group."""
    zero_variance_groups: int
    """Groups whose completions all got the same reward (they carry no signal)."""
    zero_variance_mask: torch.Tensor
    """[P] bool, True for those groups."""


def _grouped(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """Check the layout and return rewards as [P, G] float32."""
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [P*G], got shape {tuple(rewards.shape)}")
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2 (the unbiased std needs two samples), got {group_size}")
    if rewards.numel() == 0 or rewards.numel() % group_size:
        raise ValueError(f"rewards has {rewards.numel()} entries, not a positive multiple of group_size={group_size}")
    bad = (~torch.isfinite(rewards)).nonzero().flatten()
    if bad.numel():
        raise ValueError(f"{bad.numel()} non-finite reward(s) at indices {bad[:8].tolist()}: fix the reward function")
    return rewards.to(torch.float32).view(-1, group_size)  # [P, G]


def _zero_variance(grouped: torch.Tensor) -> torch.Tensor:
    # Exact equality, not TRL's isclose(std, 0): three float32 rewards of 0.9 leave a
    # std of 7e-8 from rounding in the mean, which isclose's atol=1e-8 calls informative.
    return grouped.amax(dim=1) == grouped.amin(dim=1)  # [P]


def informative_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """[P] bool, True where a group's rewards differ (non-zero advantage possible).

    Dynamic sampling (DAPO) keeps these groups and resamples the rest."""
    return ~_zero_variance(_grouped(rewards, group_size))


def _divisor(grouped: torch.Tensor, scale: Scale, eps: float) -> torch.Tensor | float:
    """What `scale` divides the centred [P, G] rewards by: [P, 1], a [] tensor, or 1."""
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    if scale == "group":
        return grouped.std(dim=1, keepdim=True) + eps
    return grouped.std() + eps if scale == "batch" else 1.0


def group_advantages(
    rewards: torch.Tensor, group_size: int, scale: Scale = "group", eps: float = 1e-4
) -> AdvantageOutput:
    """A_i = (r_i - mean(group)) / (std + eps), the std chosen by `scale`:

    - "group": std of the completion's own group (DeepSeekMath GRPO),
    - "batch": std of all rewards of the step, raw not centred (TRL `scale_rewards="batch"`),
    - "none": no division (Dr. GRPO), eps unused.

    Every std is the unbiased one (divides by n - 1), torch.std's default and what TRL
    uses. Groups with identical rewards get advantage exactly 0 in every mode, so float
    noise in their centred rewards never becomes a (scaled-up) training signal.
    """
    grouped = _grouped(rewards, group_size)  # [P, G]
    centred = (grouped - grouped.mean(dim=1, keepdim=True)) / _divisor(grouped, scale, eps)  # [P, G]
    zero_variance = _zero_variance(grouped)  # [P]
    advantages = torch.where(zero_variance[:, None], 0.0, centred)  # [P, G]
    return AdvantageOutput(
        advantages=advantages.flatten(),
        zero_variance_groups=int(zero_variance.sum()),
        zero_variance_mask=zero_variance,
    )


def _check_columns(per_reward: torch.Tensor, weights: Sequence[float]) -> None:
    if per_reward.dim() != 2 or per_reward.shape[1] != len(weights):
        raise ValueError(f"per_reward must be [P*G, {len(weights)}] (one column per weight), "
                         f"got shape {tuple(per_reward.shape)}")


def _normalised_shares(per_reward: torch.Tensor, weights: Sequence[float], group_size: int,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """GDPO's first half: each reward normalised within its group on its own and weighted,
    [P*G, R]; and the [P] groups where every reward was constant."""
    columns = [group_advantages(per_reward[:, r], group_size, "group", eps) for r in range(len(weights))]
    shares = torch.stack([c.advantages for c in columns], dim=1) * torch.tensor(weights, dtype=torch.float32)
    return shares, torch.stack([c.zero_variance_mask for c in columns]).all(dim=0)


def decoupled_advantages(per_reward: torch.Tensor, weights: Sequence[float], group_size: int,
                         eps: float = 1e-4) -> AdvantageOutput:
    """GDPO's "normalize_then_sum" (arXiv 2601.05242; TRL's multi_objective_aggregation):
    [P*G, R] unweighted rewards -> [P*G] advantages.

    Each reward is normalised within its group on its own ((r - group mean) / (group std +
    eps), exactly 0 where the group gave it one value), the weighted sum is taken, and that
    sum is centred on the step's mean and divided by the step's std (+ eps). Summing first
    lets the reward with the largest spread set every group's scale: on the viewer demo the
    layout (a dodge paid the floor) dwarfed the learned reward's spread among the options,
    and each committed answer's advantage then followed how many of its group dodged. Groups
    where every reward was constant get exactly 0 (no signal, as in `group_advantages`).
    """
    _check_columns(per_reward, weights)
    shares, constant = _normalised_shares(per_reward, weights, group_size, eps)
    summed = shares.sum(dim=1)  # [P*G]
    scaled = (summed - summed.mean()) / (summed.std() + eps) if summed.numel() > 1 else summed * 0
    advantages = torch.where(constant[:, None], 0.0, scaled.view(-1, group_size))  # [P, G]
    return AdvantageOutput(advantages=advantages.flatten(), zero_variance_groups=int(constant.sum()),
                           zero_variance_mask=constant)


def advantage_components(per_reward: torch.Tensor, weights: Sequence[float], group_size: int, scale: Scale = "group",
                         aggregation: str = "sum_then_normalize", eps: float = 1e-4) -> torch.Tensor:
    """[P*G, R] unweighted rewards -> [P*G, R] each reward's share of the advantage: the
    columns sum to the advantage `group_advantages` gives the weighted total (or, for
    "normalize_then_sum", to `decoupled_advantages`), float rounding aside.

    Every reward is centred on its group's mean and weighted, and the shares of a completion
    are divided by the same scale its total would be: a linear split, so a reward's share can
    be kept from the tokens that cannot change it (`grailcore.credit`) while the scale and the
    zero-variance rule stay those of the whole advantage."""
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
    _check_columns(per_reward, weights)
    if aggregation == "normalize_then_sum":
        shares, constant = _normalised_shares(per_reward, weights, group_size, eps)
        summed = shares.sum(dim=1)  # each group's sum is 0, so the step's mean is 0 too
        scaled = shares / (summed.std() + eps) if summed.numel() > 1 else shares * 0
        return torch.where(constant.repeat_interleave(group_size)[:, None], 0.0, scaled)
    w = torch.tensor(weights, dtype=torch.float32)
    columns = torch.stack([_grouped(per_reward[:, r], group_size) for r in range(len(weights))], dim=2)  # [P, G, R]
    totals = (columns * w).sum(dim=2)  # [P, G]
    divisor = torch.as_tensor(_divisor(totals, scale, eps))[..., None]  # [P, 1, 1] or [1]
    shares = (columns - columns.mean(dim=1, keepdim=True)) * w / divisor
    return torch.where(_zero_variance(totals)[:, None, None], 0.0, shares).reshape(-1, len(weights))
