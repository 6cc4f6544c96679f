"""grailcore: a from-scratch GRPO / GRAIL trainer for simulating people and reasoning.

Imports sit at the top of each module, except those of heavy or optional libraries
(transformers, peft, vLLM, datasets, matplotlib, wandb, huggingface_hub, pyarrow): these are
imported inside the function that needs them, so that importing grailcore, its config and
its command-line parsing stays fast and works without the optional ones installed.
"""

__version__ = "0.1.0"
