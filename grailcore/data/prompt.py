"""Render a `Decision` into the seed study's prompt format (an `Example`), and encode it
with a tokenizer's chat template. Only information from before the decision is rendered.
"""

from __future__ import annotations

import random
from typing import Any, Sequence

from grailcore.data.schema import Decision, Example, Video, Viewer, WatchedVideo

DEFAULT_SYSTEM_PROMPT = (
    "You simulate a survey participant on a YouTube-like platform. From the viewer's profile, "
    "what they are watching now, what they watched before and the recommended options, predict "
    "which option they will watch next and how their opinion on the issue will move.\n"
    "Think briefly, then answer exactly in this format:\n"
    "<think>...</think><answer>k</answer><opinion>increase|decrease|no_change</opinion>\n"
    "where k is the option number."
)
DIRECT_SYSTEM_PROMPT = (
    "You simulate a survey participant on a YouTube-like platform. From the viewer's profile, "
    "what they are watching now, what they watched before and the recommended options, predict "
    "which option they will watch next and how their opinion on the issue will move.\n"
    "Answer at once, exactly in this format and nothing else:\n"
    "<answer>k</answer><opinion>increase|decrease|no_change</opinion>\n"
    "where k is the option number."
)
LAYOUT_SYSTEM_PROMPTS = {"think": DEFAULT_SYSTEM_PROMPT, "direct": DIRECT_SYSTEM_PROMPT}
"""The default system prompt of each answer layout (`data.layout`)."""
UNKNOWN = "unknown"
"""How a missing field is shown, the same way for every option and history entry."""


def issue_label(issue: str) -> str:
    """'gun_control' -> 'Gun control', as the seed prompts name the issue."""
    return issue.replace("_", " ").capitalize()


def viewer_line(viewer: Viewer) -> str:
    """'34-year-old, Black ... man; independent conservative; $50,000-$59,999; college-educated; watches ...'."""
    who = ", ".join(p for p in (f"{viewer.age}-year-old" if viewer.age is not None else None,
                                " ".join(p for p in (viewer.race, viewer.gender) if p)) if p)
    politics = " ".join(p for p in (viewer.party, viewer.ideology) if p).lower()
    habit = f"watches YouTube {viewer.youtube_frequency}" if viewer.youtube_frequency else ""
    parts = [p for p in (who, politics, viewer.income, viewer.education, habit) if p]
    return "; ".join(parts) + "." if parts else "no profile recorded."


def survey_sentence(survey: Sequence[tuple[str, str]]) -> str:
    """'label is value' phrases joined as a sentence; a label holding '{}' is a template for its value."""
    phrases = [label.replace("{}", value) if "{}" in label else f"{label} is {value}" for label, value in survey]
    if not phrases:
        return "none recorded."
    if len(phrases) == 1:
        return phrases[0] + "."
    return ", ".join(phrases[:-1]) + ", and " + phrases[-1] + "."


def _seconds(value: float | None) -> str:
    return f"{value:.0f}s" if value is not None else f"{UNKNOWN} length"


def history_line(entry: WatchedVideo) -> str:
    """'TITLE (watched Xs of Ys (Z% complete), from CHANNEL)'."""
    v, watched = entry.video, entry.watched_s
    if watched is not None and v.duration_s:
        progress = f"watched {watched:.0f}s of {v.duration_s:.0f}s ({round(100 * watched / v.duration_s)}% complete)"
    elif watched is not None:
        progress = f"watched {watched:.0f}s of {UNKNOWN} length"
    else:
        progress = f"watch time {UNKNOWN}"
    return f"{v.title} ({progress}, from {v.channel or f'channel {UNKNOWN}'})"


def _count(value: int | None) -> str:
    return f"{value:,}" if value is not None else UNKNOWN


def option_text(video: Video, show_ids: bool = False) -> str:
    """'TITLE (CHANNEL, Ns long) — Engagement: views V, likes L, comments C'; every option gets every field."""
    title = f"{video.title} [id {video.video_id}]" if show_ids else video.title
    duration = f"{video.duration_s:.0f}s long" if video.duration_s is not None else f"length {UNKNOWN}"
    return (f"{title} ({video.channel or f'channel {UNKNOWN}'}, {duration}) — Engagement: "
            f"views {_count(video.views)}, likes {_count(video.likes)}, comments {_count(video.comments)}")


