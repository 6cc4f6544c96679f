"""Capture and restore every RNG a run draws from (python, numpy, torch CPU and CUDA), as
plain containers a checkpoint stores and `torch.load(weights_only=True)` reads back."""

from __future__ import annotations

import hashlib
import random
import warnings

import numpy as np
import torch


SEED_BITS = 62
"""Derived seeds stay below 2**62: vLLM adds a child's index, torch takes up to 2**64."""


def derive_seed(*parts: object) -> int:
    """A seed that is a hash of `parts` (ints, strings): stable across processes and runs,
    and far from every other derived seed, so consecutive seeds (vLLM gives child k of a
    request seed + k) never make two prompts' samples share a stream."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> (64 - SEED_BITS)


def capture_rng_state() -> dict:
    """This process's python, numpy, torch CPU (and current CUDA device) RNG states.

    Plain containers, ints and tensors only, so `torch.load(weights_only=True)` reads them.
    """
    numpy_state = np.random.get_state(legacy=False)
    state = {
        "python": random.getstate(),
        "numpy": {**numpy_state, "state": {"key": numpy_state["state"]["key"].tolist(),
                                           "pos": int(numpy_state["state"]["pos"])}},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict) -> None:
    """Inverse of `capture_rng_state`; the next random draws repeat those after capture."""
    random.setstate(state["python"])
    numpy_state = state["numpy"]
    np.random.set_state({**numpy_state, "state": {
        "key": np.asarray(numpy_state["state"]["key"], dtype=np.uint32),
        "pos": numpy_state["state"]["pos"]}})
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    elif "cuda" in state:
        warnings.warn("checkpoint has a CUDA RNG state but CUDA is unavailable; CPU RNGs restored only",
                      RuntimeWarning, stacklevel=2)
