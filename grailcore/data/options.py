"""Option text <-> fields: read an option line of a rendered prompt ('TITLE (CHANNEL, Ns long)
— Engagement: views V, likes L, comments C') into its fields, and render a whole slate
again with one rule, so that no option looks different from its siblings.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

UNKNOWN = "unknown"
"""How a missing value is shown ('channel unknown', 'length unknown', 'views unknown')."""
ENGAGEMENT_SEPARATOR = " — Engagement: "
_ENGAGEMENT = re.compile(r"\s*[—–-]+\s*Engagement:\s*", re.IGNORECASE)
_TRAILING_PARENS = re.compile(r"\s*\(([^()]*)\)\s*$")
_DURATION = re.compile(r"^(\d+(\.\d+)?\s*s long|\d+:\d{2}(:\d{2})?)$")
_DURATION_UNKNOWN = f"length {UNKNOWN}"
_CHANNEL_UNKNOWN = f"channel {UNKNOWN}"
# 'views 2,433,982': thousands groups exactly, so the comma before the next pair is not taken.
_COUNT = re.compile(r"([A-Za-z]+)\s*:?\s+(\d{1,3}(?:,\d{3})+(?![\d,]\d)|\d+|unknown)")
_COUNT_GAP = re.compile(r"^\s*,?\s*$")


@dataclass(frozen=True)
class OptionFields:
    """One rendered option, field by field, each value as it was written."""

    title: str
    channel: str | None = None
    """None when the option shows no channel; 'channel unknown' is kept as written."""
    duration: str | None = None
    """'382s long', '6:22' or 'length unknown'; None when not shown."""
    counts: tuple[tuple[str, str], ...] = ()
    """Engagement (name, value) pairs in their written order: ('views', '2,433,982')."""
    unparsed: str = ""
    """Engagement text that is not a 'name value' list (empty when everything was read)."""

    def carried(self) -> tuple[str, ...]:
        """Names of the fields this option shows with a known value (its rendering, minus
        fields shown as 'unknown', which look present but carry nothing)."""
        names = []
        if self.channel is not None and self.channel != _CHANNEL_UNKNOWN:
            names.append("channel")
        if self.duration is not None and self.duration != _DURATION_UNKNOWN:
            names.append("duration")
        names += [name for name, value in self.counts if value != UNKNOWN]
        return tuple(names)

    def signature(self) -> tuple[str, ...]:
        """Every field shown, an 'unknown' one as 'name?' (sorted): how the option looks."""
        shown = set(self.carried())
        if self.channel == _CHANNEL_UNKNOWN:
            shown.add("channel?")
        if self.duration == _DURATION_UNKNOWN:
            shown.add("duration?")
        shown |= {f"{name}?" for name, value in self.counts if value == UNKNOWN}
        return tuple(sorted(shown))

    def count(self, name: str) -> int | None:
        """The integer value of engagement count `name` (None when absent or unknown)."""
        value = dict(self.counts).get(name)
        return int(value.replace(",", "")) if value is not None and value != UNKNOWN else None


def parse_option_fields(text: str) -> OptionFields:
    """Fields of one option's text (without its 'k. ' number). Never raises: what cannot be
    read as engagement counts is kept in `unparsed` for the caller to judge."""
    text = text.strip()
    match = _ENGAGEMENT.search(text)
    head, engagement = (text[: match.start()], text[match.end():]) if match else (text, "")
    channel, duration = None, None
    title = head.strip()
    parens = _TRAILING_PARENS.search(title)
    if parens:
        parts = [p.strip() for p in parens.group(1).split(",") if p.strip()]
        durations = [p for p in parts if _DURATION.match(p) or p == _DURATION_UNKNOWN]
        others = [p for p in parts if p not in durations]
        if len(durations) <= 1 and parts:
            duration = durations[0] if durations else None
            channel = ", ".join(others) if others else None
            title = title[: parens.start()].strip()
    counts, unparsed, position = [], [], 0
    for found in _COUNT.finditer(engagement):
        if not _COUNT_GAP.match(engagement[position:found.start()]):
            unparsed.append(engagement[position:found.start()].strip(" ,"))
        counts.append((found.group(1).lower(), found.group(2)))
        position = found.end()
    if engagement[position:].strip(" ,"):
        unparsed.append(engagement[position:].strip(" ,"))
    return OptionFields(title, channel, duration, tuple(counts), " ".join(unparsed))


def unreadable(fields: OptionFields) -> str | None:
    """Why re-rendering `fields` would lose text (None when it would not)."""
    if not fields.title:
        return "no title before its fields"
    if fields.unparsed:
        return f"engagement text {fields.unparsed!r:.60} is not a 'name value' list"
    names = [name for name, _ in fields.counts]
    if len(set(names)) != len(names):
        return f"engagement count(s) {sorted({n for n in names if names.count(n) > 1})} appear twice"
    return None


_META = frozenset({"channel", "duration"})


def common_fields(slate: list[OptionFields]) -> tuple[str, ...]:
    """The fields every option of the slate carries with a known value, in the first
    option's order: the one rendering rule of that slate. Channel and duration share one
    trailing parenthetical, which a title can end with too ('... (Full Segment)'): they are
    kept only when every option's parenthetical holds the same of them, so a bare title's
    own parenthetical never passes for a channel beside real ones."""
    if not slate:
        return ()
    shared = set(slate[0].carried())
    for option in slate[1:]:
        shared &= set(option.carried())
    if len({frozenset(option.carried()) & _META for option in slate}) > 1:
        shared -= _META
    return tuple(name for name in slate[0].carried() if name in shared)


def render_option(fields: OptionFields, keep: tuple[str, ...]) -> str:
    """`fields` rendered showing exactly the fields named in `keep` (title always)."""
    meta = [value for name, value in (("channel", fields.channel), ("duration", fields.duration))
            if name in keep and value is not None]
    counts = dict(fields.counts)
    shown = [f"{name} {counts[name]}" for name in keep if name in counts]
    if meta:
        text = f"{fields.title} ({', '.join(meta)})"
    else:
        # A title's own trailing '(Full Segment)' would read as a channel once the real one
        # is gone, and only bare-titled options (the appended gold) would lack it: drop it.
        text = fields.title
        while (parens := _TRAILING_PARENS.search(text)) and text[: parens.start()].strip():
            text = text[: parens.start()].strip()
    return text + ENGAGEMENT_SEPARATOR + ", ".join(shown) if shown else text
