"""GRPO on the minimum-wage study with Qwen2.5-1.5B-Instruct (GPU, vLLM rollouts): the baseline arm
beside configs/grail_wage.py (same settings, no discriminator).

The model path is a PLACEHOLDER: put an HF dir of Qwen2.5-1.5B-Instruct at
models/Qwen2.5-1.5B-Instruct or pass `--model.name-or-path /your/dir` (nothing is
downloaded). Data defaults to the synthetic study; for real data pass
`--data.train-path <study dir | JSONL | parquet>` and `--data.eval-path`.
Launch: `torchrun --nproc_per_node 8 -m grailcore.train --cfg configs/grpo_wage.py`.
"""

import dataclasses
from pathlib import Path

from grailcore.cli import load_preset

# The gun-control recipe on the other issue: only the run dir and the data change.
_gun = load_preset(str(Path(__file__).with_name("grpo_gun.py")))

config = dataclasses.replace(
    _gun,
    run_dir="runs/grpo_wage",
    data=dataclasses.replace(_gun.data, train_path="synthetic:minimum_wage"),
)
