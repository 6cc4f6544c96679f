"""Per-step counters of the discriminator and the gail/* metrics made from them: sums
and counts (not means), so ranks combine exactly by summing before the ratios are taken."""

from __future__ import annotations

import math

import torch

from grailcore.rewards.gail.objective import TrainingRows

KEYS: tuple[str, ...] = (
    "frozen_skips", "loss_sum", "loss_n", "expert_n", "expert_hit", "expert_p", "policy_n", "policy_hit",
    "policy_p", "correct_n", "correct_p", "reward_gail_abs", "reward_rule_abs", "inputs", "truncated",
    "negatives", "replayed", "unparsed", "skipped_updates",
)


class StepStats:
    """Sums since the last `reset`; `vector`/`summary` turn them into metrics."""

    def __init__(self) -> None:
        self.values = dict.fromkeys(KEYS, 0.0)

    def add(self, key: str, value: float) -> None:
        self.values[key] += float(value)

    def reset(self) -> None:
        self.values = dict.fromkeys(KEYS, 0.0)

    def vector(self) -> torch.Tensor:
        """[len(KEYS)] float64, to be summed over ranks."""
        return torch.tensor([self.values[k] for k in KEYS], dtype=torch.float64)

    def record_reward_share(self, gail_part: torch.Tensor, total: torch.Tensor) -> None:
        """`gail_part` [N] = weight * r(D) inside `total` [N]."""
        self.add("reward_gail_abs", gail_part.abs().sum())
        self.add("reward_rule_abs", (total - gail_part).abs().sum())

    def record_scores(self, logits: torch.Tensor, rows: TrainingRows) -> None:
        """Accuracy and mean P(human) per kind of input, weighted by how often each occurred."""
        p, human = torch.sigmoid(logits).double(), (logits > 0).double()
        for name, counts, hit in (("expert", rows.fresh_expert_count, human),  # as the policy's: this step's only
                                  ("policy", rows.differing_count, 1 - human),
                                  ("correct", rows.correct_count, None)):
            self.add(f"{name}_n", counts.sum())
            self.add(f"{name}_p", (counts * p).sum())
            if hit is not None:
                self.add(f"{name}_hit", (counts * hit).sum())


def summary(summed: torch.Tensor, replay_buffer: int) -> dict[str, float]:
    """gail/* metrics from a `StepStats.vector()` summed over ranks. NaN where nothing was
    measured (e.g. d_loss of a frozen D, p_human_correct when no sample was right)."""
    s = dict(zip(KEYS, summed.tolist()))

    def ratio(num: float, den: float) -> float:
        return num / den if den else math.nan

    return {
        "gail/d_loss": ratio(s["loss_sum"], s["loss_n"]),
        "gail/d_acc_expert": ratio(s["expert_hit"], s["expert_n"]),
        "gail/d_acc_policy": ratio(s["policy_hit"], s["policy_n"]),
        "gail/p_human_expert": ratio(s["expert_p"], s["expert_n"]),
        "gail/p_human_policy": ratio(s["policy_p"], s["policy_n"]),
        "gail/p_human_correct": ratio(s["correct_p"], s["correct_n"]),
        # Share of the absolute reward mass, in [0, 1]: |gail part| / (|gail part| + |rule part|).
        # (|gail| / |total| would blow up whenever the parts cancel.)
        "gail/reward_share": ratio(s["reward_gail_abs"], s["reward_gail_abs"] + s["reward_rule_abs"]),
        "gail/truncation_rate": ratio(s["truncated"], s["inputs"]),
        "gail/negatives": s["negatives"],
        "gail/replayed": s["replayed"],
        "gail/unparsed": s["unparsed"],
        "gail/frozen_skips": s["frozen_skips"],
        "gail/skipped_updates": s["skipped_updates"],
        "gail/replay_buffer": float(replay_buffer),
    }
