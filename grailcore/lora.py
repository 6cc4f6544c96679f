"""LoRA adapters on the policy (peft), the option to full fine-tuning (`model.lora_rank > 0`).

The HF model stays a plain transformers model whose targeted decoder projections become
peft `lora.Linear` layers (`base_layer` frozen, `lora_A`/`lora_B` trained). Consumers:
setup (inject, freeze), optimize (reference = the same model with adapters off), sync and
export (merged weights W + scale * B @ A under the base names), checkpoint (adapters only).
"""

from __future__ import annotations

import contextlib
import sys
from typing import Callable, Iterator

import torch

from grailcore.config import ConfigError, ModelConfig

BASE_LAYER = ".base_layer."
"""peft's infix: `x.q_proj.base_layer.weight` is the frozen `x.q_proj.weight` of the base model."""
ADAPTER_MARKERS = (".lora_A.", ".lora_B.")


def apply_lora(lm: torch.nn.Module, cfg: ModelConfig, seed: int) -> torch.nn.Module:
    """Inject LoRA adapters into `lm` in place and freeze everything else; returns `lm`.

    Adapters are initialised from `seed` on a forked CPU RNG: every rank starts with the
    same A (B = 0, so the model starts equal to the base) and the run's RNG stream is
    untouched. Call it before moving `lm` to its device and before FSDP sharding.
    """
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.lora import Linear as LoraLinear

    config = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                        target_modules=list(cfg.lora_target_modules), bias="none")
    lm.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            inject_adapter_in_model(config, lm)
        except ValueError as err:  # peft: "Target modules {...} not found in the base model"
            raise ConfigError(f"model.lora_target_modules={list(cfg.lora_target_modules)}: {err}") from err
    layers = lora_layers(lm)
    decoder_prefix = _decoder_layers_prefix(lm)
    misplaced = [name for name in layers if not name.startswith(decoder_prefix)]
    wrong_kind = [name for name, layer in layers.items() if type(layer) is not LoraLinear]
    if misplaced or wrong_kind:
        raise ConfigError(
            f"model.lora_target_modules={list(cfg.lora_target_modules)} matched "
            f"{misplaced or wrong_kind}: adapters go on the linear projections inside the decoder "
            "layers only (the log-prob head reads the embedding / lm-head weight directly)")
    for name, param in lm.named_parameters():
        param.requires_grad_(is_adapter_param(name))
    return lm


def _decoder_layers_prefix(lm: torch.nn.Module) -> str:
    decoder = lm.get_decoder()
    name = next(n for n, m in lm.named_modules() if m is decoder)
    return f"{name}.layers." if name else "layers."


def lora_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """{module name: peft LoRA layer} of `model` (empty for a full fine-tuning policy)."""
    if "peft" not in sys.modules:  # no adapter exists before peft is imported (its import takes seconds)
        return {}
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def has_lora(model: torch.nn.Module) -> bool:
    return bool(lora_layers(model))


def is_adapter_param(name: str) -> bool:
    return any(marker in name for marker in ADAPTER_MARKERS)


@contextlib.contextmanager
def adapters_disabled(model: torch.nn.Module) -> Iterator[None]:
    """Inside, every LoRA layer computes its frozen base layer only: `model` IS the base model.
    peft's own switch (`enable_adapters`, what PeftModel.disable_adapter uses); it also flips
    the adapters' requires_grad, which the exit restores."""
    layers = list(lora_layers(model).values())
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)


class AdapterFreeReference:
    """The KL reference of a LoRA run: the policy itself with its adapters off.

    The base weights never train under LoRA, so this is exactly the initial policy, without
    a second copy of the model. Called like a PolicyModel (same arguments, same result)."""

    def __init__(self, policy: torch.nn.Module) -> None:
        self.policy = policy

    def __call__(self, *args, **kwargs):
        with adapters_disabled(self.policy):
            return self.policy(*args, **kwargs)


def merged_weight(layer: torch.nn.Module, base_weight: torch.Tensor,
                  full: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """W + sum over active adapters of scaling * B @ A, [out, in], in W's dtype (summed in fp32).

    `full` turns a (possibly FSDP-sharded) parameter into its full tensor; it is called on
    each adapter's A then B, in the same order on every rank (the gathers are collectives).
    Neither the layer nor `base_weight` is modified."""
    merged = base_weight.float()
    for adapter in layer.active_adapters:
        a = full(layer.lora_A[adapter].weight.detach()).float()  # [r, in]
        b = full(layer.lora_B[adapter].weight.detach()).float()  # [out, r]
        merged = merged + (b @ a) * layer.scaling[adapter]
    return merged.to(base_weight.dtype)
