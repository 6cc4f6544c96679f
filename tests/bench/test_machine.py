"""bench/machine.py: a result names the instruction-set caps it ran under, so a run that
emulates an AVX2-only CPU on an AVX-512 one cannot be read as the CPU's own speed."""

from __future__ import annotations

from bench import machine


def test_isa_caps_are_recorded_only_when_set(monkeypatch):
    for name in machine.ISA_CAPS:
        monkeypatch.delenv(name, raising=False)
    assert "isa_caps" not in machine.describe() and "capped" not in machine.summary()
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    assert machine.describe()["isa_caps"] == {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
    assert machine.summary().endswith("capped: ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2")
