"""Build a run's components from a validated Config: the policy (+ reference), the data,
the optimizer, the reward stack, the train state (restored at --resume), the rollout
worker and the evaluator, wired into a `Trainer`. Side effects live here, not in the loop."""

from __future__ import annotations

import dataclasses
import logging
import random
from pathlib import Path

import numpy as np
import torch

from grailcore import dist as gdist
from grailcore.config import Config, ConfigError
from grailcore.data import load_examples
from grailcore.data.loaders import LoadResult, sample_rows
from grailcore.data.prompt import encode_prompt
from grailcore.data.training_audit import TrainingAudit, check_training_data
from grailcore.evaluation.evaluator import Evaluator
from grailcore.lora import AdapterFreeReference, apply_lora
from grailcore.mixture import load_mixture, make_sampler
from grailcore.model import load_policy, load_tokenizer, resolve_model_path
from grailcore.optimize import build_optimizer
from grailcore.parallel import parallelize
from grailcore.policy import PolicyModel
from grailcore.rewards.likelihood import SlotReader
from grailcore.rewards.stack import build_rewards
from grailcore.rollout import build_engine
from grailcore.rollout.worker import RolloutWorker
from grailcore.sampler import continue_order
from grailcore.steps import grpo_step, sft_step
from grailcore.train_state import Checkpointer, TrainState
from grailcore.trainer import Policy, Trainer, TrainingData
from grailcore.validation import Mode

log = logging.getLogger(__name__)

STEPS = {"grpo": grpo_step, "sft": sft_step}
"""The step each mode runs; GRAIL is GRPO with the `gail` reward in rewards.names."""


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True)


def build_trainer(cfg: Config, mode: Mode = "grpo") -> Trainer:
    """Every component of a `mode` run, in dependency order; resumes when cfg.resume. SFT
    builds no reference model and no learned reward (its step samples nothing)."""
    dist = gdist.init_distributed(cfg.collective_timeout_s)
    seed_everything(cfg.seed, cfg.deterministic)
    # Data and its leak audit come before any model: a LEAK stops the run here.
    train_rows, eval_rows = load_rows(cfg, dist.rank == 0)
    audit = check_training_data({"train": train_rows, "eval": eval_rows}, cfg.data, cfg.run_dir, dist.rank == 0)
    policy, model_dir = build_policy(cfg, dist, reference=mode == "grpo" and cfg.grpo.beta > 0)
    data = training_data(cfg, policy.tokenizer, train_rows, eval_rows, audit, dist.rank == 0)
    del train_rows, eval_rows  # the raw rows were only for the audit
    optimizer, scheduler = build_optimizer(policy.model, cfg, cfg.optim.max_steps * cfg.grpo.num_iterations)
    rewards = build_rewards(cfg, data.train, dist, learned=mode == "grpo")
    state = TrainState(sampler=make_sampler(data.train, cfg.data))
    checkpointer = Checkpointer(cfg.run_dir, policy.model, optimizer, scheduler, state, {"rewards": rewards},
                                keep=cfg.checkpoint.keep, trainable_only=cfg.model.lora_rank > 0,
                                sharded=cfg.checkpoint.sharded)
    restarts = gdist.restart_count()
    if cfg.data.continue_order and not (cfg.resume or restarts):  # a resume restores the order itself
        done = continue_order(state.sampler, model_dir, data.train)
        if done and dist.rank == 0:
            log.info("prompt order: %s", done)
    if cfg.resume or restarts:  # a worker torchrun restarted (--max-restarts) resumes as --resume would
        path = checkpointer.load()
        if path is None and cfg.resume:
            raise ConfigError(f"--resume: no checkpoint in {Path(cfg.run_dir) / 'checkpoints'}; "
                              "drop --resume to start fresh")
        if dist.rank == 0:
            why = "" if cfg.resume else f" (torchrun restart {restarts})"
            if path is None:
                log.warning("torchrun restart %d: no checkpoint in %s yet, starting from step 0", restarts,
                            Path(cfg.run_dir) / "checkpoints")
            else:
                log.info("resumed from %s at step %d%s", path, state.step, why)
    rollout = RolloutWorker(build_engine(cfg, model_dir, dist, policy.model.lm, policy.tokenizer), policy.model.lm,
                            bucket_bytes=cfg.rollout.sync_bucket_mib << 20)
    if state.step:
        rollout.sync()  # the engine was built from the initial weights
    if rewards.reads_slots:  # choice_likelihood: the sampling engine reads its own answer slots
        rewards.attach_reader(SlotReader(rollout.engine.next_token_logprobs, policy.tokenizer, cfg.rollout.temperature))
        if not cfg.grpo.slot_nll_coef and dist.rank == 0:
            log.warning("the slot rewards train only the reasoning without grpo.slot_nll_coef, and on the CPU demo "
                        "they moved the choices away from people that way; add --grpo.slot-nll-coef 0.01 "
                        "(experiments/results/grpo_reward_exact/)")
    evaluator = Evaluator(cfg, dist, policy.tokenizer, rollout, rewards, data.eval_examples, data.train)
    return Trainer(cfg, dist, policy, optimizer, scheduler, data, rollout, rewards, evaluator, state, checkpointer,
                   STEPS[mode])


