"""The one training shell of every mode (GRPO, GRAIL, SFT): `Trainer.run()` repeats a
pluggable step (grailcore.steps) and owns everything around it, so every mode gets it:

    SIGTERM/SIGINT (finish the step, checkpoint, exit) -> non-finite guard (stop after
    optim.max_consecutive_bad_steps skipped steps) -> metrics and progress -> evaluation
    every eval.every steps with the best export -> checkpoints -> final evaluation,
    checkpoint, export and push to the Hub.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from grailcore import dist as gdist
from grailcore.config import Config
from grailcore.data.schema import Example
from grailcore.data.training_audit import TrainingAudit
from grailcore.evaluation.evaluator import Evaluator
from grailcore.export import export_hf
from grailcore.lora import AdapterFreeReference
from grailcore.metrics_log import MetricsLogger, Progress, StepTimer, peak_memory_mib
from grailcore.optimize import BadStepsError
from grailcore.policy import PolicyModel
from grailcore.rewards.stack import RewardStack
from grailcore.rollout.worker import RolloutWorker
from grailcore.sampler import PROMPT_ORDER_FILE, prompt_order_record
from grailcore.slot_nll import SlotTargetBuilder
from grailcore.steps import StepFn, StepOutput, Update
from grailcore.tracking import Loggers, build_logger, push_export
from grailcore.train_state import Checkpointer, TrainState

log = logging.getLogger(__name__)

PHASES = {"generation": "rollout", "scoring": "rollout scoring", "training": "update", "weight_sync": "weight sync",
          None: "step"}
"""The step's timer phases (grailcore/steps.py) as a collective failure names them."""


@dataclass
class Policy:
    """The trained model, its frozen KL reference (grpo.beta > 0; under LoRA the policy with
    its adapters off) and their tokenizer."""

    model: PolicyModel
    reference: PolicyModel | AdapterFreeReference | None
    tokenizer: Any
    """A transformers tokenizer with a chat template."""


@dataclass
class TrainingData:
    train: list[Example]
    train_ids: list[list[int]]
    """Chat-templated prompt token ids of each training example."""
    eval_examples: list[Example]
    """Held-out rows every evaluation samples (the ones `grailcore.eval --max-samples` scores)."""
    data_audit: TrainingAudit | None = None
    """The leak audit of the training and eval data made at build (raw and as trained)."""


class StopFlag:
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


