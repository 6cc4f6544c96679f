"""Rewards of both tasks behind one registry: rule rewards (`score_completions` scores a
batch), slot rewards of the policy's own answer distribution (`choice_likelihood`,
`opinion_likelihood`) and the learned `gail` reward (GRAIL's discriminator); `RewardStack`
weighs them all.

Names: viewer rewards are bare (`slate_accuracy`, `option_accuracy`, `opinion_accuracy`,
`format`, `tag_count`); a math reward doing the same job carries `math_` (`math_accuracy`,
`math_format`, `math_tag_count`); the rest keep their R1 names (`reasoning_steps`,
`length`: any task; `mathematical_rigor`: math).
"""

from grailcore.rewards import discriminator, likelihood, math_rewards, viewer  # noqa: F401 - importing registers the rewards
from grailcore.rewards.math_rewards import DEFAULT_MATH_REWARDS, VerifyTimeout, VerifyWorker
from grailcore.rewards.parsing import ParsedViewer, extract_answer, original_answer, parse_viewer
from grailcore.rewards.registry import (
    available_rewards,
    get_reward,
    learned_rewards,
    register,
    register_learned,
    register_slot,
    reward_task,
    score_completions,
    slot_rewards,
)
from grailcore.rewards.stack import LearnedReward, RewardStack, build_rewards

__all__ = [
    "DEFAULT_MATH_REWARDS",
    "LearnedReward",
    "RewardStack",
    "ParsedViewer",
    "VerifyTimeout",
    "VerifyWorker",
    "available_rewards",
    "build_rewards",
    "extract_answer",
    "get_reward",
    "learned_rewards",
    "original_answer",
    "parse_viewer",
    "register",
    "register_learned",
    "register_slot",
    "reward_task",
    "score_completions",
    "slot_rewards",
]
