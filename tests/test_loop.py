"""End-to-end GRPO on a tiny real model: the loop must raise a trivial reward, checkpoint,
resume exactly, and export a loadable model."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from grailcore.config import CheckpointConfig, Config, DataConfig, EvalConfig, GRPOConfig, LoggingConfig, \
    ModelConfig, OptimConfig, RewardsConfig, RolloutConfig
from grailcore.rewards import available_rewards, register

TRIVIAL = "test_space_tokens"


def _space_fraction(example, completion: str) -> float:
    """Share of whitespace-separated words: a signal a random model varies on at once."""
    if not completion:
        return 0.0
    return sum(ch == " " for ch in completion) / len(completion)


if TRIVIAL not in available_rewards():
    register(TRIVIAL)(_space_fraction)


def tiny_config(run_dir: Path, **overrides) -> Config:
    cfg = Config(
        run_dir=str(run_dir), seed=3,
        model=ModelConfig(name_or_path="micro-llama", gradient_checkpointing=False),
        data=DataConfig(train_path="synthetic:gun_control", synthetic_n=200, max_history=2),
        rollout=RolloutConfig(temperature=1.0, max_prompt_tokens=2048, max_completion_tokens=12),
        grpo=GRPOConfig(prompts_per_step=4, group_size=8, loss_type="grpo"),
        optim=OptimConfig(lr=3e-3, max_steps=14, micro_batch_size=16),
        rewards=RewardsConfig(names=(TRIVIAL,), weights=(1.0,)),
        eval=EvalConfig(every=0, max_samples=4),
        checkpoint=CheckpointConfig(every=0, export_final=True),
        logging=LoggingConfig(tensorboard=False, progress=False, log_samples=0),
    )
    return dataclasses.replace(cfg, **overrides)


def _run(cfg: Config) -> dict:
    from grailcore.loop import train
    from grailcore.setup import build

    parts = build(cfg)
    try:
        return train(parts, cfg)
    finally:
        parts.engine.close()


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _rewards(run_dir: Path) -> list[float]:
    return [r["reward/total"] for r in _rows(run_dir) if "reward/total" in r]


def test_grpo_raises_a_trivial_reward(tmp_path):
    cfg = tiny_config(tmp_path / "run")
    _run(cfg)
    rewards = _rewards(tmp_path / "run")
    assert len(rewards) == cfg.optim.max_steps
    first, last = sum(rewards[:4]) / 4, sum(rewards[-4:]) / 4
    assert last > first + 0.05, f"reward did not rise: first steps {rewards[:4]}, last {rewards[-4:]}"
    for row in (r for r in _rows(tmp_path / "run") if "time/training" in r):  # training's sub-phases
        assert 0 < row["time/forward_backward"] and 0 < row["time/optimizer"]
        assert row["time/forward_backward"] + row["time/optimizer"] <= row["time/training"]
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final")
    assert exported.config.num_hidden_layers == 2


def test_resume_continues_exactly(tmp_path):
    """Stop after 3 steps (checkpoint), resume to 5: same weights as 5 straight steps."""
    base = dict(optim=OptimConfig(lr=1e-3, max_steps=5, micro_batch_size=16),
                checkpoint=CheckpointConfig(every=1, keep=2, export_final=False), deterministic=True)
    straight = tiny_config(tmp_path / "straight", **base)
    _run(straight)
    split = tiny_config(tmp_path / "split", **{**base, "optim": OptimConfig(lr=1e-3, max_steps=3,
                                                                             micro_batch_size=16)})
    _run(split)
    # The schedule must see the same horizon: resume with the full max_steps.
    resumed = dataclasses.replace(split, optim=straight.optim, resume=True)
    _run(resumed)
    from safetensors.torch import load_file

    def final_weights(run: Path) -> dict:
        latest = (run / "checkpoints" / "latest").read_text().strip()
        return load_file(run / "checkpoints" / latest / "model.safetensors")

    w_straight, w_resumed = final_weights(tmp_path / "straight"), final_weights(tmp_path / "split")
    assert w_straight.keys() == w_resumed.keys()
    for name in w_straight:
        assert torch.equal(w_straight[name], w_resumed[name]), name
    assert _rewards(tmp_path / "straight") == pytest.approx(_rewards(tmp_path / "split"))


def test_grail_run_logs_discriminator_metrics_and_checkpoints_it(tmp_path):
    from grailcore.config import GailConfig

    cfg = tiny_config(tmp_path / "grail", optim=OptimConfig(lr=1e-3, max_steps=2, micro_batch_size=16),
                      gail=GailConfig(enabled=True, model="tiny-bert", max_tokens=256, weight=0.5),
                      checkpoint=CheckpointConfig(every=1, export_final=False))
    _run(cfg)
    rows = [json.loads(line) for line in (tmp_path / "grail" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert len(steps) == 2 and all("gail/truncation_rate" in r for r in steps)
    latest = (tmp_path / "grail" / "checkpoints" / "latest").read_text().strip()
    extra = torch.load(tmp_path / "grail" / "checkpoints" / latest / "extra.pt", weights_only=True)
    assert "discriminator" in extra
