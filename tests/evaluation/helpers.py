"""Hand-made viewer examples for the evaluation tests."""

from __future__ import annotations

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
