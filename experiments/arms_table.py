"""The tables of experiments/results/grpo_reward_exact/README.md from the run folders: each
arm's held-out evaluation at one step, averaged over its seeds (each seed's value beside the
mean), and paired differences between arms over the same rows with one viewer bootstrap.

    python experiments/arms_table.py \
        --arm "step 0=runs/grpo_accuracy@0" \
        --arm "0/1=runs/grpo_accuracy,runs/grpo_accuracy_s1@24" \
        --arm "likelihood=runs/grpo_likelihood,runs/grpo_likelihood_s1@24" \
        --pair "0/1" "step 0" --pair "likelihood" "0/1"

An arm is LABEL=RUN_DIR[,RUN_DIR...]@STEP: its seeds' run folders (same rows: the held-out
rows are drawn with data.seed) and the step whose `eval/step_N.jsonl` and metrics row are
read. Paired intervals cover the rows and the draws, not the training seeds: with two seeds,
the per-seed values are the only measure of how far another seed would land.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from on_slate import paired, side_scores  # noqa: E402  (the experiments folder's own analysis)

from grailcore.evaluation.compare import paired_differences  # noqa: E402

METRICS = (  # (label, metrics.jsonl key)
    ("strict-layout rate", "eval/format_rate"),
    ("next-video accuracy, all draws", "eval/accuracy_sample_mean"),
    ("off-slate mass at the answer slot", "eval/off_slate_mass"),
    ("TV to the true choice probabilities", "eval/tv_choice"),
    ("NLL of the person's choice (uniform 1.382)", "eval/nll_choice/model"),
    ("ECE", "eval/ece"),
    ("opinion NLL", "eval/opinion_nll"),
)
PAIRED = (("TV (exact)", "tv"), ("NLL (exact)", "nll"), ("off-slate mass", "off_slate"), ("strict layout", "format"),
          ("accuracy, all draws", "acc"))


@dataclass(frozen=True)
class Arm:
    label: str
    runs: tuple[Path, ...]
    step: int

    @property
    def files(self) -> list[Path]:
        return [run / "eval" / f"step_{self.step:06d}.jsonl" for run in self.runs]

    def metric_rows(self) -> list[dict]:
        rows = []
        for run in self.runs:
            found = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
                     if r.get("step") == self.step and "eval/tv_choice" in r]
            if not found:
                raise SystemExit(f"{run}/metrics.jsonl has no evaluation at step {self.step}")
            rows.append(found[-1])
        return rows


def parse_arm(text: str) -> Arm:
    label, _, rest = text.partition("=")
    runs, _, step = rest.rpartition("@")
    if not label or not runs or not step.isdigit():
        raise SystemExit(f"--arm {text!r}: expected LABEL=RUN_DIR[,RUN_DIR...]@STEP")
    return Arm(label, tuple(Path(r) for r in runs.split(",")), int(step))


def cell(values: list[float]) -> str:
    mean = f"{np.mean(values):.3f}"
    return mean if len(values) == 1 else f"{mean} ({', '.join(f'{v:.3f}' for v in values)})"


def arms_table(arms: list[Arm]) -> str:
    lines = ["| held-out rows x draws, T = 1; mean (each seed) | " + " | ".join(
                 f"{a.label} @ {a.step}" for a in arms) + " |",
             "|---" * (len(arms) + 1) + "|"]
    rows = [a.metric_rows() for a in arms]
    for label, key in METRICS:
        lines.append(f"| {label} | " + " | ".join(cell([r[key] for r in per]) for per in rows) + " |")
    on_slate = [[side_scores(str(f)) for f in a.files] for a in arms]
    for col, label in ((1, "on-slate TV (uniform 0.274)"), (2, "on-slate NLL (uniform 1.382)")):
        lines.append(f"| {label} | " + " | ".join(
            cell([float(np.mean([v[col] for v in seed.values()])) for seed in per]) for per in on_slate) + " |")
    return "\n".join(lines)


def pairs_table(pairs: list[tuple[Arm, Arm]], n_boot: int) -> str:
    def interval(value: float, low: float, high: float) -> str:
        text = f"{value:+.3f} [{low:+.3f}, {high:+.3f}]"
        return f"**{text}**" if low > 0 or high < 0 else text

    columns = []
    for a, b in pairs:
        diffs = paired_differences([str(f) for f in a.files], [str(f) for f in b.files], alpha=1.0, n_boot=n_boot)
        column = {label: interval(diffs[key].value, diffs[key].lo, diffs[key].hi) for label, key in PAIRED}
        for name, _, _, d, low, high in paired(side_scores(",".join(map(str, a.files))),
                                               side_scores(",".join(map(str, b.files))), n_boot, 0):
            if name != "off-slate mass":
                column[name] = interval(d, low, high)
        if len(a.runs) > 1 or len(b.runs) > 1:  # each seed against the other side's mean
            per_seed = [paired_differences([str(f)], [str(g) for g in b.files], alpha=1.0, n_boot=1)["tv"].value
                        for f in a.files]
            column["TV, each seed of A"] = ", ".join(f"{v:+.3f}" for v in per_seed)
        columns.append(column)
    names = list(dict.fromkeys(k for c in columns for k in c))
    lines = ["| paired, 95% interval (viewers) | " + " | ".join(
                 f"{a.label} @ {a.step} - {b.label} @ {b.step}" for a, b in pairs) + " |",
             "|---" * (len(pairs) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(c.get(name, "") for c in columns) + " |" for name in names]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arm", action="append", required=True, help="LABEL=RUN_DIR[,RUN_DIR...]@STEP")
    p.add_argument("--pair", nargs=2, action="append", default=[], metavar=("A", "B"), help="labels: A - B")
    p.add_argument("--n-boot", type=int, default=2000)
    args = p.parse_args(argv)
    arms = {a.label: a for a in map(parse_arm, args.arm)}
    print(arms_table(list(arms.values())))
    if args.pair:
        unknown = [x for pair in args.pair for x in pair if x not in arms]
        if unknown:
            raise SystemExit(f"--pair names {unknown}, not among the arms {list(arms)}")
        print()
        print(pairs_table([(arms[a], arms[b]) for a, b in args.pair], args.n_boot))


if __name__ == "__main__":
    main()
