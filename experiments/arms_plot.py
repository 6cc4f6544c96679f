"""The arms' held-out TV and NLL to the truth against policy steps, one line per arm (the mean
of its seeds, each seed a thin line), for experiments/results/grpo_reward_exact/README.md:

    python experiments/arms_plot.py --out arms.png \
        --arm "0/1=runs/d_accuracy,runs/d_accuracy_s1" \
        --arm "GRAIL=runs/d_grail,runs/d_grail_s1@24" --start runs/d_accuracy

An arm is LABEL=RUN_DIR[,RUN_DIR...][@WARMUP]: WARMUP steps at the start of the run trained the
discriminator alone (gail.warmup_steps), so the run's step s is policy step s - WARMUP. --start
is a run whose step-0 evaluation is the warm start (policy step 0 of every arm).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PANELS = (("eval/tv_choice", "TV to the true choice probabilities"),
          ("eval/nll_choice/model", "NLL of the person's choice"))
UNIFORM_NLL = 1.382
"""NLL of a uniform guess over each held-out row's slate (the tables' reference)."""


@dataclass(frozen=True)
class Curve:
    label: str
    steps: list[int]  # policy steps
    seeds: list[list[float]]  # [seed][step]

    @property
    def mean(self) -> list[float]:
        return np.mean(self.seeds, axis=0).tolist()


def evaluations(run: Path, key: str) -> dict[int, float]:
    """{step: value} of every evaluation in RUN/metrics.jsonl that logged `key` (the last one per step)."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in rows if key in r}


def curve(label: str, runs: list[Path], warmup: int, key: str, start: Path | None) -> Curve:
    """Policy step -> value for each run, on the steps every run evaluated at or after its
    warm-up, the warm start's step-0 value prepended when `start` is given."""
    per_run = [{s - warmup: v for s, v in evaluations(run, key).items() if s >= warmup} for run in runs]
    if start is not None:
        base = evaluations(start, key)
        if 0 not in base:
            raise SystemExit(f"--start {start}: no evaluation at step 0 in its metrics.jsonl")
        for values in per_run:
            values.setdefault(0, base[0])
    steps = sorted(set.intersection(*(set(v) for v in per_run)))
    if not steps:
        raise SystemExit(f"arm {label!r}: its runs share no evaluated step")
    return Curve(label, steps, [[values[s] for s in steps] for values in per_run])


def parse_arm(text: str) -> tuple[str, list[Path], int]:
    label, _, rest = text.partition("=")
    runs, at, warmup = rest.partition("@")
    if not label or not runs or (at and not warmup.isdigit()):
        raise SystemExit(f"--arm {text!r}: expected LABEL=RUN_DIR[,RUN_DIR...][@WARMUP]")
    return label, [Path(r) for r in runs.split(",")], int(warmup or 0)


def plot(curves: dict[str, list[Curve]], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PANELS), figsize=(5.2 * len(PANELS), 3.8))
    for ax, (key, title) in zip(axes, PANELS):
        for k, c in enumerate(curves[key]):
            color = f"C{k}"
            ax.plot(c.steps, c.mean, marker="o", color=color, label=f"{c.label} ({len(c.seeds)} seeds)")
            for seed in c.seeds if len(c.seeds) > 1 else ():
                ax.plot(c.steps, seed, color=color, alpha=0.3, linewidth=0.8)
        if key == "eval/nll_choice/model":
            ax.axhline(UNIFORM_NLL, color="grey", linestyle="--", linewidth=0.8, label="uniform guess")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("policy steps from the warm start")
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize=8)
    fig.suptitle("held-out rows, exact estimator; lower is closer to people", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arm", action="append", required=True, help="LABEL=RUN_DIR[,RUN_DIR...][@WARMUP]")
    p.add_argument("--start", type=Path, default=None, help="a run whose step-0 evaluation is the warm start")
    p.add_argument("--out", type=Path, required=True, help="the PNG to write")
    args = p.parse_args(argv)
    arms = [parse_arm(a) for a in args.arm]
    curves = {key: [curve(label, runs, warmup, key, args.start) for label, runs, warmup in arms] for key, _ in PANELS}
    for c_tv, c_nll in zip(*curves.values()):
        print(f"{c_tv.label}: steps {c_tv.steps}; TV {[round(v, 3) for v in c_tv.mean]}; "
              f"NLL {[round(v, 3) for v in c_nll.mean]}")
    print(plot(curves, args.out))


if __name__ == "__main__":
    main()
