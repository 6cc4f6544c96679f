"""What a viewer run's rewards paid, by the position the answer was shown at: reads the
run's `--logging.rollouts` files and prints, per window of steps, each answer position's
share of the completions (a dodge is its own row), its mean reward per reward name, its
mean advantage, and share x mean advantage, the expected push on that answer's logit at
the answer token (d J / d z_k = p_k E[A | k]).

A reward that ranks the options one way can still move the policy the other way: when
committing at all is paid far more than any choice among the options, every committed
answer gets a positive advantage and the logit of the option the policy already favours
rises fastest (p_k is largest there).

    python experiments/rollout_positions.py runs/RUN --window 6
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path


def load(run: Path) -> dict[int, list[dict]]:
    files = sorted((run / "rollouts").glob("step_*.rank*.jsonl"))
    if not files:
        raise SystemExit(f"{run / 'rollouts'}: no rollout files; train with --logging.rollouts")
    steps: dict[int, list[dict]] = collections.defaultdict(list)
    for path in files:
        for line in path.read_text().splitlines():
            row = json.loads(line)
            if row.get("task") == "viewer":
                steps[row["step"]].append(row)
    return steps


def table(steps: dict[int, list[dict]], window: int) -> list[str]:
    names = sorted({n for rows in steps.values() for r in rows for n in r["rewards"]})
    head = ["steps", "answer", "share", *(f"mean {n}" for n in names), "mean advantage", "share x advantage"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    last = max(steps)
    for start in range(min(steps), last + 1, window):
        rows = [r for s in range(start, min(start + window, last + 1)) for r in steps.get(s, [])]
        groups: dict[str, list[dict]] = collections.defaultdict(list)
        for r in rows:
            groups["dodge" if r["answer"] is None else f"shown {r['answer']}"].append(r)
        for key in sorted(groups, key=lambda k: (k == "dodge", k)):
            part = groups[key]
            share = len(part) / len(rows)
            advantage = sum(r["advantage"] for r in part) / len(part)
            means = [sum(r["rewards"][n] for r in part) / len(part) for n in names]
            cells = [f"{start}-{min(start + window - 1, last)}", key, f"{share:.3f}", *(f"{m:+.3f}" for m in means),
                     f"{advantage:+.3f}", f"{share * advantage:+.3f}"]
            out.append("| " + " | ".join(cells) + " |")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a run folder trained with --logging.rollouts")
    parser.add_argument("--window", type=int, default=6, help="steps per table block")
    args = parser.parse_args(argv)
    print("\n".join(table(load(args.run), args.window)))


if __name__ == "__main__":
    main()
