"""Build every part a run needs from a Config (model, data, engine, optimizer, resume
state) into one `Parts` object the loop drives. Side effects live here, not in the loop."""

from __future__ import annotations

import functools
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from grailcore import checkpoint as ckpt
from grailcore import dist as gdist
from grailcore.config import Config, ConfigError
from grailcore.data.schema import Example
from grailcore.lora import AdapterFreeReference, apply_lora
from grailcore.model import load_policy, load_tokenizer, resolve_model_path
from grailcore.optimize import build_optimizer
from grailcore.policy import PolicyModel
from grailcore.rollout import build_engine
from grailcore.rollout.collect import Rollouts
from grailcore.sampler import MixtureSampler, PromptSampler
from grailcore.types import RewardOutput

log = logging.getLogger(__name__)


@dataclass
class Parts:
    dist: gdist.DistInfo
    tokenizer: Any
    policy: PolicyModel
    reference: PolicyModel | AdapterFreeReference | None
    """Frozen KL reference (grpo.beta > 0); under LoRA the policy with its adapters off."""
    optimizer: torch.optim.Optimizer
    scheduler: Any
    engine: Any
    sampler: PromptSampler | MixtureSampler
    train: list[Example]
    train_ids: list[list[int]]
    """Chat-templated prompt token ids of each training example."""
    eval_examples: list[Example]
    scorer: Callable[[list[Example], list[str]], RewardOutput]
    """Training rewards (rule rewards, plus the discriminator's under GRAIL)."""
    cfg: Config
    rule_scorer: Callable[[list[Example], list[str]], RewardOutput] | None = None
    """Rule rewards only: evaluation never runs the discriminator on held-out rows."""
    start_step: int = 0
    trainer_state: dict = field(default_factory=dict)
    discriminator: Any = None
    last_samples: list = field(default_factory=list)
    engine_stale: bool = False
    """The policy changed since the engine last received its weights."""

    def after_rollouts(self, rollouts: Rollouts) -> None:
        if self.discriminator is not None:
            self.discriminator.observe(rollouts)

    def sync_weights(self) -> None:
        from grailcore.rollout.sync import push_weights

        push_weights(self.policy.lm, self.engine)
        self.engine_stale = False

    def evaluate(self, step: int | None = None) -> dict[str, float]:
        """Eval metrics on `eval_examples` (and on eval.permutations reordered copies of
        them, for eval/order/*); every rank computes the same numbers. With `step`, rank 0
        also keeps the sampled completions as RUN_DIR/eval/step_<step>.jsonl, the format
        `grailcore.eval --completions` and `grailcore.evaluation.compare` read (two steps
        of one run are the same rows in the same order: a paired comparison)."""
        from grailcore.evaluation import evaluate_examples, permuted_copies

        if self.engine_stale:  # evaluate the current policy, whatever rollout.sync_every says
            self.sync_weights()

        cfg = self.cfg
        samples = self._sample_eval(self.eval_examples)
        completions = samples.texts
        if step is not None and self.dist.rank == 0:
            from grailcore.evaluation.completions_io import write_completions

            out = Path(cfg.run_dir) / "eval"
            out.mkdir(parents=True, exist_ok=True)
            write_completions(out / f"step_{step:06d}.jsonl", samples)
        # every sample is scored: with k > 1 the reward is the sampled policy's mean, not one draw's
        flat_examples = [ex for ex, row in zip(self.eval_examples, completions) for _ in row]
        flat = (self.rule_scorer or self.scorer)(flat_examples, [text for row in completions for text in row])
        owner = torch.tensor([i for i, row in enumerate(completions) for _ in row])
        rewards = RewardOutput(total=_row_means(flat.total, owner, len(completions)),
                               per_reward={k: _row_means(v, owner, len(completions)) for k, v in flat.per_reward.items()},
                               errors=flat.errors)
        if self.eval_examples and self.eval_examples[0].task == "math":
            result = {f"eval/reward/{k}": float(v.mean()) for k, v in rewards.per_reward.items()}
            result["eval/accuracy"] = result.get("eval/reward/math_accuracy", float("nan"))
        else:
            permuted = [self._sample_eval(copy)  # orders seeded like `grailcore.eval --seed`
                        for copy in permuted_copies(self.eval_examples, cfg.eval.permutations, cfg.seed)]
            result = evaluate_examples(self.eval_examples, completions, self.train, permuted, samples.slots)
        result["eval/reward/total"] = float(rewards.total.mean())
        if cfg.data.mixture:
            from grailcore.mixture import source_eval_metrics

            result.update(source_eval_metrics(self.eval_examples, completions, rewards, self.train))
        return result

    def _sample_eval(self, examples: list[Example]):
        """eval.samples_per_row completions of every row and (viewer rows, eval.exact_distributions)
        their answer-slot distributions: each rank samples a strided share, then all ranks
        gather every row's (an `evaluation.completions_io.EvalSamples`)."""
        from grailcore.evaluation import generate_completions
        from grailcore.evaluation.completions_io import EvalSamples

        cfg, rank, world = self.cfg, self.dist.rank, self.dist.world_size
        mine = list(range(rank, len(examples), world))
        exact = cfg.eval.exact_distributions and all(ex.task == "viewer" for ex in examples)
        drawn = generate_completions(
            self.engine, self.tokenizer, [examples[i] for i in mine], cfg.eval.samples_per_row,
            cfg.eval.temperature, cfg.rollout.max_completion_tokens, exact=exact,
        )
        by_index = {i: (drawn.texts[j], drawn.slots[j] if exact else None) for j, i in enumerate(mine)}
        if world > 1:
            for part in gdist.all_gather_object(by_index):
                by_index.update(part)
        rows = [by_index[i] for i in range(len(examples))]
        return EvalSamples(list(examples), [texts for texts, _ in rows], [s for _, s in rows] if exact else None)

    def extra_state(self) -> dict:
        return {"discriminator": self.discriminator.state_dict()} if self.discriminator else {}

    def reduce(self, metrics: dict[str, float]) -> dict[str, float]:
        return gdist.all_reduce_mean(metrics) if self.dist.world_size > 1 else metrics


