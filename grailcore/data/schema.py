"""Typed records of the viewer study and the math workload, and the `Example` every
trainer/eval/reward component consumes.

A `Decision` is one viewing decision of one participant (structured, our schema);
an `Example` is what a model sees and what it is scored against (rendered prompt +
gold fields), built from a `Decision`, a pre-rendered prompt row, or a math problem.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping

OPINION_DIRECTIONS: tuple[str, ...] = ("increase", "decrease", "no_change")
ISSUES: tuple[str, ...] = ("gun_control", "minimum_wage")
Task = Literal["viewer", "math"]


class SchemaError(ValueError):
    """A row does not match the schema; the message names where and what."""


@dataclass(frozen=True)
class Video:
    """A video as it appears in a slate, the history or 'currently watching'."""

    video_id: str
    title: str
    channel: str | None = None
    duration_s: float | None = None
    views: int | None = None
    likes: int | None = None
    comments: int | None = None
    stance: float | None = None
    """Latent slant in [-1, 1] (+1 = pro-regulation / pro-increase). Never rendered."""


@dataclass(frozen=True)
class WatchedVideo:
    """A history entry: the video and how long it was watched, before the decision."""

    video: Video
    watched_s: float | None = None


@dataclass(frozen=True)
class Viewer:
    """Pre-treatment profile of a participant (all fields measured before the session)."""

    viewer_id: str
    age: int | None = None
    gender: str | None = None
    race: str | None = None
    party: str | None = None
    ideology: str | None = None
    income: str | None = None
    education: str | None = None
    youtube_frequency: str | None = None
    political_interest: str | None = None


@dataclass(frozen=True)
class Decision:
    """One viewing decision: state before the click, the slate, and what happened.

    `gold_index` is 1-based into `slate` as stored (prompt building may shuffle).
    `survey` holds pre-treatment survey answers only, as display label -> value.
    `true_choice_probs` / `true_opinion_probs` exist for synthetic data only.
    """

    row_id: str
    viewer: Viewer
    issue: str
    study: str
    session_id: str
    step: int
    initial_viewpoint: str
    current: Video
    history: tuple[WatchedVideo, ...]
    survey: tuple[tuple[str, str], ...]
    slate: tuple[Video, ...]
    gold_index: int
    opinion_before: float | None = None
    opinion_after: float | None = None
    opinion_direction: str | None = None
    slate_design: str | None = None
    true_choice_probs: tuple[float, ...] | None = None
    true_opinion_probs: tuple[float, ...] | None = None
    """Probabilities of (increase, decrease, no_change), in OPINION_DIRECTIONS order."""

    @property
    def n_options(self) -> int:
        return len(self.slate)


def opinion_direction(before: float, after: float, tolerance: float) -> str:
    """Direction of an opinion change on ONE scale; |after - before| <= tolerance is no_change."""
    delta = after - before
    if delta > tolerance:
        return "increase"
    if delta < -tolerance:
        return "decrease"
    return "no_change"


@dataclass(frozen=True)
class Example:
    """A scored prompt: chat messages plus the gold fields rewards and eval need.

    For the viewer task `gold_index` is 1-based in the ORDER SHOWN in the prompt, and
    `option_texts[i]` is the rendered text of option i+1 (the discriminator's action).
    `true_choice_probs` (synthetic only) is in the shown order too.
    """

    example_id: str
    task: Task
    messages: tuple[Mapping[str, str], ...]
    gold_index: int | None = None
    n_options: int | None = None
    opinion_direction: str | None = None
    option_texts: tuple[str, ...] = ()
    state_text: str = ""
    """Viewer / current video / history text (the discriminator's state)."""
    true_choice_probs: tuple[float, ...] | None = None
    true_opinion_probs: tuple[float, ...] | None = None
    answer: str | None = None
    """Math: the gold answer (LaTeX or plain)."""
    issue: str | None = None
    study: str | None = None
    viewer_id: str | None = None
    source: str = ""
    """Dataset name, for per-source metrics in mixtures."""
    meta: Mapping[str, Any] = field(default_factory=dict)

    @property
    def prompt(self) -> str:
        """The user message text."""
        return next(m["content"] for m in self.messages if m["role"] == "user")

    def replace(self, **changes: Any) -> "Example":
        return dataclasses.replace(self, **changes)


def validate_example(ex: Example, where: str) -> None:
    """Raise SchemaError naming `where` (file:line) and the field when `ex` is unusable."""
    if ex.task == "viewer":
        if ex.n_options is None or ex.n_options < 1:
            raise SchemaError(f"{where}: field 'n_options' must be >= 1 (empty slate?), got {ex.n_options}")
        if ex.gold_index is None or not 1 <= ex.gold_index <= ex.n_options:
            raise SchemaError(
                f"{where}: field 'gold_index' must be in 1..{ex.n_options}, got {ex.gold_index}"
            )
        if ex.opinion_direction is not None and ex.opinion_direction not in OPINION_DIRECTIONS:
            raise SchemaError(
                f"{where}: field 'opinion_direction' must be one of {OPINION_DIRECTIONS}, "
                f"got {ex.opinion_direction!r}"
            )
        if ex.true_choice_probs is not None and len(ex.true_choice_probs) != ex.n_options:
            raise SchemaError(f"{where}: field 'true_choice_probs' has {len(ex.true_choice_probs)} "
                              f"entries for {ex.n_options} options")
    elif ex.task == "math":
        if not ex.answer:
            raise SchemaError(f"{where}: field 'answer' is missing or empty")
    else:
        raise SchemaError(f"{where}: field 'task' must be 'viewer' or 'math', got {ex.task!r}")
    if not ex.prompt.strip():
        raise SchemaError(f"{where}: the prompt is empty")
