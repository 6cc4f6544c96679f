"""Which part of a change in exact fidelity is the choice, and which the format?

The product's exact metrics (grailcore.evaluation.fidelity) keep the off-slate mass (the
model names no option) as a loss, which keeps them proper but mixes two things: writing an
answer at all, and choosing among the options as people do. This analysis separates them
for completions files with answer-slot distributions (`RUN_DIR/eval/step_N.jsonl`): each
row's mean slot distribution renormalised over its slate (on-slate TV to the true choice
probabilities, on-slate NLL of the person's option), and the off-slate mass itself, with
paired differences A - B over the same rows and a bootstrap over viewers.

    python experiments/on_slate.py A.jsonl B.jsonl [--n-boot 2000]

A side may be several files of the same rows, comma-separated (an arm's seeds): each row's
measures are then the mean over those files (as `grailcore.evaluation.compare` does).

The renormalised measures are not proper on their own (a model could dodge its hard rows);
read them beside the off-slate mass and the product's exact metrics.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def row_scores(path: Path) -> dict[str, tuple[str, float, float, float]]:
    """example_id -> (viewer_id, on-slate TV, on-slate NLL, off-slate mass)."""
    out = {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        slot = row.get("answer_slot")
        if slot is None or row.get("true_choice_probs") is None:
            raise SystemExit(f"{path}: row {row['example_id']} has no answer_slot or true_choice_probs; this "
                             "analysis needs exact distributions of a synthetic study")
        p = np.mean(np.array(slot["choice"], dtype=float), axis=0)
        mass = float(p.sum())
        q = p / mass if mass > 0 else np.full_like(p, 1 / len(p))
        truth = np.array(row["true_choice_probs"], dtype=float)
        tv = 0.5 * float(np.abs(q - truth).sum())
        nll = -float(np.log(max(q[row["gold_index"] - 1], 1e-12)))
        out[row["example_id"]] = (row.get("viewer_id", row["example_id"]), tv, nll, 1 - mass)
    return out


def side_scores(paths: str) -> dict[str, tuple[str, float, float, float]]:
    """row_scores of one or several comma-separated files of the same rows, averaged per row."""
    per_file = [row_scores(Path(p)) for p in paths.split(",") if p]
    ids = set(per_file[0])
    for other, path in zip(per_file[1:], paths.split(",")[1:]):
        if set(other) != ids:
            raise SystemExit(f"{path} has other rows than {paths.split(',')[0]}: average seeds of the same rows")
    return {i: (per_file[0][i][0], *np.mean([f[i][1:] for f in per_file], axis=0).tolist()) for i in per_file[0]}


def paired(a: dict, b: dict, n_boot: int, seed: int) -> list[tuple[str, float, float, float, float, float]]:
    ids = sorted(set(a) & set(b))
    if len(ids) != len(a) or len(ids) != len(b):
        raise SystemExit(f"the files share {len(ids)} rows of {len(a)} and {len(b)}: compare the same rows")
    viewers = sorted({a[i][0] for i in ids})
    rows_of = {v: [k for k, i in enumerate(ids) if a[i][0] == v] for v in viewers}
    rng = np.random.default_rng(seed)
    out = []
    for col, name in ((1, "on-slate TV"), (2, "on-slate NLL"), (3, "off-slate mass")):
        va, vb = np.array([a[i][col] for i in ids]), np.array([b[i][col] for i in ids])
        diff = va - vb
        boots = []
        for _ in range(n_boot):
            pick = rng.choice(len(viewers), len(viewers))
            index = np.concatenate([rows_of[viewers[v]] for v in pick])
            boots.append(diff[index].mean())
        low, high = np.quantile(boots, [0.025, 0.975])
        out.append((name, float(va.mean()), float(vb.mean()), float(diff.mean()), float(low), float(high)))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("a", help="completions file(s), comma-separated for several seeds")
    p.add_argument("b")
    p.add_argument("--n-boot", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    print("| measure | A | B | mean(A - B) | 95% interval (viewers) |\n|---|---|---|---|---|")
    for name, ma, mb, d, low, high in paired(side_scores(args.a), side_scores(args.b), args.n_boot, args.seed):
        print(f"| {name} | {ma:.3f} | {mb:.3f} | {d:+.3f} | [{low:+.3f}, {high:+.3f}] |")


if __name__ == "__main__":
    main()
