"""Strict viewer/math parsers and the original system's answer rule."""

import json
from pathlib import Path

import pytest

from grailcore.rewards.parsing import (
    ParsedViewer,
    extract_answer,
    math_format_ok,
    original_answer,
    parse_viewer,
)

SEED_SAMPLE = Path(__file__).parent / "data" / "seed_prompts_sample.jsonl"
"""Copy of six real validation rows of the original study with the original model's
completions (shared/data/seed_prompts_sample.jsonl)."""

GOOD = "<think>She likes long videos.</think><answer>3</answer><opinion>increase</opinion>"


def test_full_layout_parses():
    assert parse_viewer(GOOD, 4) == ParsedViewer(answer=3, opinion="increase", has_think=True, format_ok=True)


def test_whitespace_and_newlines_inside_and_between_tags():
    text = "\n<think>\nhm\n</think>\n\n<answer> 3\n</answer>\n<opinion>\n Increase \n</opinion>\n"
    assert parse_viewer(text, 4) == ParsedViewer(answer=3, opinion="increase", has_think=True, format_ok=True)


@pytest.mark.parametrize("content", ["Option 3", "3 or 4", "3.", "#3", "three", "", "3 3", "-3", "+3", "3/4"])
def test_answer_must_be_exactly_one_integer(content):
    parsed = parse_viewer(f"<think>x</think><answer>{content}</answer><opinion>increase</opinion>", 4)
    assert parsed.answer is None
    assert not parsed.format_ok
    assert parsed.opinion == "increase"  # the other blocks still parse


@pytest.mark.parametrize("index, expected", [(0, None), (1, 1), (4, 4), (5, None), (40, None)])
def test_answer_range_is_1_to_n_options(index, expected):
    assert parse_viewer(f"<answer>{index}</answer>", 4).answer == expected


def test_leading_zero_reads_as_integer():
    assert parse_viewer("<answer>03</answer>", 4).answer == 3


def test_several_answers_are_unparsed_even_when_they_agree():
    assert parse_viewer("<answer>3</answer> so <answer>3</answer>", 4).answer is None
    assert parse_viewer("<answer>3</answer><answer>1</answer>", 4).answer is None


def test_nested_blocks_are_unparsed():
    inside_think = parse_viewer("<think>maybe <answer>3</answer></think><opinion>decrease</opinion>", 4)
    assert inside_think.answer is None and not inside_think.has_think
    assert inside_think.opinion == "decrease"
    assert parse_viewer("<answer><answer>3</answer></answer>", 4).answer is None
    straddling = parse_viewer("<answer>3<opinion></answer>increase</opinion>", 4)
    assert straddling.answer is None and straddling.opinion is None


def test_missing_or_reversed_tags():
    assert parse_viewer("<answer>3", 4).answer is None
    assert parse_viewer("3</answer>", 4).answer is None
    assert parse_viewer("</answer>3<answer>", 4).answer is None
    no_opinion = parse_viewer("<think>x</think><answer>3</answer>", 4)
    assert no_opinion.answer == 3 and no_opinion.opinion is None and not no_opinion.format_ok
    no_think = parse_viewer("<answer>3</answer><opinion>increase</opinion>", 4)
    assert not no_think.has_think and not no_think.format_ok and no_think.answer == 3


def test_text_outside_blocks_keeps_the_parse_but_breaks_format():
    after = parse_viewer(GOOD + "\nI hope this helps!", 4)
    assert after.answer == 3 and after.opinion == "increase" and not after.format_ok
    before = parse_viewer("Sure. " + GOOD, 4)
    assert before.answer == 3 and not before.format_ok
    between = parse_viewer("<think>x</think>so<answer>3</answer><opinion>increase</opinion>", 4)
    assert not between.format_ok


def test_format_needs_the_order_think_answer_opinion():
    text = "<answer>3</answer><think>x</think><opinion>increase</opinion>"
    assert not parse_viewer(text, 4).format_ok


