"""Every check of a `Config` that needs no data or model, in one place, run by each entry
point before anything is built. Each failure is a ConfigError naming the field, the value
and the fix. (Checks that need the loaded data or model raise where those are loaded.)"""

from __future__ import annotations

from typing import Literal

from grailcore.advantages import AGGREGATIONS
from grailcore.config import Config, ConfigError
from grailcore.mixture import sources
from grailcore.rewards import available_rewards, slot_rewards
from grailcore.rewards.gail.objective import REWARD_KINDS
from grailcore.tracking import check_tracking
from kernels.objective import KL_ESTIMATORS, LOSS_TYPES, POLICY_LOSSES

Mode = Literal["grpo", "sft"]
"""What a run trains: GRPO (GRAIL when rewards.names lists `gail`) or SFT."""


def validate(cfg: Config, world_size: int = 1, mode: Mode = "grpo") -> None:
    """Raise ConfigError on the first setting that cannot work for `mode` at `world_size`."""
    for ok, message in [*_model_checks(cfg), *_training_checks(cfg), *_objective_checks(cfg), *_gail_checks(cfg),
                        *_run_checks(cfg, world_size, mode)]:
        if not ok:
            raise ConfigError(message)
    _check_rewards(cfg)
    sources(cfg.data)  # data.mixture: weights, names, one task
    check_tracking(cfg)  # W&B and Hub settings


def _model_checks(cfg: Config) -> list[tuple[bool, str]]:
    model = cfg.model
    return [
        (model.trainable_layers >= 0, f"model.trainable_layers must be >= 0 (0 = all), got {model.trainable_layers}"),
        (model.lora_rank >= 0, f"model.lora_rank must be >= 0 (0 = no LoRA: full fine-tuning), got {model.lora_rank}"),
        (not (model.lora_rank and model.trainable_layers),
         f"model.lora_rank={model.lora_rank} and model.trainable_layers={model.trainable_layers} "
         "are alternatives (LoRA freezes every base weight); set one of them to 0"),
        (not model.lora_rank or model.lora_alpha > 0, f"model.lora_alpha must be > 0, got {model.lora_alpha}"),
        (not model.lora_rank or 0 <= model.lora_dropout < 1,
         f"model.lora_dropout must be in [0, 1), got {model.lora_dropout}"),
        (not model.lora_rank or len(model.lora_target_modules) > 0,
         "model.lora_target_modules must name at least one module when model.lora_rank > 0"),
    ]


