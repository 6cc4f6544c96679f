"""Parsed evaluation rows: examples + completions turned into aligned numpy arrays.

Every metric, baseline and fidelity measure reads a `ScoredRows`; only this module
calls the completion parser, so all of them score the same parse.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from grailcore.data.schema import OPINION_DIRECTIONS, Example
from grailcore.evaluation.answer_slot import RowSlots

NONE = -1
"""Code for 'no parsed answer / no opinion / no gold opinion' in the int arrays."""

# The original system counted a completion as formatted when this tag matched,
# whatever else the text held (its ANS_TAG); kept here so its format rate reproduces.
_ORIGINAL_ANSWER_TAG = re.compile(r"(?si)<answer>\s*([^<\n]+?)\s*</answer>")


@dataclass(frozen=True)
class SlotArrays:
    """The rows' answer-slot distributions (`answer_slot.RowSlots`) as padded arrays.
    Entries are a row's sampled completions (exact) or its one direct read; their count S
    need not equal the K parsed samples."""

    estimator: str
    """answer_slot.EXACT or answer_slot.DIRECT, the same for every row."""
    temperature: float
    choice: np.ndarray  # [N, S, max_n] float, p(option k) per entry, 0-padded
    opinion: np.ndarray  # [N, S, 3] float, p(direction) per entry
    mask: np.ndarray  # [N, S] bool, real entries
    forced: np.ndarray  # [N, S] bool, the choice slot was forced (no <answer> written)

    def _mean(self, values: np.ndarray) -> np.ndarray:
        return (values * self.mask[..., None]).sum(axis=1) / self.mask.sum(axis=1)[:, None]

    @property
    def row_choice(self) -> np.ndarray:
        """[N, max_n] each row's choice distribution: the mean of its entries (Rao-Blackwellised)."""
        return self._mean(self.choice)

    @property
    def row_opinion(self) -> np.ndarray:
        """[N, 3] each row's opinion distribution, likewise."""
        return self._mean(self.opinion)

    @classmethod
    def stack(cls, slots: Sequence[RowSlots], n_options: np.ndarray) -> SlotArrays:
        estimators = {r.estimator for r in slots}
        temperatures = {r.temperature for r in slots}
        if len(estimators) != 1 or len(temperatures) != 1:
            raise ValueError(f"the rows' answer-slot distributions mix estimators {sorted(estimators)} / "
                             f"temperatures {sorted(temperatures)}; score one evaluation at a time")
        width, entries = int(n_options.max()), max(len(r.samples) for r in slots)
        choice = np.zeros((len(slots), entries, width))
        opinion = np.zeros((len(slots), entries, len(OPINION_DIRECTIONS)))
        mask = np.zeros((len(slots), entries), dtype=bool)
        forced = np.zeros((len(slots), entries), dtype=bool)
        for i, (row, n) in enumerate(zip(slots, n_options)):
            for j, s in enumerate(row.samples):
                if len(s.choice) != n:
                    raise ValueError(f"row {i + 1}: {len(s.choice)} option probabilities for {n} options")
                choice[i, j, :n], opinion[i, j], mask[i, j] = s.choice, s.opinion, True
                forced[i, j] = s.choice_slot == "forced"
        return cls(estimators.pop(), temperatures.pop(), choice, opinion, mask, forced)


@dataclass(frozen=True)
class ScoredRows:
    """N rows with up to K samples each; padded samples have `sample_mask` False.

    Choices are 1-based option positions in shown order, NONE when unparsed.
    Opinions are indices into OPINION_DIRECTIONS, NONE when absent.
    """

    gold: np.ndarray  # [N] int, 1-based
    n_options: np.ndarray  # [N] int
    answers: np.ndarray  # [N, K] int, strict parser, NONE = unparsed / out of range
    format_ok: np.ndarray  # [N, K] bool, strict format
    opinions: np.ndarray  # [N, K] int
    original_answers: np.ndarray  # [N, K] int, the original system's rule
    original_formatted: np.ndarray  # [N, K] bool, the original system's <answer> check
    sample_mask: np.ndarray  # [N, K] bool
    gold_opinion: np.ndarray  # [N] int, NONE when the row has no gold direction
    issue: tuple[str, ...]
    study: tuple[str, ...]
    viewer_id: tuple[str | None, ...]
    true_choice_probs: np.ndarray | None  # [N, max_n] float, 0-padded; synthetic only
    true_opinion_probs: np.ndarray | None  # [N, 3] float; synthetic only
    slots: SlotArrays | None = None
    """The model's answer-slot distributions; None = only texts (histogram fallback)."""

    @property
    def n_rows(self) -> int:
        return int(self.gold.shape[0])

    @property
    def max_options(self) -> int:
        return int(self.n_options.max()) if self.n_rows else 0

    @property
    def first_answer(self) -> np.ndarray:
        """[N] the first sample's choice (the greedy one when k = 1)."""
        return self.answers[:, 0]

    @property
    def has_gold_opinion(self) -> np.ndarray:
        return self.gold_opinion != NONE


