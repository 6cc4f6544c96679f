"""Reward registry and `score_completions`, which turns completions into a RewardOutput.

A rule reward is a pure `fn(example, completion) -> float`. Settings reach it as
keyword-only parameters named like a `RewardsConfig` field (e.g. `length_target`), bound at
score time. A learned reward (GRAIL's discriminator, `gail`) is registered by its builder
(`register_learned`). A slot reward (`choice_likelihood`) is `fn(example, completion, slots)`
of the policy's answer-slot distributions, read from the rollout engine
(`register_slot`, grailcore/rewards/likelihood.py). `grailcore.rewards.stack.RewardStack`
combines all three kinds.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
import math
import typing
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from grailcore.config import RewardsConfig
from grailcore.data.schema import Example, Task
from grailcore.types import RewardOutput

logger = logging.getLogger(__name__)

RewardFn = Callable[..., float]
TASKS: tuple[str, ...] = typing.get_args(Task)
_LOGGED_INPUT_CHARS = 300


@dataclass(frozen=True)
class _Entry:
    fn: RewardFn
    task: str | None
    """The `Example.task` it scores; None = any task."""
    read_at: str | None = None
    """A slot reward: the tag after which its slot is read (`<answer>`, `<opinion>`)."""


_REGISTRY: dict[str, _Entry] = {}
_LEARNED: dict[str, _Entry] = {}
"""Learned rewards: name -> builder (see `register_learned`)."""
_SLOT: dict[str, _Entry] = {}
"""Slot rewards: name -> fn(example, completion, slots: SampleSlots, **settings)."""
_warned: set[str] = set()
"""Reward names whose first failure was logged: one warning per name and process, the
counts go to RewardOutput.errors every step."""


def register(name: str, task: str | None = None) -> Callable[[RewardFn], RewardFn]:
    """Decorator: register `fn` under `name` for examples of `task` (None = any)."""
    return _registrar(_REGISTRY, name, task)


def register_learned(name: str, task: str | None = None) -> Callable[[Callable], Callable]:
    """Decorator: register the builder of a learned reward, `build(cfg, train_examples, dist,
    weight) -> LearnedReward` (see grailcore.rewards.stack), for examples of `task`."""
    return _registrar(_LEARNED, name, task)


def register_slot(name: str, task: str | None = None, *, read_at: str) -> Callable[[RewardFn], RewardFn]:
    """Decorator: register a reward of the policy's slot distributions,
    `fn(example, completion, slots, **settings) -> float`, for examples of `task`, read at
    the slot after the tag `read_at` (what `grailcore.credit` keeps its advantage before)."""
    return _registrar(_SLOT, name, task, read_at)


def _registrar(table: dict[str, _Entry], name: str, task: str | None,
               read_at: str | None = None) -> Callable[[Callable], Callable]:
    if task not in (*TASKS, None):
        raise ValueError(f"reward {name!r}: task must be one of {TASKS} or None, got {task!r}")

    def decorator(fn: Callable) -> Callable:
        _check_new(name)
        table[name] = _Entry(fn, task, read_at)
        return fn

    return decorator


def _check_new(name: str) -> None:
    known = _REGISTRY.get(name) or _LEARNED.get(name) or _SLOT.get(name)
    if known is not None:
        raise ValueError(f"reward {name!r} is already registered (by {known.fn!r})")


def available_rewards() -> dict[str, Callable]:
    """Every registered reward, name -> its function (a learned reward: its builder)."""
    return {name: entry.fn for name, entry in {**_REGISTRY, **_LEARNED, **_SLOT}.items()}


def learned_rewards() -> dict[str, Callable]:
    """The learned rewards, name -> builder."""
    return {name: entry.fn for name, entry in _LEARNED.items()}


def slot_rewards() -> dict[str, Callable]:
    """The rewards of the policy's slot distributions, name -> fn."""
    return {name: entry.fn for name, entry in _SLOT.items()}


def slot_read_at(name: str) -> str | None:
    """The tag after which slot reward `name` is read; None for every other reward."""
    return _SLOT[name].read_at if name in _SLOT else None


