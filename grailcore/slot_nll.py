"""The direct half of the likelihood reward's gradient: the negative log-likelihood of the
person's option among the slate's options (and of their opinion direction among the three)
at each sampled answer slot, added to the GRPO loss with weight `grpo.slot_nll_coef`.

Why. `choice_likelihood` pays r(z) = log p(y | x, z), the probability the policy gives the
person's option y at the answer slot after its sampled reasoning z. The objective it stands
for, J = E_{z ~ pi(. | x)}[log p(y | x, z)], has two gradient terms:

    grad J = E_z[ log p(y | x, z) grad log pi(z | x) ]  +  E_z[ grad log p(y | x, z) ].

GRPO's advantages estimate only the first: they reweight the reasoning the policy already
samples. The second trains the slot itself: given each sampled reasoning, it moves the
answer token's distribution toward people's. Without it a warm start whose reasoning names
an option (so the slot is nearly one-hot) is paid about 0 or the floor per sample, i.e. a
0/1 reward, and sharpens (experiments/results/grpo_reward_exact/). With it the slot's
optimum is the proper one: E_{y ~ q}[-log p(y)] is smallest at p = q, people's conditional
distribution, not the mode. (The term below is this gradient restricted to the options'
share of the slot, for the reason given there.)

What is trained. At the slot after `<answer>` (and after `<opinion>`), where the sampled
completion reaches it (`SlotVocabulary.slot_after` on the sampled tokens, the position still
in the completion and in the loss mask), the term is the NLL of the person's label among the
labels, -log [p_T(person's) / sum_l p_T(l)], under softmax(logits / T) at the sampling
temperature. p_T(l) sums the tokens that start only label l's candidates (`answer_slot`'s)
and write more than whitespace: the digit `3` on a slate of up to 9 options, `Ġincrease` /
`incre` for an opinion with SmolLM2's tokenizer; once one is sampled the label is decided.
Its optimum is people's distribution over the labels. It moves mass among the labels only:
every other token's logit gets no gradient from it, so whether an answer is written at all
stays the rewards' business (`format`, the likelihood rewards' floor). The plain NLL
-log p_T(person's) also pushed the labels' total up, and on the CPU demo that spread to
digits everywhere: the layout collapsed within 8 steps at coefficients 1 and 0.1
(experiments/results/grpo_reward_exact/). A label without such a token (option 1 on a
12-option slate: `1` also starts 10, 11, 12) is not trained, nor is a slot where fewer than
two labels have one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from grailcore.data.schema import OPINION_DIRECTIONS, Example
from grailcore.evaluation.answer_slot import ANSWER_OPEN, OPINION_OPEN, SlotVocabulary
from grailcore.token_logprobs import TokenHidden
from grailcore.types import Completion

SlotPositions = list[tuple[int, tuple[tuple[int, ...], ...], int]]
"""One completion's slots: (index of the sampled token at the slot in the completion, each
label's token ids there, the person's label)."""


@dataclass(frozen=True)
class SlotTargets:
    """The slots of a [B, T] completion block."""

    index: torch.Tensor
    """[S] long: flat position b * T + t of the sampled token at each slot."""
    candidates: torch.Tensor
    """[S, C] long: every label's token ids at each slot, -1 = padding."""
    person: torch.Tensor
    """[S, C] bool: the ids of the person's label."""

    @staticmethod
    def build(slots: Sequence[SlotPositions], width: int, mask: torch.Tensor) -> SlotTargets:
        """From each row's slots, keeping those whose token enters the loss (mask [B, T])."""
        kept = [(b * width + t, labels, gold) for b, row in enumerate(slots) for t, labels, gold in row
                if mask[b, t] > 0]
        columns = max((sum(map(len, labels)) for _, labels, _ in kept), default=1)
        candidates = torch.full((len(kept), columns), -1, dtype=torch.long)
        person = torch.zeros((len(kept), columns), dtype=torch.bool)
        for s, (_, labels, gold) in enumerate(kept):
            ids = [i for ids in labels for i in ids]
            candidates[s, :len(ids)] = torch.tensor(ids, dtype=torch.long)
            start = sum(map(len, labels[:gold]))
            person[s, start:start + len(labels[gold])] = True
        return SlotTargets(torch.tensor([i for i, _, _ in kept], dtype=torch.long), candidates, person)

    def __len__(self) -> int:
        return self.index.shape[0]


