"""Rule rewards of the viewer task: which option was watched next, where the opinion
moved, and whether the completion keeps the answer layout. Each is in [0, 1].
"""

from __future__ import annotations

from grailcore.data.schema import Example
from grailcore.rewards.parsing import VIEWER_TAGS, ParsedViewer, parse_viewer
from grailcore.rewards.registry import register

_TAG_STRINGS = {layout: tuple(s for tag in VIEWER_TAGS[layout == "direct":] for s in (f"<{tag}>", f"</{tag}>"))
                for layout in ("think", "direct")}
"""The tags of each layout (the direct one has no <think>)."""


def _parse(example: Example, completion: str) -> ParsedViewer:
    if example.n_options is None or example.gold_index is None:
        raise ValueError(
            f"example {example.example_id!r}: viewer rewards need 'gold_index' and 'n_options', "
            f"got {example.gold_index} and {example.n_options}"
        )
    return parse_viewer(completion, example.n_options, example.meta.get("layout", "think"))


def committed_answer(example: Example, completion: str) -> int | None:
    """The option a viewer completion commits to in its example's full answer layout, else
    None (a dodge: no parsable answer, or a broken layout)."""
    parsed = _parse(example, completion)
    return parsed.answer if parsed.format_ok else None


@register("option_accuracy", task="viewer")
def option_accuracy(example: Example, completion: str) -> float:
    """1 when the parsed option equals the gold option."""
    return float(_parse(example, completion).answer == example.gold_index)


@register("opinion_accuracy", task="viewer")
def opinion_accuracy(example: Example, completion: str) -> float:
    """1 when the parsed opinion equals the gold direction; 0 when the row has none
    (no signal then: the whole group scores the same)."""
    if example.opinion_direction is None:
        return 0.0
    return float(_parse(example, completion).opinion == example.opinion_direction)


@register("slate_accuracy", task="viewer")
def slate_accuracy(example: Example, completion: str) -> float:
    """0.5 for the right option + 0.5 for the right opinion direction.

    Rows without a gold opinion (the original data) score the option alone on 0..1,
    so the reward keeps the same range on both kinds of rows.
    """
    parsed = _parse(example, completion)
    option = float(parsed.answer == example.gold_index)
    if example.opinion_direction is None:
        return option
    return 0.5 * option + 0.5 * float(parsed.opinion == example.opinion_direction)


@register("format", task="viewer")
def format_reward(example: Example, completion: str) -> float:
    """1 for the exact layout `<think>..</think><answer>k</answer><opinion>..</opinion>`
    (`<answer>k</answer><opinion>..</opinion>` for rows rendered with data.layout='direct')."""
    return float(_parse(example, completion).format_ok)


@register("tag_count", task="viewer")
def tag_count(example: Example, completion: str) -> float:
    """1/6 for each of the six tag strings that occurs exactly once (missing and
    repeated tags both cost), a denser signal than `format` early in training; 1/4 for
    each of the direct layout's four."""
    tags = _TAG_STRINGS[example.meta.get("layout", "think")]
    return sum(completion.count(s) == 1 for s in tags) / len(tags)
