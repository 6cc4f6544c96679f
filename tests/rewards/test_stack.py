"""RewardStack (grailcore/rewards/stack.py): one weight table for rule and learned rewards,
table-order totals, rule rewards only with learned=False, learned state in and out, and no
preset pays a completion for dodging the answer (`pytest -k dodg`)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from grailcore.cli import load_preset
from grailcore.config import Config, RewardsConfig
from grailcore.data.schema import OPINION_DIRECTIONS, Example
from grailcore.rewards import RewardStack, learned_rewards, score_completions
from grailcore.rewards.discriminator import Discriminator
from grailcore.rewards.gail.objective import REWARD_KINDS

VIEWER = Example(example_id="v1", task="viewer", messages=({"role": "user", "content": "q"},),
                 gold_index=2, n_options=3, opinion_direction="increase")
RIGHT = "<think>x</think><answer>2</answer><opinion>increase</opinion>"
WRONG = "<answer>3</answer> trailing"


class CountingReward:
    """A learned reward that pays its update count: enough to check what the stack does with one."""

    def __init__(self) -> None:
        self.updates, self.scored = 0, 0

    def score(self, examples, completions):
        self.scored += len(completions)
        return torch.full((len(completions),), float(self.updates))

    def update(self, examples, completions, rewards):
        assert "gail" in rewards.per_reward  # it learns from the rewards it was scored with
        self.updates += 1

    def metrics(self):
        return {"gail/updates": float(self.updates)}

    def state_dict(self):
        return {"updates": self.updates}

    def load_state_dict(self, state):
        self.updates = state["updates"]


def _stack(reward: CountingReward) -> RewardStack:
    return RewardStack(RewardsConfig(names=("slate_accuracy", "gail", "format"), weights=(1.0, 2.0, 0.5)),
                       {"gail": reward})


def test_the_discriminator_is_registered_as_a_learned_reward():
    assert "gail" in learned_rewards()


def test_total_is_the_weighted_sum_of_every_reward_in_the_table():
    reward = CountingReward()
    stack = _stack(reward)
    before = stack([VIEWER] * 2, [RIGHT, WRONG])
    stack.update([VIEWER] * 2, [RIGHT, WRONG], before)
    after = stack([VIEWER] * 2, [RIGHT, WRONG])
    assert list(after.per_reward) == ["slate_accuracy", "gail", "format"]  # table order
    assert after.per_reward["gail"].tolist() == [1.0, 1.0] and after.errors["gail"] == 0
    assert after.total.tolist() == [1.0 + 2.0 + 0.5, 0.0 + 2.0 + 0.0]
    assert stack.metrics() == {"gail/updates": 1.0}


def test_without_learned_rewards_it_matches_score_completions_and_never_runs_them():
    reward = CountingReward()
    rules = _stack(reward)([VIEWER] * 2, [RIGHT, WRONG], learned=False)
    expected = score_completions([VIEWER] * 2, [RIGHT, WRONG],
                                 RewardsConfig(names=("slate_accuracy", "format"), weights=(1.0, 0.5)))
    assert reward.scored == 0 and set(rules.per_reward) == {"slate_accuracy", "format"}
    assert torch.equal(rules.total, expected.total)


def test_a_stack_built_without_learned_rewards_refuses_to_score_them():
    stack = RewardStack(RewardsConfig(names=("format", "gail"), weights=(1.0, 1.0)), {})
    assert stack([VIEWER], [RIGHT], learned=False).total.tolist() == [1.0]
    with pytest.raises(RuntimeError, match="'gail' was not built"):
        stack([VIEWER], [RIGHT])


def test_learned_state_round_trips_and_a_missing_one_is_an_error():
    reward = CountingReward()
    stack = _stack(reward)
    stack.update([VIEWER], [RIGHT], stack([VIEWER], [RIGHT]))
    restored = CountingReward()
    _stack(restored).load_state_dict(stack.state_dict())
    assert stack.state_dict() == {"gail": {"updates": 1}} and restored.updates == 1
    with pytest.raises(ValueError, match=r"no state of learned reward\(s\) \['gail'\].*rewards.names"):
        _stack(CountingReward()).load_state_dict({})


# ---- dodging: not answering never pays (issue 21 item 2) ------------------------------------

PRESETS = sorted((Path(__file__).parents[2] / "configs").glob("*.py"))
OPTIONS = ("Why gun control saves lives", "The case for gun rights now", "A sheriff on background checks")
DODGE_VIEWER = Example(example_id="d1", task="viewer", messages=({"role": "user", "content": "q"},),
                       gold_index=2, n_options=3, opinion_direction="increase", option_texts=OPTIONS,
                       state_text="VIEWER supports gun rights.")


def _committed(k: int, opinion: str) -> list[str]:
    return [f"<think>t</think><answer>{k}</answer><opinion>{opinion}</opinion>",
            f"<think>t</think>\n<answer> {k} </answer>\n<opinion>{opinion}</opinion>\n"]


def _dodges(opinion: str) -> list[str]:
    """Completions without a committed answer in the layout, each with `opinion` (the gold
    option, 2, wherever an answer is readable, so a dodge is as good as it can be)."""
    op = f"<opinion>{opinion}</opinion>"
    return [
        f"<think>t</think>{op}",  # no answer at all
        f"<think>t</think><answer>Option 2</answer>{op}",  # not a bare integer
        f"<think>t</think><answer>9</answer>{op}",  # out of range
        f"<think>t</think><answer>2</answer><answer>2</answer>{op}",  # two answers
        f"<think>t <answer>2</answer></think>{op}",  # nested in <think>
        f"Sure! <think>t</think><answer>2</answer>{op}",  # the right option, layout broken
        f"<answer>2</answer>{op}",  # the right option, no <think>
        f"<think>t</think><answer>2</answer>{op} and more",  # the right option, trailing text
    ]


def _viewer_presets() -> list[Path]:
    return [p for p in PRESETS if load_preset(str(p)).data.task == "viewer"]


def _dodging_cases() -> list[tuple[Path, str]]:
    """Every viewer preset x every gail transform (presets without `gail` once: no transform)."""
    cases = []
    for path in _viewer_presets():
        kinds = REWARD_KINDS if "gail" in load_preset(str(path)).rewards.names else ("-",)
        cases += [(path, kind) for kind in kinds]
    return cases


def _preset_stack(cfg: Config, kind: str, logit: float) -> RewardStack:
    """The preset's reward table; its `gail` (if any) is a tiny-bert D with the preset's
    clip and transform `kind`, whose logit is `logit` for every input."""
    learned = {}
    if "gail" in cfg.rewards.names:
        gail = dataclasses.replace(cfg.gail, model="tiny-bert", max_tokens=64, reward=kind, frozen_path=None)
        d = Discriminator(gail, [DODGE_VIEWER])
        with torch.no_grad():  # the output layer starts at zero: its bias is D's logit everywhere
            d.head[-1].bias.fill_(logit)
        learned["gail"] = d
    return RewardStack(cfg.rewards, learned)


def test_dodging_cases_cover_every_viewer_preset_and_transform():
    names = {p.stem for p in _viewer_presets()}
    assert {"grail_gun", "grail_wage", "demo_grail_gun", "grpo_gun", "demo_gun"} <= names
    assert len(_dodging_cases()) >= 3 * len(REWARD_KINDS)  # three GRAIL presets x every transform
    math_presets = {p.stem for p in PRESETS} - names  # math has no option to dodge
    assert all(load_preset(str(p)).data.task == "math" for p in PRESETS if p.stem in math_presets)


@pytest.mark.parametrize(("preset", "kind"), _dodging_cases(), ids=lambda v: getattr(v, "stem", v))
def test_dodging_never_totals_more_than_any_committed_answer(preset: Path, kind: str):
    """For D's least and greatest logit, the worst committed answer (any option) totals at
    least the best dodge with the same opinion."""
    cfg = load_preset(str(preset))
    for logit in (-30.0, 30.0):
        stack = _preset_stack(cfg, kind, logit)
        for opinion in OPINION_DIRECTIONS:
            committed = [t for k in (1, 2, 3) for t in _committed(k, opinion)]
            dodges = _dodges(opinion)
            totals = stack([DODGE_VIEWER] * (len(committed) + len(dodges)), committed + dodges).total
            worst_committed, best_dodge = totals[:len(committed)].min(), totals[len(committed):].max()
            assert worst_committed >= best_dodge - 1e-6, (preset.stem, kind, logit, opinion, totals.tolist())