def _row_means(values: torch.Tensor, owner: torch.Tensor, n_rows: int) -> torch.Tensor:
    """Mean of each row's sample scores: `values[j]` belongs to row `owner[j]`."""
    sums = torch.zeros(n_rows, dtype=torch.float32).index_add_(0, owner, values.float())
    return sums / torch.bincount(owner, minlength=n_rows).clamp(min=1)


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True)


def _load_data(cfg: Config, tokenizer, rank0: bool) -> tuple[list[Example], list[list[int]], list[Example]]:
    from grailcore.data import load_examples
    from grailcore.data.loaders import sample_rows
    from grailcore.data.prompt import encode_prompt

    if cfg.data.mixture:
        from grailcore.mixture import load_mixture

        train, evals = load_mixture(cfg.data)
    else:
        train = load_examples(cfg.data.train_path, cfg.data, split="train")
        if train.split == "all" and cfg.data.eval_path is None:
            raise ConfigError(f"data.train_path={cfg.data.train_path} has no splits; set data.eval_path to a "
                              "held-out file (evaluating on training rows would be meaningless)")
        evals = load_examples(cfg.data.eval_path or cfg.data.train_path, cfg.data,
                              split="validation" if cfg.data.eval_path is None else "train")
    for res in (train, evals):
        if res.skipped and rank0:
            log.warning("%s: skipped %d bad rows (skip_bad_rows=True): %s", res.source, res.skipped,
                        "; ".join(res.skip_reasons[:5]))
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
        raise ConfigError(f"no usable training examples in {cfg.data.train_path}")
    # the same rows `grailcore.eval --max-samples N --seed <seed>` scores
    return examples, ids, sample_rows(evals.examples, cfg.eval.max_samples, cfg.seed)


