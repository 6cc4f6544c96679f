"""Answer-slot reads an engine already made while sampling.

A completion's answer slot sits on its own sampled path: the distribution at that position
is the one the engine drew the next token from. When sampling reported the log-probs of the
slot's candidate tokens at every step (`SamplingParams.watch_token_ids`, vLLM's
`logprob_token_ids`), a read of a node on a sampled path is a lookup, not a scoring request.
Reads off every sampled path (forced slots, an unwritten option's continuation, opinion
mixtures) still go to the engine's scoring pass. Both are log_softmax(logits / T) of the
same weights; they differ only by the engine's arithmetic in a decode batch vs a scoring
batch (equal to 1e-5 in fp32: tests/rollout/test_vllm_answer_slot.py).
"""

from __future__ import annotations

from typing import Mapping, Sequence

from grailcore.evaluation.answer_slot import Scorer, SlotVocabulary
from grailcore.types import Completion


def watch_ids(vocab: SlotVocabulary, n_options: Sequence[int], limit: int = 128) -> tuple[int, ...]:
    """Every token of the choice candidates of the largest slate and of the opinion
    candidates, first tokens first, at most `limit` (a read needing a dropped id is scored)."""
    choices = [c for cs in vocab.choices(max(n_options)) for c in cs] if n_options else []
    candidates = choices + [c for cs in vocab.opinions for c in cs]
    depth = max((len(c) for c in candidates), default=0)
    ordered = [c[d] for d in range(depth) for c in candidates if d < len(c)]
    return tuple(dict.fromkeys(ordered))[:limit]


class SampledReads:
    """The watched log-probs of `completions[i]` (sampled after `prompts[i]`), looked up by
    the token sequence a read is made after."""

    def __init__(self, prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[Completion]]):
        self._paths: dict[tuple[int, ...], list[tuple[tuple[int, ...], tuple[dict[int, float], ...]]]] = {}
        for prompt, row in zip(prompts, completions, strict=True):
            self._paths.setdefault(tuple(prompt), []).extend(
                (tuple(c.token_ids), c.watched) for c in row if c.watched is not None)
        self._lengths = sorted({len(p) for p in self._paths})
        self.hits = 0
        self.misses = 0

    def lookup(self, sequence: Sequence[int]) -> Mapping[int, float] | None:
        """What sampling reported after `sequence`, if it is a prompt plus a sampled prefix."""
        sequence = tuple(sequence)
        for length in self._lengths:
            if length > len(sequence):
                break
            paths = self._paths.get(sequence[:length])
            if paths is None:
                continue
            step, written = len(sequence) - length, sequence[length:]
            for ids, watched in paths:
                if step < len(watched) and ids[:step] == written:
                    return watched[step]
        return None

    def scorer(self, score: Scorer, temperature: float) -> Scorer:
        """`score`, answering from the sampled steps where every asked id was reported (only
        at the sampling `temperature`: the watched log-probs are under it)."""
        def read(sequences: list[list[int]], token_ids: list[list[int]], at: float) -> list[list[float]]:
            out: list[list[float] | None] = [None] * len(sequences)
            if at == temperature:
                for i, (seq, ids) in enumerate(zip(sequences, token_ids, strict=True)):
                    step = self.lookup(seq)
                    if step is not None and all(t in step for t in ids):
                        out[i] = [step[t] for t in ids]
            rest = [i for i, v in enumerate(out) if v is None]
            self.hits += len(sequences) - len(rest)
            self.misses += len(rest)
            if rest:
                for i, values in zip(rest, score([sequences[i] for i in rest], [token_ids[i] for i in rest], at)):
                    out[i] = values
            return out  # type: ignore[return-value]

        return read
