"""Has a GRAIL run's discriminator learned anything about people? An offline check.

The run's own gail/* metrics score each step's fresh rollouts before D learns from them, on
8 people's choices a step on the CPU demo: their standard error (~0.03 a run) is as large as
the effect. This check scores D, from a run's checkpoints, on held-out rows it never trained
on (the study's validation split) with exact expectations instead of draws:

- gap = E_people[P(human)] - E_policy[P(human)], people's choice drawn from the study's true
  choice probabilities, the policy's from its own answer-slot distributions, summarised per
  slate size as where it answers (its position habit; read from an evaluation file of the
  policy, e.g. the warm start's `eval/step_000000.jsonl`);
- the same gap for the oracle D = p_people / (p_people + p_policy), the most any D can reach
  against that position habit;
- D's logit at the habit's favourite position minus the slate's other positions.

    python experiments/d_check.py --policy runs/grpo_accuracy/eval/step_000000.jsonl \
        runs/grail/checkpoints/step_00000020 runs/grail/checkpoints/step_00000045

Reads each checkpoint's D state (`extra.pt`, as the trainer writes it); the D settings are
the run's `config.yaml`, one folder above `checkpoints/`.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import yaml

from grailcore.cli import from_dict
from grailcore.config import Config
from grailcore.data.loaders import load_examples
from grailcore.rewards.discriminator import Discriminator


def position_habit(path: Path) -> dict[int, np.ndarray]:
    """Slate size -> the policy's mean on-slate answer distribution over shown positions."""
    sums: dict[int, np.ndarray] = defaultdict(lambda: 0.0)
    for line in path.read_text().splitlines():
        row = json.loads(line)
        p = np.mean(np.array(row["answer_slot"]["choice"], dtype=float), axis=0)
        if p.sum() > 0:
            sums[len(p)] = sums[len(p)] + p / p.sum()
    return {k: v / v.sum() for k, v in sums.items()}


def run_config(checkpoint: Path) -> Config:
    raw = yaml.safe_load((checkpoint.parent.parent / "config.yaml").read_text())
    return from_dict(raw, f"{checkpoint.parent.parent}/config.yaml")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="+", type=Path, help="checkpoint folders (step_N) of one GRAIL run")
    p.add_argument("--policy", type=Path, required=True, help="an evaluation file of the policy D is to tell apart")
    p.add_argument("--rows", type=int, default=150, help="validation rows scored")
    args = p.parse_args(argv)
    habit = position_habit(args.policy)
    cfg = run_config(args.checkpoints[0])
    train = load_examples(cfg.data.train_path, cfg.data, "train").examples
    rows = [ex for ex in load_examples(cfg.data.train_path, cfg.data, "validation").examples
            if ex.n_options in habit and ex.true_choice_probs][:args.rows]
    if not rows:
        raise SystemExit(f"no validation rows with true choice probabilities and a slate size of {sorted(habit)}")
    d = Discriminator(cfg.gail, [*train, *rows])
    people = [np.array(ex.true_choice_probs) / sum(ex.true_choice_probs) for ex in rows]
    policy = [habit[ex.n_options] for ex in rows]
    oracle = [h / (h + q) for h, q in zip(people, policy)]
    print(f"{len(rows)} validation rows; policy position habit: "
          + "; ".join(f"{k} options {np.round(v, 3).tolist()}" for k, v in sorted(habit.items())))
    print(f"oracle D: gap {np.mean([o @ h - o @ q for o, h, q in zip(oracle, people, policy)]):+.3f}")
    print("| checkpoint | D updates | gap people - policy | logit at the habit's position - others | "
          "mean P(human), people |\n|---|---|---|---|---|")
    for checkpoint in args.checkpoints:
        state = torch.load(checkpoint / "extra.pt", weights_only=False)["rewards"]["gail"]
        d.load_state_dict(state)
        gaps, favourite, human = [], [], []
        for ex, h, q in zip(rows, people, policy):
            z = d.logits([ex] * ex.n_options, list(range(1, ex.n_options + 1))).numpy()
            prob = 1 / (1 + np.exp(-z))
            gaps.append(prob @ h - prob @ q)
            top = int(np.argmax(q))
            favourite.append(z[top] - np.delete(z, top).mean())
            human.append(prob @ h)
        print(f"| {checkpoint.name} | {state['updates']} | {np.mean(gaps):+.3f} | {np.mean(favourite):+.3f} | "
              f"{np.mean(human):.3f} |")


if __name__ == "__main__":
    main()
