"""Every reward of a run behind one weight table (`rewards.names` / `rewards.weights`): rule
rewards (pure functions), slot rewards (`choice_likelihood`: the policy's own probability of
the person's choice, read through a `SlotReader`), and learned ones (GRAIL's discriminator,
`gail`), which keep a model, learn from each step's rollouts (`update`) and are
checkpointed (`state_dict`)."""

from __future__ import annotations

from typing import Callable, Protocol, Sequence

import torch

from grailcore.config import Config, RewardsConfig
from grailcore.data.schema import Example
from grailcore.dist import DistInfo
from grailcore.rewards.registry import learned_rewards, score_rule, score_slot, slot_rewards
from grailcore.types import Completion, RewardOutput

Tokens = Sequence[tuple[Sequence[int], Sequence[int]]]
"""Per completion: (its chat-templated prompt's token ids, its own token ids as sampled)."""


class LearnedReward(Protocol):
    """A reward with a model of its own. Collectives: `update` and `metrics` run on every
    rank together, once per training step."""

    def score(self, examples: Sequence[Example], completions: Sequence[str]) -> torch.Tensor:
        """[N] unweighted reward of each completion."""
        ...

    def update(self, examples: Sequence[Example], completions: Sequence[str], rewards: RewardOutput) -> None:
        """Learn from one training step's rollouts (training examples only) and their rewards."""
        ...

    def metrics(self) -> dict[str, float]: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class RewardStack:
    """Scores completions with every reward of the table, in table order: total = sum of
    weight * reward. Learned and slot rewards score training rollouts only: evaluation
    passes `learned=False`, so a discriminator never sees a held-out row (the evaluation
    reports the exact NLL of the person's choice itself)."""

    def __init__(self, cfg: RewardsConfig, learned: dict[str, LearnedReward]) -> None:
        if len(set(cfg.names)) != len(cfg.names):  # validation stops this for configs; a guard for hand-made ones
            raise ValueError(f"rewards.names lists a reward twice: {cfg.names}")
        self.cfg = cfg
        self.learned = learned
        """name -> learned reward (each one listed in cfg.names)."""
        self.reader: Callable[..., list] | None = None
        """Reads each completion's slot distributions (`likelihood.SlotReader`); see attach_reader."""

    @property
    def reads_slots(self) -> bool:
        """Whether a reward of the table needs the completions' slot distributions."""
        return any(name in slot_rewards() for name in self.cfg.names)

    def attach_reader(self, reader: Callable[..., list]) -> None:
        """Give the slot rewards their reader (the trainer's: its rollout engine):
        `reader(examples, tokens, sampled)`, `sampled` the completions or None."""
        self.reader = reader

    def watch_ids(self, examples: Sequence[Example]) -> tuple[int, ...]:
        """Token ids whose log-probs sampling should report so the slot rewards look their
        reads up (`SamplingParams.watch_token_ids`); () when no reward reads slots."""
        if not self.reads_slots or not hasattr(self.reader, "watch_ids"):
            return ()
        return self.reader.watch_ids(examples)

    def __call__(self, examples: Sequence[Example], completions: Sequence[str], *,
                 learned: bool = True, tokens: Tokens | None = None,
                 sampled: Sequence[Completion] | None = None) -> RewardOutput:
        """RewardOutput of aligned lists (len N). learned=False: the rule rewards only.
        tokens: per completion (prompt ids, completion ids), needed by slot rewards;
        sampled: the completions themselves (their texts and the log-probs sampling
        reported), which let the reader skip reads no reward pays for."""
        per_reward: dict[str, torch.Tensor] = {}
        errors: dict[str, int] = {}
        total = torch.zeros(len(completions), dtype=torch.float32)  # [N]
        learned_names = learned_rewards()
        slots = self._read_slots(examples, tokens, sampled) if learned and self.reads_slots else None
        for name, weight in zip(self.cfg.names, self.cfg.weights, strict=True):
            if name in slot_rewards():
                if not learned:
                    continue
                values, failed = score_slot(name, examples, completions, slots, self.cfg)  # [N]
            elif name in learned_names:
                if not learned:
                    continue
                if name not in self.learned:
                    raise RuntimeError(f"learned reward {name!r} was not built (build_rewards(learned=False)); "
                                       "this stack scores with learned=False only")
                values, failed = self.learned[name].score(examples, completions), 0  # [N]
            else:
                values, failed = score_rule(name, list(examples), list(completions), self.cfg)  # [N]
            per_reward[name], errors[name] = values, failed
            total += weight * values
        return RewardOutput(total=total, per_reward=per_reward, errors=errors)

    def _read_slots(self, examples: Sequence[Example], tokens: Tokens | None,
                    sampled: Sequence[Completion] | None) -> list:
        names = [n for n in self.cfg.names if n in slot_rewards()]
        if self.reader is None:
            raise RuntimeError(f"rewards {names} read the policy's answer slot, but no reader is attached "
                               "(RewardStack.attach_reader; the trainer attaches its rollout engine)")
        if tokens is None:
            raise RuntimeError(f"rewards {names} need each completion's token ids: pass tokens=")
        return self.reader(examples, tokens, sampled)

    def update(self, examples: Sequence[Example], completions: Sequence[str], rewards: RewardOutput) -> None:
        """Every learned reward learns from this step's training rollouts."""
        for reward in self.learned.values():
            reward.update(examples, completions, rewards)

    def metrics(self) -> dict[str, float]:
        """The learned rewards' own metrics since the last call (a collective)."""
        return {k: v for reward in self.learned.values() for k, v in reward.metrics().items()}

    def state_dict(self) -> dict:
        return {name: reward.state_dict() for name, reward in self.learned.items()}

    def load_state_dict(self, state: dict) -> None:
        """Restore every learned reward; each must be in `state` (the run's rewards.names
        must match the checkpoint's)."""
        missing = sorted(set(self.learned) - set(state))
        if missing:
            raise ValueError(f"the checkpoint holds no state of learned reward(s) {missing} (it has "
                             f"{sorted(state)}); resume with the rewards.names it was written with")
        for name, reward in self.learned.items():
            reward.load_state_dict(state[name])


def build_rewards(cfg: Config, train_examples: Sequence[Example], dist: DistInfo, learned: bool = True) -> RewardStack:
    """The run's RewardStack; with `learned`, every learned reward in rewards.names is built
    (on every rank: building one is a collective). learned=False builds none: such a stack
    scores with learned=False only (SFT, generation)."""
    models: dict[str, LearnedReward] = {}
    if learned:
        builders = learned_rewards()
        for name, weight in zip(cfg.rewards.names, cfg.rewards.weights):
            if name in builders:
                models[name] = builders[name](cfg, train_examples, dist, weight)
    return RewardStack(cfg.rewards, models)
