"""Load any supported dataset into `Example`s: synthetic study dirs, `synthetic:<issue>`,
JSONL / parquet / HF on-disk Decisions, pre-rendered prompt files, and math (via data.math).
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

from grailcore.config import DataConfig
from grailcore.data.prompt import LAYOUT_SYSTEM_PROMPTS, build_example
from grailcore.data.schema import (
    ISSUES, OPINION_DIRECTIONS, Example, SchemaError, decision_from_dict, validate_example,
)
from grailcore.data.synth import SPLITS, generate_study, split_by_viewer

log = logging.getLogger(__name__)
SYNTHETIC_PREFIX = "synthetic:"
_PRERENDERED_KEYS = {"prompt", "gold_index", "n_options", "issue", "study", "opinion_direction",
                     "example_completion", "id", "example_id"}
_OPTION_LINE = re.compile(r"^(\d+)\. (.*)$")


@dataclass(frozen=True)
class LoadResult:
    """Examples of one split plus what was skipped (only with data.skip_bad_rows) and why."""

    examples: list[Example]
    skipped: int = 0
    skip_reasons: list[str] = field(default_factory=list)
    """'file:line: field ... why', one per skipped row."""
    source: str = ""
    split: str = ""
    """The split loaded, or 'all' for a single file (it has no splits: every row is returned)."""


def load_examples(path: str, data_cfg: DataConfig, split: str = "train") -> LoadResult:
    """Examples of `split` from `path` (see the module docstring for the accepted forms).

    A malformed row raises SchemaError naming file, line and field; with
    `data_cfg.skip_bad_rows` it is counted and reported in the result instead.
    `data_cfg.max_train_samples` caps split 'train'.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if data_cfg.task == "math":
        result = _load_math(path, data_cfg, split)
    elif path.startswith(SYNTHETIC_PREFIX):
        result = _load_synthetic(path, data_cfg, split)
    else:
        result = _load_rows(path, data_cfg, split)
    if not result.examples:
        raise SchemaError(f"{path}: split {split!r} has no usable rows "
                          f"({result.skipped} skipped: {result.skip_reasons[:3]})")
    if result.skipped:
        log.warning("%s: skipped %d malformed row(s), e.g. %s", path, result.skipped, result.skip_reasons[0])
    if split == "train" and data_cfg.max_train_samples is not None:
        result = LoadResult(result.examples[: data_cfg.max_train_samples], result.skipped,
                            result.skip_reasons, result.source, result.split)
    return result


def sample_rows(examples: list[Example], n: int | None, seed: int) -> list[Example]:
    """A seeded sample of `n` rows kept in their stored order (all rows when n is None or
    >= len). Not the first n: sessions are stored together, so the first rows would cover
    only a few viewers (and a viewer-clustered interval would rest on those few)."""
    if n is None or n >= len(examples):
        return list(examples)
    keep = sorted(random.Random(seed).sample(range(len(examples)), n))
    return [examples[i] for i in keep]


def _load_math(path: str, data_cfg: DataConfig, split: str) -> LoadResult:
    """`synthetic:math` (generated problems, split 8:1:1 by index) or a user file (no splits)."""
    from grailcore.data import math  # late import: math data is optional for viewer runs

    if path == f"{SYNTHETIC_PREFIX}math":
        rows = math.generate_math(data_cfg.synthetic_n, data_cfg.seed)
        bucket = {"train": range(0, 8), "validation": (8,), "test": (9,)}[split]
        rows = [r for i, r in enumerate(rows) if i % 10 in bucket]
        return LoadResult(math.math_examples(rows, data_cfg.system_prompt, source=path), source=path, split=split)
    examples = math.load_math(path, system_prompt=data_cfg.system_prompt)
    return LoadResult(examples=examples, source=_source_name(path), split="all")


def _render_options(data_cfg: DataConfig, source: str) -> dict[str, Any]:
    return dict(max_history=data_cfg.max_history, show_ids=data_cfg.show_ids,
                shuffle_options=data_cfg.shuffle_options, seed=data_cfg.seed,
                system_prompt=data_cfg.system_prompt, source=source, layout=data_cfg.layout)


def _load_synthetic(path: str, data_cfg: DataConfig, split: str) -> LoadResult:
    issue = path[len(SYNTHETIC_PREFIX):]
    if issue not in ISSUES:
        raise ValueError(f"{path}: unknown issue {issue!r}; use synthetic:<issue> with issue in {ISSUES}")
    decisions = split_by_viewer(generate_study(issue, data_cfg.synthetic_n, data_cfg.seed), data_cfg.seed)[split]
    options = _render_options(data_cfg, path)
    return LoadResult([build_example(d, **options) for d in decisions], source=path, split=split)


def _load_rows(path: str, data_cfg: DataConfig, split: str) -> LoadResult:
    rows, split_loaded = _rows(path, split)
    source = _source_name(path)
    examples, reasons = [], []
    for where, row in rows:
        try:
            examples.append(_to_example(row, where, data_cfg, source))
        except SchemaError as err:
            if not data_cfg.skip_bad_rows:
                raise SchemaError(f"{err} (fix the row, or set data.skip_bad_rows to count and skip "
                                  "malformed rows)") from None
            reasons.append(str(err))
    return LoadResult(examples, len(reasons), reasons, source, split_loaded)