def _hf_engine(policy: PolicyModel, tokenizer, model_dir: Path, cfg: Config, dist: gdist.DistInfo):
    from grailcore.rollout.hf import HFEngine

    if dist.world_size == 1:
        return HFEngine(policy.lm, tokenizer, shares_weights=True)
    # A sharded policy cannot `generate`; each rank samples from its own full copy.
    copy = load_policy(model_dir, cfg.model.dtype, cfg.model.attn_implementation).to(dist.device)
    return HFEngine(copy.eval().requires_grad_(False), tokenizer, shares_weights=False)


def _freeze_below(lm: torch.nn.Module, trainable_layers: int) -> None:
    """Only the top `trainable_layers` decoder layers and the final norm keep gradients."""
    decoder = lm.get_decoder()
    if trainable_layers > len(decoder.layers):
        raise ConfigError(f"model.trainable_layers={trainable_layers} but the model has "
                          f"{len(decoder.layers)} decoder layers")
    lm.requires_grad_(False)
    for layer in decoder.layers[-trainable_layers:]:
        layer.requires_grad_(True)
    if getattr(decoder, "norm", None) is not None:
        decoder.norm.requires_grad_(True)


def _policy_model(model_dir: Path, cfg: Config, dist: gdist.DistInfo, trainable: bool) -> PolicyModel:
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
        from grailcore.parallel import parallelize

        model = parallelize(model, cfg, dist)
    return model


def build(cfg: Config) -> Parts:
    dist = gdist.init_distributed()
    rank0 = dist.rank == 0
    if cfg.grpo.prompts_per_step % dist.world_size:
        raise ConfigError(f"grpo.prompts_per_step={cfg.grpo.prompts_per_step} must be divisible by "
                          f"the world size {dist.world_size} (whole groups per rank)")
    seed_everything(cfg.seed, cfg.deterministic)
    model_dir = resolve_model_path(cfg.model.name_or_path)
    tokenizer = load_tokenizer(model_dir)
    policy = _policy_model(model_dir, cfg, dist, trainable=True)
    reference = None
    if cfg.grpo.beta > 0:
        reference = (AdapterFreeReference(policy) if cfg.model.lora_rank
                     else _policy_model(model_dir, cfg, dist, trainable=False))
    train, train_ids, eval_examples = _load_data(cfg, tokenizer, rank0)
    total_updates = cfg.optim.max_steps * cfg.grpo.num_iterations
    optimizer, scheduler = build_optimizer(policy, cfg, total_updates)
    from grailcore.mixture import make_sampler
    from grailcore.rewards import score_completions

    parts = Parts(dist=dist, tokenizer=tokenizer, policy=policy, reference=reference,
                  optimizer=optimizer, scheduler=scheduler, engine=None,
                  sampler=make_sampler(train, cfg.data), train=train, train_ids=train_ids,
                  eval_examples=eval_examples, scorer=functools.partial(score_completions, cfg=cfg.rewards),
                  cfg=cfg)
    if cfg.gail.enabled:
        from grailcore.rewards.discriminator import build_discriminator

        parts.discriminator = build_discriminator(cfg, train, dist)
        parts.rule_scorer = parts.scorer
        parts.scorer = parts.discriminator.wrap_scorer(parts.scorer)
    if cfg.resume:
        _resume(parts, cfg)
    parts.engine = build_engine(cfg, model_dir, dist, lambda: _hf_engine(policy, tokenizer, model_dir, cfg, dist))
    if parts.start_step:
        parts.sync_weights()  # the engine was built from the initial weights
    return parts


def _resume(parts: Parts, cfg: Config) -> None:
    loaded = ckpt.load_checkpoint(Path(cfg.run_dir), parts.policy, parts.optimizer, parts.scheduler)
    if loaded is None:
        raise ConfigError(f"--resume: no checkpoint in {Path(cfg.run_dir) / 'checkpoints'}; "
                          "drop --resume to start fresh")
    parts.start_step = loaded.trainer_state["step"]
    parts.trainer_state = loaded.trainer_state
    parts.sampler.load_state_dict(loaded.trainer_state["sampler"])
    if parts.discriminator is not None and "discriminator" in loaded.extra:
        parts.discriminator.load_state_dict(loaded.extra["discriminator"])
    if parts.dist.rank == 0:
        log.info("resumed from %s at step %d", loaded.path, parts.start_step)
