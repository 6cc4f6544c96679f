"""CPU demo of the reasoning workload: R1-style GRPO on generated math problems with the
seed's weighted rule rewards, SmolLM2-135M-Instruct, a few steps.

`python -m grailcore.train --cfg configs/r1_math_demo.py`"""

from grailcore.config import (CheckpointConfig, Config, DataConfig, EvalConfig, GRPOConfig, LoggingConfig,
                              ModelConfig, OptimConfig, RewardsConfig, RolloutConfig)
from grailcore.rewards import DEFAULT_MATH_REWARDS

names, weights = DEFAULT_MATH_REWARDS

config = Config(
    run_dir="runs/r1_math_demo",
    seed=0,
    model=ModelConfig(name_or_path="smollm2-135m-instruct", gradient_checkpointing=False, trainable_layers=8),
    data=DataConfig(task="math", train_path="synthetic:math", synthetic_n=500),
    rollout=RolloutConfig(engine="hf", temperature=1.0, max_prompt_tokens=256, max_completion_tokens=96),
    grpo=GRPOConfig(prompts_per_step=4, group_size=4, loss_type="dr_grpo", prefix_sharing=True),
    optim=OptimConfig(lr=1e-5, max_steps=8, micro_batch_size=16),
    rewards=RewardsConfig(names=names, weights=weights, length_target=60),
    eval=EvalConfig(every=0, on_start=True, max_samples=24),
    checkpoint=CheckpointConfig(every=0, keep=1),
    logging=LoggingConfig(log_samples=1),
)
