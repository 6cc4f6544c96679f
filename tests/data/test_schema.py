"""Decision <-> dict serialisation: exact round trip, and errors that name file, line and field."""

import copy
import json

import pytest

from grailcore.data.schema import SchemaError, decision_from_dict, decision_to_dict, opinion_direction
from grailcore.data.synth import generate_study

WHERE = "study/train.jsonl:7"


@pytest.fixture(scope="module")
def rows():
    return [decision_to_dict(d) for d in generate_study("gun_control", 40, seed=3)]


def test_round_trip_through_json_is_exact():
    decisions = generate_study("minimum_wage", 40, seed=1)
    for d in decisions:
        again = decision_from_dict(json.loads(json.dumps(decision_to_dict(d))), WHERE)
        assert again == d


def test_integral_floats_pass_as_ints(rows):
    # parquet/pandas store int columns with nulls as floats
    row = copy.deepcopy(rows[0])
    row["slate"][0]["views"] = float(row["slate"][0]["views"])
    assert isinstance(decision_from_dict(row, WHERE).slate[0].views, int)


def _set(path, value):
    def mutate(row):
        *parents, last = path
        target = row
        for key in parents:
            target = target[key]
        if value is KeyError:
            del target[last]
        else:
            target[last] = value
    return mutate


MALFORMED = [
    ("missing row_id", _set(["row_id"], KeyError), "'row_id' is missing"),
    ("null issue", _set(["issue"], None), "'issue' must not be null"),
    ("step as string", _set(["step"], "3"), "'step' must be an integer"),
    ("step as bool", _set(["step"], True), "'step' must be an integer"),
    ("negative step", _set(["step"], -1), "'step' must be >= 0"),
    ("gold index 0", _set(["gold_index"], 0), "'gold_index' must be in 1.."),
    ("gold index past slate", _set(["gold_index"], 99), "'gold_index' must be in 1.."),
    ("empty slate", _set(["slate"], []), "'slate' is empty"),
    ("slate not a list", _set(["slate"], "abc"), "'slate' must be a list"),
    ("option without title", _set(["slate", 1, "title"], KeyError), "'slate[1].title' is missing"),
    ("negative views", _set(["slate", 0, "views"], -5), "'slate[0].views' must be >= 0"),
    ("stance out of range", _set(["current", "stance"], 1.5), "'current.stance' must be in [-1, 1]"),
    ("history title not text", _set(["history", 0, "video", "title"], 5), "'history[0].video.title' must be a string"),
    ("history entry not an object", _set(["history", 0], None), "'history[0]' must be an object"),
    ("viewer age as text", _set(["viewer", "age"], "old"), "'viewer.age' must be an integer"),
    ("viewer missing", _set(["viewer"], KeyError), "'viewer' is missing"),
    ("survey pair of one", _set(["survey", 0], ["party"]), "'survey[0]' must be a [label, value] pair"),
    ("unknown direction", _set(["opinion_direction"], "up"), "'opinion_direction' must be one of"),
    ("probs not summing to 1", lambda r: r.update(true_choice_probs=[0.5] * len(r["slate"])),
     "'true_choice_probs' must sum to 1"),
    ("probs of wrong length", _set(["true_choice_probs"], [1.0]), "'true_choice_probs' has 1 entries"),
    ("negative probability", _set(["true_opinion_probs"], [1.2, -0.2, 0.0]), "'true_opinion_probs[0]' must be a probability"),
    ("opinion as text", _set(["opinion_before"], "high"), "'opinion_before' must be a number"),
    ("unknown top-level field", _set(["slate_size"], 4), "unknown field(s) ['slate_size'] in 'row'"),
    ("unknown video field", _set(["current", "rating"], 4), "unknown field(s) ['rating'] in 'current'"),
]


@pytest.mark.parametrize("name,mutate,expected", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_row_names_file_line_and_field(rows, name, mutate, expected):
    row = copy.deepcopy(next(r for r in rows if r["history"]))
    mutate(row)
    with pytest.raises(SchemaError) as err:
        decision_from_dict(row, WHERE)
    message = str(err.value)
    assert message.startswith(f"{WHERE}: "), message
    assert expected in message, message


def test_row_that_is_not_an_object():
    with pytest.raises(SchemaError, match=r"^x.jsonl:2: field 'row' must be an object, got list"):
        decision_from_dict([1, 2], "x.jsonl:2")


@pytest.mark.parametrize("before,after,expected", [
    (0.5, 0.52, "no_change"), (0.5, 0.48, "no_change"), (0.5, 0.5201, "increase"), (0.5, 0.4799, "decrease"),
])
def test_opinion_direction_tolerance(before, after, expected):
    assert opinion_direction(before, after, tolerance=0.02) == expected