def _training_checks(cfg: Config) -> list[tuple[bool, str]]:
    grpo, optim, rollout = cfg.grpo, cfg.optim, cfg.rollout
    return [
        (grpo.group_size >= 2,
         f"grpo.group_size must be >= 2, got {grpo.group_size} (advantages are relative to the group)"),
        (grpo.prompts_per_step >= 1, f"grpo.prompts_per_step must be >= 1, got {grpo.prompts_per_step}"),
        (grpo.num_iterations >= 1, f"grpo.num_iterations must be >= 1, got {grpo.num_iterations}"),
        (grpo.beta >= 0, f"grpo.beta must be >= 0, got {grpo.beta} (0 = no KL term)"),
        (grpo.slot_nll_coef >= 0, f"grpo.slot_nll_coef must be >= 0, got {grpo.slot_nll_coef} (0 = off)"),
        (not grpo.slot_nll_coef or "viewer" in {cfg.data.task, *((s.task or cfg.data.task) for s in cfg.data.mixture)},
         f"grpo.slot_nll_coef={grpo.slot_nll_coef} trains the answer slot toward people's choices; "
         f"data.task={cfg.data.task!r} has none (set it to 0)"),
        (grpo.epsilon_low >= 0 and grpo.epsilon_high >= 0,
         f"grpo.epsilon_low/high must be >= 0, got {grpo.epsilon_low}/{grpo.epsilon_high}"),
        (grpo.max_resample_attempts >= 0,
         f"grpo.max_resample_attempts must be >= 0, got {grpo.max_resample_attempts}"),
        (grpo.max_resample_attempts >= 1 or not (grpo.dynamic_sampling or grpo.reject_threshold is not None),
         f"grpo.max_resample_attempts={grpo.max_resample_attempts} resamples nothing, so "
         f"grpo.dynamic_sampling={grpo.dynamic_sampling} / grpo.reject_threshold={grpo.reject_threshold} "
         "would do nothing; set grpo.max_resample_attempts >= 1 or turn resampling off"),
        (optim.lr > 0, f"optim.lr must be > 0, got {optim.lr}"),
        (optim.max_steps >= 1, f"optim.max_steps must be >= 1, got {optim.max_steps}"),
        (optim.micro_batch_size >= 1, f"optim.micro_batch_size must be >= 1, got {optim.micro_batch_size}"),
        (optim.max_consecutive_bad_steps >= 1,
         f"optim.max_consecutive_bad_steps must be >= 1, got {optim.max_consecutive_bad_steps}"),
        (rollout.temperature > 0, f"rollout.temperature must be > 0, got {rollout.temperature} (groups need sampling)"),
        (0 < rollout.top_p <= 1, f"rollout.top_p must be in (0, 1], got {rollout.top_p}"),
        (rollout.max_prompt_tokens >= 16, f"rollout.max_prompt_tokens must be >= 16, got {rollout.max_prompt_tokens}"),
        (rollout.max_completion_tokens >= 1,
         f"rollout.max_completion_tokens must be >= 1, got {rollout.max_completion_tokens}"),
        (rollout.sync_every >= 1, f"rollout.sync_every must be >= 1, got {rollout.sync_every}"),
        (rollout.engine_threads >= 0,
         f"rollout.engine_threads must be >= 0, got {rollout.engine_threads} (0 = the trainer's thread count)"),
        (rollout.sync_bucket_mib >= 0,
         f"rollout.sync_bucket_mib must be >= 0, got {rollout.sync_bucket_mib} (0 = one gather per tensor)"),
        (rollout.engine != "hf" or rollout.engine_dtype in ("auto", cfg.model.dtype),
         f"rollout.engine_dtype={rollout.engine_dtype} needs rollout.engine=vllm: the HF engine samples "
         f"from the policy in model.dtype={cfg.model.dtype}; set rollout.engine_dtype=auto"),
        (cfg.sft.batch_size >= 1, f"sft.batch_size must be >= 1, got {cfg.sft.batch_size}"),
        (cfg.eval.samples_per_row >= 1, f"eval.samples_per_row must be >= 1, got {cfg.eval.samples_per_row}"),
        (cfg.eval.permutations >= 0,
         f"eval.permutations must be >= 0, got {cfg.eval.permutations} (0 = shown order only)"),
        (cfg.data.layout == "think" or cfg.data.task == "viewer",
         f"data.layout='direct' is a viewer answer layout, got data.task={cfg.data.task!r}; math answers "
         "keep <think> (set data.layout='think')"),
        (not cfg.eval.exact_distributions or cfg.eval.temperature > 0,
         f"eval.exact_distributions reads softmax(logits / eval.temperature): eval.temperature must be > 0, "
         f"got {cfg.eval.temperature} (or set eval.exact_distributions=False)"),
        (cfg.checkpoint.keep >= 1, f"checkpoint.keep must be >= 1, got {cfg.checkpoint.keep}"),
        (cfg.collective_timeout_s > 0,
         f"collective_timeout_s must be > 0 seconds, got {cfg.collective_timeout_s}"),
    ]


def _objective_checks(cfg: Config) -> list[tuple[bool, str]]:
    """The loss variants and the engine importance-sampling correction (kernels/objective.py)."""
    grpo = cfg.grpo
    band = grpo.engine_seq_band
    return [
        (grpo.policy_loss in POLICY_LOSSES,
         f"grpo.policy_loss must be one of {tuple(POLICY_LOSSES)}, got {grpo.policy_loss!r}"),
        (grpo.loss_type in LOSS_TYPES, f"grpo.loss_type must be one of {LOSS_TYPES}, got {grpo.loss_type!r}"),
        (grpo.reward_aggregation in AGGREGATIONS,
         f"grpo.reward_aggregation must be one of {AGGREGATIONS}, got {grpo.reward_aggregation!r}"),
        (grpo.reward_aggregation != "normalize_then_sum" or grpo.scale_rewards == "group",
         f"grpo.reward_aggregation=normalize_then_sum normalises each reward by its group's std and the sum "
         f"by the step's; it does not use grpo.scale_rewards={grpo.scale_rewards!r}: leave it at 'group'"),
        (grpo.kl_estimator in KL_ESTIMATORS,
         f"grpo.kl_estimator must be one of {tuple(KL_ESTIMATORS)}, got {grpo.kl_estimator!r}"),
        (grpo.engine_is_correction in ("auto", "on", "off"),
         f"grpo.engine_is_correction must be auto, on or off, got {grpo.engine_is_correction!r}"),
        (grpo.engine_is_cap >= 1,
         f"grpo.engine_is_cap must be >= 1, got {grpo.engine_is_cap} (a cap below 1 down-weights every token)"),
        (band is None or (len(band) == 2 and 0 <= band[0] <= 1 <= band[1]),
         f"grpo.engine_seq_band must be (low, high) with 0 <= low <= 1 <= high, or None; got {band}"),
    ]


