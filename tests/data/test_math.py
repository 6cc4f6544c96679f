"""Tests of grailcore/data/math.py: generator determinism and correctness (answers are
recomputed here from the problem text alone), R1 examples, loader errors and the CLI."""

from __future__ import annotations

import json
import math
import re
from fractions import Fraction

import datasets
import pytest

from grailcore.data.math import (
    DEFAULT_KINDS, GENERATORS, R1_SYSTEM_PROMPT, generate_math, latex_number, load_math, main,
    math_examples,
)
from grailcore.data.schema import SchemaError, validate_example

ALL_KINDS = tuple(GENERATORS)


def parse_answer_number(text: str) -> Fraction:
    """Read `7`, `-3`, `\\frac{3}{4}`, `-\\frac{5}{2}`; reject unreduced or improper LaTeX."""
    if re.fullmatch(r"-?\d+", text):
        return Fraction(int(text))
    match = re.fullmatch(r"(-?)\\frac\{(\d+)\}\{(\d+)\}", text)
    assert match, f"not a LaTeX number: {text!r}"
    num, den = int(match.group(2)), int(match.group(3))
    assert den > 1 and math.gcd(num, den) == 1, f"not in lowest terms: {text!r}"
    return Fraction(-num if match.group(1) else num, den)


def solve_word(problem: str) -> int:
    a, b = (int(v) for v in re.findall(r"\d+", problem)[:2])
    if "more" in problem:
        return a + b
    if "gave away" in problem:
        return a - b
    if "in each box" in problem:
        return a * b
    assert "equally" in problem, problem
    assert a % b == 0, problem
    return a // b


def apply(a: Fraction, op: str, b: Fraction) -> Fraction:
    return {"+": a + b, "-": a - b, "\\times": a * b}[op]


def check_row(problem: str, answer: str, kind: str) -> None:
    """Assert `answer` is the right answer to `problem`, without calling the generator."""
    if kind == "word":
        assert answer == str(solve_word(problem))
        return
    if kind in ("linear", "linear_fraction"):
        assert answer.startswith("x = ")
        x = parse_answer_number(answer[4:])
        sides = re.fullmatch(r"Solve for \$x\$: \$(.+) = (.+)\$\.", problem).groups()
        values = []
        for side in sides:
            m = re.fullmatch(r"(\d+)x ([+-]) (\d+)", side)
            values.append(int(m[1]) * x + (int(m[3]) if m[2] == "+" else -int(m[3])) if m
                          else Fraction(int(side)))
        assert values[0] == values[1], (problem, answer)
        return
    expr = re.fullmatch(r"Compute \$(.+)\$\.( Give the answer in lowest terms\.)?", problem).group(1)
    expr = re.sub(r"\\frac\{(\d+)\}\{(\d+)\}", r"F(\1,\2)", expr).replace("\\times", "*")
    assert re.fullmatch(r"[\dF(),+\-* ]+", expr), expr  # only numbers and operators reach eval
    value = eval(expr, {"F": Fraction})  # noqa: S307 - the regex above restricts the input
    assert parse_answer_number(answer) == Fraction(value), (problem, answer)


def test_same_seed_same_rows_other_seed_other_rows():
    first, again = generate_math(40, seed=7), generate_math(40, seed=7)
    assert first.to_dict() == again.to_dict()
    assert first["problem"] != generate_math(40, seed=8)["problem"]
    assert first.column_names == ["problem", "answer", "kind"]


def test_every_answer_of_every_kind_is_correct():
    rows = generate_math(600, seed=1, kinds=ALL_KINDS)
    assert len(set(rows["problem"])) == 600
    assert set(rows["kind"]) == set(ALL_KINDS)
    for row in rows:
        check_row(row["problem"], row["answer"], row["kind"])


def test_default_mix_is_easy_enough_for_a_small_model():
    rows = generate_math(400, seed=2)
    assert set(rows["kind"]) == set(DEFAULT_KINDS)
    easy = [r for r in rows if r["kind"] in ("arithmetic", "word")]
    assert len(easy) > 400 * 0.35
    # Small numbers: every number in the easy problems is at most 2 digits.
    assert all(int(v) < 100 for r in easy for v in re.findall(r"\d+", r["problem"]))


def test_latex_number():
    assert latex_number(Fraction(6, 3)) == "2"
    assert latex_number(Fraction(-5, 2)) == "-\\frac{5}{2}"
    assert latex_number(Fraction(3, 4)) == "\\frac{3}{4}"


def test_answers_are_understood_by_math_verify():
    from math_verify import parse, verify

    rows = generate_math(len(ALL_KINDS) * 3, seed=3, kinds=ALL_KINDS)
    for row in rows:
        plain = row["answer"].removeprefix("x = ")
        value = parse_answer_number(plain)
        decimal = str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"
        assert verify(parse(row["answer"]), parse(decimal)), row


def test_unknown_kind_and_exhausted_kinds_raise():
    with pytest.raises(ValueError, match="unknown math kinds"):
        generate_math(5, seed=0, kinds=("calculus",))
    # Fewer than 2000 distinct small-number arithmetic problems exist.
    with pytest.raises(ValueError, match="distinct problems"):
        generate_math(2000, seed=0, kinds=("arithmetic",))