def opinion_code(direction: str | None) -> int:
    return OPINION_DIRECTIONS.index(direction) if direction in OPINION_DIRECTIONS else NONE


def original_formatted(text: str) -> bool:
    """The original system's format check: an `<answer>...</answer>` tag anywhere."""
    return _ORIGINAL_ANSWER_TAG.search(text) is not None


def _padded(rows: Sequence[Sequence], k: int, fill, dtype) -> np.ndarray:
    out = np.full((len(rows), k), fill, dtype=dtype)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out


def _true_probs(examples: Sequence[Example], width: int, attr: str) -> np.ndarray | None:
    """Stack a per-row probability field, or None unless EVERY row has it."""
    values = [getattr(ex, attr) for ex in examples]
    if not values or any(v is None for v in values):
        return None
    out = np.zeros((len(values), width), dtype=np.float64)
    for i, probs in enumerate(values):
        out[i, : len(probs)] = probs
    return out


def score_completions(examples: Sequence[Example], completions: Sequence[Sequence[str]],
                      slots: Sequence[RowSlots] | None = None) -> ScoredRows:
    """Parse every completion of every viewer example into a `ScoredRows`.

    `completions[i]` holds the samples of `examples[i]` (first = greedy when k = 1);
    `slots[i]`, when given, their answer-slot distributions.
    """
    from grailcore.rewards.parsing import original_answer, parse_viewer

    if len(examples) != len(completions):
        raise ValueError(f"{len(examples)} examples but {len(completions)} completion lists; they must align")
    answers, fmt, opinions, orig, orig_fmt = [], [], [], [], []
    for i, (ex, texts) in enumerate(zip(examples, completions)):
        if ex.task != "viewer":
            raise ValueError(f"example {i} ({ex.example_id}) has task {ex.task!r}; viewer evaluation needs 'viewer'")
        if not texts:
            raise ValueError(f"example {i} ({ex.example_id}) has no completions")
        parsed = [parse_viewer(t, ex.n_options, ex.meta.get("layout", "think")) for t in texts]
        answers.append([NONE if p.answer is None else p.answer for p in parsed])  # parser checks 1..n
        fmt.append([p.format_ok for p in parsed])
        opinions.append([opinion_code(p.opinion) for p in parsed])
        orig.append([NONE if (a := original_answer(t)) is None else a for t in texts])
        orig_fmt.append([original_formatted(t) for t in texts])
    return build_rows(examples, answers, fmt, opinions, orig, orig_fmt, slots)


def build_rows(
    examples: Sequence[Example],
    answers: Sequence[Sequence[int]],
    format_ok: Sequence[Sequence[bool]] | None = None,
    opinions: Sequence[Sequence[int]] | None = None,
    original_answers: Sequence[Sequence[int]] | None = None,
    original_fmt: Sequence[Sequence[bool]] | None = None,
    slots: Sequence[RowSlots] | None = None,
) -> ScoredRows:
    """Assemble `ScoredRows` from per-sample codes (tests build rows directly with this)."""
    if slots is not None and len(slots) != len(examples):
        raise ValueError(f"{len(slots)} answer-slot rows for {len(examples)} examples; they must align")
    k = max((len(a) for a in answers), default=1)
    lengths = [len(a) for a in answers]
    mask = np.arange(k)[None, :] < np.asarray(lengths)[:, None]
    n_opts = np.array([ex.n_options for ex in examples], dtype=np.int64)
    width = int(n_opts.max()) if len(n_opts) else 0
    strict = _padded(answers, k, NONE, np.int64)
    return ScoredRows(
        gold=np.array([ex.gold_index for ex in examples], dtype=np.int64),
        n_options=n_opts,
        answers=strict,
        format_ok=_padded(format_ok, k, False, bool) if format_ok is not None else strict != NONE,
        opinions=_padded(opinions, k, NONE, np.int64) if opinions is not None else np.full((len(answers), k), NONE),
        original_answers=_padded(original_answers, k, NONE, np.int64) if original_answers is not None else strict,
        original_formatted=_padded(original_fmt, k, False, bool) if original_fmt is not None else strict != NONE,
        sample_mask=mask,
        gold_opinion=np.array([opinion_code(ex.opinion_direction) for ex in examples], dtype=np.int64),
        issue=tuple(ex.issue or "unknown" for ex in examples),
        study=tuple(ex.study or "unknown" for ex in examples),
        viewer_id=tuple(ex.viewer_id or None for ex in examples),
        true_choice_probs=_true_probs(examples, width, "true_choice_probs"),
        true_opinion_probs=_true_probs(examples, len(OPINION_DIRECTIONS), "true_opinion_probs"),
        slots=SlotArrays.stack(slots, n_opts) if slots is not None else None,
    )
