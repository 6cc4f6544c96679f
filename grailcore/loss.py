"""Clipped GRPO policy loss + k3 KL, aggregated the grpo / bnpo / dapo / dr_grpo way.

Takes per-token log-probs [B, T] float32 (from `grailcore.token_logprobs`) and advantages [B]
(from `grailcore.advantages`); the loop calls it once per micro-batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

LossType = Literal["grpo", "bnpo", "dapo", "dr_grpo"]
LOSS_TYPES = ("grpo", "bnpo", "dapo", "dr_grpo")


@dataclass(frozen=True)
class LossOutput:
    """The loss to backpropagate and detached [] float32 statistics of this micro-batch.

    Statistics are means over its masked tokens; weight them by `num_tokens` to
    combine micro-batches. They stay tensors so logging decides when to sync."""

    loss: torch.Tensor
    """[] differentiable, already divided by the step's normaliser (see `grpo_loss`)."""
    kl_mean: torch.Tensor
    """k3 KL to the reference model; 0 without reference log-probs."""
    clip_fraction: torch.Tensor
    """Tokens whose policy gradient the clip removes (either side)."""
    clip_low_fraction: torch.Tensor
    """ratio < 1 - epsilon_low with a negative advantage."""
    clip_high_fraction: torch.Tensor
    """ratio > 1 + epsilon_high with a positive advantage."""
    ratio_mean: torch.Tensor
    ratio_min: torch.Tensor
    """1 when the micro-batch has no masked tokens (as are ratio_mean and ratio_max)."""
    ratio_max: torch.Tensor
    num_tokens: torch.Tensor
    """Masked (trained) tokens in this micro-batch."""


@dataclass(frozen=True)
class LossNormalizers:
    """What the summed per-token losses of one optimizer step are divided by."""

    num_sequences: float
    """Sequences in the step on this rank (grpo, dr_grpo)."""
    num_items: float
    """Masked tokens in the step on this rank (bnpo; dapo on one rank)."""


def step_normalizers(masks: Sequence[torch.Tensor]) -> LossNormalizers:
    """Normalisers of one optimizer step on this rank from its micro-batches' masks
    (each [B_k, T_k]). Pass them to every `grpo_loss` call of the step."""
    return LossNormalizers(
        num_sequences=float(sum(mask.shape[0] for mask in masks)),
        num_items=float(sum(int(mask.bool().sum()) for mask in masks)),
    )


def grpo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor | None,
    ref_logprobs: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    epsilon_low: float,
    epsilon_high: float,
    beta: float,
    loss_type: LossType,
    max_completion_length: int | None = None,
    num_items: float | torch.Tensor | None = None,
    num_sequences: float | torch.Tensor | None = None,
) -> LossOutput:
    """GRPO loss of one micro-batch. logprobs/old_logprobs/ref_logprobs/mask are [B, T]
    (mask 1 = trained token), advantages [B].

    per token: -min(r A, clip(r, 1 - epsilon_low, 1 + epsilon_high) A) + beta k3, with
    r = exp(logprobs - old_logprobs) (old None = logprobs.detach(): one pass per batch)
    and k3 = exp(ref - logp) - (ref - logp) - 1. Aggregation by `loss_type`:
      grpo     sum_i (masked mean of sequence i) / num_sequences
      bnpo     masked sum / num_items
      dapo     masked sum / num_items
      dr_grpo  masked sum / (num_sequences * max_completion_length)
    A sequence with no masked tokens contributes 0 but still counts in num_sequences.

    Gradient accumulation: every micro-batch of an optimizer step must be divided by
    the same step-wide normaliser, so pass `step_normalizers(all masks of the step)`;
    the summed micro-batch losses (and gradients) then equal the loss of the whole
    step as one batch. The defaults (this micro-batch's B and token count) are right
    only when the step is a single micro-batch. Across ranks, gradients are averaged:
    bnpo uses this rank's num_items (a per-rank token mean; TRL's bnpo divides each
    micro-batch by its own count, which accumulation cannot reproduce exactly); dapo
    uses the global token count divided by the world size (all-reduce the counts);
    grpo and dr_grpo use this rank's num_sequences (ranks hold equal numbers).
    """
    _check_inputs(logprobs, old_logprobs, ref_logprobs, advantages, mask, beta, loss_type, max_completion_length)
    mask = mask.bool()
    # Padded positions may hold inf/nan old or ref log-probs; masking the loss alone
    # would still give 0 * inf = nan gradients there, so neutralise them first.
    current = logprobs.detach()
    old = current if old_logprobs is None else torch.where(mask, old_logprobs, current)
    adv = advantages.to(logprobs.dtype)[:, None]  # [B, 1]
    ratio = torch.exp(logprobs - old)  # [B, T]
    clipped_ratio = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)  # [B, T]
    token_loss = -torch.min(ratio * adv, clipped_ratio * adv)  # [B, T]
    kl = None
    if ref_logprobs is not None:
        log_ref_ratio = torch.where(mask, ref_logprobs, current) - logprobs  # [B, T]
        kl = torch.exp(log_ref_ratio) - log_ref_ratio - 1  # [B, T], k3 >= 0
        if beta != 0:
            token_loss = token_loss + beta * kl
    token_loss = torch.where(mask, token_loss, 0.0)  # [B, T]
    loss = _aggregate(token_loss, mask, loss_type, max_completion_length, num_items, num_sequences)
    return _with_stats(loss, ratio, adv, kl, mask, epsilon_low, epsilon_high)


