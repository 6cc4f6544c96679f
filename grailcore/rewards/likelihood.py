"""Proper-scoring choice rewards: the policy's own probability of the person's choice.

`choice_likelihood` pays log p_policy(person's option | prompt, sampled reasoning), read at
the completion's answer slot under softmax(logits / T) at the sampling temperature
(`grailcore.evaluation.answer_slot`: the same distribution the exact fidelity metrics use);
`opinion_likelihood` the same for the opinion direction. Both are clipped below at
`rewards.likelihood_floor`.

Why: a 0/1 accuracy reward is maximised by always naming the most likely option. The
expected log-probability of the person's choice, E_{y ~ people}[log p(y | x, z)], is a
proper scoring rule: over the reasoning z the policy can write, it is largest where the
answer distribution that z leads to is closest (in cross-entropy) to people's, not where it
puts all mass on the mode. The reward is a property of the reasoning: the answer token the
policy then samples does not change it, so in the direct layout (no reasoning, one slot per
prompt) every sample of a group gets the same reward and GRPO learns nothing from it
(validation refuses that combination).

Dodging: a completion without a committed answer in the layout (`format_ok`) gets the
floor, the least any committed answer can get, so not answering never pays (issue 21's
rule, as for the discriminator's `reward_floor`).

The reads go to the rollout engine (`RolloutEngine.next_token_logprobs`), i.e. the weights
that sampled the completions; `RewardStack.attach_reader` connects them.
"""

from __future__ import annotations

import math
from typing import Sequence

from grailcore.data.schema import OPINION_DIRECTIONS, Example
from grailcore.evaluation.answer_slot import (ANSWER_OPEN, OPINION_OPEN, SampleSlots, Scorer, SlotVocabulary,
                                              slot_distributions)
from grailcore.evaluation.sampled_reads import SampledReads, watch_ids
from grailcore.rewards.parsing import parse_viewer
from grailcore.rewards.registry import register_slot
from grailcore.rewards.stack import Tokens
from grailcore.types import Completion


class SlotReader:
    """Reads each sampled completion's answer- and opinion-slot distributions from an engine.

    Given the sampled `Completion`s too, it reads only what a slot reward pays for: a
    completion without a committed answer gets the floor whatever its slots hold, so its
    slots are not read (all zeros, kind 'skipped'); and a slot on the sampled path is looked
    up in the log-probs the engine reported while sampling (`watch_ids` asks for them,
    `evaluation/sampled_reads.py`) instead of requested again."""

    def __init__(self, score: Scorer, tokenizer, temperature: float) -> None:
        if temperature <= 0:
            raise ValueError(f"the slot rewards read softmax(logits / T) at the sampling temperature; got T={temperature}")
        self.score, self.vocab, self.temperature = score, SlotVocabulary(tokenizer), temperature

    def watch_ids(self, examples: Sequence[Example]) -> tuple[int, ...]:
        """The token ids whose log-probs sampling should report (`SamplingParams.watch_token_ids`)."""
        return watch_ids(self.vocab, [ex.n_options for ex in examples])

    def __call__(self, examples: Sequence[Example], tokens: Tokens,
                 sampled: Sequence[Completion] | None = None) -> list[SampleSlots]:
        if len(examples) != len(tokens) or (sampled is not None and len(sampled) != len(tokens)):
            raise ValueError(f"{len(examples)} examples for {len(tokens)} token sequences"
                             + (f" and {len(sampled)} completions" if sampled is not None else ""))
        keep = list(range(len(examples)))
        score = self.score
        if sampled is not None:
            keep = [i for i in keep if committed(examples[i], sampled[i].text)]
            score = SampledReads([tokens[i][0] for i in keep], [[sampled[i]] for i in keep]).scorer(
                self.score, self.temperature)
        rows = slot_distributions(score, self.vocab, [tokens[i][0] for i in keep], [[tokens[i][1]] for i in keep],
                                  [examples[i].n_options for i in keep],
                                  [examples[i].meta.get("layout", "think") for i in keep], self.temperature)
        out = [SampleSlots((0.0,) * ex.n_options, (0.0,) * len(OPINION_DIRECTIONS), "skipped", "skipped")
               for ex in examples]
        for i, row in zip(keep, rows):
            out[i] = row.samples[0]
        return out


def committed(example: Example, completion: str) -> bool:
    """Whether the completion commits to an answer in its example's layout; a slot reward
    pays its floor otherwise."""
    return parse_viewer(completion, example.n_options, example.meta.get("layout", "think")).format_ok


def _clipped_log(p: float, floor: float) -> float:
    return max(math.log(p), floor) if p > 0 else floor


@register_slot("choice_likelihood", task="viewer", read_at=ANSWER_OPEN)
def choice_likelihood(example: Example, completion: str, slots: SampleSlots, *, likelihood_floor: float) -> float:
    """log p(person's option) at the answer slot, >= likelihood_floor; the floor without a
    committed answer."""
    if example.gold_index is None or not committed(example, completion):
        return likelihood_floor
    return _clipped_log(slots.choice[example.gold_index - 1], likelihood_floor)


@register_slot("opinion_likelihood", task="viewer", read_at=OPINION_OPEN)
def opinion_likelihood(example: Example, completion: str, slots: SampleSlots, *, likelihood_floor: float) -> float:
    """log p(person's opinion direction) at the opinion slot, >= likelihood_floor; the floor
    without a committed answer; 0 on rows without a gold direction (no signal, as
    `opinion_accuracy`)."""
    if example.opinion_direction is None:
        return 0.0
    if not committed(example, completion):
        return likelihood_floor
    return _clipped_log(slots.opinion[OPINION_DIRECTIONS.index(example.opinion_direction)], likelihood_floor)
