"""Dataset mixtures: weighted resumable sampling, per-source loading and system prompts,
per-source metrics, and a short mixture run on micro-llama."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import yaml

from grailcore.cli import load_preset
from grailcore.config import ConfigError, DataConfig, GRPOConfig, MixtureSource, OptimConfig
from grailcore.data.schema import Example
from grailcore.mixture import load_mixture, load_split, make_sampler, source_name, source_reward_metrics, sources
from grailcore.sampler import MixtureSampler, PromptSampler

GUN, WAGE = "synthetic:gun_control", "synthetic:minimum_wage"


def _sampler(seed: int = 0) -> MixtureSampler:
    return MixtureSampler([list(range(0, 10)), list(range(10, 14))], [3.0, 1.0], seed, ["a", "b"])


def test_draws_follow_the_weights_in_every_window():
    sampler = _sampler()
    draws = sampler.next(400)
    from_a = [i < 10 for i in draws]
    for end in range(1, 401):
        assert abs(sum(from_a[:end]) - 0.75 * end) <= 1, f"share of source a drifts after {end} draws"
    # Within a source, each epoch is a permutation: 300 draws of a = 30 full passes over its 10 rows.
    assert sorted(i for i in draws if i < 10) == sorted(list(range(10)) * 30)
    assert sorted(i for i in draws if i >= 10) == sorted(list(range(10, 14)) * 25)


def test_seeded_and_resumable_through_json():
    a, b = _sampler(seed=1), _sampler(seed=1)
    assert a.next(7) == b.next(7)
    assert _sampler(seed=2).next(20) != _sampler(seed=1).next(20)
    state = json.loads(json.dumps(a.state_dict()))  # checkpoints store trainer_state as JSON
    expected = a.next(25)
    resumed = _sampler(seed=1)
    resumed.load_state_dict(state)
    assert resumed.next(25) == expected


def test_resume_refuses_other_data():
    state = _sampler().state_dict()
    changed = MixtureSampler([list(range(10)), list(range(10, 14))], [1.0, 1.0], 0, ["a", "b"])
    with pytest.raises(ValueError, match="resume with the same data"):
        changed.load_state_dict(state)
    with pytest.raises(ValueError, match="data.mixture"):
        PromptSampler(14, 0).load_state_dict(state)
    with pytest.raises(ValueError, match="single dataset"):
        _sampler().load_state_dict(PromptSampler(14, 0).state_dict())


def test_bad_mixtures_are_refused():
    with pytest.raises(ValueError, match=r"\['b'\] have no usable"):
        MixtureSampler([[0], []], [1.0, 1.0], 0, ["a", "b"])
    with pytest.raises(ValueError, match="weights must be > 0"):
        MixtureSampler([[0], [1]], [1.0, 0.0], 0, ["a", "b"])
    with pytest.raises(ConfigError, match="repeat"):
        sources(DataConfig(mixture=(MixtureSource(GUN), MixtureSource("other/gun_control.jsonl"))))
    with pytest.raises(ConfigError, match=r"mixture\[1\].*weight must be > 0"):
        sources(DataConfig(mixture=(MixtureSource(GUN), MixtureSource(WAGE, weight=-1))))
    with pytest.raises(ConfigError, match=r"mixes tasks \['math', 'viewer'\]"):
        sources(DataConfig(mixture=(MixtureSource(GUN), MixtureSource("m.jsonl", task="math"))))
    with pytest.raises(ConfigError, match="eval_path is set beside"):
        sources(DataConfig(eval_path="x.jsonl", mixture=(MixtureSource(GUN),)))
    with pytest.raises(ConfigError, match=r"mixture\[0\]: expected a mapping"):
        sources(DataConfig(mixture=({"path": GUN, "wieght": 2},)))


def test_source_names():
    assert source_name(MixtureSource(GUN)) == "gun_control"
    assert source_name(MixtureSource("data/wage_v2.jsonl")) == "wage_v2"
    assert source_name(MixtureSource("data/study_dir/")) == "study_dir"
    assert source_name(MixtureSource(GUN, name="gun")) == "gun"


def _mixture_cfg(**overrides) -> DataConfig:
    return DataConfig(synthetic_n=100, max_history=2, mixture=(
        MixtureSource(GUN, weight=3.0), MixtureSource(WAGE, name="wage", system_prompt="You are brief.")),
        **overrides)


def test_sources_load_with_their_own_system_prompt_and_name():
    train, evals = load_mixture(_mixture_cfg())
    by_source = {s: [ex for ex in train.examples if ex.source == s] for s in ("gun_control", "wage")}
    assert all(by_source.values()) and len(train.examples) == sum(map(len, by_source.values()))
    assert all(ex.issue == "gun_control" for ex in by_source["gun_control"])
    assert all(ex.messages[0]["content"] == "You are brief." for ex in by_source["wage"])
    assert all(ex.messages[0]["content"] != "You are brief." for ex in by_source["gun_control"])
    assert {ex.source for ex in evals.examples} == {"gun_control", "wage"}
    assert not {ex.example_id for ex in evals.examples} & {ex.example_id for ex in train.examples}
    capped = load_split(_mixture_cfg(max_train_samples=5), "train")
    assert len(capped.examples) == 10  # the cap is per source


def test_yaml_mixture_and_sampler(tmp_path):
    path = tmp_path / "mix.yaml"
    path.write_text(yaml.safe_dump({"data": {"synthetic_n": 100, "mixture": [
        {"path": GUN, "weight": 1.0}, {"path": WAGE, "weight": 3.0, "name": "wage"}]}}))
    cfg = load_preset(str(path))
    train, _ = load_mixture(cfg.data)
    sampler = make_sampler(train.examples, cfg.data)
    drawn = [train.examples[i].source for i in sampler.next(40)]
    assert drawn.count("wage") == 30 and drawn.count("gun_control") == 10
    assert isinstance(make_sampler(train.examples, DataConfig()), PromptSampler)


def test_source_without_splits_needs_an_eval_path(tmp_path):
    rows = tmp_path / "math.jsonl"
    rows.write_text("".join(json.dumps({"problem": f"{i} + 1 = ?", "answer": str(i + 1)}) + "\n" for i in range(4)))
    cfg = DataConfig(mixture=(MixtureSource(str(rows), task="math"),))
    with pytest.raises(ConfigError, match="'math' .* has no splits; set its eval_path"):
        load_mixture(cfg)
    fixed = DataConfig(mixture=(MixtureSource(str(rows), task="math", eval_path=str(rows)),))
    train, evals = load_mixture(fixed)
    assert {ex.task for ex in train.examples} == {"math"} and len(evals.examples) == 4


def test_source_reward_metrics():
    ex = [Example(example_id=str(i), task="viewer", messages=(), source=s) for i, s in enumerate("aabb")]
    metrics = source_reward_metrics(ex, torch.tensor([1.0, 0.0, 0.5, 0.5]))
    assert metrics == {"reward/total/a": 0.5, "reward/total/b": 0.5}


def test_mixture_run_logs_per_source_metrics(tmp_path):
    from test_trainer import _run, tiny_config

    cfg = tiny_config(tmp_path / "run")
    cfg = dataclasses.replace(
        cfg, data=_mixture_cfg(), grpo=GRPOConfig(prompts_per_step=2, group_size=2),
        optim=OptimConfig(lr=1e-3, max_steps=2, micro_batch_size=4),
        rollout=dataclasses.replace(cfg.rollout, max_completion_tokens=8),
        eval=dataclasses.replace(cfg.eval, max_samples=4))
    _run(cfg)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "reward/total" in r]
    # 2 prompts per step at 3:1 draw gun, gun | wage, gun (ties go to the earlier source).
    assert "reward/total/gun_control" in steps[0] and "reward/total/wage" not in steps[0]
    assert "reward/total/gun_control" in steps[1] and "reward/total/wage" in steps[1]
    final = records[-1]
    assert {"eval/accuracy/gun_control", "eval/accuracy/wage", "eval/reward/total/wage"} <= set(final)
