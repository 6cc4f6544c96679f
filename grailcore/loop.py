"""The GRPO / GRAIL training loop, top to bottom:

    sample prompts -> rollouts (engine) -> rewards (+ discriminator) -> advantages
    -> policy update (loss, kernels, optimizer) -> weight sync -> log / eval / checkpoint
"""

from __future__ import annotations

import dataclasses
import logging
import math
import signal
import time
from pathlib import Path

import torch

from grailcore import checkpoint as ckpt
from grailcore.advantages import group_advantages
from grailcore.batch import micro_batches
from grailcore.config import Config
from grailcore.dist import DistInfo
from grailcore.export import export_hf
from grailcore.metrics import MetricsLogger, Progress, StepTimer, peak_memory_mib
from grailcore.optimize import BadStepsError, UpdateStats, policy_update
from grailcore.rollout.collect import Rollouts, collect_rollouts
from grailcore.setup import Parts
from grailcore.tracking import build_logger, push_export
from grailcore.types import SamplingParams

log = logging.getLogger(__name__)


class _StopFlag:
    """Set by SIGTERM/SIGINT: finish the current step, checkpoint, exit cleanly."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict = {}

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        """Give the caller (a test runner, a notebook) its own handlers back."""
        for sig, handler in self._previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)  # None: set outside Python
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        if self.requested:  # a second signal: the user does not want to wait for the step
            self.uninstall()
            # Not the previous handler: a library (an engine) may have installed one that
            # only flags a shutdown, and the user asked to stop now.
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)
            return
        log.warning("signal %s: checkpointing after this step, then exiting (send it again to stop now)", signum)
        self.requested = True


def _step_metrics(rollouts: Rollouts, adv, updates: list[UpdateStats], parts: Parts) -> dict[str, float]:
    rewards = rollouts.rewards
    m: dict[str, float] = {"reward/total": float(rewards.total.mean()),
                           "reward/total_std": float(rewards.total.std())}
    for name, values in rewards.per_reward.items():
        m[f"reward/{name}"] = float(values.mean())
        m[f"reward/{name}/std"] = float(values.std())
        m[f"reward/{name}/errors"] = float(rewards.errors.get(name, 0))
    if parts.cfg.data.mixture:  # reward/total/<source>, over the whole step (a collective: all ranks)
        from grailcore.mixture import source_reward_metrics

        m.update(source_reward_metrics(rollouts.examples, rewards.total))
    lengths = torch.tensor([len(c.token_ids) for c in rollouts.completions], dtype=torch.float32)
    m["completion/length"] = float(lengths.mean())
    m["completion/truncated"] = float(sum(c.finish_reason == "length" for c in rollouts.completions)
                                      / len(rollouts.completions))
    m["grpo/zero_variance_groups"] = float(adv.zero_variance_groups)
    m["grpo/resampled_groups"] = float(rollouts.resampled_groups)
    first = updates[0]
    m.update({"loss": first.loss, "kl": first.kl, "clip_fraction": first.clip_fraction,
              "entropy": first.entropy, "grad_norm": first.grad_norm,
              "rollout/logprob_diff": first.logprob_diff,
              "rollout/mismatch_kl": first.mismatch_kl,
              "rollout/is_capped_fraction": first.is_capped_fraction,
              "rollout/is_dropped_fraction": first.is_dropped_fraction,
              "lr": parts.scheduler.get_last_lr()[0],
              "grpo/skipped_updates": float(sum(u.skipped for u in updates)),
              # Sub-phases of time/training (the rest: micro-batching, frozen old/ref log-probs).
              "time/forward_backward": sum(u.forward_backward_s for u in updates),
              "time/optimizer": sum(u.optimizer_s for u in updates)})
    return m


def _one_step(step: int, parts: Parts, cfg: Config, timer: StepTimer) -> tuple[dict[str, float], list[UpdateStats]]:
    dist: DistInfo = parts.dist
    indices = parts.sampler.next(cfg.grpo.prompts_per_step)
    per_rank = len(indices) // dist.world_size
    mine = indices[dist.rank * per_rank:(dist.rank + 1) * per_rank]  # whole groups per rank
    params = SamplingParams(n=cfg.grpo.group_size, temperature=cfg.rollout.temperature,
                            top_p=cfg.rollout.top_p, max_tokens=cfg.rollout.max_completion_tokens,
                            seed=cfg.seed * 1_000_003 + step * 97 + dist.rank)
    with timer("generation"):
        rollouts = collect_rollouts(
            parts.engine, [parts.train[i] for i in mine], [parts.train_ids[i] for i in mine], params,
            parts.scorer, dynamic_sampling=cfg.grpo.dynamic_sampling,
            reject_threshold=cfg.grpo.reject_threshold, max_resample_attempts=cfg.grpo.max_resample_attempts,
        )
    with timer("scoring"):
        parts.after_rollouts(rollouts)  # discriminator update (GRAIL); no-op for GRPO
        adv = group_advantages(rollouts.rewards.total, cfg.grpo.group_size, cfg.grpo.scale_rewards)
    with timer("training"):
        batches = micro_batches(rollouts.prompt_ids, rollouts.completions, adv.advantages,
                                parts.tokenizer.pad_token_id, cfg.optim.micro_batch_size,
                                cfg.grpo.mask_truncated)
        updates = policy_update(parts.policy, parts.reference, parts.optimizer, parts.scheduler,
                                batches, cfg, dist.world_size)
        parts.engine_stale = True
    if (step + 1) % cfg.rollout.sync_every == 0:
        with timer("weight_sync"):
            parts.sync_weights()
    metrics = _step_metrics(rollouts, adv, updates, parts)
    if parts.discriminator is not None:  # a collective: every rank calls it every step
        metrics.update(parts.discriminator.metrics())
    tokens = sum(len(c.token_ids) for c in rollouts.completions)
    metrics["tokens/completion"] = float(tokens)
    parts.last_samples = [(rollouts.examples[0], rollouts.completions[0].text)]
    return metrics, updates


def _evaluate(step: int, parts: Parts, cfg: Config, metrics_log: MetricsLogger) -> dict[str, float]:
    result = parts.evaluate(step)
    metrics_log.log(step, result)
    if parts.dist.rank == 0:
        shown = ", ".join(f"{k}={v:.3f}" for k, v in sorted(result.items()) if not k.endswith("_ci"))
        print(f"[eval step {step}] {shown}", flush=True)
    return result


def _save(step: int, parts: Parts, cfg: Config, state: dict) -> None:
    trainer_state = {**state, "step": step, "sampler": parts.sampler.state_dict()}
    ckpt.save_checkpoint(Path(cfg.run_dir), step, parts.policy, parts.optimizer, parts.scheduler,
                         trainer_state, extra=parts.extra_state(),
                         keep=cfg.checkpoint.keep, trainable_only=cfg.model.lora_rank > 0)


def train(parts: Parts, cfg: Config) -> dict:
    """Run GRPO from parts.start_step to cfg.optim.max_steps; returns the run summary.
    SIGTERM/SIGINT finish the current step, checkpoint it and return early."""
    stop = _StopFlag()
    stop.install()
    try:
        return _train(parts, cfg, stop)
    finally:
        stop.uninstall()


def _train(parts: Parts, cfg: Config, stop: _StopFlag) -> dict:
    run_dir, rank0 = Path(cfg.run_dir), parts.dist.rank == 0
    metrics_log = build_logger(cfg, enabled=rank0, resume_step=parts.start_step if cfg.resume else None)
    progress = Progress(cfg.optim.max_steps, parts.start_step, enabled=rank0 and cfg.logging.progress)
    state = dict(parts.trainer_state)
    best = state.get("best_metric")
    bad_in_a_row, t_start, total_tokens = state.get("bad_in_a_row", 0), time.time(), 0
    first_eval = None
    if cfg.eval.on_start and parts.start_step == 0:
        first_eval = _evaluate(0, parts, cfg, metrics_log)
    step = parts.start_step
    last_eval: dict[str, float] = {}
    while step < cfg.optim.max_steps:
        timer = StepTimer()
        with timer("step"):
            metrics, updates = _one_step(step, parts, cfg, timer)
        bad_in_a_row = bad_in_a_row + 1 if all(u.skipped for u in updates) else 0
        metrics.update(timer.as_metrics())
        metrics.update(peak_memory_mib())  # averaged over ranks below: the per-rank peak
        metrics = parts.reduce(metrics)
        metrics["tokens/per_s"] = metrics["tokens/completion"] * parts.dist.world_size / max(metrics["time/step"], 1e-9)
        total_tokens += int(metrics["tokens/completion"] * parts.dist.world_size)
        step += 1
        metrics_log.log(step, metrics)
        progress.update(step, reward=metrics["reward/total"], loss=metrics["loss"])
        if bad_in_a_row >= cfg.optim.max_consecutive_bad_steps:  # logged above, never checkpointed
            progress.close()
            metrics_log.close()
            raise BadStepsError(
                f"{bad_in_a_row} consecutive steps had a non-finite loss or gradient (last at step {step}); "
                f"the last good checkpoint in {run_dir / 'checkpoints'} is kept. Lower optim.lr or check rewards."
            )
        if rank0 and cfg.logging.log_samples:
            ex, text = parts.last_samples[0]
            log.info("step %d sample (gold %s): %s", step, ex.gold_index or ex.answer, text[:300])
        if cfg.eval.every and step % cfg.eval.every == 0 and step < cfg.optim.max_steps:
            last_eval = _evaluate(step, parts, cfg, metrics_log)
            best = _track_best(best, last_eval, step, parts, cfg)
        state.update(best_metric=best, bad_in_a_row=bad_in_a_row)
        if stop.requested or (cfg.checkpoint.every and step % cfg.checkpoint.every == 0):
            _save(step, parts, cfg, state)
        if stop.requested:
            log.warning("stopped by signal after step %d; resume with --resume", step)
            break
    progress.close()
    if not stop.requested:
        last_eval = _evaluate(step, parts, cfg, metrics_log)
        best = _track_best(best, last_eval, step, parts, cfg)
        state.update(best_metric=best)
        _save(step, parts, cfg, state)
        if cfg.checkpoint.export_final:
            export_hf(parts.policy.lm, parts.tokenizer, run_dir / "final")
            if rank0 and cfg.checkpoint.push_to_hub:
                log.info("pushed the final export: %s", push_export(run_dir / "final", cfg.checkpoint.push_to_hub))
    metrics_log.close()
    return _summary(step, first_eval, last_eval, best, time.time() - t_start, total_tokens, cfg, rank0)


def _track_best(best, result: dict[str, float], step: int, parts: Parts, cfg: Config):
    value = result.get(cfg.eval.best_metric)
    if value is None or math.isnan(value):
        return best
    if best is None or value > best["value"]:
        best = {"value": value, "step": step, "metric": cfg.eval.best_metric}
        export_hf(parts.policy.lm, parts.tokenizer, Path(cfg.run_dir) / "best")
    return best


def _summary(step, first_eval, last_eval, best, seconds, tokens, cfg: Config, rank0: bool) -> dict:
    summary = {"steps": step, "seconds": round(seconds, 1), "completion_tokens": tokens,
               "first_eval": first_eval, "final_eval": last_eval, "best": best}
    if rank0:
        import json

        (Path(cfg.run_dir) / "summary.json").write_text(json.dumps(summary, indent=2))
        print("=== training summary ===")
        print(json.dumps({k: v for k, v in summary.items()}, indent=2))
    return summary
