"""CPU demo of GRAIL: configs/demo_gun.py (GRPO from the SFT warm start of
configs/demo_sft_gun.py: run that first) plus the MiniLM discriminator, whose reward for
looking human (`gail`) joins the rule rewards in rewards.names / rewards.weights.
`python -m grailcore.train --cfg configs/demo_grail_gun.py`

Watch gail/* in the logs: p_human_expert should rise above p_human_policy."""

import dataclasses
from pathlib import Path

from grailcore.cli import load_preset
from grailcore.config import GailConfig

# The GRPO demo with the discriminator added: the two differ in nothing else.
_demo_gun = load_preset(str(Path(__file__).with_name("demo_gun.py")))

config = dataclasses.replace(
    _demo_gun,
    run_dir="runs/demo_grail_gun",
    # gail's weight 0.25 * its clip 2: capped at +-0.5, so the rule rewards (up to 1.5) still lead.
    rewards=dataclasses.replace(_demo_gun.rewards, names=(*_demo_gun.rewards.names, "gail"),
                                weights=(*_demo_gun.rewards.weights, 0.25)),
    gail=GailConfig(
        model="minilm-l6", max_tokens=256,
        # A faster D than the real recipes' so it has learned something within 20 steps.
        lr=5e-5, disc_steps=1,
        reward="logit", reward_clip=2.0,
        negatives="all", replay_size=64, replay_ratio=0.5,
    ),
)
