"""The pluggable step of the Trainer: one optimizer step of GRPO (GRAIL when the rewards
include the discriminator) or of SFT. A step draws its prompts, applies its update through
`Update` and returns a `StepOutput`; the Trainer's shell (signals, non-finite guard,
evaluation, checkpoints, export) is the same for every step.

    grpo: prompts -> rollouts (engine) -> rewards (+ discriminator update) -> advantages
          -> policy update (loss, kernels, optimizer) -> weight sync
    sft:  prompts -> gold targets -> completion-only NLL -> optimizer step
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch

from grailcore import dist as gdist
from grailcore.advantages import AdvantageOutput, Scale, advantage_components, decoupled_advantages, group_advantages
from grailcore.batch import micro_batches
from grailcore.credit import WHOLE, slot_cuts, token_advantages
from grailcore.data.schema import Example
from grailcore.metrics_log import StepTimer
from grailcore.mixture import source_reward_metrics
from grailcore.optimize import UpdateStats, policy_update
from grailcore.rewards.registry import slot_read_at
from grailcore.rng import derive_seed
from grailcore.rollout.collect import Rollouts
from grailcore.rollout_log import write_rollouts
from grailcore.types import Completion, RewardOutput, SamplingParams

if TYPE_CHECKING:  # annotations only: the trainer imports this module
    from grailcore.config import Config
    from grailcore.trainer import Trainer


@dataclass(frozen=True)
class Update:
    """Where a step applies its update. The run passes the trainer's optimizer and
    scheduler; the dry run passes withheld ones (`applied=False`), and a step then leaves
    every other state alone too (no discriminator update, no weight sync)."""

    optimizer: Any
    scheduler: Any
    applied: bool = True


@dataclass
class StepOutput:
    """One step on this rank. Lists are this rank's sequences."""

    metrics: dict[str, float]
    """This rank's metrics (the trainer averages them over ranks)."""
    skipped: bool
    """Every update of the step was skipped: its loss or gradient was not finite."""
    tokens: int
    """Completion (GRPO) or target (SFT) tokens trained on."""
    loss: float
    grad_norm: float
    prompt_ids: list[list[int]]
    completions: list[Completion]
    """Sampled completions (GRPO) or gold targets (SFT)."""
    sequences_per_step: int
    """Sequences of a whole step (all ranks) at the configured sizes."""
    rewards: RewardOutput | None = None
    zero_variance_groups: int | None = None
    samples: list[tuple[Example, str]] = field(default_factory=list)
    """(example, model output) pairs the trainer may print."""


StepFn = Callable[["Trainer", int, StepTimer, Update], StepOutput]


