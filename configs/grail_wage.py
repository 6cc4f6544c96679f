"""GRAIL on the minimum-wage study with Qwen2.5-1.5B-Instruct (GPU, vLLM rollouts).

The model path is a PLACEHOLDER: put an HF dir of Qwen2.5-1.5B-Instruct at
models/Qwen2.5-1.5B-Instruct or pass `--model.name-or-path /your/dir` (nothing is
downloaded). Data defaults to the synthetic study; for the real one pass
`--data.train-path <study dir | JSONL | parquet>` (rows need option texts for D).
Launch: `torchrun --nproc_per_node 8 -m grailcore.train --cfg configs/grail_wage.py`.
"""

import dataclasses
from pathlib import Path

from grailcore.cli import load_preset

# The gun-control recipe on the other issue: only the run dir and the data change.
_gun = load_preset(str(Path(__file__).with_name("grail_gun.py")))

config = dataclasses.replace(
    _gun,
    run_dir="runs/grail_wage",
    data=dataclasses.replace(_gun.data, train_path="synthetic:minimum_wage"),
)