def _aggregate(token_loss, mask, loss_type, max_completion_length, num_items, num_sequences) -> torch.Tensor:
    num_sequences = mask.shape[0] if num_sequences is None else num_sequences
    if loss_type == "grpo":
        per_sequence = token_loss.sum(-1) / mask.sum(-1).clamp(min=1)  # [B]
        return per_sequence.sum() / num_sequences
    if loss_type in ("bnpo", "dapo"):
        # Same formula; they differ in the num_items the caller passes across ranks.
        num_items = mask.sum().clamp(min=1) if num_items is None else num_items
        return token_loss.sum() / num_items
    return token_loss.sum() / (num_sequences * max_completion_length)  # dr_grpo


@torch.no_grad()
def _with_stats(loss, ratio, adv, kl, mask, epsilon_low, epsilon_high) -> LossOutput:
    num_tokens = mask.sum()
    has_tokens = num_tokens > 0
    ratio = ratio.float()

    def masked_mean(values: torch.Tensor) -> torch.Tensor:
        return torch.where(mask, values.float(), 0.0).sum() / num_tokens.clamp(min=1)

    clip_low = (ratio < 1 - epsilon_low) & (adv < 0)  # [B, T]
    clip_high = (ratio > 1 + epsilon_high) & (adv > 0)  # [B, T]
    one = ratio.new_ones(())
    return LossOutput(
        loss=loss,
        kl_mean=masked_mean(kl) if kl is not None else ratio.new_zeros(()),
        clip_fraction=masked_mean(clip_low | clip_high),
        clip_low_fraction=masked_mean(clip_low),
        clip_high_fraction=masked_mean(clip_high),
        ratio_mean=torch.where(has_tokens, masked_mean(ratio), one),
        ratio_min=torch.where(has_tokens, torch.where(mask, ratio, torch.inf).amin(), one),
        ratio_max=torch.where(has_tokens, torch.where(mask, ratio, -torch.inf).amax(), one),
        num_tokens=num_tokens.float(),
    )


def _check_inputs(logprobs, old_logprobs, ref_logprobs, advantages, mask, beta, loss_type, max_completion_length):
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if logprobs.dim() != 2:
        raise ValueError(f"logprobs must be [B, T], got shape {tuple(logprobs.shape)}")
    named = {"old_logprobs": old_logprobs, "ref_logprobs": ref_logprobs, "mask": mask}
    for name, tensor in named.items():
        if tensor is not None and tensor.shape != logprobs.shape:
            raise ValueError(f"{name} has shape {tuple(tensor.shape)}, logprobs {tuple(logprobs.shape)}")
    if advantages.shape != logprobs.shape[:1]:
        raise ValueError(f"advantages must be [B] = [{logprobs.shape[0]}], got {tuple(advantages.shape)}")
    if beta != 0 and ref_logprobs is None:
        raise ValueError(f"beta={beta} needs ref_logprobs (the KL term); pass them or set grpo.beta = 0")
    if loss_type == "dr_grpo" and (max_completion_length is None or max_completion_length < logprobs.shape[1]):
        raise ValueError(
            f"loss_type='dr_grpo' needs max_completion_length >= T={logprobs.shape[1]}, got {max_completion_length}"
        )