def test_math_examples_are_r1_prompts_with_gold_answers():
    rows = generate_math(5, seed=4)
    examples = math_examples(rows, source="gen")
    assert [e.answer for e in examples] == rows["answer"]
    for ex, row in zip(examples, rows):
        validate_example(ex, "test")
        assert ex.task == "math" and ex.source == "gen" and ex.meta["kind"] == row["kind"]
        assert [m["role"] for m in ex.messages] == ["system", "user"]
        assert ex.messages[0]["content"] == R1_SYSTEM_PROMPT
        assert "<think>" in R1_SYSTEM_PROMPT and "<answer>" in R1_SYSTEM_PROMPT
        assert ex.prompt == row["problem"]
    assert len({e.example_id for e in examples}) == 5
    custom = math_examples([{"problem": "1+1?", "answer": 2}], system_prompt="Be brief.")
    assert custom[0].messages[0]["content"] == "Be brief." and custom[0].answer == "2"


def test_math_examples_rejects_rows_without_answer():
    with pytest.raises(SchemaError, match=r"gen: row 2: field 'answer' is missing"):
        math_examples([{"problem": "a", "answer": "1"}, {"problem": "b"}], source="gen")


def write_jsonl(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_load_math_jsonl(tmp_path):
    path = write_jsonl(tmp_path / "mine.jsonl", [
        json.dumps({"problem": "2+2?", "answer": "4", "kind": "arithmetic"}), "",
        json.dumps({"problem": "Half of 1?", "answer": "\\frac{1}{2}"}),
    ])
    examples = load_math(path)
    assert [e.answer for e in examples] == ["4", "\\frac{1}{2}"]
    assert [e.prompt for e in examples] == ["2+2?", "Half of 1?"]
    assert all(e.source == "mine" and e.task == "math" for e in examples)
    assert examples[0].messages[0]["content"] == R1_SYSTEM_PROMPT
    assert load_math(path, system_prompt="Short.")[1].messages[0]["content"] == "Short."


@pytest.mark.parametrize("bad_line, field", [
    ({"problem": "2+2?"}, "answer"),
    ({"problem": "2+2?", "answer": "  "}, "answer"),
    ({"problem": "", "answer": "4"}, "problem"),
    ({"question": "2+2?", "answer": "4"}, "problem"),
])
def test_load_math_names_file_line_and_field(tmp_path, bad_line, field):
    # Line 3 is bad; the blank line 2 still counts, so the number matches an editor's.
    path = write_jsonl(tmp_path / "bad.jsonl", [json.dumps({"problem": "1+1?", "answer": "2"}), "",
                                                json.dumps(bad_line)])
    with pytest.raises(SchemaError, match=rf"^eval: .*bad\.jsonl:3: field '{field}' is missing or empty"):
        load_math(path, where_prefix="eval: ")


def test_load_math_rejects_broken_json_and_unknown_formats(tmp_path):
    with pytest.raises(SchemaError, match=r"broken\.jsonl:2: invalid JSON"):
        load_math(write_jsonl(tmp_path / "broken.jsonl", ['{"problem": "a", "answer": "1"}', "{oops"]))
    with pytest.raises(SchemaError, match=r"list\.jsonl:1: expected a JSON object"):
        load_math(write_jsonl(tmp_path / "list.jsonl", ["[1, 2]"]))
    with pytest.raises(SchemaError, match="unsupported"):
        load_math(write_jsonl(tmp_path / "data.csv", ["problem,answer"]))
    with pytest.raises(SchemaError, match="no rows"):
        load_math(write_jsonl(tmp_path / "empty.jsonl", [""]))
    with pytest.raises(SchemaError, match="no such file"):
        load_math(str(tmp_path / "missing.jsonl"))


def test_load_math_parquet_and_saved_dataset(tmp_path):
    rows = generate_math(6, seed=5)
    rows.to_parquet(str(tmp_path / "m.parquet"))
    assert [e.answer for e in load_math(str(tmp_path / "m.parquet"))] == rows["answer"]
    rows.save_to_disk(str(tmp_path / "disk"))
    assert [e.prompt for e in load_math(str(tmp_path / "disk"))] == rows["problem"]
    broken = datasets.Dataset.from_dict({"problem": ["a", "b"], "answer": ["1", None]})
    broken.to_parquet(str(tmp_path / "broken.parquet"))
    with pytest.raises(SchemaError, match=r"broken\.parquet: row 2: field 'answer'"):
        load_math(str(tmp_path / "broken.parquet"))
    datasets.DatasetDict({"train": rows}).save_to_disk(str(tmp_path / "dict"))
    with pytest.raises(SchemaError, match="point at one split"):
        load_math(str(tmp_path / "dict"))


def test_cli_writes_loadable_jsonl_and_disk_dataset(tmp_path, capsys):
    expected = generate_math(20, seed=0)["problem"]
    main(["--n", "20", "--out", str(tmp_path / "out" / "m.jsonl")])
    assert [e.prompt for e in load_math(str(tmp_path / "out" / "m.jsonl"))] == expected
    main(["--n", "20", "--seed", "0", "--kinds", "arithmetic,word", "--out", str(tmp_path / "disk")])
    loaded = load_math(str(tmp_path / "disk"))
    assert len(loaded) == 20 and {e.meta["kind"] for e in loaded} <= {"arithmetic", "word"}
    assert "wrote 20 problems" in capsys.readouterr().out
