"""Action-first tokenisation of the discriminator's (chosen option, state) text pairs:
truncation at the token budget can only cut the state's tail, never the action."""

from __future__ import annotations

from typing import Sequence

import torch


class ActionTooLongError(ValueError):
    """An option's text alone does not fit the discriminator's token budget."""


def encode_pairs(tokenizer, actions: Sequence[str], states: Sequence[str], max_tokens: int,
                 example_ids: Sequence[str]) -> tuple[dict[str, torch.Tensor], list[bool]]:
    """Padded [B, T] tensors of `[CLS] action [SEP] state [SEP]` (T <= max_tokens) and, per
    row, whether the state's tail was cut. Raises ActionTooLongError when an action leaves
    no room for the state: silently cutting the action is the flaw this layout prevents."""
    specials = tokenizer.num_special_tokens_to_add(pair=True)
    action_lengths = [len(ids) for ids in tokenizer(list(actions), add_special_tokens=False)["input_ids"]]
    state_lengths = [len(ids) for ids in tokenizer(list(states), add_special_tokens=False)["input_ids"]]
    for example_id, action, length in zip(example_ids, actions, action_lengths):
        if length + specials >= max_tokens:
            raise ActionTooLongError(
                f"example {example_id!r}: the option text {action[:80]!r}... is {length} tokens, which "
                f"with {specials} special tokens leaves no room for the state within "
                f"gail.max_tokens={max_tokens}; raise gail.max_tokens")
    truncated = [a + s + specials > max_tokens for a, s in zip(action_lengths, state_lengths)]
    batch = tokenizer(list(actions), list(states), truncation="only_second", max_length=max_tokens,
                      padding=True, return_tensors="pt")
    return dict(batch), truncated
