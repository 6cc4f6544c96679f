"""Strict parsers of completions: the viewer answer/opinion, the math answer, and the
original system's looser answer rule (kept only so eval can reproduce its numbers).

Rules shared by every strict parser (tags are the exact lowercase strings `<think>`,
`</think>`, `<answer>`, `</answer>`, `<opinion>`, `</opinion>`):

- A block is usable only when its opening and closing tag each occur exactly once,
  the opening first. Several `<answer>` tags -> unparsed, even if they agree.
- Blocks must not overlap: a block inside (or straddling) another known block is
  nested and unparsed, e.g. an `<answer>` written inside `<think>`.
- Content is stripped of whitespace (spaces, tabs, newlines) and then must match
  exactly:
  * viewer answer: one ASCII integer k with 1 <= k <= n_options ("3", " 3\\n",
    "03" reads as 3). "Option 3", "3 or 4", "3.", "#3", or k out of range -> None.
  * opinion: `increase`, `decrease` or `no_change`, case-insensitive; `no change`
    and `no-change` also mean `no_change` (unambiguous spellings of the same label,
    refusing them would punish wording, not the prediction). Anything else -> None.
  * math answer: any non-empty text (math-verify judges it later).
- Text outside the blocks does not stop parsing (completions often add text after
  the last tag); it only breaks `format_ok`.
- viewer `format_ok`: exactly `<think>..</think><answer>k</answer><opinion>..</opinion>`
  in this order, with only whitespace before, between and after the blocks, and both
  k and the opinion parsed. In the direct layout (`data.layout="direct"`, no reasoning)
  the same without the `<think>` block, and a `<think>` tag anywhere breaks it. math `math_format_ok`: the same with `<think>` and
  `<answer>` only and a non-empty answer.

The original system's rule (`original_answer`): the FIRST `<answer>...</answer>`
(tags case-insensitive) whose whitespace-stripped content is one line without `<`,
read as an optional word "option" followed by an integer (else None); it counted
a row correct when that integer equals the gold index (an integer outside
1..n_options never equals the gold, so the range check it also made changes nothing).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from grailcore.data.schema import OPINION_DIRECTIONS

VIEWER_TAGS: tuple[str, ...] = ("think", "answer", "opinion")
MATH_TAGS: tuple[str, ...] = ("think", "answer")

_INTEGER = re.compile(r"[0-9]+")
_OPINION_ALIASES = {"no change": "no_change", "no-change": "no_change"}
_ORIGINAL_ANSWER = re.compile(r"<answer>\s*([^<\n]+?)\s*</answer>", re.IGNORECASE | re.DOTALL)
_ORIGINAL_PAYLOAD = re.compile(r"\s*(?:option\s*)?(\d+)\s*", re.IGNORECASE)


@dataclass(frozen=True)
class Block:
    """One tag block: `text[start:end]` spans the tags, `content` is what lies between."""

    start: int
    end: int
    content: str


@dataclass(frozen=True)
class ParsedViewer:
    """What a viewer completion commits to; None where the strict rules reject it."""

    answer: int | None
    """1-based option index."""
    opinion: str | None
    """One of OPINION_DIRECTIONS."""
    has_think: bool
    """A usable (unique, not nested) <think> block exists."""
    format_ok: bool
    """The full layout, see the module docstring."""


def _find_block(text: str, tag: str) -> Block | None:
    opening, closing = f"<{tag}>", f"</{tag}>"
    if text.count(opening) != 1 or text.count(closing) != 1:
        return None
    start, close = text.index(opening), text.index(closing)
    if close < start:
        return None
    return Block(start, close + len(closing), text[start + len(opening):close])


def find_blocks(text: str, tags: tuple[str, ...]) -> dict[str, Block | None]:
    """The usable block of each tag: unique, well ordered, overlapping no other block."""
    blocks = {tag: _find_block(text, tag) for tag in tags}
    found = [tag for tag in tags if blocks[tag] is not None]
    nested = set()
    for i, a in enumerate(found):
        for b in found[i + 1:]:
            if blocks[a].start < blocks[b].end and blocks[b].start < blocks[a].end:
                nested.update((a, b))
    return {tag: None if tag in nested else block for tag, block in blocks.items()}


def _only_whitespace_around(text: str, blocks: list[Block]) -> bool:
    """True when the blocks appear in this order with only whitespace outside them."""
    position = 0
    for block in blocks:
        if block.start < position or text[position:block.start].strip():
            return False
        position = block.end
    return not text[position:].strip()


def _parse_index(content: str, n_options: int) -> int | None:
    payload = content.strip()
    if not _INTEGER.fullmatch(payload):
        return None
    index = int(payload)
    return index if 1 <= index <= n_options else None


def _parse_opinion(content: str) -> str | None:
    label = content.strip().lower()
    label = _OPINION_ALIASES.get(label, label)
    return label if label in OPINION_DIRECTIONS else None


def parse_viewer(text: str, n_options: int, layout: str = "think") -> ParsedViewer:
    """Parse a viewer completion under the strict rules of this module; `layout` ('think'
    or 'direct') only decides `format_ok`."""
    if layout not in ("think", "direct"):
        raise ValueError(f"layout must be 'think' or 'direct', got {layout!r}")
    blocks = find_blocks(text, VIEWER_TAGS)
    think, answer_block, opinion_block = (blocks[tag] for tag in VIEWER_TAGS)
    answer = _parse_index(answer_block.content, n_options) if answer_block else None
    opinion = _parse_opinion(opinion_block.content) if opinion_block else None
    format_ok = answer is not None and opinion is not None and (
        think is not None and _only_whitespace_around(text, [think, answer_block, opinion_block])
        if layout == "think" else
        "<think>" not in text and _only_whitespace_around(text, [answer_block, opinion_block]))
    return ParsedViewer(answer=answer, opinion=opinion, has_think=think is not None, format_ok=format_ok)


def extract_answer(text: str) -> str | None:
    """The stripped content of the usable math <answer> block, or None."""
    block = find_blocks(text, MATH_TAGS)["answer"]
    if block is None or not block.content.strip():
        return None
    return block.content.strip()


def math_format_ok(text: str) -> bool:
    """Exactly `<think>..</think><answer>..</answer>` with whitespace only around."""
    blocks = find_blocks(text, MATH_TAGS)
    think, answer = blocks["think"], blocks["answer"]
    if think is None or answer is None or not answer.content.strip():
        return False
    return _only_whitespace_around(text, [think, answer])


def original_answer(text: str) -> int | None:
    """The index the ORIGINAL system read from a completion (see module docstring)."""
    match = _ORIGINAL_ANSWER.search(text)
    if match is None:
        return None
    payload = _ORIGINAL_PAYLOAD.fullmatch(match.group(1))
    return int(payload.group(1)) if payload else None
