"""Completions files: JSONL rows of prompt fields (as in the seed sample) plus the
completions to score, read for `--completions` and written after every model run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from grailcore.data.loaders import prerendered_example
from grailcore.data.schema import Example, SchemaError, validate_example

COMPLETION_KEYS = ("completions", "completion", "example_completion")
"""Where a row keeps its completions, in order of preference (`example_completion` is
the seed sample's field: what the original system answered)."""
EXTRA_KEYS = ("viewer_id", "true_choice_probs", "true_opinion_probs")
"""Fields beyond the pre-rendered prompt rows that keep CIs and fidelity intact on rescoring."""
RECORD_KEYS = ("finish_reasons",)
"""Written for the record, not scored."""


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
    if row.get("viewer_id") is not None:
        out["viewer_id"] = str(row["viewer_id"])
    for key in ("true_choice_probs", "true_opinion_probs"):
        if row.get(key) is not None:
            if not isinstance(row[key], list) or not all(isinstance(p, (int, float)) for p in row[key]):
                raise SchemaError(f"{where}: field '{key}' must be a list of numbers")
            out[key] = tuple(float(p) for p in row[key])
    return out


def read_completions(path: str | Path) -> tuple[list[Example], list[list[str]]]:
    """Examples and their completions; a malformed row raises SchemaError naming file:line."""
    examples, completions = [], []
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
            fields = {k: v for k, v in row.items() if k not in (*COMPLETION_KEYS, *EXTRA_KEYS, *RECORD_KEYS)}
            example = prerendered_example(fields, where, source=source).replace(**_extras(row, where))
            validate_example(example, where)
            examples.append(example)
            completions.append(texts)
    if not examples:
        raise SchemaError(f"{path}: no rows")
    return examples, completions


def example_row(example: Example) -> dict[str, Any]:
    """The fields `read_completions` turns back into the same scored Example."""
    row = {"example_id": example.example_id, "prompt": example.prompt, "gold_index": example.gold_index,
           "n_options": example.n_options, "issue": example.issue, "study": example.study,
           "opinion_direction": example.opinion_direction, "viewer_id": example.viewer_id}
    for key in ("true_choice_probs", "true_opinion_probs"):
        if getattr(example, key) is not None:
            row[key] = list(getattr(example, key))
    return row


def write_completions(path: str | Path, examples: Sequence[Example], completions: Sequence[Sequence[str]],
                      finish_reasons: Sequence[Sequence[str]] | None = None) -> Path:
    """One JSONL row per example with its `completions` (and `finish_reasons` when known)."""
    path = Path(path)
    with open(path, "w", encoding="utf-8") as fh:
        for i, (example, texts) in enumerate(zip(examples, completions)):
            row = {**example_row(example), "completions": list(texts)}
            if finish_reasons is not None:
                row["finish_reasons"] = list(finish_reasons[i])
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path
