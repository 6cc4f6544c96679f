"""Completions files: JSONL rows of prompt fields (as in the seed sample) plus the
completions to score, read for `--completions` and written after every model run. A row
written by a model run also carries its completions' answer-slot distributions
(`answer_slot`), so rescoring and `compare` use the exact estimator without the model."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from grailcore.data.loaders import prerendered_example
from grailcore.data.schema import Example, SchemaError, validate_example
from grailcore.evaluation.answer_slot import LAYOUTS, RowSlots

COMPLETION_KEYS = ("completions", "completion", "example_completion")
"""Where a row keeps its completions, in order of preference (`example_completion` is
the seed sample's field: what the original system answered)."""
EXTRA_KEYS = ("viewer_id", "true_choice_probs", "true_opinion_probs", "layout")
"""Fields beyond the pre-rendered prompt rows that keep CIs and fidelity intact on rescoring."""
SLOT_KEY = "answer_slot"
"""The row's per-completion answer-slot distributions (`answer_slot.RowSlots.to_json`)."""
RECORD_KEYS = ("finish_reasons",)
"""Written for the record, not scored."""


@dataclass(frozen=True)
class EvalSamples:
    """Evaluated rows and what the model produced for them, in one option order."""

    examples: list[Example]
    texts: list[list[str]]
    """texts[i]: the completions of examples[i] (the first is the greedy one when k = 1)."""
    slots: list[RowSlots] | None = None
    """slots[i]: their answer-slot distributions; None = texts only (histogram fallback)."""
    finish_reasons: list[list[str]] | None = None
    """Written for the record ('stop' / 'length'), not scored."""

    def head(self, n: int | None) -> EvalSamples:
        """The first n rows (all when n is None)."""
        if n is None:
            return self
        return EvalSamples(self.examples[:n], self.texts[:n], self.slots[:n] if self.slots is not None else None,
                           self.finish_reasons[:n] if self.finish_reasons is not None else None)


def _completions_of(row: dict[str, Any], where: str) -> list[str]:
    for key in COMPLETION_KEYS:
        if key in row:
            value = row[key]
            texts = [value] if isinstance(value, str) else value
            if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
                raise SchemaError(f"{where}: field '{key}' must be a string or a non-empty list of strings")
            return texts
    raise SchemaError(f"{where}: no completion field; give one of {list(COMPLETION_KEYS)}")


def _extras(row: dict[str, Any], where: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if row.get("layout", "think") not in LAYOUTS:
        raise SchemaError(f"{where}: field 'layout' must be one of {list(LAYOUTS)}, got {row['layout']!r}")
    if row.get("viewer_id") is not None:
        out["viewer_id"] = str(row["viewer_id"])
    for key in ("true_choice_probs", "true_opinion_probs"):
        if row.get(key) is not None:
            if not isinstance(row[key], list) or not all(isinstance(p, (int, float)) for p in row[key]):
                raise SchemaError(f"{where}: field '{key}' must be a list of numbers")
            out[key] = tuple(float(p) for p in row[key])
    return out


def _slots_of(rows_slots: list[RowSlots | None], path: str | Path) -> list[RowSlots] | None:
    """All rows' distributions, None when no row has them; a file with some only is an error."""
    missing = [i for i, s in enumerate(rows_slots, 1) if s is None]
    if len(missing) == len(rows_slots):
        return None
    if missing:
        raise SchemaError(f"{path}: row {missing[0]} (and {len(missing) - 1} more) has no field '{SLOT_KEY}' while "
                          "other rows do; score files written by one evaluation")
    return rows_slots  # type: ignore[return-value]


def read_completions(path: str | Path) -> EvalSamples:
    """Examples, their completions and (when the file has them) their answer-slot
    distributions; a malformed row raises SchemaError naming file:line."""
    examples, completions, slots = [], [], []
    source = Path(path).stem
    with open(path, encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, 1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise SchemaError(f"{where}: not valid JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise SchemaError(f"{where}: a row must be a JSON object")
            texts = _completions_of(row, where)
            fields = {k: v for k, v in row.items()
                      if k not in (*COMPLETION_KEYS, *EXTRA_KEYS, *RECORD_KEYS, SLOT_KEY)}
            extras = _extras(row, where)
            example = prerendered_example(fields, where, source=source, layout=row.get("layout", "think"))
            example = example.replace(**extras)
            validate_example(example, where)
            examples.append(example)
            completions.append(texts)
            try:
                slots.append(RowSlots.from_json(row[SLOT_KEY], example.n_options, where) if SLOT_KEY in row else None)
            except ValueError as err:
                raise SchemaError(str(err)) from None
    if not examples:
        raise SchemaError(f"{path}: no rows")
    return EvalSamples(examples, completions, _slots_of(slots, path))


def example_row(example: Example) -> dict[str, Any]:
    """The fields `read_completions` turns back into the same scored Example."""
    row = {"example_id": example.example_id, "prompt": example.prompt, "gold_index": example.gold_index,
           "n_options": example.n_options, "issue": example.issue, "study": example.study,
           "opinion_direction": example.opinion_direction, "viewer_id": example.viewer_id}
    for key in ("true_choice_probs", "true_opinion_probs"):
        if getattr(example, key) is not None:
            row[key] = list(getattr(example, key))
    if example.meta.get("layout", "think") != "think":
        row["layout"] = example.meta["layout"]
    return row


def write_completions(path: str | Path, samples: EvalSamples) -> Path:
    """One JSONL row per example with its `completions` (and `answer_slot`, `finish_reasons` when known)."""
    path = Path(path)
    with open(path, "w", encoding="utf-8") as fh:
        for i, (example, texts) in enumerate(zip(samples.examples, samples.texts, strict=True)):
            row = {**example_row(example), "completions": list(texts)}
            if samples.slots is not None:
                row[SLOT_KEY] = samples.slots[i].to_json()
            if samples.finish_reasons is not None:
                row["finish_reasons"] = list(samples.finish_reasons[i])
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path
