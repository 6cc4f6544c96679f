"""Action-first tokenisation of the discriminator's (chosen option, state) text pairs:
truncation at the token budget can only cut the state's tail, never the action."""

from __future__ import annotations

from typing import Sequence

import torch


class ActionTooLongError(ValueError):
    """An option's text alone does not fit the discriminator's token budget."""


def _lengths(tokenizer, texts: Sequence[str]) -> list[int]:
    return [len(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]


def check_actions_fit(tokenizer, actions: Sequence[str], max_tokens: int, where: Sequence[str]) -> list[int]:
    """Token length of each action; raises ActionTooLongError naming `where[i]` when an
    action leaves no room for the state (cutting the action is the flaw this layout prevents)."""
    specials = tokenizer.num_special_tokens_to_add(pair=True)
    lengths = _lengths(tokenizer, actions)
    for place, action, length in zip(where, actions, lengths):
        if length + specials >= max_tokens:
            raise ActionTooLongError(
                f"{place}: the option text {action[:80]!r}... is {length} tokens, which with {specials} "
                f"special tokens leaves no room for the state within gail.max_tokens={max_tokens}; "
                "raise gail.max_tokens")
    return lengths


def encode_pairs(tokenizer, actions: Sequence[str], states: Sequence[str], max_tokens: int,
                 where: Sequence[str]) -> tuple[dict[str, torch.Tensor], list[bool]]:
    """Padded [B, T] tensors of `[CLS] action [SEP] state [SEP]` (T <= max_tokens) and, per
    row, whether the state's tail was cut. `where[i]` names row i in errors."""
    specials = tokenizer.num_special_tokens_to_add(pair=True)
    action_lengths = check_actions_fit(tokenizer, actions, max_tokens, where)
    truncated = [a + s + specials > max_tokens for a, s in zip(action_lengths, _lengths(tokenizer, states))]
    batch = tokenizer(list(actions), list(states), truncation="only_second", max_length=max_tokens,
                      padding=True, return_tensors="pt")
    return dict(batch), truncated


def slate_chunks(sizes: Sequence[int], max_rows: int) -> list[slice]:
    """Consecutive whole slates (`sizes[i]` options each) grouped into chunks of at most
    `max_rows` options (a slate larger than that is a chunk of its own), as slices of slates."""
    chunks, start, rows = [], 0, 0
    for i, size in enumerate(sizes):
        if rows and rows + size > max_rows:
            chunks.append(slice(start, i))
            start, rows = i, 0
        rows += size
    if rows:
        chunks.append(slice(start, len(sizes)))
    return chunks
