"""GRAIL on the gun-control study with Qwen2.5-1.5B-Instruct (GPU, vLLM rollouts).

The model path is a PLACEHOLDER: put an HF dir of Qwen2.5-1.5B-Instruct at
models/Qwen2.5-1.5B-Instruct or pass `--model.name-or-path /your/dir` (nothing is
downloaded). Data defaults to the synthetic study; for the real one pass
`--data.train-path <study dir | JSONL | parquet>` (rows need option texts for D).
Launch: `torchrun --nproc_per_node 8 -m grailcore.train --cfg configs/grail_gun.py`.
"""

import dataclasses
from pathlib import Path

from grailcore.cli import load_preset
from grailcore.config import GailConfig

# The GRPO arm with the discriminator's reward added: the two arms differ in nothing else.
_grpo = load_preset(str(Path(__file__).with_name("grpo_gun.py")))

config = dataclasses.replace(
    _grpo,
    run_dir="runs/grail_gun",
    # gail's weight 0.5 * its clip 2 = 1 = slate_accuracy's range: a confident D cannot swamp it.
    rewards=dataclasses.replace(_grpo.rewards, names=(*_grpo.rewards.names, "gail"),
                                weights=(*_grpo.rewards.weights, 0.5)),
    gail=GailConfig(
        model="minilm-l6", max_tokens=512,
        lr=2e-5, disc_steps=1,
        # logit = log D - log(1 - D): GAIL's density-ratio reward, clipped (see the weight above).
        reward="logit", reward_clip=2.0,
        # "all": every parsed policy choice is a negative (the unbiased GAIL estimate), so D
        # learns p_human / (p_human + p_policy) and pays choices humans make more often
        # than the policy, i.e. it pushes toward human choice distributions.
        negatives="all", replay_size=2048, replay_ratio=0.5, label_smoothing=0.1,
    ),
)
