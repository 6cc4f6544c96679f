"""Hand-made viewer examples for the evaluation tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from grailcore.data.schema import Example


def example(i: int, gold: int, n: int, *, viewer: str | None = None, opinion: str | None = None,
            issue: str = "gun_control", study: str = "study1", option_texts: tuple[str, ...] = (),
            true_probs: tuple[float, ...] | None = None,
            true_opinion: tuple[float, float, float] | None = None) -> Example:
    return Example(
        example_id=f"row{i}", task="viewer", messages=({"role": "user", "content": f"prompt {i}"},),
        gold_index=gold, n_options=n, opinion_direction=opinion, option_texts=option_texts,
        true_choice_probs=true_probs, true_opinion_probs=true_opinion, issue=issue, study=study,
        viewer_id=viewer,
    )


def completion(answer: int | str, opinion: str | None = "no_change") -> str:
    tail = f"<opinion>{opinion}</opinion>" if opinion else ""
    return f"<think>because</think><answer>{answer}</answer>{tail}"


REPO = Path(__file__).resolve().parents[2]
SEED_CANDIDATES = (REPO.parent / "shared" / "data" / "seed_prompts_sample.jsonl",  # CI: ../shared beside the repo
                   REPO / "tests" / "rewards" / "data" / "seed_prompts_sample.jsonl")  # the repo's copy


def seed_sample() -> Path:
    for path in SEED_CANDIDATES:
        if path.is_file():
            return path
    pytest.skip(f"seed sample not found at {[str(p) for p in SEED_CANDIDATES]}")
