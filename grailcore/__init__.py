"""grailcore: a from-scratch GRPO / GRAIL trainer for simulating people and reasoning."""

__version__ = "0.1.0"
