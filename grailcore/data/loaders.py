"""Load any supported dataset into `Example`s: synthetic study dirs, `synthetic:<issue>`,
JSONL / parquet / HF on-disk Decisions, pre-rendered prompt files, and math (via data.math).
Every viewer row is shown alike whatever its source: options rendered by one rule and
shuffled by `data.shuffle_options`; the rows as the file gave them are kept for the audit.
"""

from __future__ import annotations

import json
import logging
import os
import dataclasses
import random
import re
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

from grailcore.config import DataConfig
from grailcore.data.options import common_fields, parse_option_fields, render_option, unreadable
from grailcore.data.prompt import DEFAULT_SYSTEM_PROMPT, build_example, option_order
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
    raw_examples: list[Example] | None = None
    """The same rows as the file gave them, aligned with `examples`: pre-rendered prompts
    as written, Decisions rendered in their stored slate order. None where loading changes
    nothing (math). The leak audit reads them to say what the data itself carries."""


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
        cap = data_cfg.max_train_samples
        result = dataclasses.replace(result, examples=result.examples[:cap], raw_examples=(
            None if result.raw_examples is None else result.raw_examples[:cap]))
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
                system_prompt=data_cfg.system_prompt, source=source)


def _load_synthetic(path: str, data_cfg: DataConfig, split: str) -> LoadResult:
    issue = path[len(SYNTHETIC_PREFIX):]
    if issue not in ISSUES:
        raise ValueError(f"{path}: unknown issue {issue!r}; use synthetic:<issue> with issue in {ISSUES}")
    decisions = split_by_viewer(generate_study(issue, data_cfg.synthetic_n, data_cfg.seed), data_cfg.seed)[split]
    options = _render_options(data_cfg, path)
    stored = {**options, "shuffle_options": False}
    return LoadResult([build_example(d, **options) for d in decisions], source=path, split=split,
                      raw_examples=[build_example(d, **stored) for d in decisions])


def _load_rows(path: str, data_cfg: DataConfig, split: str) -> LoadResult:
    rows, split_loaded = _rows(path, split)
    source = _source_name(path)
    examples, raw, reasons = [], [], []
    for where, row in rows:
        try:
            shown, given = _to_examples(row, where, data_cfg, source)
        except SchemaError as err:
            if not data_cfg.skip_bad_rows:
                raise SchemaError(f"{err} (fix the row, or set data.skip_bad_rows to count and skip "
                                  "malformed rows)") from None
            reasons.append(str(err))
            continue
        examples.append(shown)
        raw.append(given)
    return LoadResult(examples, len(reasons), reasons, source, split_loaded, raw_examples=raw)


def _to_examples(row: Any, where: str, data_cfg: DataConfig, source: str) -> tuple[Example, Example]:
    """(the row as training shows it, the row as the file gave it)."""
    if isinstance(row, SchemaError):  # a line that is not even a JSON object
        raise row
    # Decision rows have no 'prompt' and no 'n_options'; either marks a pre-rendered row.
    if isinstance(row, Mapping) and ("prompt" in row or "n_options" in row):
        given = prerendered_example(row, where, data_cfg.system_prompt, source)
        validate_example(given, where)
        shown = rerender_prerendered(given, data_cfg.seed, data_cfg.shuffle_options)
    else:
        decision, options = decision_from_dict(row, where), _render_options(data_cfg, source)
        shown = build_example(decision, **options)
        given = build_example(decision, **{**options, "shuffle_options": False})
    validate_example(shown, where)
    return shown, given


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
                        source: str = "") -> Example:
    """An Example from a row like the seed sample, exactly as the file wrote it (options parsed
    from OPTIONS). Training and evaluation show it through `rerender_prerendered`; scoring a
    completions file keeps it as-is (the completions answered that prompt)."""
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
        messages=({"role": "system", "content": system_prompt or DEFAULT_SYSTEM_PROMPT},
                  {"role": "user", "content": prompt}),
        gold_index=gold, n_options=n_options, opinion_direction=direction, option_texts=options,
        state_text=state, issue=_typed(row, "issue", str, where), study=_typed(row, "study", str, where),
        source=source, meta={"where": where},
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
    head, options, _ = _prompt_parts(prompt, where)
    return head.strip(), options


def _prompt_parts(prompt: str, where: str) -> tuple[str, tuple[str, ...], str]:
    """(text before OPTIONS, option texts, text after the OPTIONS block with its leading
    blank line) of a rendered prompt: head + OPTIONS + options + tail is the prompt again."""
    head, marker, rest = prompt.partition("\n\nOPTIONS\n")
    if not marker:
        raise SchemaError(f"{where}: field 'prompt' has no OPTIONS section")
    block, blank, after = rest.partition("\n\n")
    options = []
    for line in block.splitlines():
        match = _OPTION_LINE.match(line)
        if not match or int(match.group(1)) != len(options) + 1:
            raise SchemaError(f"{where}: field 'prompt' has a malformed OPTIONS line {line!r:.80} "
                              f"(expected '{len(options) + 1}. <text>')")
        options.append(match.group(2))
    return head, tuple(options), blank + after


def rerender_prerendered(example: Example, seed: int, shuffle: bool) -> Example:
    """A pre-rendered row (as `prerendered_example` read it) shown like a row built from a
    Decision: every option rendered by one rule (a field that only some options carry is
    dropped for all) and the options in `option_order`'s seeded order, gold remapped.
    An option that cannot be read into fields raises SchemaError naming file, line and field."""
    where = example.meta["where"]
    head, _, tail = _prompt_parts(example.prompt, where)
    slate = []
    for k, text in enumerate(example.option_texts, 1):
        fields = parse_option_fields(text)
        why = unreadable(fields)
        if why:
            raise SchemaError(f"{where}: field 'prompt', OPTIONS line {k} cannot be re-rendered: {why} "
                              f"(option text {text[:80]!r}); make it 'TITLE (CHANNEL, Ns long) — Engagement: "
                              "name value, ...'")
        slate.append(fields)
    keep = common_fields(slate)
    texts = [render_option(fields, keep) for fields in slate]
    order = option_order(example.example_id, len(texts), seed, shuffle)
    shown = tuple(texts[i] for i in order)
    block = "\n".join(f"{k}. {text}" for k, text in enumerate(shown, 1))
    prompt = f"{head}\n\nOPTIONS\n{block}{tail}"
    dropped = sorted({name for fields in slate for name in fields.carried()} - set(keep))
    return example.replace(
        messages=tuple({**m, "content": prompt} if m["role"] == "user" else m for m in example.messages),
        gold_index=order.index(example.gold_index - 1) + 1, option_texts=shown,
        meta={**example.meta, "shown_order": tuple(order), "dropped_fields": tuple(dropped)},
    )
