"""rollout.engine_dtype: "auto" reads the CPU's bf16 flags (or the GPU's bf16 support), an
explicit setting wins; fed other machines' /proc/cpuinfo."""

from __future__ import annotations

import pytest

from grailcore.rollout.precision import CpuInfo, cpu_note, read_cpu_info, resolve_engine_dtype

AVX2_ONLY = "fpu vme sse sse2 ssse3 fma sse4_1 sse4_2 avx f16c avx2 bmi1 bmi2"
# AVX-512 without BF16 (Skylake-SP): torch's mkldnn bf16 check says yes here; the engine must not.
AVX512_NO_BF16 = AVX2_ONLY + " avx512f avx512dq avx512cd avx512bw avx512vl"
ZEN4 = AVX512_NO_BF16 + " avx512_bf16 avx512_vnni"
SAPPHIRE_RAPIDS_AMX_ONLY = AVX512_NO_BF16 + " amx_bf16 amx_tile amx_int8"

CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 9R14 96-Core Processor
flags\t\t: {flags}

processor\t: 1
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 9R14 96-Core Processor
flags\t\t: {flags} amx_bf16
"""


def cpu(flags: str) -> CpuInfo:
    return CpuInfo("Test CPU", frozenset(flags.split()))


@pytest.mark.parametrize("flags, expected", [
    (AVX2_ONLY, "float32"),
    (AVX512_NO_BF16, "float32"),
    (ZEN4, "bfloat16"),
    (SAPPHIRE_RAPIDS_AMX_ONLY, "bfloat16"),
    ("", "float32"),
])
def test_auto_reads_native_bf16_flags(flags, expected):
    choice = resolve_engine_dtype("auto", "cpu", cpu(flags))
    assert choice.name == expected
    assert "Test CPU" in choice.reason
    if expected == "bfloat16":
        assert any(f in choice.reason for f in ("avx512_bf16", "amx_bf16"))
    else:
        assert "no native bf16" in choice.reason


@pytest.mark.parametrize("setting", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("flags", [AVX2_ONLY, ZEN4])
def test_explicit_setting_wins(setting, flags):
    choice = resolve_engine_dtype(setting, "cpu", cpu(flags))
    assert choice.name == setting and "configured" in choice.reason
    assert resolve_engine_dtype(setting, "cuda", cuda_bf16=False).name == setting


@pytest.mark.parametrize("cuda_bf16, expected", [(True, "bfloat16"), (False, "float32")])
def test_auto_on_gpu_follows_its_bf16_support(cuda_bf16, expected):
    # The CPU's flags do not matter for a CUDA engine.
    assert resolve_engine_dtype("auto", "cuda", cpu(AVX2_ONLY), cuda_bf16=cuda_bf16).name == expected


def test_cpuinfo_parsing_reads_the_first_processor(tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_text(CPUINFO.format(flags=AVX2_ONLY))
    info = read_cpu_info(path)
    assert info.model == "AMD EPYC 9R14 96-Core Processor"
    assert "avx2" in info.flags and "amx_bf16" not in info.flags
    assert resolve_engine_dtype("auto", "cpu", info).name == "float32"
    path.write_text(CPUINFO.format(flags=ZEN4))
    assert resolve_engine_dtype("auto", "cpu", read_cpu_info(path)).name == "bfloat16"


def test_no_cpuinfo_means_float32(tmp_path):
    info = read_cpu_info(tmp_path / "absent")
    assert info == CpuInfo("", frozenset())
    assert resolve_engine_dtype("auto", "cpu", info).name == "float32"


def test_this_machine_is_resolved_from_its_own_flags():
    info = read_cpu_info()
    has_native = bool({"avx512_bf16", "amx_bf16"} & info.flags)
    assert resolve_engine_dtype("auto", "cpu").name == ("bfloat16" if has_native else "float32")


def test_cpu_note_names_the_model_and_its_bf16_support():
    assert cpu_note(CpuInfo("AMD EPYC", frozenset(ZEN4.split()))).startswith("cpu: AMD EPYC, ")
    assert cpu_note(CpuInfo("AMD EPYC", frozenset(ZEN4.split()))).endswith("avx512f: yes, native bf16 matmul: avx512_bf16")
    assert cpu_note(CpuInfo("", frozenset(AVX2_ONLY.split()))).endswith("avx512f: no, native bf16 matmul: no")
    assert "cpu: unknown" in cpu_note(CpuInfo("", frozenset()))
