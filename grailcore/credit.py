"""Causal credit for the slot rewards: a reward read at a slot gets no say over the tokens
that cannot change it.

`choice_likelihood` is log p(person's option | prompt, the tokens before the answer slot),
read from the policy's distribution at the slot. The token sampled there, and every token
after it, cannot change that number; with one advantage per sequence GRPO still gives them
the reward's share of it. In expectation that share adds nothing to their gradient (given
the tokens before the slot, E[grad log pi(token)] = 0), but in a finite group it is noise
that correlates with what was sampled: on the CPU demo, completions that happened to name a
likely option wrote "decrease" at the opinion slot in steps 1-4, their advantage raised
"decrease", and the opinion collapsed onto it (experiments/results/grpo_reward_exact/).

So the advantage becomes per token: a completion's advantage is the sum of its rewards'
shares (`grailcore.advantages.advantage_components`: each reward centred on its group and
divided by the scale of the total), and a slot reward's share is kept only on the tokens
before its slot. This is REINFORCE's causality ("reward to go"): token t's weight may drop
any term fixed before t is sampled without changing the gradient's expectation, only its
variance. The slot tokens themselves learn from the direct half of the likelihood's
gradient, `grpo.slot_nll_coef` (grailcore/slot_nll.py); the two together are the gradient
of E_z[log p(y | x, z)]. Measured on the CPU demo with the slot term (one seed), the credit
left the choice about where it was (TV +0.009 [-0.004, +0.021], NLL +0.08 [+0.00, +0.15]
against no credit) and the opinion NLL lower (0.708 against 0.837): the slot term is what
moved the choices toward people.

Where the credit stays on the whole completion, as before:
- a completion that does not commit to an answer: its slot reward is the floor, which the
  whole completion caused;
- a slot the sampled tokens do not reach as they are (the tag's last token also carries
  what follows it, so the slot's prefix was re-encoded);
- every other reward (rule rewards, the discriminator's `gail`), which read the whole text.
One approximation: whether a completion commits depends on its whole text, so a token after
the slot can still change the reward, from log p to the floor, by breaking the layout. The
exact term for such a token, with log p at the slot as its baseline (fixed before it), is 0
when the completion commits and floor - log p when it does not. A committed completion gets
the 0; an uncommitted one keeps its share, floor - the group's mean, on every token (its
slot is not read, so log p is not known). The `format` reward pays for the layout too.
"""

from __future__ import annotations

from typing import Sequence

import torch

from grailcore.data.schema import Example
from grailcore.rewards.likelihood import committed
from grailcore.rewards.registry import reward_task, slot_read_at
from grailcore.slot_nll import SlotTargetBuilder
from grailcore.types import Completion

WHOLE = -1
"""A cut meaning "every token of the completion"."""


def slot_cuts(slots: SlotTargetBuilder, names: Sequence[str], examples: Sequence[Example],
              completions: Sequence[Completion]) -> torch.Tensor:
    """[N, R] long: for each completion and reward (in `names` order), how many leading
    completion tokens can change the reward: the index of the token sampled at the reward's
    slot, or WHOLE (see the module docstring for when)."""
    if len(examples) != len(completions):
        raise ValueError(f"{len(examples)} examples for {len(completions)} completions")
    cuts = torch.full((len(completions), len(names)), WHOLE, dtype=torch.long)
    for r, name in enumerate(names):
        tag = slot_read_at(name)
        if tag is None:
            continue
        task = reward_task(name)
        for n, (example, completion) in enumerate(zip(examples, completions)):
            if (task is not None and example.task != task) or not committed(example, completion.text):
                continue
            at = slots.slot_index(slots.vocab.strip_special(completion.token_ids), tag)
            if at is not None:
                cuts[n, r] = at
    return cuts


def token_advantages(components: torch.Tensor, cuts: torch.Tensor, width: int) -> torch.Tensor:
    """[N, R] each reward's share of the advantage and [N, R] cuts -> [N, width] float32
    advantages: share r counts on tokens t < cuts[n, r], on every token where the cut is WHOLE.
    Where no cut applies each row is its sequence's advantage, components.sum(1)."""
    if components.shape != cuts.shape or components.dim() != 2:
        raise ValueError(f"components {tuple(components.shape)} and cuts {tuple(cuts.shape)} must both be [N, R]")
    position = torch.arange(width)  # [T]
    limit = torch.where(cuts == WHOLE, width, cuts)  # [N, R]
    keep = position[None, None, :] < limit[:, :, None]  # [N, R, T]
    return (components.to(torch.float32)[:, :, None] * keep).sum(dim=1)  # [N, T]