def _gail_checks(cfg: Config) -> list[tuple[bool, str]]:
    gail = cfg.gail
    return [
        (gail.reward in REWARD_KINDS, f"gail.reward must be one of {REWARD_KINDS}, got {gail.reward!r}"),
        (gail.reward_clip > 0, f"gail.reward_clip must be > 0, got {gail.reward_clip}"),
        (gail.lr > 0, f"gail.lr must be > 0, got {gail.lr}"),
        (gail.head_lr > 0, f"gail.head_lr must be > 0, got {gail.head_lr}"),
        (gail.disc_steps >= 1, f"gail.disc_steps must be >= 1, got {gail.disc_steps}"),
        (gail.max_tokens >= 8, f"gail.max_tokens must be >= 8, got {gail.max_tokens}"),
        (0 <= gail.label_smoothing < 1, f"gail.label_smoothing must be in [0, 1), got {gail.label_smoothing}"),
        (gail.dodge in ("floor", "worst_option"),
         f"gail.dodge must be 'floor' or 'worst_option', got {gail.dodge!r}"),
        (gail.negatives in ("differing", "all"),
         f"gail.negatives must be 'differing' or 'all', got {gail.negatives!r}"),
        (gail.replay_size >= 0, f"gail.replay_size must be >= 0, got {gail.replay_size}"),
        (gail.replay_ratio >= 0, f"gail.replay_ratio must be >= 0, got {gail.replay_ratio}"),
        (gail.warmup_steps >= 0, f"gail.warmup_steps must be >= 0, got {gail.warmup_steps}"),
        (gail.warmup_steps == 0 or ("gail" in cfg.rewards.names and gail.frozen_path is None),
         f"gail.warmup_steps={gail.warmup_steps} trains the discriminator alone, so it needs `gail` in "
         "rewards.names and no gail.frozen_path; set it to 0 or add the discriminator"),
        (gail.warmup_steps < cfg.optim.max_steps,
         f"gail.warmup_steps={gail.warmup_steps} leaves no policy step in optim.max_steps={cfg.optim.max_steps}; "
         "raise max_steps to warmup_steps + the policy steps wanted"),
    ]


def _run_checks(cfg: Config, world_size: int, mode: Mode) -> list[tuple[bool, str]]:
    """Settings that depend on the launch: each rank takes an equal share of a step's prompts."""
    if mode == "sft":
        return [(cfg.sft.batch_size % world_size == 0,
                 f"sft.batch_size={cfg.sft.batch_size} must be divisible by the world size {world_size}; "
                 "change it or the number of ranks")]
    return [(cfg.grpo.prompts_per_step % world_size == 0,
             f"grpo.prompts_per_step={cfg.grpo.prompts_per_step} must be divisible by the world size "
             f"{world_size} (whole groups per rank); change it or the number of ranks")]


def _check_rewards(cfg: Config) -> None:
    names, weights = cfg.rewards.names, cfg.rewards.weights
    if len(names) != len(weights):
        raise ConfigError(f"rewards.names ({len(names)}) and rewards.weights ({len(weights)}) must have the same "
                          "length: one weight per reward, the discriminator's (`gail`) included")
    if len(set(names)) != len(names):
        raise ConfigError(f"rewards.names lists a reward twice: {names}; list each once")
    unknown = [n for n in names if n not in available_rewards()]
    if unknown:
        raise ConfigError(f"rewards.names: unknown reward(s) {unknown}; available: {sorted(available_rewards())}")
    reads = [n for n in names if n in slot_rewards()]
    if reads and cfg.data.layout == "direct":
        raise ConfigError(f"rewards.names {reads} with data.layout='direct': without reasoning every sample of a "
                          "group reads the same answer slot, so the reward is the same for the whole group and "
                          "GRPO learns nothing from it; use data.layout='think' (or train the direct layout "
                          "with grailcore.sft, whose loss is the same log-likelihood)")
    if reads and cfg.data.task != "viewer":
        raise ConfigError(f"rewards.names {reads} score viewer choices, got data.task={cfg.data.task!r}")
    if not cfg.rewards.likelihood_floor < 0:
        raise ConfigError(f"rewards.likelihood_floor must be < 0 (a log-probability), got {cfg.rewards.likelihood_floor}")