def _to_example(row: Any, where: str, data_cfg: DataConfig, source: str) -> Example:
    if isinstance(row, SchemaError):  # a line that is not even a JSON object
        raise row
    # Decision rows have no 'prompt' and no 'n_options'; either marks a pre-rendered row.
    if isinstance(row, Mapping) and ("prompt" in row or "n_options" in row):
        example = prerendered_example(row, where, data_cfg.system_prompt, source, data_cfg.layout)
    else:
        example = build_example(decision_from_dict(row, where), **_render_options(data_cfg, source))
    validate_example(example, where)
    return example


def _rows(path: str, split: str) -> tuple[Iterator[tuple[str, Any]], str]:
    """(location 'file:line', row) pairs and the split they belong to."""
    if os.path.isdir(path):
        split_file = os.path.join(path, f"{split}.jsonl")
        if os.path.isfile(split_file):
            return _jsonl_rows(split_file), split
        if any(os.path.isfile(os.path.join(path, f)) for f in ("dataset_info.json", "dataset_dict.json")):
            return _hf_rows(path, split)
        raise SchemaError(f"{path}: a directory without {split}.jsonl that is not a datasets.save_to_disk "
                          "directory; point at a synthetic study dir, a .jsonl/.parquet file or a saved dataset")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file or directory (expected a dataset dir or file, "
                                f"or {SYNTHETIC_PREFIX}<issue>)")
    if path.endswith((".jsonl", ".json")):
        return _jsonl_rows(path), "all"
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq  # late import: only parquet inputs need it

        return ((f"{path}:{i}", r) for i, r in enumerate(pq.read_table(path).to_pylist(), 1)), "all"
    raise SchemaError(f"{path}: unsupported file type; use .jsonl, .parquet, a study dir or a saved dataset")


def _jsonl_rows(path: str) -> Iterator[tuple[str, Any]]:
    with open(path, encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, 1):
            if not line.strip():
                continue  # blank lines carry no row
            try:
                yield f"{path}:{line_no}", json.loads(line)
            except json.JSONDecodeError as err:
                yield f"{path}:{line_no}", SchemaError(f"{path}:{line_no}: not valid JSON ({err.msg})")


def _hf_rows(path: str, split: str) -> tuple[Iterator[tuple[str, Any]], str]:
    import datasets  # late import: heavy, and only saved datasets need it

    loaded = datasets.load_from_disk(path)
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise SchemaError(f"{path}: saved DatasetDict has splits {list(loaded)}, not {split!r}")
        return ((f"{path}[{split}]:{i}", r) for i, r in enumerate(loaded[split], 1)), split
    return ((f"{path}:{i}", r) for i, r in enumerate(loaded, 1)), "all"


def _source_name(path: str) -> str:
    base = os.path.basename(os.path.normpath(path))
    return os.path.splitext(base)[0] if os.path.isfile(path) else base


def prerendered_example(row: Mapping[str, Any], where: str, system_prompt: str | None = None,
                        source: str = "", layout: str = "think") -> Example:
    """An Example from a row like the seed sample: the prompt text kept as-is, options parsed from OPTIONS."""
    unknown = sorted(set(row) - _PRERENDERED_KEYS)
    if unknown:
        raise SchemaError(f"{where}: unknown field(s) {unknown}; pre-rendered rows have {sorted(_PRERENDERED_KEYS)}")
    prompt = _typed(row, "prompt", str, where)
    gold, n_options = _typed(row, "gold_index", int, where), _typed(row, "n_options", int, where)
    direction = row.get("opinion_direction")
    if direction is not None and direction not in OPINION_DIRECTIONS:
        raise SchemaError(f"{where}: field 'opinion_direction' must be one of {OPINION_DIRECTIONS}, got {direction!r}")
    state, options = split_prompt(prompt, where)
    if len(options) != n_options:
        raise SchemaError(f"{where}: field 'n_options' is {n_options} but the prompt's OPTIONS lists {len(options)}")
    if not 1 <= gold <= n_options:
        raise SchemaError(f"{where}: field 'gold_index' must be in 1..{n_options}, got {gold}")
    return Example(
        example_id=str(row.get("example_id") or row.get("id") or f"{source}:{where.rsplit(':', 1)[-1]}"),
        task="viewer",
        messages=({"role": "system", "content": system_prompt or LAYOUT_SYSTEM_PROMPTS[layout]},
                  {"role": "user", "content": prompt}),
        gold_index=gold, n_options=n_options, opinion_direction=direction, option_texts=options,
        state_text=state, issue=_typed(row, "issue", str, where), study=_typed(row, "study", str, where),
        source=source, meta={"where": where, "layout": layout},
    )


def _typed(row: Mapping[str, Any], key: str, kind: type, where: str) -> Any:
    value = row.get(key)
    if value is None:
        raise SchemaError(f"{where}: field '{key}' is missing")
    if not isinstance(value, kind) or isinstance(value, bool):
        raise SchemaError(f"{where}: field '{key}' must be {kind.__name__}, got {type(value).__name__} {value!r:.40}")
    return value


def split_prompt(prompt: str, where: str) -> tuple[str, tuple[str, ...]]:
    """(text before OPTIONS, option texts without their numbers) of a rendered prompt."""
    head, marker, rest = prompt.partition("\n\nOPTIONS\n")
    if not marker:
        raise SchemaError(f"{where}: field 'prompt' has no OPTIONS section")
    options = []
    for line in rest.split("\n\n", 1)[0].splitlines():
        match = _OPTION_LINE.match(line)
        if not match or int(match.group(1)) != len(options) + 1:
            raise SchemaError(f"{where}: field 'prompt' has a malformed OPTIONS line {line!r:.80} "
                              f"(expected '{len(options) + 1}. <text>')")
        options.append(match.group(2))
    return head.strip(), tuple(options)
