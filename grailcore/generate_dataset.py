"""Generate scored completions with the config's rollout engine: k per prompt, rewards
attached, saved as a `datasets` dataset for SFT warm starts (`--keep correct` keeps the
completions whose answer is right: rejection-sampled SFT data).

    python -m grailcore.generate_dataset --cfg configs/demo_gun.py --out data/gun_k4 --samples-per-row 4 --keep correct

Resumable: prompts are done in shards (OUT/shards/*.jsonl, each written atomically); a
rerun with the same settings skips finished shards, and a rerun with another --keep only
refilters. OUT/dataset is the `save_to_disk` dataset (absent when no row is kept);
OUT/generate.json holds the settings.
Any other argument is a config override (`--model.name-or-path runs/x/final`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

from grailcore import dist as gdist
from grailcore.build import build_policy, load_rows, seed_everything, training_data
from grailcore.cli import command, parse_config
from grailcore.config import Config, ConfigError, RewardsConfig
from grailcore.data.prompt import encode_prompt
from grailcore.data.schema import Example
from grailcore.mixture import load_split
from grailcore.rewards import learned_rewards, score_completions, slot_rewards
from grailcore.rollout import build_engine
from grailcore.rollout.base import RolloutEngine
from grailcore.types import Completion, SamplingParams
from grailcore.validation import validate

log = logging.getLogger(__name__)
CORRECTNESS_REWARD = {"viewer": "option_accuracy", "math": "math_accuracy"}
"""Per task, the reward that is 1 exactly when the completion's answer is right."""
SHARDS_DIR, SETTINGS_FILE, DATASET_DIR = "shards", "generate.json", "dataset"


@dataclass(frozen=True)
class GenerateOptions:
    out: Path
    samples_per_row: int = 4
    split: str = "train"
    keep: Literal["correct", "all"] = "all"
    shard_size: int = 64
    """Prompts per shard: the unit of resumption."""


def scoring_config(rewards: RewardsConfig, tasks: Sequence[str]) -> RewardsConfig:
    """The run's rule rewards (a learned one, the discriminator, exists only inside its training
    run; a slot reward reads the training engine) plus each task's correctness reward at
    weight 0 (the total is unchanged)."""
    model_rewards = {**learned_rewards(), **slot_rewards()}
    rules = [(n, w) for n, w in zip(rewards.names, rewards.weights) if n not in model_rewards]
    names, weights = tuple(n for n, _ in rules), tuple(w for _, w in rules)
    extra = tuple(CORRECTNESS_REWARD[t] for t in sorted(set(tasks)) if CORRECTNESS_REWARD[t] not in names)
    return dataclasses.replace(rewards, names=names + extra, weights=weights + (0.0,) * len(extra))


def sample_records(rows: Sequence[int], examples: Sequence[Example], groups: Sequence[Sequence[Completion]],
                   rewards: RewardsConfig) -> list[dict[str, Any]]:
    """One record per completion: prompt messages + assistant reply, rewards, correctness, gold fields."""
    flat = [(row, ex, k, c) for row, ex, group in zip(rows, examples, groups) for k, c in enumerate(group)]
    scores = score_completions([ex for _, ex, _, _ in flat], [c.text for *_, c in flat], rewards)
    out = []
    for i, (row, ex, k, c) in enumerate(flat):
        per_reward = {name: float(v[i]) for name, v in scores.per_reward.items()}
        out.append({
            "row": row, "sample": k, "example_id": ex.example_id, "source": ex.source, "task": ex.task,
            "messages": [{"role": m["role"], "content": m["content"]} for m in ex.messages]
            + [{"role": "assistant", "content": c.text}],
            "prompt": ex.prompt, "completion": c.text, "finish_reason": c.finish_reason,
            "completion_tokens": len(c.token_ids), "reward": float(scores.total[i]), "rewards": per_reward,
            "correct": per_reward[CORRECTNESS_REWARD[ex.task]] == 1.0,
            "gold_index": ex.gold_index, "opinion_direction": ex.opinion_direction, "answer": ex.answer,
        })
    return out


def _settings(cfg: Config, options: GenerateOptions, rewards: RewardsConfig, examples: Sequence[Example]) -> dict:
    """Everything that decides the generated rows; a rerun must match it to reuse shards."""
    ids = "\0".join(ex.example_id for ex in examples)
    return {"model": cfg.model.name_or_path, "data": json.loads(json.dumps(dataclasses.asdict(cfg.data))),
            "temperature": cfg.rollout.temperature, "top_p": cfg.rollout.top_p,
            "max_completion_tokens": cfg.rollout.max_completion_tokens, "seed": cfg.seed,
            "rewards": json.loads(json.dumps(dataclasses.asdict(rewards))), "split": options.split,
            "samples_per_row": options.samples_per_row, "shard_size": options.shard_size,
            "rows": len(examples), "example_ids_crc32": zlib.crc32(ids.encode())}


def _check_settings(out: Path, settings: dict) -> None:
    path = out / SETTINGS_FILE
    if path.exists():
        old = json.loads(path.read_text())
        if differ := sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k)):
            raise ConfigError(f"{out} holds shards generated with other settings ({', '.join(differ)} differ); "
                              "rerun with the same settings to resume, or choose a new --out")
        return
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(settings, indent=2))