def grpo_step(trainer: Trainer, step: int, timer: StepTimer, update: Update) -> StepOutput:
    """One GRPO step on this rank's share of grpo.prompts_per_step prompts."""
    cfg, dist, data = trainer.cfg, trainer.dist, trainer.data
    mine = trainer.next_prompts(cfg.grpo.prompts_per_step)  # whole groups per rank
    seeds = prompt_seeds(cfg.seed, step, [data.train[i].example_id for i in mine], first_slot=dist.rank * len(mine))
    # Slot rewards look up the reads on each sampled path in what sampling reports (T > 0, no nucleus).
    watch = trainer.rewards.watch_ids([data.train[i] for i in mine]) if cfg.rollout.top_p == 1.0 else ()
    params = SamplingParams(n=cfg.grpo.group_size, temperature=cfg.rollout.temperature,
                            top_p=cfg.rollout.top_p, max_tokens=cfg.rollout.max_completion_tokens, seeds=seeds,
                            watch_token_ids=watch)
    with timer("generation"):
        rollouts = trainer.rollout.collect(
            [data.train[i] for i in mine], [data.train_ids[i] for i in mine], params, trainer.rewards,
            dynamic_sampling=cfg.grpo.dynamic_sampling, reject_threshold=cfg.grpo.reject_threshold,
            max_resample_attempts=cfg.grpo.max_resample_attempts)
    with timer("scoring"):
        if update.applied:  # the discriminator learns from this step's rollouts (GRAIL)
            trainer.rewards.update(rollouts.examples, [c.text for c in rollouts.completions], rollouts.rewards)
        if cfg.grpo.reward_aggregation == "normalize_then_sum":
            adv = step_advantages(reward_matrix(rollouts.rewards, cfg.rewards.names), cfg.grpo.group_size,
                                  cfg.grpo.scale_rewards, weights=cfg.rewards.weights)
        else:
            adv = step_advantages(rollouts.rewards.total, cfg.grpo.group_size, cfg.grpo.scale_rewards)
    if cfg.logging.rollouts and not cfg.dry_run:
        write_rollouts(cfg.run_dir, step + 1, dist.rank, rollouts, adv.advantages)  # numbered as metrics.jsonl
    # The discriminator's warm-up: the policy stays as it is (a dry run still measures a policy update).
    if update.applied and step < cfg.gail.warmup_steps:
        return _discriminator_only(trainer, rollouts, adv)
    with timer("training"):
        slots = ([trainer.slot_targets(ex, c) for ex, c in zip(rollouts.examples, rollouts.completions)]
                 if cfg.grpo.slot_nll_coef else None)
        advantages, cut_fraction = adv.advantages, None
        if cfg.grpo.causal_slot_credit and any(slot_read_at(name) for name in cfg.rewards.names):
            advantages, cut_fraction = causal_advantages(trainer, rollouts)
        batches = micro_batches(rollouts.prompt_ids, rollouts.completions, advantages,
                                trainer.policy.tokenizer.pad_token_id, cfg.optim.micro_batch_size,
                                cfg.grpo.mask_truncated, slots)
        # A withheld update needs one pass: more would repeat it on the same weights.
        passes = cfg if update.applied else dataclasses.replace(cfg, grpo=dataclasses.replace(cfg.grpo, num_iterations=1))
        updates = policy_update(trainer.policy.model, trainer.policy.reference, update.optimizer, update.scheduler,
                                batches, passes, dist.world_size)
        if update.applied:
            trainer.rollout.mark_stale()
    if update.applied and (step + 1) % cfg.rollout.sync_every == 0:
        with timer("weight_sync"):
            trainer.rollout.sync()
    metrics = _grpo_metrics(trainer, rollouts, adv.zero_variance_groups, updates)
    if cut_fraction is not None:
        metrics["grpo/slot_credit_cut"] = cut_fraction
    metrics.update(trainer.rewards.metrics())  # the discriminator's; a collective: every rank, every step
    tokens = sum(len(c.token_ids) for c in rollouts.completions)
    metrics["tokens/completion"] = float(tokens)
    return StepOutput(
        metrics=metrics, skipped=all(u.skipped for u in updates), tokens=tokens, loss=updates[0].loss,
        grad_norm=updates[0].grad_norm, prompt_ids=rollouts.prompt_ids, completions=rollouts.completions,
        sequences_per_step=cfg.grpo.prompts_per_step * cfg.grpo.group_size, rewards=rollouts.rewards,
        zero_variance_groups=adv.zero_variance_groups,
        samples=[(rollouts.examples[0], rollouts.completions[0].text)])


def _discriminator_only(trainer: Trainer, rollouts: Rollouts, adv: AdvantageOutput) -> StepOutput:
    """A step of `gail.warmup_steps`: the rollouts' metrics and D's, no policy update."""
    metrics = _grpo_metrics(trainer, rollouts, adv.zero_variance_groups, updates=None)
    metrics.update(trainer.rewards.metrics())  # a collective, as in every step
    metrics["gail/warmup"] = 1.0
    cfg = trainer.cfg
    return StepOutput(
        metrics=metrics, skipped=False, tokens=0, loss=0.0, grad_norm=0.0, prompt_ids=rollouts.prompt_ids,
        completions=rollouts.completions, sequences_per_step=cfg.grpo.prompts_per_step * cfg.grpo.group_size,
        rewards=rollouts.rewards, zero_variance_groups=adv.zero_variance_groups,
        samples=[(rollouts.examples[0], rollouts.completions[0].text)])


def prompt_seeds(run_seed: int, step: int, example_ids: list[str], first_slot: int) -> tuple[int, ...]:
    """A sampling seed per prompt of a step, from (run seed, step, example id, slot in the
    step's global prompt list): a prompt's samples are independent of every other prompt's
    and rank's, and a resumed run, which draws the same prompts at the same step, repeats them."""
    return tuple(derive_seed(run_seed, step, example_id, first_slot + k) for k, example_id in enumerate(example_ids))


