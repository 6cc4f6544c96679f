"""Hand-made viewer examples with a real OPTIONS block, and fake models, for the
order-robustness and population tests."""

from __future__ import annotations

from grailcore.data.schema import Example
from grailcore.evaluation.order import options_block

from .helpers import completion


def viewer_example(i: int, gold: int, n: int = 4, *, viewer: str | None = None, opinion: str | None = None,
                   viewpoint: str = "Supports a handgun ban", stances: tuple[float, ...] | None = None,
                   meta: dict | None = None, issue: str = "gun_control", study: str = "study1") -> Example:
    texts = tuple(f"Video {i}-{k} (Channel {k}, 100s long) — Engagement: views {k}0" for k in range(1, n + 1))
    state = f"VIEWER 30-year-old woman.\nInitial Viewpoint: {viewpoint}\n\nCURRENTLY WATCHING X (from Y)"
    prompt = f"{state}\n\nOPTIONS\n{options_block(texts)}\n\nQUESTIONS\n1. Which option number?"
    extra = dict(meta or {})
    if stances is not None:
        extra["option_stances"] = stances
    return Example(example_id=f"row{i}", task="viewer", messages=({"role": "user", "content": prompt},),
                   gold_index=gold, n_options=n, opinion_direction=opinion, option_texts=texts, state_text=state,
                   issue=issue, study=study, viewer_id=viewer or f"v{i // 2}", meta=extra)


def always_first(example: Example) -> list[str]:
    """A position-biased fake: answers option 1 whatever is shown."""
    return [completion(1)]


def follows_content(example: Example) -> list[str]:
    """A content-following fake: picks the gold video wherever it is shown."""
    return [completion(example.gold_index)]