def _write_atomic(path: Path, records: list[dict]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    os.replace(tmp, path)  # a crash mid-write leaves no half shard behind


def _features(reward_names: Sequence[str]):
    from datasets import Features, List, Value

    return Features({
        "row": Value("int64"), "sample": Value("int64"), "example_id": Value("string"), "source": Value("string"),
        "task": Value("string"), "messages": List({"role": Value("string"), "content": Value("string")}),
        "prompt": Value("string"), "completion": Value("string"), "finish_reason": Value("string"),
        "completion_tokens": Value("int64"), "reward": Value("float32"),
        "rewards": {name: Value("float32") for name in reward_names}, "correct": Value("bool"),
        "gold_index": Value("int64"), "opinion_direction": Value("string"), "answer": Value("string"),
    })


def _save_dataset(records: list[dict], reward_names: Sequence[str], out: Path) -> Path | None:
    """OUT/dataset replaced by `records`; None (and no dataset) when there are none, since
    `datasets` cannot load a saved dataset of 0 rows."""
    import datasets

    target, tmp = out / DATASET_DIR, out / f".{DATASET_DIR}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    if not records:
        shutil.rmtree(target, ignore_errors=True)  # a stale dataset of other --keep must not linger
        return None
    datasets.Dataset.from_list(records, features=_features(reward_names)).save_to_disk(str(tmp))
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    return target


def generate_dataset(engine: RolloutEngine, examples: Sequence[Example], prompt_ids: Sequence[list[int]],
                     cfg: Config, options: GenerateOptions) -> dict[str, Any]:
    """Generate every unfinished shard, then write the kept rows as OUT/dataset; returns a summary."""
    if options.samples_per_row < 1 or options.shard_size < 1:
        raise ConfigError("--samples-per-row and --shard-size must be >= 1")
    rewards = scoring_config(cfg.rewards, [ex.task for ex in examples])
    out = Path(options.out)
    _check_settings(out, _settings(cfg, options, rewards, examples))
    (out / SHARDS_DIR).mkdir(exist_ok=True)
    shard_starts = range(0, len(examples), options.shard_size)
    generated = 0
    for shard, start in enumerate(shard_starts):
        path = out / SHARDS_DIR / f"shard-{shard:05d}.jsonl"
        if path.exists():
            continue
        rows = list(range(start, min(start + options.shard_size, len(examples))))
        params = SamplingParams(n=options.samples_per_row, temperature=cfg.rollout.temperature,
                                top_p=cfg.rollout.top_p, max_tokens=cfg.rollout.max_completion_tokens,
                                seed=cfg.seed * 1_000_003 + shard)
        groups = engine.generate([prompt_ids[i] for i in rows], params)
        _write_atomic(path, sample_records(rows, [examples[i] for i in rows], groups, rewards))
        generated += 1
        log.info("shard %d/%d done (%d prompts)", shard + 1, len(shard_starts), len(rows))
    records = [json.loads(line) for shard in range(len(shard_starts))
               for line in (out / SHARDS_DIR / f"shard-{shard:05d}.jsonl").read_text().splitlines()]
    kept = [r for r in records if options.keep == "all" or r["correct"]]
    dataset = _save_dataset(kept, rewards.names, out)
    if dataset is None:
        log.warning("no completion of %d passed --keep %s; no dataset written", len(records), options.keep)
    by_source: dict[str, list[bool]] = {}
    for r in records:
        by_source.setdefault(r["source"], []).append(r["correct"])
    return {"dataset": str(dataset) if dataset else None, "rows": len(examples), "samples": len(records), "kept": len(kept),
            "keep": options.keep, "shards": len(shard_starts), "shards_generated": generated,
            "correct_rate": {s: sum(v) / len(v) for s, v in sorted(by_source.items())}}


def _split_prompts(tokenizer, cfg: Config, split: str) -> tuple[list[Example], list[list[int]]]:
    """The split's examples and prompt ids; 'train' is exactly what training samples from."""
    if split == "train":
        data = training_data(cfg, tokenizer, *load_rows(cfg, rank0=True), audit=None, rank0=True)
        return data.train, data.train_ids
    examples, ids, too_long = [], [], []
    for ex in load_split(cfg.data, split).examples:
        tokens = encode_prompt(tokenizer, ex)
        if len(tokens) > cfg.rollout.max_prompt_tokens:
            too_long.append(ex.example_id)
            continue
        examples.append(ex)
        ids.append(tokens)
    if too_long:
        message = f"{len(too_long)} {split} prompts exceed rollout.max_prompt_tokens: {too_long[:5]}"
        if not cfg.data.skip_bad_rows:
            raise ConfigError(message + "; raise it, or set data.skip_bad_rows to skip them")
        log.warning("skipped %s", message)
    return examples, ids


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m grailcore.generate_dataset", description=__doc__, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path, help="output directory (resumed if it exists)")
    parser.add_argument("--samples-per-row", type=int, default=4, help="completions per prompt (k)")
    parser.add_argument("--split", default="train", choices=("train", "validation", "test"))
    parser.add_argument("--keep", default="all", choices=("all", "correct"),
                        help="'correct': only completions whose option/math answer is right")
    parser.add_argument("--shard-size", type=int, default=64, help="prompts per shard (unit of resumption)")
    args, config_args = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    cfg = parse_config(config_args, description=__doc__)
    dist = gdist.init_distributed()
    if dist.world_size > 1:
        raise ConfigError("grailcore.generate_dataset runs in one process; launch it with python, not torchrun")
    validate(cfg)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    seed_everything(cfg.seed, cfg.deterministic)
    # Only the policy and the engine are needed: no reference model, no optimizer, no discriminator.
    policy, model_dir = build_policy(cfg, dist, reference=False)
    examples, prompt_ids = _split_prompts(policy.tokenizer, cfg, args.split)
    engine = build_engine(cfg, model_dir, dist, policy.model.lm, policy.tokenizer)
    try:
        options = GenerateOptions(out=args.out, samples_per_row=args.samples_per_row, split=args.split,
                                  keep=args.keep, shard_size=args.shard_size)
        summary = generate_dataset(engine, examples, prompt_ids, cfg, options)
    finally:
        engine.close()
        gdist.shutdown()
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    command(main)
