"""Rule rewards of both tasks behind one registry; `score_completions` scores a batch.

Names: viewer rewards are bare (`slate_accuracy`, `option_accuracy`, `opinion_accuracy`,
`format`, `tag_count`); a math reward doing the same job carries `math_` (`math_accuracy`,
`math_format`, `math_tag_count`); the rest keep their R1 names (`reasoning_steps`,
`length`: any task; `mathematical_rigor`: math).
"""

from grailcore.rewards import math, viewer  # noqa: F401 - importing registers the rewards
from grailcore.rewards.math import DEFAULT_MATH_REWARDS, VerifyTimeout, VerifyWorker
from grailcore.rewards.parsing import ParsedViewer, extract_answer, original_answer, parse_viewer
from grailcore.rewards.registry import (
    available_rewards,
    get_reward,
    register,
    reward_task,
    score_completions,
)

__all__ = [
    "DEFAULT_MATH_REWARDS",
    "ParsedViewer",
    "VerifyTimeout",
    "VerifyWorker",
    "available_rewards",
    "extract_answer",
    "get_reward",
    "original_answer",
    "parse_viewer",
    "register",
    "reward_task",
    "score_completions",
]
