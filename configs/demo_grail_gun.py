"""CPU demo of GRAIL: configs/demo_gun.py plus the MiniLM discriminator, whose reward for
looking human is added to the rule rewards. `python -m grailcore.train --cfg configs/demo_grail_gun.py`.

D costs a few seconds a step on 2 cores (MiniLM, 256 tokens); watch gail/* in the logs:
p_human_expert should rise above p_human_policy within the 20 steps."""

import dataclasses
import importlib.util
from pathlib import Path

from grailcore.config import GailConfig


def _demo_gun():
    spec = importlib.util.spec_from_file_location("demo_gun", Path(__file__).with_name("demo_gun.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.config


config = dataclasses.replace(
    _demo_gun(),
    run_dir="runs/demo_grail_gun",
    gail=GailConfig(
        enabled=True, model="minilm-l6", max_tokens=256,
        # A faster D than the real recipes' so it has learned something within 20 steps.
        lr=5e-5, disc_steps=1,
        # Capped at +-0.5 after weighting: the rule rewards (up to 2) still lead.
        reward="logit", weight=0.25, reward_clip=2.0,
        negatives="all", replay_size=64, replay_ratio=0.5,
    ),
)
