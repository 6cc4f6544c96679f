"""A check of the GRPO plumbing on the viewer demo: train with a fixed rule reward shaped like
GRAIL's D reward on the demo's warm start, `avoid_shown_3`: the option shown third pays -1,
any other committed answer +1, a dodge (no committed answer in the layout) -2. If the
policy's on-slate mass on the third option rose under it, rewards would reach the wrong
completions somewhere. The trainer's own entry point, with the reward registered first:

    python experiments/position_probe.py --cfg configs/demo_gun.py --model.name-or-path runs/demo_sft_gun/final \\
        --run-dir runs/probe_avoid3 --eval.no-on-start --rewards.names format avoid_shown_3 --rewards.weights 0.5 1.0
"""

from grailcore import cli
from grailcore.rewards.registry import register
from grailcore.rewards.viewer import committed_answer
from grailcore.train import main


@register("avoid_shown_3", task="viewer")
def avoid_shown_3(example, completion: str) -> float:
    answer = committed_answer(example, completion)
    return -2.0 if answer is None else (-1.0 if answer == 3 else 1.0)


if __name__ == "__main__":
    cli.command(main)
