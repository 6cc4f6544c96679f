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
    # The slack keeps decimal data on the boundary (0.52 - 0.50 vs 0.02) on the no_change side
    # despite binary rounding.
    delta, tolerance = after - before, tolerance + 1e-9
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


# --- Decision <-> plain dict (JSONL, parquet and HF rows share this shape) ---------

_PROB_TOLERANCE = 1e-4
_VIDEO_KEYS = {f.name for f in dataclasses.fields(Video)}
_VIEWER_KEYS = {f.name for f in dataclasses.fields(Viewer)}
_DECISION_KEYS = {f.name for f in dataclasses.fields(Decision)}
_NOT_GIVEN = object()


def decision_to_dict(d: Decision) -> dict[str, Any]:
    """A JSON/arrow-ready dict of `d` (tuples become lists); `decision_from_dict` inverts it."""
    return _listify(dataclasses.asdict(d))


def _listify(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _listify(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_listify(v) for v in obj]
    return obj


class _Fields:
    """Typed reads from one mapping; every error names `where` (file:line) and the field path."""

    def __init__(self, obj: Any, where: str, path: str, allowed: set[str]):
        if not isinstance(obj, Mapping):
            raise SchemaError(f"{where}: field '{path or 'row'}' must be an object, got {type(obj).__name__}")
        unknown = sorted(set(obj) - allowed)
        if unknown:
            raise SchemaError(f"{where}: unknown field(s) {unknown} in '{path or 'row'}'; "
                              f"allowed: {sorted(allowed)}")
        self.obj, self.where, self.prefix = obj, where, f"{path}." if path else ""

    def fail(self, key: str, message: str) -> SchemaError:
        return SchemaError(f"{self.where}: field '{self.prefix}{key}' {message}")

    def get(self, key: str, kind: str, required: bool = False) -> Any:
        if key not in self.obj or self.obj[key] is None:
            if required:
                raise self.fail(key, "is missing" if key not in self.obj else "must not be null")
            return None
        value, ok = _coerce(self.obj[key], kind)
        if not ok:
            raise self.fail(key, f"must be {kind}, got {type(self.obj[key]).__name__} {self.obj[key]!r:.60}")
        return value

    def sub(self, key: str, allowed: set[str], item: Any = _NOT_GIVEN, suffix: str = "") -> "_Fields":
        """Fields of the nested object at `key` (or of `item`, an element of the list at `key`)."""
        if item is _NOT_GIVEN and self.obj.get(key) is None:
            raise self.fail(key, "is missing")
        obj = self.obj[key] if item is _NOT_GIVEN else item
        return _Fields(obj, self.where, f"{self.prefix}{key}{suffix}", allowed)


def _coerce(value: Any, kind: str) -> tuple[Any, bool]:
    """(converted value, ok). Integral floats pass as ints: parquet/pandas turn int columns with nulls into floats."""
    if kind == "a string":
        return value, isinstance(value, str)
    if kind == "an integer":
        if isinstance(value, float) and value.is_integer():
            return int(value), True
        return value, isinstance(value, int) and not isinstance(value, bool)
    if kind == "a number":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value == value
        return (float(value) if ok else value), ok
    if kind == "a list":
        return value, isinstance(value, (list, tuple))
    raise AssertionError(kind)


def _video(f: _Fields) -> Video:
    kwargs = {k: f.get(k, "a string", required=True) for k in ("video_id", "title")}
    if not kwargs["title"].strip():
        raise f.fail("title", "must not be empty")
    kwargs["channel"] = f.get("channel", "a string")
    for key in ("duration_s", "stance"):
        kwargs[key] = f.get(key, "a number")
    for key in ("views", "likes", "comments"):
        kwargs[key] = f.get(key, "an integer")
        if kwargs[key] is not None and kwargs[key] < 0:
            raise f.fail(key, f"must be >= 0, got {kwargs[key]}")
    if kwargs["duration_s"] is not None and kwargs["duration_s"] < 0:
        raise f.fail("duration_s", f"must be >= 0, got {kwargs['duration_s']}")
    if kwargs["stance"] is not None and not -1 <= kwargs["stance"] <= 1:
        raise f.fail("stance", f"must be in [-1, 1], got {kwargs['stance']}")
    return Video(**kwargs)


def _viewer(f: _Fields) -> Viewer:
    kwargs: dict[str, Any] = {k: f.get(k, "a string") for k in _VIEWER_KEYS - {"viewer_id", "age"}}
    return Viewer(viewer_id=f.get("viewer_id", "a string", required=True), age=f.get("age", "an integer"), **kwargs)


def _probs(f: _Fields, key: str, n: int) -> tuple[float, ...] | None:
    raw = f.get(key, "a list")
    if raw is None:
        return None
    if len(raw) != n:
        raise f.fail(key, f"has {len(raw)} entries, expected {n}")
    values = []
    for i, p in enumerate(raw):
        p, ok = _coerce(p, "a number")
        if not ok or not 0 <= p <= 1:
            raise f.fail(f"{key}[{i}]", f"must be a probability in [0, 1], got {raw[i]!r}")
        values.append(p)
    if abs(sum(values) - 1) > _PROB_TOLERANCE:
        raise f.fail(key, f"must sum to 1, sums to {sum(values):.6f}")
    return tuple(values)


def _history(f: _Fields) -> tuple[WatchedVideo, ...]:
    entries = []
    for i, item in enumerate(f.get("history", "a list", required=True)):
        entry = f.sub("history", {"video", "watched_s"}, item, f"[{i}]")
        watched = entry.get("watched_s", "a number")
        if watched is not None and watched < 0:
            raise entry.fail("watched_s", f"must be >= 0, got {watched}")
        entries.append(WatchedVideo(_video(entry.sub("video", _VIDEO_KEYS)), watched))
    return tuple(entries)


def _survey(f: _Fields) -> tuple[tuple[str, str], ...]:
    pairs = []
    for i, pair in enumerate(f.get("survey", "a list", required=True)):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise f.fail(f"survey[{i}]", f"must be a [label, value] pair of strings, got {pair!r:.60}")
        pairs.append((pair[0], pair[1]))
    return tuple(pairs)


def _slate(f: _Fields) -> tuple[Video, ...]:
    items = f.get("slate", "a list", required=True)
    if not items:
        raise f.fail("slate", "is empty: a decision needs at least one option")
    return tuple(_video(f.sub("slate", _VIDEO_KEYS, item, f"[{i}]")) for i, item in enumerate(items))


def decision_from_dict(obj: Mapping[str, Any], where: str) -> Decision:
    """Parse and check one row of our schema; raises SchemaError naming `where` (file:line) and the field."""
    f = _Fields(obj, where, "", _DECISION_KEYS)
    text = {k: f.get(k, "a string", required=True)
            for k in ("row_id", "issue", "study", "session_id", "initial_viewpoint")}
    step = f.get("step", "an integer", required=True)
    if step < 0:
        raise f.fail("step", f"must be >= 0, got {step}")
    viewer = _viewer(f.sub("viewer", _VIEWER_KEYS))
    current = _video(f.sub("current", _VIDEO_KEYS))
    slate = _slate(f)
    gold = f.get("gold_index", "an integer", required=True)
    if not 1 <= gold <= len(slate):
        raise f.fail("gold_index", f"must be in 1..{len(slate)} (1-based into slate), got {gold}")
    direction = f.get("opinion_direction", "a string")
    if direction is not None and direction not in OPINION_DIRECTIONS:
        raise f.fail("opinion_direction", f"must be one of {OPINION_DIRECTIONS}, got {direction!r}")
    return Decision(
        **text, step=step, viewer=viewer, current=current, history=_history(f), survey=_survey(f),
        slate=slate, gold_index=gold,
        opinion_before=f.get("opinion_before", "a number"), opinion_after=f.get("opinion_after", "a number"),
        opinion_direction=direction, slate_design=f.get("slate_design", "a string"),
        true_choice_probs=_probs(f, "true_choice_probs", len(slate)),
        true_opinion_probs=_probs(f, "true_opinion_probs", len(OPINION_DIRECTIONS)),
    )
