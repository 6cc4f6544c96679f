"""Held-out evaluation during training: sample the current policy on the evaluation rows
through the run's rollout engine, score them with the rule rewards, and return flat
`eval/...` metrics (the same numbers `grailcore.eval` reports without intervals)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from grailcore import dist as gdist
from grailcore.config import Config
from grailcore.data.schema import Example
from grailcore.evaluation.completions_io import EvalSamples, write_completions
from grailcore.evaluation.evaluate import evaluate_examples
from grailcore.evaluation.generate import generate_completions
from grailcore.evaluation.order import permuted_copies
from grailcore.mixture import source_eval_metrics
from grailcore.rewards.stack import RewardStack
from grailcore.rng import derive_seed
from grailcore.rollout.worker import RolloutWorker
from grailcore.types import RewardOutput


class Evaluator:
    """`evaluator(step)` -> eval metrics of the current policy on `examples`.

    Invariants: the rows are held out (never trained on), so they are scored by the rule
    rewards only: a learned reward (the discriminator) never sees them. Every rank computes
    the same numbers (a collective: all ranks call it together).
    """

    def __init__(self, cfg: Config, dist: gdist.DistInfo, tokenizer, rollout: RolloutWorker, rewards: RewardStack,
                 examples: list[Example], train_examples: Sequence[Example]) -> None:
        self.cfg, self.dist, self.tokenizer = cfg, dist, tokenizer
        self.rollout, self.rewards = rollout, rewards
        self.examples = examples
        self.train_examples = train_examples
        """Fit the position/opinion priors of the baselines."""

    def __call__(self, step: int | None = None) -> dict[str, float]:
        """Eval metrics on `examples` (and on eval.permutations reordered copies of them, for
        eval/order/*). With `step`, rank 0 also keeps the sampled completions as
        RUN_DIR/eval/step_<step>.jsonl, the format `grailcore.eval --completions` and
        `grailcore.evaluation.compare` read (two steps of one run are the same rows in the
        same order: a paired comparison)."""
        self.rollout.sync_if_stale()  # evaluate the current policy, whatever rollout.sync_every says
        cfg, examples = self.cfg, self.examples
        samples = self._sample(examples, step, order=0)
        completions = samples.texts
        if step is not None and self.dist.rank == 0:
            out = Path(cfg.run_dir) / "eval"
            out.mkdir(parents=True, exist_ok=True)
            write_completions(out / f"step_{step:06d}.jsonl", samples)
        rewards = self._row_rewards(completions)
        if examples and examples[0].task == "math":
            result = {f"eval/reward/{k}": float(v.mean()) for k, v in rewards.per_reward.items()}
            result["eval/accuracy"] = result.get("eval/reward/math_accuracy", float("nan"))
        else:
            permuted = [self._sample(copy, step, order=k + 1)  # orders seeded like `grailcore.eval --seed`
                        for k, copy in enumerate(permuted_copies(examples, cfg.eval.permutations, cfg.seed))]
            result = evaluate_examples(examples, completions, self.train_examples, permuted, samples.slots)
        result["eval/reward/total"] = float(rewards.total.mean())
        if cfg.data.mixture:
            result.update(source_eval_metrics(examples, completions, rewards, self.train_examples))
        return result

    def _row_rewards(self, completions: list[list[str]]) -> RewardOutput:
        """Each row's rule rewards, the mean over its samples: with k > 1 the reward is the
        sampled policy's mean, not one draw's."""
        flat_examples = [ex for ex, row in zip(self.examples, completions) for _ in row]
        flat = self.rewards(flat_examples, [text for row in completions for text in row], learned=False)
        owner = torch.tensor([i for i, row in enumerate(completions) for _ in row])
        rows = len(completions)
        return RewardOutput(total=row_means(flat.total, owner, rows),
                            per_reward={k: row_means(v, owner, rows) for k, v in flat.per_reward.items()},
                            errors=flat.errors)

    def _sample(self, examples: list[Example], step: int | None, order: int) -> EvalSamples:
        """eval.samples_per_row completions of every row and (viewer rows, eval.exact_distributions)
        their answer-slot distributions: each rank samples a strided share, then all ranks
        gather every row's. Each row is seeded by (run seed, step, option order, row), so an
        evaluation repeats exactly in a resumed run and at any world size, whatever the
        engine drew before."""
        cfg, rank, world = self.cfg, self.dist.rank, self.dist.world_size
        mine = list(range(rank, len(examples), world))
        exact = cfg.eval.exact_distributions and all(ex.task == "viewer" for ex in examples)
        seeds = [derive_seed(cfg.seed, "eval", step, order, i, examples[i].example_id) for i in mine]
        drawn = generate_completions(
            self.rollout.engine, self.tokenizer, [examples[i] for i in mine], cfg.eval.samples_per_row,
            cfg.eval.temperature, cfg.rollout.max_completion_tokens, exact=exact, seeds=seeds,
        )
        by_index = {i: (drawn.texts[j], drawn.slots[j] if exact else None) for j, i in enumerate(mine)}
        if world > 1:
            for part in gdist.all_gather_object(by_index):
                by_index.update(part)
        rows = [by_index[i] for i in range(len(examples))]
        return EvalSamples(list(examples), [texts for texts, _ in rows], [s for _, s in rows] if exact else None)


def row_means(values: torch.Tensor, owner: torch.Tensor, n_rows: int) -> torch.Tensor:
    """Mean of each row's sample scores: `values[j]` belongs to row `owner[j]`."""
    sums = torch.zeros(n_rows, dtype=torch.float32).index_add_(0, owner, values.float())
    return sums / torch.bincount(owner, minlength=n_rows).clamp(min=1)