def _own_first_tokens(labels: Sequence[Sequence[tuple[int, ...]]], decode) -> list[tuple[int, ...]]:
    """Per label: the first tokens of its candidates that write something (not whitespace
    alone) and start no other label's candidate: once one is sampled, the label is decided."""
    out = []
    for k, own in enumerate(labels):
        others = {c[0] for j, cs in enumerate(labels) if j != k for c in cs}
        out.append(tuple(sorted({c[0] for c in own if c[0] not in others and decode([c[0]]).strip()})))
    return out


class SlotTargetBuilder:
    """Finds the answer and opinion slots on sampled completions and the person's tokens there."""

    def __init__(self, tokenizer) -> None:
        self.vocab = SlotVocabulary(tokenizer)
        self.opinion_tokens = _own_first_tokens(self.vocab.opinions, self.vocab.decode)
        self._choice_tokens: dict[int, list[tuple[int, ...]]] = {}

    def choice_tokens(self, n_options: int) -> list[tuple[int, ...]]:
        if n_options not in self._choice_tokens:
            self._choice_tokens[n_options] = _own_first_tokens(self.vocab.choices(n_options), self.vocab.decode)
        return self._choice_tokens[n_options]

    def slot_index(self, ids: Sequence[int], tag: str) -> int | None:
        """Index of the sampled token at the slot after `tag`, if the sample reaches it and
        the slot's prefix is the sampled tokens themselves (not re-encoded)."""
        ids = tuple(ids)
        head = self.vocab.slot_after(ids, tag)
        if head is None or len(head) >= len(ids) or ids[:len(head)] != head:  # no tag, ends there, or re-encoded
            return None
        return len(head)

    def __call__(self, example: Example, completion: Completion) -> SlotPositions:
        ids = self.vocab.strip_special(completion.token_ids)
        wanted = []
        if example.gold_index is not None:
            wanted.append((ANSWER_OPEN, self.choice_tokens(example.n_options), example.gold_index - 1))
        if example.opinion_direction is not None:
            wanted.append((OPINION_OPEN, self.opinion_tokens, OPINION_DIRECTIONS.index(example.opinion_direction)))
        out = []
        for tag, labels, gold in wanted:
            at = self.slot_index(ids, tag)
            if at is None or not labels[gold] or sum(1 for t in labels if t) < 2:
                continue
            kept = [t for t in labels if t]  # labels without a token of their own drop out of the sum
            out.append((at, tuple(kept), kept.index(labels[gold])))
        return out


def slot_nll(tokens: TokenHidden, slots: SlotTargets, temperature: float) -> torch.Tensor:
    """[S'] -log [p_T(person's label) / sum_l p_T(l)] at the slots whose token is among
    `tokens`' trained tokens (differentiable through the hidden states and the head)."""
    batch, width = tokens.shape
    where = torch.full((batch * width,), -1, dtype=torch.long, device=tokens.index.device)
    where[tokens.index] = torch.arange(tokens.index.shape[0], device=tokens.index.device)
    at = where[slots.index.to(where.device)]
    keep = at >= 0
    hidden = tokens.hidden.index_select(0, tokens.rows[at[keep]])  # [S', H]
    candidates = slots.candidates.to(hidden.device)[keep]  # [S', C]
    person = slots.person.to(hidden.device)[keep]
    # Only the candidates' logits: the softmax's normaliser cancels in the ratio (no [S', V] tensor).
    weight = tokens.weight.index_select(0, candidates.clamp(min=0).reshape(-1)).view(
        *candidates.shape, tokens.weight.shape[1])  # [S', C, H]; S' may be 0
    picked = torch.einsum("sh,sch->sc", hidden, weight).float() / temperature
    labels = picked.masked_fill(candidates < 0, float("-inf")).logsumexp(1)
    return labels - picked.masked_fill(~person, float("-inf")).logsumexp(1)
