"""Math workload data: a seeded generator of small problems with LaTeX answers, and the
conversion of problem/answer rows (generated, or a user's JSONL / parquet / saved dataset)
into R1-style `Example`s. CLI: `python -m grailcore.data.math --n 1000 --out DIR`.
"""

from __future__ import annotations

import argparse
import json
import random
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import datasets

from grailcore.data.schema import Example, SchemaError

R1_SYSTEM_PROMPT = (
    "A conversation between User and Assistant. The User asks a question and the Assistant "
    "solves it. The Assistant first thinks about the reasoning process and then gives the "
    "answer. The reasoning process and the answer are enclosed within <think> </think> and "
    "<answer> </answer> tags, i.e. <think> reasoning process here </think>"
    "<answer> answer here </answer>. Put only the final answer inside <answer>, in LaTeX "
    "where needed (for example \\frac{3}{4} or x = 5)."
)

Problem = tuple[str, str]
"""(problem text, gold answer in LaTeX)."""


def latex_number(value: Fraction) -> str:
    """An exact number as the answer string: `7`, `-3`, `\\frac{3}{4}`, `-\\frac{5}{2}`."""
    if value.denominator == 1:
        return str(value.numerator)
    sign = "-" if value < 0 else ""
    return f"{sign}\\frac{{{abs(value.numerator)}}}{{{value.denominator}}}"


def _signed(term: int) -> str:
    """`+ 4` / `- 4`, for writing `3x + 4` and `3x - 4`."""
    return f"+ {term}" if term >= 0 else f"- {-term}"


def _arithmetic(rng: random.Random) -> Problem:
    """One operation on numbers up to 20; differences are never negative."""
    a, b = rng.randint(1, 20), rng.randint(1, 20)
    op = rng.choice("+-*")
    if op == "-":
        a, b = max(a, b), min(a, b)
        return f"Compute ${a} - {b}$.", str(a - b)
    if op == "*":
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        return f"Compute ${a} \\times {b}$.", str(a * b)
    return f"Compute ${a} + {b}$.", str(a + b)


_NAMES = ("Ana", "Ben", "Chen", "Dara", "Eli", "Fatima", "Goran", "Hana", "Ivo", "Jun")
_ITEMS = ("apples", "marbles", "stickers", "books", "pencils", "coins", "cards", "shells")


def _word(rng: random.Random) -> Problem:
    """A one-step story problem with small whole numbers."""
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    template = rng.randrange(4)
    if template == 0:
        a, b = rng.randint(2, 30), rng.randint(2, 30)
        return (f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?",
                str(a + b))
    if template == 1:
        a = rng.randint(5, 40)
        b = rng.randint(1, a - 1)
        return (f"{name} had {a} {item} and gave away {b}. How many {item} does {name} have left?",
                str(a - b))
    if template == 2:
        a, b = rng.randint(2, 9), rng.randint(2, 12)
        return (f"There are {a} boxes with {b} {item} in each box. How many {item} are there "
                f"in total?", str(a * b))
    per, groups = rng.randint(2, 9), rng.randint(2, 9)
    return (f"{name} shares {per * groups} {item} equally among {groups} friends. How many {item} "
            f"does each friend get?", str(per))


def _linear(rng: random.Random) -> Problem:
    """`ax + b = c` with a whole-number solution."""
    x, a = rng.randint(-10, 10), rng.randint(2, 9)
    b = rng.choice([v for v in range(-20, 21) if v != 0])
    return f"Solve for $x$: ${a}x {_signed(b)} = {a * x + b}$.", f"x = {x}"


def _linear_fraction(rng: random.Random) -> Problem:
    """Harder: `ax + b = cx + d` whose solution is usually a fraction."""
    a, c = rng.sample(range(2, 13), 2)
    b, d = rng.sample([v for v in range(-30, 31) if v != 0], 2)
    x = Fraction(d - b, a - c)
    return (f"Solve for $x$: ${a}x {_signed(b)} = {c}x {_signed(d)}$.", f"x = {latex_number(x)}")


