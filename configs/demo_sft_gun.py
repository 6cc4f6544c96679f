"""CPU demo, part 1: SFT warm start of SmolLM2-135M-Instruct on the synthetic gun study.

SmolLM2 never writes the <think>/<answer>/<opinion> layout on its own (reward 0 for every
sample, so GRPO has no signal); a few SFT steps on gold targets teach the format.
`python -m grailcore.sft --cfg configs/demo_sft_gun.py`, then configs/demo_gun.py."""

from grailcore.config import (CheckpointConfig, Config, DataConfig, EvalConfig, LoggingConfig, ModelConfig,
                              OptimConfig, RolloutConfig, SFTConfig)

config = Config(
    run_dir="runs/demo_sft_gun",
    seed=0,
    model=ModelConfig(name_or_path="smollm2-135m-instruct", dtype="float32", gradient_checkpointing=False,
                      trainable_layers=8),
    data=DataConfig(train_path="synthetic:gun_control", synthetic_n=2000, max_history=2),
    rollout=RolloutConfig(engine="vllm", max_prompt_tokens=768, max_completion_tokens=48, fallback_to_hf=True),
    optim=OptimConfig(lr=2e-4, max_steps=12, micro_batch_size=4, warmup_steps=1, schedule="cosine"),
    sft=SFTConfig(batch_size=8),
    eval=EvalConfig(on_start=True, max_samples=32),
    checkpoint=CheckpointConfig(every=0, keep=1),
    logging=LoggingConfig(log_samples=0),
)