def state_text(decision: Decision, max_history: int = 12) -> str:
    """VIEWER .. SURVEY HIGHLIGHTS: what was known before the decision (history strictly before
    the current video, pre-treatment survey; never the choice or the opinion after it)."""
    shown = decision.history[-max_history:] if max_history > 0 else decision.history
    history = "\n".join(f"{i}. {history_line(h)}" for i, h in enumerate(shown, 1)) or "(none yet)"
    current = decision.current
    return (
        f"VIEWER {viewer_line(decision.viewer)}\n"
        f"Initial Viewpoint: {decision.initial_viewpoint}\n\n"
        f"CURRENTLY WATCHING {current.title} (from {current.channel or f'channel {UNKNOWN}'})\n\n"
        f"RECENTLY WATCHED (NEWEST LAST)\n{history}\n\n"
        f"SURVEY HIGHLIGHTS\n{survey_sentence(decision.survey)}"
    )


def questions_text(issue: str) -> str:
    return ("QUESTIONS\n1. Which option number will the viewer watch next?\n"
            f"2. After this recommendation, will the viewer's opinion on {issue_label(issue)} "
            "increase, decrease, or stay the same?")


def option_order(row_id: str, n: int, seed: int, shuffle: bool) -> list[int]:
    """Stored slate index shown at each position; seeded by (seed, row_id) so a row always gets the same order."""
    order = list(range(n))
    if shuffle:
        random.Random(f"grailcore-options:{seed}:{row_id}").shuffle(order)
    return order


def build_example(decision: Decision, *, max_history: int = 12, show_ids: bool = False,
                  shuffle_options: bool = True, seed: int = 0, system_prompt: str | None = None,
                  source: str = "", layout: str = "think") -> Example:
    """The prompt a model sees for `decision`, with gold index and true probabilities in the SHOWN
    order; `layout` picks the default system prompt and is kept in meta['layout'] for rewards."""
    order = option_order(decision.row_id, decision.n_options, seed, shuffle_options)
    options = tuple(option_text(decision.slate[i], show_ids) for i in order)
    state = state_text(decision, max_history)
    options_block = "\n".join(f"{k}. {text}" for k, text in enumerate(options, 1))
    prompt = f"{state}\n\nOPTIONS\n{options_block}\n\n{questions_text(decision.issue)}"
    probs = decision.true_choice_probs
    return Example(
        example_id=decision.row_id, task="viewer",
        messages=({"role": "system", "content": system_prompt or LAYOUT_SYSTEM_PROMPTS[layout]},
                  {"role": "user", "content": prompt}),
        gold_index=order.index(decision.gold_index - 1) + 1, n_options=decision.n_options,
        opinion_direction=decision.opinion_direction, option_texts=options, state_text=state,
        true_choice_probs=tuple(probs[i] for i in order) if probs is not None else None,
        true_opinion_probs=decision.true_opinion_probs, issue=decision.issue, study=decision.study,
        viewer_id=decision.viewer.viewer_id, source=source,
        meta={"session_id": decision.session_id, "step": decision.step, "slate_design": decision.slate_design,
              "shown_order": tuple(order), "option_stances": tuple(decision.slate[i].stance for i in order),
              "viewer_ideology": decision.viewer.ideology, "initial_viewpoint": decision.initial_viewpoint,
              "layout": layout},
    )


def encode_prompt(tokenizer: Any, example: Example) -> list[int]:
    """Token ids of the example's chat messages plus the assistant turn's start."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', type(tokenizer).__name__)!r} has no chat template: "
            "use an instruct/chat model's tokenizer, or set `tokenizer.chat_template` to a Jinja template "
            "before encoding prompts"
        )
    messages = [dict(m) for m in example.messages]
    # return_dict=False: transformers 5 returns a BatchEncoding by default.
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                              return_dict=False))