def _fractions(rng: random.Random) -> Problem:
    """Sum, difference or product of two fractions with denominators up to 9."""
    # Operands are shown as drawn (2/4 stays 2/4), so reducing is part of the work.
    q1, q2 = rng.randint(2, 9), rng.randint(2, 9)
    p1, p2 = rng.randint(1, q1 - 1), rng.randint(1, q2 - 1)
    left, right = Fraction(p1, q1), Fraction(p2, q2)
    op = rng.choice("+-*")
    value = {"+": left + right, "-": left - right, "*": left * right}[op]
    symbol = {"+": "+", "-": "-", "*": "\\times"}[op]
    return (f"Compute $\\frac{{{p1}}}{{{q1}}} {symbol} \\frac{{{p2}}}{{{q2}}}$. Give the answer "
            f"in lowest terms.", latex_number(value))


def _multi_step(rng: random.Random) -> Problem:
    """Harder: `(a + b) x c - d` with two-digit numbers."""
    a, b, c, d = rng.randint(10, 99), rng.randint(10, 99), rng.randint(2, 12), rng.randint(10, 99)
    return f"Compute $({a} + {b}) \\times {c} - {d}$.", str((a + b) * c - d)


GENERATORS: dict[str, Callable[[random.Random], Problem]] = {
    "arithmetic": _arithmetic,
    "word": _word,
    "linear": _linear,
    "fractions": _fractions,
    "multi_step": _multi_step,
    "linear_fraction": _linear_fraction,
}
DEFAULT_KINDS: tuple[str, ...] = ("arithmetic", "word", "linear", "fractions")
"""Modest on purpose: a 135M model solves some small-number arithmetic and word problems,
so GRPO groups have reward variance. `multi_step` and `linear_fraction` are harder."""


def generate_math(n: int, seed: int, kinds: Sequence[str] = DEFAULT_KINDS) -> datasets.Dataset:
    """`n` distinct problems (columns problem, answer, kind), kinds drawn uniformly; the same
    (n, seed, kinds) always gives the same rows. Split one call for disjoint train/eval sets:
    two seeds overlap on the small easy kinds."""
    unknown = [k for k in kinds if k not in GENERATORS]
    if unknown or not kinds:
        raise ValueError(f"unknown math kinds {unknown or list(kinds)}; choose from {sorted(GENERATORS)}")
    rng = random.Random(seed)
    seen: set[str] = set()
    rows: dict[str, list[str]] = {"problem": [], "answer": [], "kind": []}
    # Retries bound the loop when n exceeds what the chosen kinds can produce.
    for _ in range(50 * n + 100):
        if len(seen) == n:
            break
        kind = rng.choice(kinds)
        problem, answer = GENERATORS[kind](rng)
        if problem in seen:
            continue
        seen.add(problem)
        for column, value in zip(rows, (problem, answer, kind)):
            rows[column].append(value)
    if len(seen) < n:
        raise ValueError(f"only {len(seen)} distinct problems of kinds {list(kinds)}; ask for fewer "
                         f"or add kinds")
    return datasets.Dataset.from_dict(rows)


def _field(row: Mapping[str, Any], name: str, where: str) -> str:
    value = row.get(name)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)  # numeric answers in user JSON ("answer": 42) are fine
    if not isinstance(value, str) or not value.strip():
        found = ", ".join(sorted(row)) or "none"
        raise SchemaError(f"{where}: field '{name}' is missing or empty (columns found: {found}); "
                          f"math rows need non-empty 'problem' and 'answer'")
    return value.strip()