def test_format_needs_a_valid_answer_and_opinion():
    assert not parse_viewer(GOOD.replace(">3<", ">9<"), 4).format_ok
    assert not parse_viewer(GOOD.replace("increase", "up"), 4).format_ok


@pytest.mark.parametrize("content, expected", [
    ("increase", "increase"), ("DECREASE", "decrease"), ("no_change", "no_change"),
    ("No Change", "no_change"), ("no-change", "no_change"), (" no_change\n", "no_change"),
    ("unchanged", None), ("increased", None), ("increase or decrease", None), ("no  change", None), ("", None),
])
def test_opinion_labels(content, expected):
    assert parse_viewer(f"<opinion>{content}</opinion>", 4).opinion == expected


def test_math_extract_answer():
    assert extract_answer("<think>a</think><answer> \\frac{1}{2}\n</answer>") == "\\frac{1}{2}"
    assert extract_answer("<think>a</think><answer>x < 3</answer> done") == "x < 3"
    assert extract_answer("the answer is 5") is None
    assert extract_answer("<answer>  </answer>") is None
    assert extract_answer("<answer>1</answer><answer>2</answer>") is None
    assert extract_answer("<think><answer>2</answer></think>") is None


def test_math_format():
    assert math_format_ok("<think>\nwork\n</think>\n<answer>\n2\n</answer>\n")
    assert not math_format_ok("<think>work</think><answer>2</answer> extra")
    assert not math_format_ok("<think>work</think><answer>2</answer><opinion>increase</opinion>")
    assert not math_format_ok("<think>work</think><answer> </answer>")
    assert not math_format_ok("<answer>2</answer>")


@pytest.mark.parametrize("text, expected", [
    ("<answer>\n5\n</answer>", 5),
    ("<answer>Option 3</answer>", 3),
    ("<ANSWER> option 4 </ANSWER>", 4),
    ("<answer>2</answer><answer>3</answer>", 2),
    ("<answer>3 or 4</answer>", None),
    ("<answer>3.</answer>", None),
    ("no tags 3", None),
])
def test_original_answer_rule(text, expected):
    assert original_answer(text) == expected


def _seed_rows():
    return [json.loads(line) for line in SEED_SAMPLE.read_text().splitlines()]


def test_original_rule_on_the_seed_sample():
    rows = _seed_rows()
    answers = [original_answer(row["example_completion"]) for row in rows]
    assert answers == [5, 2, 2, 1, 1, 1]
    correct = [answer == row["gold_index"] for answer, row in zip(answers, rows)]
    # The three gun rows are right (gold = last option), the wage rows answered 1.
    assert correct == [True, True, True, False, False, False]


def test_strict_parser_on_the_seed_sample():
    for row in _seed_rows():
        parsed = parse_viewer(row["example_completion"], row["n_options"])
        assert parsed.answer == original_answer(row["example_completion"])
        assert parsed.has_think and parsed.opinion is None and not parsed.format_ok


def test_direct_layout_format_has_no_think_block():
    direct = "<answer>3</answer>\n<opinion>no change</opinion>"
    assert parse_viewer(direct, 4, "direct") == ParsedViewer(answer=3, opinion="no_change", has_think=False,
                                                             format_ok=True)
    assert not parse_viewer(direct, 4).format_ok  # the think layout still needs its <think>
    assert not parse_viewer(GOOD, 4, "direct").format_ok  # reasoning breaks the direct layout
    assert not parse_viewer("<think><answer>3</answer><opinion>increase</opinion>", 4, "direct").format_ok
    assert not parse_viewer("<answer>3</answer><opinion>increase</opinion> ok", 4, "direct").format_ok
    assert parse_viewer(GOOD, 4, "direct").answer == 3  # the parse itself does not depend on the layout
    with pytest.raises(ValueError, match="layout"):
        parse_viewer(GOOD, 4, "terse")
