"""The GRPO loss of one micro-batch on the one objective, `kernels.objective` (ratio,
clip, KL estimator, engine importance weights, aggregation): from log-probs [B, T] in
plain torch (`grpo_loss`, the reference) or straight from the policy's last hidden states
through the fused kernel (`fused_loss`: no [tokens, vocab] tensor, no recompute).

The GRPO step (grailcore/steps.py, through optimize.py) calls one of them per micro-batch
with that micro-batch's `PolicyTerms`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from grailcore.token_logprobs import TokenHidden
from kernels.grpo_loss import fused_grpo_loss_tokens
from kernels.objective import (LOSS_TYPES, LossType, Objective, Tokens, aggregation_weights, objective_loss,
                               summarize)

__all__ = ["LOSS_TYPES", "LossNormalizers", "LossOutput", "LossType", "PolicyTerms", "fused_loss", "grpo_loss",
           "step_normalizers"]


@dataclass(frozen=True)
class LossOutput:
    """The loss to backpropagate and detached [] float32 statistics of its tokens.

    `sums` add up over micro-batches (`kernels.objective.merge_stats`); the properties are
    means over this micro-batch's tokens. They stay tensors so logging decides when to sync."""

    loss: torch.Tensor
    """[] differentiable, already divided by the step's normaliser (see `PolicyTerms.build`)."""
    sums: dict[str, torch.Tensor]
    """`kernels.objective.objective_loss`'s sums (tokens, clipped_low/high, ratio, kl, engine
    terms), plus entropy when it was computed."""

    @property
    def num_tokens(self) -> torch.Tensor:
        return self.sums["tokens"]

    def mean(self, name: str) -> torch.Tensor:
        """A `kernels.objective.summarize` mean (0 when not summed, e.g. kl without reference)."""
        return summarize(self.sums).get(name, torch.zeros(()))

    kl_mean = property(lambda self: self.mean("kl"))
    clip_fraction = property(lambda self: self.mean("clip_fraction"))
    """Tokens whose policy gradient the clip removes (either side; cispo: whose weight is capped)."""
    clip_low_fraction = property(lambda self: self.mean("clip_low_fraction"))
    clip_high_fraction = property(lambda self: self.mean("clip_high_fraction"))
    ratio_mean = property(lambda self: self.mean("ratio_mean"))
    ratio_min = property(lambda self: self.mean("ratio_min"))
    """1 when the micro-batch has no tokens (as are ratio_mean and ratio_max)."""
    ratio_max = property(lambda self: self.mean("ratio_max"))


@dataclass(frozen=True)
class LossNormalizers:
    """What the summed per-token losses of one optimizer step are divided by."""

    num_sequences: float
    """Sequences in the step on this rank (grpo, dr_grpo)."""
    num_items: float
    """Masked tokens in the step on this rank (bnpo; dapo on one rank)."""


def step_normalizers(masks: Sequence[torch.Tensor]) -> LossNormalizers:
    """Normalisers of one optimizer step on this rank from its micro-batches' masks
    (each [B_k, T_k]). Pass them to every `PolicyTerms.build` of the step."""
    return LossNormalizers(
        num_sequences=float(sum(mask.shape[0] for mask in masks)),
        num_items=float(sum(int(mask.bool().sum()) for mask in masks)),
    )


@dataclass(frozen=True)
class PolicyTerms:
    """One micro-batch's inputs to the loss besides the current log-probs, [B, T] unless said."""

    mask: torch.Tensor
    """1 = a token that enters the loss."""
    advantages: torch.Tensor
    """[B], or [B, T] per token (`grailcore.credit`)."""
    weights: torch.Tensor
    """Aggregation weights (`kernels.objective.aggregation_weights`)."""
    old_logprobs: torch.Tensor | None = None
    """Trainer log-probs before the update; None = on-policy (the current ones, detached)."""
    ref_logprobs: torch.Tensor | None = None
    engine_logprobs: torch.Tensor | None = None

    @staticmethod
    def build(mask, advantages, *, loss_type: LossType, old_logprobs=None, ref_logprobs=None, engine_logprobs=None,
              max_completion_length: int | None = None, num_items: float | None = None,
              num_sequences: float | None = None) -> PolicyTerms:
        """Checks shapes and computes the weights. Gradient accumulation: every micro-batch
        of an optimizer step must be divided by the same step-wide normaliser, so pass
        `step_normalizers(all masks of the step)`; the summed micro-batch losses (and
        gradients) then equal the loss of the whole step as one batch. The defaults (this
        micro-batch's B and token count) are right only for a single micro-batch. Across
        ranks, gradients are averaged: bnpo uses this rank's num_items (a per-rank token
        mean; TRL's bnpo divides each micro-batch by its own count, which accumulation
        cannot reproduce exactly); dapo uses the global token count divided by the world
        size; grpo and dr_grpo use this rank's num_sequences (ranks hold equal numbers)."""
        if mask.dim() != 2:
            raise ValueError(f"mask must be [B, T], got shape {tuple(mask.shape)}")
        named = {"old_logprobs": old_logprobs, "ref_logprobs": ref_logprobs, "engine_logprobs": engine_logprobs}
        for name, tensor in named.items():
            if tensor is not None and tensor.shape != mask.shape:
                raise ValueError(f"{name} has shape {tuple(tensor.shape)}, mask {tuple(mask.shape)}")
        if advantages.shape not in (mask.shape[:1], mask.shape):
            raise ValueError(f"advantages must be [B] = [{mask.shape[0]}] or [B, T] = {list(mask.shape)}, "
                             f"got {tuple(advantages.shape)}")
        weights = aggregation_weights(mask, loss_type, max_completion_length=max_completion_length,
                                      num_items=num_items, num_sequences=num_sequences)
        return PolicyTerms(mask.bool(), advantages, weights, old_logprobs, ref_logprobs, engine_logprobs)

    def tokens(self, index: torch.Tensor) -> Tokens:
        """The `kernels.objective.Tokens` at flat positions index [K] (b * T + t)."""
        return Tokens.gather(index, self.mask.shape[1], self.advantages, self.weights, self.old_logprobs,
                             self.ref_logprobs, self.engine_logprobs)


def grpo_loss(logprobs: torch.Tensor, terms: PolicyTerms, objective: Objective) -> LossOutput:
    """The loss from log-probs [B, T] (plain torch): `kernels.objective.objective_loss` over
    the masked tokens. Values at other positions (padding: maybe inf/nan old or ref
    log-probs) are never read, so they cannot leak into the loss or its gradient."""
    if logprobs.shape != terms.mask.shape:
        raise ValueError(f"logprobs must be [B, T] = {tuple(terms.mask.shape)}, got {tuple(logprobs.shape)}")
    index = terms.mask.reshape(-1).nonzero().squeeze(1)  # [K]
    loss, sums = objective_loss(logprobs.reshape(-1)[index], terms.tokens(index), objective)
    return LossOutput(loss, sums)


def fused_loss(tokens: TokenHidden, *, terms: PolicyTerms, objective: Objective, temperature: float,
               chunk_size: int | None = None, compute_entropy: bool = False) -> LossOutput:
    """The same loss straight from hidden states (`kernels.fused_grpo_loss_tokens`); hand it
    (terms and objective bound) to `PolicyModel.forward(loss=...)`."""
    loss, sums, _ = fused_grpo_loss_tokens(
        tokens.hidden, tokens.weight, tokens.rows, tokens.targets, terms.tokens(tokens.index), objective,
        temperature=temperature, compute_entropy=compute_entropy, chunk_size=chunk_size,
    )
    return LossOutput(loss, sums)
