"""SFT targets: the rationale template's placeholders are filled from what the row shows."""

from __future__ import annotations

import pytest

from grailcore.config import Config, ConfigError, SFTConfig, validate
from grailcore.data.schema import Example
from grailcore.sft import option_sides, sft_target


TITLES = ("Why America Needs Red Flag Laws", "Would Magazine Limits Actually Work? (Full Segment)",
          "Gun Laws in Ohio, Explained | Open Forum", "Thoughts and Prayers Aren't Working")


def _row(stances=(0.7, -0.3, 0.05, 0.16), gold=2, ideology="Liberal") -> Example:
    meta = {"viewer_ideology": ideology}
    if stances is not None:
        meta.update(option_stances=stances, option_titles=TITLES)
    return Example(example_id="r7", task="viewer", messages=({"role": "user", "content": "..."},),
                   gold_index=gold, n_options=4, opinion_direction="no_change", source="unit", meta=meta)


def test_synthetic_rows_carry_titles_and_stances_in_shown_order():
    from grailcore.config import DataConfig
    from grailcore.data import load_examples

    for ex in load_examples("synthetic:gun_control", DataConfig(synthetic_n=60)).examples[:20]:
        assert len(ex.meta["option_titles"]) == len(ex.meta["option_stances"]) == ex.n_options
        for title, text in zip(ex.meta["option_titles"], ex.option_texts):
            assert text.startswith(title + " (")


def test_sides_follow_the_stances_with_a_neutral_band():
    assert option_sides(_row()) == "for 1, 4; against 2; neutral 3"
    assert option_sides(_row(stances=(-0.15, 0.15, -0.16))) == "for none; against 3; neutral 1, 2"


def test_target_fills_every_placeholder():
    text = sft_target(_row(), "Viewer: {ideology}. Options: {sides}. Next: {title}. Pick {answer}.")
    assert text == ("<think>\nViewer: Liberal. Options: for 1, 4; against 2; neutral 3. "
                    f"Next: {TITLES[1]}. Pick 2.\n</think>\n"
                    "<answer>2</answer><opinion>no_change</opinion>")


def test_default_rationale_needs_no_stances():
    assert "<answer>3</answer>" in sft_target(_row(stances=None, gold=3), SFTConfig().rationale)


def test_sides_without_stances_names_the_row_and_the_fix():
    with pytest.raises(ValueError, match=r"'r7' \(unit\).*option_stances.*\{sides\}: drop it"):
        sft_target(_row(stances=None), "Options: {sides}.")
    with pytest.raises(ValueError, match=r"option_titles.*\{title\}"):
        sft_target(_row(stances=None), "Next: {title}.")


@pytest.mark.parametrize("rationale, message", [
    ("Pick {choice}.", r"unknown placeholder\(s\) \['choice'\]"),
    ("Pick {answer.", "not a valid format template"),
])
def test_bad_rationale_fails_at_start(rationale, message):
    with pytest.raises(ConfigError, match=message):
        validate(Config(sft=SFTConfig(rationale=rationale)))