def _entry(name: str) -> _Entry:
    if name in _LEARNED:
        raise KeyError(f"reward {name!r} is learned (it has a model); score it through a RewardStack")
    if name in _SLOT:
        raise KeyError(f"reward {name!r} reads the policy's answer slot; score it through a RewardStack "
                       "with a reader attached (the trainer attaches its rollout engine)")
    if name not in _REGISTRY:
        raise KeyError(f"unknown reward {name!r}; available: {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def get_reward(name: str) -> RewardFn:
    """The reward registered as `name`; KeyError listing the available names otherwise."""
    return _entry(name).fn


def reward_task(name: str) -> str | None:
    """The task whose examples `name` scores (None = any); others get 0 from it."""
    if name in _LEARNED:
        return _LEARNED[name].task
    return _SLOT[name].task if name in _SLOT else _entry(name).task


def bind_config(fn: RewardFn, cfg: RewardsConfig) -> RewardFn:
    """`fn` with every keyword-only parameter named like a RewardsConfig field filled in."""
    fields = {f.name for f in dataclasses.fields(cfg)}
    params = inspect.signature(fn).parameters.values()
    settings = {p.name: getattr(cfg, p.name) for p in params
                if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name in fields}
    return functools.partial(fn, **settings) if settings else fn


def _score_one(name: str, fn: RewardFn, example: Example, completion: str) -> float | None:
    """The reward, or None when it raised (timeouts raise too); logs the first failure."""
    try:
        score = float(fn(example, completion))
        if not math.isfinite(score):
            raise ValueError(f"returned {score}")
        return score
    except Exception as error:  # noqa: BLE001 - a broken reward must not kill training
        if name not in _warned:
            _warned.add(name)
            logger.warning(
                "reward %r failed on example %r (scored 0; later failures are only counted "
                "in RewardOutput.errors): %s: %s; completion: %r",
                name, example.example_id, type(error).__name__, error,
                completion[:_LOGGED_INPUT_CHARS],
            )
        return None


def score_rule(name: str, examples: list[Example], completions: list[str], cfg: RewardsConfig) -> tuple[torch.Tensor, int]:
    """([N] float32 scores, how many failed) of rule reward `name` on aligned lists.

    It scores 0 on examples of another task; where it raises or times out it scores 0
    and is counted as failed.
    """
    if len(examples) != len(completions):
        raise ValueError(f"{len(examples)} examples for {len(completions)} completions; "
                         "repeat each example group_size times")
    entry = _entry(name)
    fn = bind_config(entry.fn, cfg)
    scores, failed = [], 0
    for example, completion in zip(examples, completions):
        score = 0.0
        if entry.task is None or entry.task == example.task:
            score = _score_one(name, fn, example, completion)
            failed += score is None
        scores.append(score or 0.0)
    return torch.tensor(scores, dtype=torch.float32), failed


def score_slot(name: str, examples: Sequence[Example], completions: Sequence[str], slots: Sequence,
               cfg: RewardsConfig) -> tuple[torch.Tensor, int]:
    """([N] float32 scores, how many failed) of slot reward `name`, given each completion's
    `SampleSlots`; 0 on examples of another task, as `score_rule`."""
    if not len(examples) == len(completions) == len(slots):
        raise ValueError(f"{len(examples)} examples, {len(completions)} completions, {len(slots)} slot reads")
    entry = _SLOT[name]
    fn = bind_config(entry.fn, cfg)
    scores, failed = [], 0
    for example, completion, slot in zip(examples, completions, slots):
        score = 0.0
        if entry.task is None or entry.task == example.task:
            score = _score_one(name, functools.partial(fn, slots=slot), example, completion)
            failed += score is None
        scores.append(score or 0.0)
    return torch.tensor(scores, dtype=torch.float32), failed


def score_completions(examples: list[Example], completions: list[str], cfg: RewardsConfig) -> RewardOutput:
    """Score each completion against its example with the rule rewards of `cfg` (aligned
    lists, len N = prompts * group_size): total = sum of weight * reward (see `score_rule`).
    Learned rewards need their model: score those through a RewardStack."""
    if len(set(cfg.names)) != len(cfg.names):  # a guard for hand-made configs (validation checks presets)
        raise ValueError(f"rewards.names lists a reward twice: {cfg.names}")
    per_reward: dict[str, torch.Tensor] = {}
    errors: dict[str, int] = {}
    total = torch.zeros(len(completions), dtype=torch.float32)  # [N]
    for name, weight in zip(cfg.names, cfg.weights, strict=True):
        per_reward[name], errors[name] = score_rule(name, examples, completions, cfg)  # [N]
        total += weight * per_reward[name]
    return RewardOutput(total=total, per_reward=per_reward, errors=errors)