class Trainer:
    """Owns the run's components and its loop; `step_fn` is what one step does."""

    def __init__(self, cfg: Config, dist: gdist.DistInfo, policy: Policy, optimizer: torch.optim.Optimizer,
                 scheduler, data: TrainingData, rollout: RolloutWorker, rewards: RewardStack, evaluator: Evaluator,
                 state: TrainState, checkpointer: Checkpointer, step_fn: StepFn) -> None:
        self.cfg, self.dist, self.policy = cfg, dist, policy
        self.optimizer, self.scheduler = optimizer, scheduler
        self.data, self.rollout, self.rewards, self.evaluator = data, rollout, rewards, evaluator
        self.state, self.checkpointer, self.step_fn = state, checkpointer, step_fn

    @functools.cached_property
    def slot_targets(self) -> SlotTargetBuilder:
        """Finds the answer/opinion slots the slot term trains (grpo.slot_nll_coef)."""
        return SlotTargetBuilder(self.policy.tokenizer)

    def next_prompts(self, count: int) -> list[int]:
        """This rank's share of the step's next `count` prompts (every rank draws the same
        global list; validation made `count` divisible by the world size)."""
        indices = self.state.sampler.next(count)
        share = len(indices) // self.dist.world_size
        return indices[self.dist.rank * share:(self.dist.rank + 1) * share]

    def step(self, timer: StepTimer, update: Update | None = None) -> StepOutput:
        """Run `step_fn` once at the current step (the trainer's own update unless given)."""
        return self.step_fn(self, self.state.step, timer, update or Update(self.optimizer, self.scheduler))

    def reduce(self, metrics: dict[str, float]) -> dict[str, float]:
        """Mean of each metric over ranks (a collective)."""
        return gdist.all_reduce_mean(metrics) if self.dist.world_size > 1 else metrics

    def close(self) -> None:
        self.rollout.close()

    # ---------------------------------------------------------------- the loop

    def run(self) -> dict:
        """Train from state.step to optim.max_steps; returns the run summary. SIGTERM/SIGINT
        finish the current step, checkpoint it and return early."""
        stop = StopFlag()
        stop.install()
        try:
            return self._run(stop)
        finally:
            stop.uninstall()

    def _run(self, stop: StopFlag) -> dict:
        cfg, state, rank0 = self.cfg, self.state, self.dist.rank == 0
        resumed = cfg.resume or (gdist.restart_count() > 0 and state.step > 0)  # torchrun restarts resume too
        metrics_log = build_logger(cfg, enabled=rank0, resume_step=state.step if resumed else None)
        progress = Progress(cfg.optim.max_steps, state.step, enabled=rank0 and cfg.logging.progress)
        started, tokens, first_eval, last_eval = time.time(), 0, None, {}
        try:
            if cfg.eval.on_start and state.step == 0:
                first_eval = self._evaluate(metrics_log)
            while state.step < cfg.optim.max_steps:
                tokens += self._train_step(metrics_log, progress)
                if cfg.eval.every and state.step % cfg.eval.every == 0 and state.step < cfg.optim.max_steps:
                    last_eval = self._evaluate(metrics_log, track_best=True)
                if stop.requested or (cfg.checkpoint.every and state.step % cfg.checkpoint.every == 0):
                    self._save()
                if stop.requested:
                    log.warning("stopped by signal after step %d; resume with --resume", state.step)
                    break
            progress.close()
            if not stop.requested:
                last_eval = self._finish(metrics_log)
        finally:
            progress.close()
            metrics_log.close()
        return self._summary(first_eval, last_eval, time.time() - started, tokens)

    def _train_step(self, metrics_log: MetricsLogger | Loggers, progress: Progress) -> int:
        """One step, logged; returns the tokens it trained on (all ranks). Raises
        BadStepsError after too many skipped steps in a row (logged, never checkpointed)."""
        cfg, state = self.cfg, self.state
        timer = StepTimer()
        with gdist.named_failures(lambda: f"the {PHASES.get(timer.failed_in, timer.failed_in)} phase of step "
                                          f"{state.step + 1}"):
            with timer("step"):
                out = self.step(timer)
        state.bad_in_a_row = state.bad_in_a_row + 1 if out.skipped else 0
        metrics = {**out.metrics, **timer.as_metrics(), "tokens/step": float(out.tokens)}
        metrics.update(peak_memory_mib())  # averaged over ranks below: the per-rank peak
        metrics = self.reduce(metrics)
        metrics["tokens/step"] *= self.dist.world_size
        metrics["tokens/per_s"] = metrics["tokens/step"] / max(metrics["time/step"], 1e-9)
        state.step += 1
        metrics_log.log(state.step, metrics)
        progress.update(state.step, **{name: metrics[key] for name, key in (("reward", "reward/total"),
                                                                            ("loss", "loss")) if key in metrics})
        if state.bad_in_a_row >= cfg.optim.max_consecutive_bad_steps:
            raise BadStepsError(
                f"{state.bad_in_a_row} consecutive steps had a non-finite loss or gradient (last at step "
                f"{state.step}); the last good checkpoint in {Path(cfg.run_dir) / 'checkpoints'} is kept. "
                "Lower optim.lr or check rewards.")
        if self.dist.rank == 0 and cfg.logging.log_samples and out.samples:
            ex, text = out.samples[0]
            log.info("step %d sample (gold %s): %s", state.step, ex.gold_index or ex.answer, text[:300])
        return int(metrics["tokens/step"])

    def _save(self) -> None:
        with gdist.named_failures(lambda: f"the checkpoint after step {self.state.step}"):
            self.checkpointer.save()

    def _evaluate(self, metrics_log: MetricsLogger | Loggers, track_best: bool = False) -> dict[str, float]:
        step = self.state.step
        with gdist.named_failures(lambda: f"the evaluation at step {step}"):
            result = self.evaluator(step)
        metrics_log.log(step, result)
        if self.dist.rank == 0:
            shown = ", ".join(f"{k}={v:.3f}" for k, v in sorted(result.items()) if not k.endswith("_ci"))
            print(f"[eval step {step}] {shown}", flush=True)
        if track_best:
            self._track_best(result)
        return result

    def _track_best(self, result: dict[str, float]) -> None:
        """Export the policy as RUN_DIR/best when eval.best_metric beats the best so far."""
        value = result.get(self.cfg.eval.best_metric)
        if value is None or math.isnan(value):
            return
        best = self.state.best
        if best is None or value > best["value"]:
            self.state.best = {"value": value, "step": self.state.step, "metric": self.cfg.eval.best_metric}
            self._export(Path(self.cfg.run_dir) / "best")

    def _export(self, out: Path) -> None:
        """The policy as a HF dir, with where its prompt order stopped (a later stage continues it)."""
        export_hf(self.policy.model.lm, self.policy.tokenizer, out,
                  {PROMPT_ORDER_FILE: prompt_order_record(self.state.sampler, self.data.train)})

    def _finish(self, metrics_log: MetricsLogger | Loggers) -> dict[str, float]:
        """The last evaluation, checkpoint, export and upload of a run that was not stopped."""
        cfg, run_dir = self.cfg, Path(self.cfg.run_dir)
        last_eval = self._evaluate(metrics_log, track_best=True)
        self._save()
        if cfg.checkpoint.export_final:
            self._export(run_dir / "final")
            if self.dist.rank == 0 and cfg.checkpoint.push_to_hub:
                log.info("pushed the final export: %s", push_export(run_dir / "final", cfg.checkpoint.push_to_hub))
        return last_eval

    def _summary(self, first_eval: dict | None, last_eval: dict, seconds: float, tokens: int) -> dict:
        # completion_tokens: the tokens trained on, sampled completions (GRPO) or gold targets (SFT).
        summary = {"steps": self.state.step, "seconds": round(seconds, 1), "completion_tokens": tokens,
                   "first_eval": first_eval, "final_eval": last_eval, "best": self.state.best}
        if self.dist.rank == 0:
            (Path(self.cfg.run_dir) / "summary.json").write_text(json.dumps(summary, indent=2))
            lines = ["=== training summary ===",
                     f"steps {summary['steps']}, {summary['seconds']} s, {tokens:,} tokens trained; best: {self.state.best}"]
            lines += [f"{key:40s} {value:.4f}" + (f"   (start {first_eval[key]:.4f})" if first_eval and key in first_eval else "")
                      for key, value in sorted(last_eval.items()) if not key.endswith("_ci")]
            print("\n".join(lines), flush=True)
        return summary
