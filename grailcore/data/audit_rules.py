"""The trivial rules of the leak audit: each picks, per slate, the options a predictor that
never looks at the viewer would choose (position, rendering, already-seen titles, views)."""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Callable, Sequence

from grailcore.data.options import parse_option_fields

MIN_TITLE_CHARS = 12
"""Shorter titles match history text by accident too often to count as 'already seen'."""
_NUMBER_PREFIX = re.compile(r"^\s*\d+[.)]\s+")


@dataclass(frozen=True)
class RenderedOption:
    """What an option's text shows: its fields (the rendering signature), title and views."""

    title: str
    signature: tuple[str, ...]
    views: int | None


def parse_option(text: str) -> RenderedOption:
    """Split a rendered option into title, rendering signature and view count. A field
    rendered as 'unknown' (e.g. 'channel unknown', 'views unknown') enters the signature
    as 'channel?' / 'views?': it looks different from a known value, but carries none."""
    fields = parse_option_fields(_NUMBER_PREFIX.sub("", text.strip()))
    return RenderedOption(title=fields.title, signature=fields.signature(), views=fields.count("views"))


# A rule names, per example, the 1-based options it would pick; an empty tuple means
# "no idea" and earns the expected credit of a random pick, so fallbacks never borrow
# accuracy from another rule (e.g. a first-position bias).
Candidates = tuple[int, ...]


@dataclass(frozen=True)
class Row:
    """One audited example: gold position, slate size, parsed options and viewer state."""

    gold: int
    n: int
    options: tuple[RenderedOption, ...]
    state: str
    cluster: str
    """Viewer id, or the example id when there is none (the row then stands alone)."""
    has_viewer: bool
    group: str


def credit(row: Row, picks: Candidates) -> float:
    """1 for a gold pick, 1/k for a k-way tie holding it, 1/n for an abstention (or all options)."""
    if not picks or len(picks) == row.n:
        return 1.0 / row.n
    return (row.gold in picks) / len(picks)


def _always_first(rows: Sequence[Row]) -> tuple[list[Candidates], str]:
    return [(1,) for _ in rows], ""


def _always_last(rows: Sequence[Row]) -> tuple[list[Candidates], str]:
    return [(r.n,) for r in rows], ""


def _modes(counts: Counter, n: int) -> Candidates:
    if sum(counts.values()) == 0:
        return ()
    best = max(counts[p] for p in range(1, n + 1))
    return tuple(p for p in range(1, n + 1) if counts[p] == best)


def _modal_position(rows: Sequence[Row]) -> tuple[list[Candidates], str]:
    """Most frequent gold position per slate size, scored leave-one-out so that fitting
    on the audited rows does not flatter it (with few rows per size it otherwise would)."""
    counts: dict[int, Counter] = defaultdict(Counter)
    for r in rows:
        counts[r.n][r.gold] += 1
    picks = []
    for r in rows:
        counts[r.n][r.gold] -= 1
        picks.append(_modes(counts[r.n], r.n))
        counts[r.n][r.gold] += 1
    fit = ", ".join(f"n={n}->{'/'.join(map(str, _modes(c, n)))}" for n, c in sorted(counts.items()))
    return picks, fit


def _unique_signature_picks(row: Row, fewest: bool) -> Candidates:
    seen = Counter(o.signature for o in row.options)
    unique = [i + 1 for i, o in enumerate(row.options) if seen[o.signature] == 1]
    if not unique:
        return ()
    # Unknown-valued fields ('views?') do not count: they show no information.
    sizes = {i: sum(not f.endswith("?") for f in row.options[i - 1].signature) for i in unique}
    target = min(sizes.values()) if fewest else max(sizes.values())
    return tuple(i for i in unique if sizes[i] == target)


def _odd_rendering(rows: Sequence[Row]) -> tuple[list[Candidates], str]:
    """The option whose rendering signature is unique in its slate. When several are
    unique (always so in a 2-option slate) pick the one with the fewest fields or the
    most, a direction fitted leave-one-out; ties in the fit go to 'fewest' (the known
    flaw: the clicked video appended without channel and duration)."""
    few = [_unique_signature_picks(r, True) for r in rows]
    many = [_unique_signature_picks(r, False) for r in rows]
    credit_few = [credit(r, p) for r, p in zip(rows, few)]
    credit_many = [credit(r, p) for r, p in zip(rows, many)]
    total_few, total_many = sum(credit_few), sum(credit_many)
    picks = [
        f if total_few - cf >= total_many - cm else m
        for f, m, cf, cm in zip(few, many, credit_few, credit_many)
    ]
    if not any(few):
        return picks, "no slate has a uniquely rendered option"
    return picks, "fewest fields" if total_few >= total_many else "most fields"


def _seen_in_state(rows: Sequence[Row]) -> tuple[list[Candidates], str]:
    """Options whose title already appears in the viewer state (current video, history):
    a clicked video showing up there is post-decision information."""
    picks = []
    for r in rows:
        titles = [o.title.rstrip(". …") for o in r.options]
        picks.append(tuple(
            i + 1 for i, t in enumerate(titles) if len(t) >= MIN_TITLE_CHARS and t in r.state
        ))
    return picks, ""


def _most_viewed(rows: Sequence[Row]) -> tuple[list[Candidates], str]:
    picks = []
    for r in rows:
        views = [o.views for o in r.options]
        if not r.options or any(v is None for v in views):
            picks.append(())
            continue
        top = max(views)
        picks.append(tuple(i + 1 for i, v in enumerate(views) if v == top))
    return picks, ""


RuleFn = Callable[[Sequence[Row]], tuple[list[Candidates], str]]
RULES: tuple[tuple[str, str, RuleFn], ...] = (
    ("always_first", "artifact", _always_first),
    ("always_last", "artifact", _always_last),
    ("modal_position", "artifact", _modal_position),
    ("odd_rendering", "artifact", _odd_rendering),
    ("seen_in_state", "artifact", _seen_in_state),
    ("most_viewed", "content", _most_viewed),
)
"""(name, kind, rule). 'artifact' rules exploit how the data was made and decide the
verdict; 'content' rules use a real signal (popularity) and are a baseline to beat."""