def build_policy(cfg: Config, dist: gdist.DistInfo, reference: bool) -> tuple[Policy, Path]:
    """The trainable policy (with the KL reference when `reference`), its tokenizer, and the
    model dir it was loaded from."""
    model_dir = resolve_model_path(cfg.model.name_or_path)
    tokenizer = load_tokenizer(model_dir)
    model = policy_model(model_dir, cfg, dist, trainable=True)
    ref = None
    if reference:
        ref = AdapterFreeReference(model) if cfg.model.lora_rank else policy_model(model_dir, cfg, dist, trainable=False)
    return Policy(model=model, reference=ref, tokenizer=tokenizer), model_dir


def policy_model(model_dir: Path, cfg: Config, dist: gdist.DistInfo, trainable: bool) -> PolicyModel:
    """The HF model of `model_dir` as a PolicyModel: LoRA, checkpointing and frozen layers
    applied when `trainable` (else frozen whole), sharded with FSDP2 on several ranks."""
    lm = load_policy(model_dir, cfg.model.dtype, cfg.model.attn_implementation)
    if trainable and cfg.model.lora_rank:
        apply_lora(lm, cfg.model, cfg.seed)  # before sharding: FSDP2 shards the adapters with their layer
    lm = lm.to(dist.device)
    lm.config.use_cache = False
    if trainable and cfg.model.gradient_checkpointing:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if not trainable:
        lm.eval().requires_grad_(False)
    elif cfg.model.trainable_layers:
        _freeze_below(lm, cfg.model.trainable_layers)
    model = PolicyModel(lm, cfg.model.logprob_impl, cfg.model.logprob_chunk_size)
    if dist.world_size > 1:
        model = parallelize(model, cfg, dist)
    return model


def _freeze_below(lm: torch.nn.Module, trainable_layers: int) -> None:
    """Only the top `trainable_layers` decoder layers and the final norm keep gradients."""
    decoder = lm.get_decoder()
    if trainable_layers > len(decoder.layers):
        raise ConfigError(f"model.trainable_layers={trainable_layers} but the model has "
                          f"{len(decoder.layers)} decoder layers; lower model.trainable_layers")
    lm.requires_grad_(False)
    for layer in decoder.layers[-trainable_layers:]:
        layer.requires_grad_(True)
    if getattr(decoder, "norm", None) is not None:
        decoder.norm.requires_grad_(True)


def load_rows(cfg: Config, rank0: bool) -> tuple[LoadResult, LoadResult]:
    """(train, eval) rows as loaded, before any tokenizer; skipped rows are reported on rank 0."""
    if cfg.data.mixture:
        train, evals = load_mixture(cfg.data)
    else:
        train = load_examples(cfg.data.train_path, cfg.data, split="train")
        if train.split == "all" and cfg.data.eval_path is None:
            raise ConfigError(f"data.train_path={cfg.data.train_path} has no splits; set data.eval_path to a "
                              "held-out file (evaluating on training rows would be meaningless)")
        # A held-out file is read whole (as split 'train' of a file without splits) and
        # data.max_train_samples, which caps training rows, must not cap it.
        evals = load_examples(cfg.data.eval_path or cfg.data.train_path,
                              dataclasses.replace(cfg.data, max_train_samples=None),
                              split="validation" if cfg.data.eval_path is None else "train")
    for res in (train, evals):
        if res.skipped and rank0:
            log.warning("%s: skipped %d bad rows (skip_bad_rows=True): %s", res.source, res.skipped,
                        "; ".join(res.skip_reasons[:5]))
    return train, evals


def training_data(cfg: Config, tokenizer, train: LoadResult, evals: LoadResult, audit: TrainingAudit | None,
                  rank0: bool) -> TrainingData:
    """Training examples whose prompts fit rollout.max_prompt_tokens, with their prompt ids,
    and the evaluation rows (the same rows `grailcore.eval --max-samples N --seed <data.seed>` scores).
    The rows are drawn with data.seed, not the run's seed: runs that differ only in seed are
    evaluated on the same rows, so their evaluations pair row by row (`evaluation.compare`)."""
    examples, ids, too_long = [], [], []
    for ex in train.examples:
        tokens = encode_prompt(tokenizer, ex)
        if len(tokens) > cfg.rollout.max_prompt_tokens:
            too_long.append(f"{ex.example_id} ({len(tokens)} tokens)")
            continue
        examples.append(ex)
        ids.append(tokens)
    if too_long:
        message = (f"{len(too_long)} training prompts exceed rollout.max_prompt_tokens="
                   f"{cfg.rollout.max_prompt_tokens}: {', '.join(too_long[:5])}")
        if not cfg.data.skip_bad_rows:
            raise ConfigError(message + "; raise rollout.max_prompt_tokens, lower data.max_history, "
                              "or set data.skip_bad_rows to skip them")
        if rank0:
            log.warning("skipped %s", message)
    if not examples:
        raise ConfigError(f"no usable training examples in {cfg.data.train_path}; check data.train_path")
    return TrainingData(train=examples, train_ids=ids,
                        eval_examples=sample_rows(evals.examples, cfg.eval.max_samples, cfg.data.seed), data_audit=audit)