def step_advantages(rewards: torch.Tensor, group_size: int, scale: Scale,
                    weights: Sequence[float] | None = None) -> AdvantageOutput:
    """This rank's advantages [P*G] from its rewards: [P*G] totals, or [P*G, R] unweighted
    rewards with their `weights` for GDPO's normalize_then_sum (`decoupled_advantages`;
    `scale` unused). Each rank holds whole groups, so "group" and "none" need nothing from
    the others; "batch" and normalize_then_sum divide by the std of the whole step, so
    every rank's rewards are gathered first (a collective: all ranks call it, each with the
    same number of groups) and this rank's share is cut back out."""
    def advantages(everyone: torch.Tensor) -> AdvantageOutput:
        if weights is None:
            return group_advantages(everyone, group_size, scale)
        return decoupled_advantages(everyone, weights, group_size)

    if (weights is None and scale != "batch") or gdist.get_world_size() == 1:
        return advantages(rewards)
    everyone = advantages(gdist.all_gather(rewards))  # [world*P*G]
    rank, n = gdist.get_rank(), rewards.shape[0]
    mask = everyone.zero_variance_mask[rank * n // group_size:(rank + 1) * n // group_size]  # [P]
    return AdvantageOutput(advantages=everyone.advantages[rank * n:(rank + 1) * n],
                           zero_variance_groups=int(mask.sum()), zero_variance_mask=mask)


def causal_advantages(trainer: Trainer, rollouts: Rollouts) -> tuple[torch.Tensor, float]:
    """[N, T] per-token advantages with each slot reward's share kept only before its slot
    (grailcore/credit.py), T the longest completion; and the fraction of (completion, slot
    reward) pairs whose share was cut. A collective where `step_advantages` is one."""
    cfg = trainer.cfg
    components = step_components(reward_matrix(rollouts.rewards, cfg.rewards.names), cfg)  # [N, R]
    cuts = slot_cuts(trainer.slot_targets, cfg.rewards.names, rollouts.examples, rollouts.completions)  # [N, R]
    width = max(1, max(len(c.token_ids) for c in rollouts.completions))
    slot_columns = [r for r, name in enumerate(cfg.rewards.names) if slot_read_at(name)]
    cut = float((cuts[:, slot_columns] != WHOLE).float().mean())
    return token_advantages(components, cuts, width), cut


def step_components(rewards: torch.Tensor, cfg: Config) -> torch.Tensor:
    """This rank's [P*G, R] shares of the advantage (`advantage_components`) from its [P*G, R]
    unweighted rewards; the same collective as `step_advantages` where the scale needs the
    whole step."""
    def components(everyone: torch.Tensor) -> torch.Tensor:
        return advantage_components(everyone, cfg.rewards.weights, cfg.grpo.group_size, cfg.grpo.scale_rewards,
                                    cfg.grpo.reward_aggregation)

    whole_step = cfg.grpo.reward_aggregation == "normalize_then_sum" or cfg.grpo.scale_rewards == "batch"
    if not whole_step or gdist.get_world_size() == 1:
        return components(rewards)
    rank, n = gdist.get_rank(), rewards.shape[0]
    return components(gdist.all_gather(rewards))[rank * n:(rank + 1) * n]


def reward_matrix(rewards: RewardOutput, names: Sequence[str]) -> torch.Tensor:
    """[N, R] the unweighted rewards in `names` order (the columns GDPO normalises)."""
    return torch.stack([rewards.per_reward[name] for name in names], dim=1)


def _grpo_metrics(trainer: Trainer, rollouts: Rollouts, zero_variance_groups: int,
                  updates: list[UpdateStats] | None) -> dict[str, float]:
    rewards = rollouts.rewards
    m: dict[str, float] = {"reward/total": float(rewards.total.mean()),
                           "reward/total_std": float(rewards.total.std())}
    for name, values in rewards.per_reward.items():
        m[f"reward/{name}"] = float(values.mean())
        m[f"reward/{name}/std"] = float(values.std())
        m[f"reward/{name}/errors"] = float(rewards.errors.get(name, 0))
    if trainer.cfg.data.mixture:  # reward/total/<source>, over the whole step (a collective: all ranks)
        m.update(source_reward_metrics(rollouts.examples, rewards.total))
    lengths = torch.tensor([len(c.token_ids) for c in rollouts.completions], dtype=torch.float32)
    m["completion/length"] = float(lengths.mean())
    m["completion/truncated"] = float(sum(c.finish_reason == "length" for c in rollouts.completions)
                                      / len(rollouts.completions))
    m["grpo/zero_variance_groups"] = float(zero_variance_groups)
    m["grpo/resampled_groups"] = float(rollouts.resampled_groups)
    if updates is None:  # no policy update this step (the discriminator's warm-up)
        return m
    first = updates[0]
    m.update({"loss": first.loss, "kl": first.kl, "clip_fraction": first.clip_fraction,
              "entropy": first.entropy, "grad_norm": first.grad_norm,
              "rollout/logprob_diff": first.logprob_diff,
              "rollout/mismatch_kl": first.mismatch_kl,
              "rollout/is_capped_fraction": first.is_capped_fraction,
              "rollout/is_dropped_fraction": first.is_dropped_fraction,
              "lr": trainer.scheduler.get_last_lr()[0],
              "grpo/skipped_updates": float(sum(u.skipped for u in updates)),
              **({"grpo/slot_nll": first.slot_nll, "grpo/slots": float(first.slots)}
                 if trainer.cfg.grpo.slot_nll_coef else {}),
              # Sub-phases of time/training (the rest: micro-batching, frozen old/ref log-probs).
              "time/forward_backward": sum(u.forward_backward_s for u in updates),
              "time/optimizer": sum(u.optimizer_s for u in updates)})
    return m


# ---------------------------------------------------------------- SFT


def sft_target(example: Example, rationale: str) -> str:
    """The completion a perfect simulator writes for `example` (viewer or math)."""
    if example.task == "math":
        return f"<think>\nThe answer is {example.answer}.\n</think>\n<answer>{example.answer}</answer>"
    opinion = f"<opinion>{example.opinion_direction}</opinion>" if example.opinion_direction else ""
    if example.meta.get("layout") == "direct":  # data.layout="direct": no reasoning, no rationale
        return f"<answer>{example.gold_index}</answer>{opinion}"
    think = rationale.format(answer=example.gold_index)
    return f"<think>\n{think}\n</think>\n<answer>{example.gold_index}</answer>{opinion}"


def target_completions(tokenizer, examples: list[Example], rationale: str) -> list[Completion]:
    """Tokenised targets, each ending with EOS so the model learns to stop."""
    out = []
    for ex in examples:
        text = sft_target(ex, rationale)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        out.append(Completion(text=text, token_ids=tuple(ids), logprobs=None, finish_reason="stop"))
    return out


def sft_step(trainer: Trainer, step: int, timer: StepTimer, update: Update) -> StepOutput:
    """One step of mean target-token NLL (completion-only) on this rank's share of
    sft.batch_size examples; skipped (no optimizer step) when the loss or gradient is not finite."""
    cfg, data, policy = trainer.cfg, trainer.data, trainer.policy
    mine = trainer.next_prompts(cfg.sft.batch_size)
    with timer("training"):
        targets = target_completions(policy.tokenizer, [data.train[i] for i in mine], cfg.sft.rationale)
        prompt_ids = [data.train_ids[i] for i in mine]
        batches = micro_batches(prompt_ids, targets, torch.zeros(len(mine)), policy.tokenizer.pad_token_id,
                                cfg.optim.micro_batch_size)
        tokens = sum(float(b.completion_mask.sum()) for b in batches)
        nll = 0.0
        for b in batches:
            out = policy.model(b.input_ids, b.attention_mask, b.num_completion_tokens,
                               temperature=1.0, completion_mask=b.completion_mask)
            loss = -(out.logprobs * b.completion_mask).sum() / tokens  # [] mean over the step
            loss.backward()
            nll += float(loss.detach())
        params = [p for p in policy.model.parameters() if p.requires_grad]
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip))
        skipped = not (math.isfinite(grad_norm) and math.isfinite(nll))
        if not skipped:
            update.optimizer.step()
        update.scheduler.step()
        update.optimizer.zero_grad(set_to_none=True)
        if update.applied:
            trainer.rollout.mark_stale()
    metrics = {"sft/nll": nll, "loss": nll, "grad_norm": grad_norm, "lr": trainer.scheduler.get_last_lr()[0],
               "tokens/target": tokens, "sft/skipped_updates": float(skipped)}
    return StepOutput(metrics=metrics, skipped=skipped, tokens=int(tokens), loss=nll, grad_norm=grad_norm,
                      prompt_ids=prompt_ids, completions=targets, sequences_per_step=cfg.sft.batch_size)
