"""Writes fixtures/gun_flaw_200.jsonl: pre-rendered prompt rows in the seed sample's format
with the original gun study's flaw, built from synthetic decisions. The clicked video is
appended last to the slate and rendered without channel, duration and comments, as in
the original files (see the shared data README). Regenerate with
`python tests/data/gun_flaw_fixture.py`; test_training_audit checks the file matches."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from grailcore.data.prompt import option_text, questions_text, state_text
from grailcore.data.schema import Decision
from grailcore.data.synth import generate_study

FIXTURE = Path(__file__).parent / "fixtures" / "gun_flaw_200.jsonl"
ROWS = 200


def flawed_row(d: Decision) -> dict:
    """The decision rendered as the original system did: other options in stored order,
    then the clicked video, bare."""
    gold = d.slate[d.gold_index - 1]
    others = [option_text(v) for k, v in enumerate(d.slate, 1) if k != d.gold_index]
    appended = f"{gold.title} — Engagement: views {gold.views:,}, likes {gold.likes:,}"
    options = "\n".join(f"{k}. {text}" for k, text in enumerate([*others, appended], 1))
    prompt = f"{state_text(d, max_history=2)}\n\nOPTIONS\n{options}\n\n{questions_text(d.issue)}"
    return {"prompt": prompt, "gold_index": d.n_options, "n_options": d.n_options, "issue": d.issue,
            "study": "study1", "opinion_direction": d.opinion_direction}


def fixture_text(n: int = ROWS) -> str:
    decisions = generate_study("gun_control", 400, seed=5)[:n]
    return "".join(json.dumps(flawed_row(d), ensure_ascii=False) + "\n" for d in decisions)


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else FIXTURE
    out.write_text(fixture_text(), encoding="utf-8")
    print(f"wrote {ROWS} rows to {out}")
