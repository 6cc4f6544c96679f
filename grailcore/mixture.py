"""Dataset mixtures (`data.mixture`): load every source with its own task and system
prompt, tag each Example with its source name, draw prompts by weight (MixtureSampler),
and split reward / eval metrics by source (`reward/total/<source>`, `eval/.../<source>`).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import torch

from grailcore import dist as gdist
from grailcore.config import ConfigError, DataConfig, MixtureSource
from grailcore.data.loaders import SYNTHETIC_PREFIX, LoadResult, load_examples
from grailcore.data.schema import Example
from grailcore.evaluation import evaluate_examples
from grailcore.sampler import MixtureSampler, PromptSampler
from grailcore.types import RewardOutput


def source_name(source: MixtureSource) -> str:
    """The configured name, else the path's last component ('synthetic:gun_control' -> 'gun_control')."""
    if source.name:
        return source.name
    path = source.path[len(SYNTHETIC_PREFIX):] if source.path.startswith(SYNTHETIC_PREFIX) else source.path
    base = os.path.basename(os.path.normpath(path))
    return os.path.splitext(base)[0] if os.path.splitext(base)[1] in (".jsonl", ".json", ".parquet") else base


def sources(data: DataConfig) -> list[MixtureSource]:
    """data.mixture as MixtureSource objects (YAML configs give dicts), checked: weights > 0,
    distinct names, one task, and no data.eval_path beside a mixture (each source names its own)."""
    out = []
    for i, entry in enumerate(data.mixture):
        if isinstance(entry, MixtureSource):
            out.append(entry)
            continue
        known = {f.name for f in dataclasses.fields(MixtureSource)}
        if not isinstance(entry, dict) or set(entry) - known or "path" not in entry:
            raise ConfigError(f"data.mixture[{i}]: expected a mapping with 'path' and optional "
                              f"{sorted(known - {'path'})}, got {entry!r}")
        out.append(MixtureSource(**entry))
    for i, src in enumerate(out):
        if not src.weight > 0:
            raise ConfigError(f"data.mixture[{i}] ({src.path}): weight must be > 0, got {src.weight}")
    names = [source_name(s) for s in out]
    if len(set(names)) != len(names):
        raise ConfigError(f"data.mixture: source names {names} repeat; give each source a distinct `name`")
    tasks = sorted({src.task or data.task for src in out})
    if len(tasks) > 1:
        # Training would cope (rewards score only their own task); evaluation scores one task per run.
        raise ConfigError(f"data.mixture mixes tasks {tasks}; the sources of one mixture must share a task")
    if out and data.eval_path is not None:
        raise ConfigError("data.eval_path is set beside data.mixture; give each source its own "
                          "data.mixture[i].eval_path instead")
    return out


def _source_cfg(data: DataConfig, src: MixtureSource) -> DataConfig:
    return dataclasses.replace(data, system_prompt=src.system_prompt or data.system_prompt,
                               task=src.task or data.task, mixture=())


def _tagged(result: LoadResult, name: str) -> LoadResult:
    raw = None if result.raw_examples is None else [ex.replace(source=name) for ex in result.raw_examples]
    return dataclasses.replace(result, examples=[ex.replace(source=name) for ex in result.examples],
                               raw_examples=raw)


def _merge(results: Sequence[LoadResult], split: str) -> LoadResult:
    raw = None if any(r.raw_examples is None for r in results) else [ex for r in results for ex in r.raw_examples]
    return LoadResult(examples=[ex for r in results for ex in r.examples], skipped=sum(r.skipped for r in results),
                      skip_reasons=[why for r in results for why in r.skip_reasons],
                      source="mixture(" + ",".join(r.examples[0].source for r in results) + ")", split=split,
                      raw_examples=raw)


def load_split(data: DataConfig, split: str) -> LoadResult:
    """`split` of the training data: of every mixture source (concatenated in mixture order,
    Example.source = the source name), or of data.train_path without a mixture."""
    if not data.mixture:
        return load_examples(data.train_path, data, split=split)
    return _merge([_tagged(load_examples(src.path, _source_cfg(data, src), split=split), source_name(src))
                   for src in sources(data)], split)


def load_mixture(data: DataConfig) -> tuple[LoadResult, LoadResult]:
    """(train, eval) examples of the mixture; a source's eval rows are its eval_path, else the
    validation split of its path (a source without splits must name an eval_path)."""
    train, evals = [], []
    for src in sources(data):
        cfg, name = _source_cfg(data, src), source_name(src)
        result = _tagged(load_examples(src.path, cfg, split="train"), name)
        if result.split == "all" and src.eval_path is None:
            raise ConfigError(f"data.mixture source {name!r} ({src.path}) has no splits; set its eval_path "
                              "to a held-out file (evaluating on training rows would be meaningless)")
        train.append(result)
        eval_split = "validation" if src.eval_path is None else "train"
        evals.append(_tagged(load_examples(src.eval_path or src.path, cfg, split=eval_split), name))
    return _merge(train, "train"), _merge(evals, "validation")


def make_sampler(examples: Sequence[Example], data: DataConfig) -> PromptSampler | MixtureSampler:
    """PromptSampler over `examples`, or a MixtureSampler over their sources when data.mixture is set."""
    if not data.mixture:
        return PromptSampler(len(examples), data.seed)
    srcs = sources(data)
    names = [source_name(s) for s in srcs]
    by_source: dict[str, list[int]] = {name: [] for name in names}
    for i, ex in enumerate(examples):
        by_source[ex.source].append(i)
    return MixtureSampler([by_source[n] for n in names], [s.weight for s in srcs], data.seed, names)


def _means_by_source(sources_: Sequence[str], values: Sequence[float]) -> dict[str, float]:
    sums: dict[str, list[float]] = {}
    for source, value in zip(sources_, values):
        sums.setdefault(source, []).append(value)
    return {source: sum(v) / len(v) for source, v in sorted(sums.items())}


def source_reward_metrics(examples: Sequence[Example], totals: torch.Tensor) -> dict[str, float]:
    """`reward/total/<source>`: mean total reward per source over the whole step (all ranks).

    Every rank gets the same keys and values (sources drawn on any rank), as
    all_reduce_mean requires; call it on every rank.
    """
    pairs = [(ex.source, float(t)) for ex, t in zip(examples, totals.tolist())]
    gathered = [p for part in gdist.all_gather_object(pairs) for p in part]
    means = _means_by_source([s for s, _ in gathered], [v for _, v in gathered])
    return {f"reward/total/{source}": value for source, value in means.items()}


def source_eval_metrics(examples: Sequence[Example], completions: Sequence[Sequence[str]], rewards: RewardOutput,
                        train: Sequence[Example]) -> dict[str, float]:
    """`eval/reward/total/<source>` and `eval/accuracy/<source>` (viewer: first-sample choice
    accuracy; math: math_accuracy) from the full eval set's completions and per-row rewards (mean over the row's samples)."""
    out = {f"eval/reward/total/{s}": v
           for s, v in _means_by_source([ex.source for ex in examples], rewards.total.tolist()).items()}
    for source in sorted({ex.source for ex in examples}):
        rows = [i for i, ex in enumerate(examples) if ex.source == source]
        subset = [examples[i] for i in rows]
        if subset[0].task == "math":
            if "math_accuracy" in rewards.per_reward:
                out[f"eval/accuracy/{source}"] = float(rewards.per_reward["math_accuracy"][rows].mean())
        else:
            result = evaluate_examples(subset, [completions[i] for i in rows], train)
            if "eval/accuracy" in result:
                out[f"eval/accuracy/{source}"] = result["eval/accuracy"]
    return out

