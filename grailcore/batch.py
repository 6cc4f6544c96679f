"""Padded training tensors from rollouts: left-padded prompt, right-padded completion.

Layout of one row: [pad .. pad, prompt, completion, pad .. pad], the prompt block
P wide, the completion block T wide, so completion logits are the last T+1 positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from grailcore.slot_nll import SlotPositions, SlotTargets
from grailcore.types import Completion


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor
    """[B, P+T] long."""
    attention_mask: torch.Tensor
    """[B, P+T] long, 1 on real tokens."""
    completion_mask: torch.Tensor
    """[B, T] float32, 1 on completion tokens that enter the loss."""
    advantages: torch.Tensor
    """[B] float32, or [B, T] per completion token (`grailcore.credit`)."""
    engine_logprobs: torch.Tensor | None
    """[B, T] float32, the rollout engine's log-probs of the sampled tokens (0 on padding)."""
    slots: SlotTargets | None = None
    """The answer/opinion slots trained by `grpo.slot_nll_coef` (grailcore/slot_nll.py)."""

    @property
    def num_completion_tokens(self) -> int:
        return self.completion_mask.shape[1]


def collate(
    prompt_ids: list[list[int]],
    completions: list[Completion],
    advantages: torch.Tensor,
    pad_id: int,
    mask_truncated: bool = False,
    slots: list[SlotPositions] | None = None,
) -> Batch:
    """One Batch from B (prompt, completion) pairs; advantages [B], or [B, >= T] per token
    (cut to the batch's completion width T); slots: each pair's
    (`grailcore.slot_nll.SlotTargetBuilder`), kept where the slot's token enters the loss."""
    rows = len(completions)
    p_width = max(len(p) for p in prompt_ids)
    t_width = max(1, max(len(c.token_ids) for c in completions))
    input_ids = torch.full((rows, p_width + t_width), pad_id, dtype=torch.long)  # [B, P+T]
    attention_mask = torch.zeros_like(input_ids)
    completion_mask = torch.zeros((rows, t_width), dtype=torch.float32)  # [B, T]
    engine_lp = torch.zeros((rows, t_width), dtype=torch.float32)
    has_engine_lp = all(c.logprobs is not None for c in completions)
    for i, (prompt, comp) in enumerate(zip(prompt_ids, completions)):
        n = len(comp.token_ids)
        input_ids[i, p_width - len(prompt):p_width] = torch.tensor(prompt)
        input_ids[i, p_width:p_width + n] = torch.tensor(comp.token_ids, dtype=torch.long)
        attention_mask[i, p_width - len(prompt):p_width + n] = 1
        if not (mask_truncated and comp.finish_reason == "length"):
            completion_mask[i, :n] = 1.0
        if has_engine_lp and n:
            engine_lp[i, :n] = torch.tensor(comp.logprobs, dtype=torch.float32)
    return Batch(
        input_ids=input_ids, attention_mask=attention_mask,
        completion_mask=completion_mask,
        advantages=(advantages[:, :t_width] if advantages.dim() == 2 else advantages).to(torch.float32),
        engine_logprobs=engine_lp if has_engine_lp else None,
        slots=None if slots is None else SlotTargets.build(slots, t_width, completion_mask),
    )


def micro_batches(
    prompt_ids: list[list[int]],
    completions: list[Completion],
    advantages: torch.Tensor,
    pad_id: int,
    micro_batch_size: int,
    mask_truncated: bool = False,
    slots: list[SlotPositions] | None = None,
) -> list[Batch]:
    """Consecutive chunks of `micro_batch_size` rows, each padded only to its own widths."""
    out = []
    for start in range(0, len(completions), micro_batch_size):
        end = start + micro_batch_size
        out.append(collate(prompt_ids[start:end], completions[start:end], advantages[start:end],
                           pad_id, mask_truncated, None if slots is None else slots[start:end]))
    return out
