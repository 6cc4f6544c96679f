"""Config validation (grailcore/validation.py): every check runs before anything is built and
names the field; the reward table holds the discriminator's weight like any other."""

from __future__ import annotations

import dataclasses

import pytest

from grailcore.config import (
    CheckpointConfig, Config, ConfigError, DataConfig, EvalConfig, GailConfig, GRPOConfig, OptimConfig, RewardsConfig,
    SFTConfig,
)
from grailcore.validation import validate


def test_gail_is_an_ordinary_entry_of_the_reward_table():
    validate(Config(rewards=RewardsConfig(names=("slate_accuracy", "format", "gail"), weights=(1.0, 0.5, 0.25))))
    with pytest.raises(ConfigError, match=r"rewards.names \(3\) and rewards.weights \(2\).*`gail`"):
        validate(Config(rewards=RewardsConfig(names=("slate_accuracy", "format", "gail"), weights=(1.0, 0.5))))
    with pytest.raises(ConfigError, match="twice"):
        validate(Config(rewards=RewardsConfig(names=("gail", "gail"), weights=(1.0, 1.0))))


@pytest.mark.parametrize("gail, field", [
    (dict(reward="exp"), "gail.reward"), (dict(reward_clip=0.0), "gail.reward_clip"), (dict(lr=0.0), "gail.lr"),
    (dict(disc_steps=0), "gail.disc_steps"), (dict(max_tokens=4), "gail.max_tokens"),
    (dict(label_smoothing=1.0), "gail.label_smoothing"), (dict(negatives="some"), "gail.negatives"),
    (dict(dodge="zero"), "gail.dodge"),
    (dict(replay_size=-1), "gail.replay_size"), (dict(replay_ratio=-0.5), "gail.replay_ratio"),
    (dict(warmup_steps=-1), "gail.warmup_steps"), (dict(warmup_steps=2), "gail.warmup_steps=2 trains the disc"),
])
def test_discriminator_settings_are_checked_before_it_is_built(gail, field):
    with pytest.raises(ConfigError, match=field):
        validate(Config(gail=GailConfig(**gail)))


def test_a_discriminator_warm_up_must_leave_policy_steps():
    grail = RewardsConfig(names=("slate_accuracy", "gail"), weights=(1.0, 0.25))
    validate(Config(rewards=grail, gail=GailConfig(warmup_steps=4)))
    with pytest.raises(ConfigError, match=r"gail.warmup_steps=20 leaves no policy step in optim.max_steps=20"):
        validate(Config(rewards=grail, gail=GailConfig(warmup_steps=20), optim=OptimConfig(max_steps=20)))


def test_a_step_must_split_evenly_over_the_ranks_of_its_mode():
    cfg = Config(grpo=GRPOConfig(prompts_per_step=3), sft=SFTConfig(batch_size=4))
    validate(cfg, world_size=1)
    with pytest.raises(ConfigError, match=r"grpo.prompts_per_step=3 must be divisible by the world size 2"):
        validate(cfg, world_size=2, mode="grpo")
    validate(cfg, world_size=2, mode="sft")  # SFT draws sft.batch_size examples, not prompts_per_step
    with pytest.raises(ConfigError, match=r"sft.batch_size=4 must be divisible by the world size 3"):
        validate(cfg, world_size=3, mode="sft")


def test_tracking_and_mixture_settings_are_checked_here_too():
    with pytest.raises(ConfigError, match="not a Hub repo id"):
        validate(Config(checkpoint=CheckpointConfig(push_to_hub="just-a-name")))
    bad_mixture = dataclasses.replace(Config().data, mixture=({"path": "synthetic:gun_control", "weight": 0.0},))
    with pytest.raises(ConfigError, match=r"data.mixture\[0\].*weight must be > 0"):
        validate(Config(data=bad_mixture))


@pytest.mark.parametrize("grpo, match", [
    (dict(policy_loss="ppo"), r"grpo.policy_loss must be one of \('grpo', 'gspo', 'cispo'\), got 'ppo'"),
    (dict(loss_type="sum"), r"grpo.loss_type must be one of"), (dict(kl_estimator="k4"), "grpo.kl_estimator"),
    (dict(engine_is_correction="yes"), "grpo.engine_is_correction must be auto, on or off"),
    (dict(engine_is_cap=0.9), r"grpo.engine_is_cap must be >= 1, got 0.9"),
    (dict(engine_seq_band=(1.1, 2.0)), r"grpo.engine_seq_band must be \(low, high\)"),
    (dict(reward_aggregation="mean"), "grpo.reward_aggregation must be one of"),
    (dict(reward_aggregation="normalize_then_sum", scale_rewards="batch"),
     r"normalize_then_sum .* does not use grpo.scale_rewards='batch'"),
])
def test_the_objective_settings_are_checked_naming_the_field(grpo, match):
    with pytest.raises(ConfigError, match=match):
        validate(Config(grpo=GRPOConfig(**grpo)))
    validate(Config(grpo=GRPOConfig(policy_loss="gspo", kl_estimator="k1", engine_is_correction="on", engine_seq_band=None,
                                    reward_aggregation="normalize_then_sum")))


@pytest.mark.parametrize("grpo", [dict(dynamic_sampling=True), dict(reject_threshold=1.0)])
def test_resampling_without_attempts_is_refused_naming_the_resample_setting(grpo):
    with pytest.raises(ConfigError, match=r"grpo.max_resample_attempts=0.*>= 1"):
        validate(Config(grpo=GRPOConfig(**grpo)))
    validate(Config(grpo=GRPOConfig(**grpo, max_resample_attempts=1)))
    with pytest.raises(ConfigError, match=r"grpo.max_resample_attempts must be >= 0"):
        validate(Config(grpo=GRPOConfig(max_resample_attempts=-1)))


def test_the_answer_layout_and_exact_distributions_are_checked_here():
    validate(Config(data=DataConfig(layout="direct")))
    with pytest.raises(ConfigError, match=r"data.layout='direct' is a viewer answer layout, got data.task='math'"):
        validate(Config(data=DataConfig(task="math", layout="direct")))
    with pytest.raises(ConfigError, match=r"eval.temperature must be > 0, got 0.0"):
        validate(Config(eval=EvalConfig(temperature=0.0)))
    validate(Config(eval=EvalConfig(temperature=0.0, exact_distributions=False)))  # greedy, histogram only