def _example(row: Mapping[str, Any], index: int, where: str, system_prompt: str | None,
             source: str) -> Example:
    problem, answer = _field(row, "problem", where), _field(row, "answer", where)
    messages = ({"role": "system", "content": system_prompt or R1_SYSTEM_PROMPT},
                {"role": "user", "content": problem})
    meta = {"kind": row["kind"]} if row.get("kind") else {}
    return Example(example_id=f"{source or 'math'}-{index}", task="math", messages=messages,
                   answer=answer, source=source, meta=meta)


def math_examples(dataset_or_rows: Iterable[Mapping[str, Any]], system_prompt: str | None = None,
                  source: str = "") -> list[Example]:
    """R1-style examples (system prompt asking for <think>/<answer>, user = problem,
    answer = gold) from a `datasets.Dataset` or any iterable of problem/answer rows."""
    return [_example(row, i, f"{source or 'math rows'}: row {i + 1}", system_prompt, source)
            for i, row in enumerate(dataset_or_rows)]


def _jsonl_rows(path: Path, where_prefix: str) -> Iterable[tuple[str, Mapping[str, Any]]]:
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            where = f"{where_prefix}{path}:{line_no}"
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise SchemaError(f"{where}: invalid JSON ({e.msg}); each line must be one object "
                                  f"with 'problem' and 'answer'") from None
            if not isinstance(row, dict):
                raise SchemaError(f"{where}: expected a JSON object, got {type(row).__name__}")
            yield where, row


def _table_rows(path: Path, where_prefix: str) -> Iterable[tuple[str, Mapping[str, Any]]]:
    if path.is_dir():
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            raise SchemaError(f"{where_prefix}{path}: a DatasetDict with splits {list(loaded)}; "
                              f"point at one split, e.g. {path / next(iter(loaded))}")
        rows: Iterable[Mapping[str, Any]] = loaded
    else:
        import pyarrow.parquet as pq

        rows = pq.read_table(path).to_pylist()
    for row_no, row in enumerate(rows, start=1):
        yield f"{where_prefix}{path}: row {row_no}", row


def load_math(path: str, where_prefix: str = "", system_prompt: str | None = None) -> list[Example]:
    """Examples from a JSONL (.jsonl/.json), parquet file or `save_to_disk` directory with
    'problem' and 'answer' columns ('kind' optional). Errors name file, line and field;
    `where_prefix` is prepended to every location; `system_prompt` replaces the R1 one."""
    file = Path(path)
    if not file.exists():
        raise SchemaError(f"{where_prefix}{path}: no such file or directory")
    if file.suffix in (".jsonl", ".json"):
        rows = _jsonl_rows(file, where_prefix)
    elif file.suffix == ".parquet" or file.is_dir():
        rows = _table_rows(file, where_prefix)
    else:
        raise SchemaError(f"{where_prefix}{path}: unsupported math data; use .jsonl, .parquet or a "
                          f"save_to_disk directory")
    source = file.stem
    examples = [_example(row, i, where, system_prompt, source) for i, (where, row) in enumerate(rows)]
    if not examples:
        raise SchemaError(f"{where_prefix}{path}: no rows")
    return examples


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m grailcore.data.math",
                                     description="Generate seeded math problems with LaTeX answers.")
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kinds", default=",".join(DEFAULT_KINDS),
                        help=f"comma-separated, from {','.join(GENERATORS)}")
    parser.add_argument("--out", required=True,
                        help="a .jsonl file, or a directory for datasets.save_to_disk")
    args = parser.parse_args(argv)
    dataset = generate_math(args.n, args.seed, tuple(args.kinds.split(",")))
    out = Path(args.out)
    if out.suffix == ".jsonl":
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("w", encoding="utf-8") as f:
            for row in dataset:
                f.write(json.dumps(row) + "\n")
    else:
        dataset.save_to_disk(str(out))
    counts = {k: dataset["kind"].count(k) for k in sorted(set(dataset["kind"]))}
    print(f"wrote {len(dataset)} problems {counts} to {out}")


if __name__ == "__main__":
    main()
