"""bench/train_step.py's summary: ratios pair each grailcore system with the TRL run of its own
phase, and the last table picks the phase whose TRL step was fastest."""

from __future__ import annotations

import pytest

pytest.importorskip("trl", reason="trl is a bench extra (pip install -e '.[bench]')")

from bench.train_step import against_fastest_trl, summarize  # noqa: E402


def record(phase, system, step, step_s, training_s, sync_s=0.0):
    generation_s = step_s - training_s - sync_s
    return {"system": system, "phase": phase, "step": step, "engine_dtype": "bfloat16", "step_s": step_s,
            "generation_s": generation_s, "generation_cpu_s": generation_s, "training_s": training_s,
            "weight_sync_s": sync_s, "forward_backward_s": training_s, "completion_tokens": 100,
            "trained_tokens": 1000, "cpu_s": step_s, "peak_extra_mib": 1.0, "matmul_peak_gflop_per_s": 200.0,
            "training_cpu_s": training_s, "train_gflop_per_s": 1.0, "fwd_bwd_gflop_per_s": 1.0,
            "fwd_bwd_of_peak": 0.5, "train_of_peak": 0.5, "train_gflop_per_cpu_s": 1.0,
            "completion_tok_per_s": 1.0, "trained_tok_per_s": 1.0}


def test_ratios_are_per_phase_and_the_fastest_trl_phase_is_picked():
    records = [
        record("gc", "trl_gc", 0, 999.0, 900.0),  # warm-up: dropped
        record("gc", "trl_gc", 1, 100.0, 60.0), record("gc", "trl_gc", 2, 120.0, 80.0),
        record("gc", "shared", 0, 999.0, 1.0, 0.5),
        record("gc", "shared", 1, 20.0, 10.0, 0.4), record("gc", "shared", 2, 30.0, 10.0, 0.6),
        record("no_gc", "trl_no_gc", 0, 999.0, 900.0),
        record("no_gc", "trl_no_gc", 1, 80.0, 40.0), record("no_gc", "trl_no_gc", 2, 80.0, 40.0),
        record("no_gc", "shared", 0, 999.0, 1.0),
        record("no_gc", "shared", 1, 40.0, 20.0, 0.4), record("no_gc", "shared", 2, 40.0, 20.0, 0.4),
    ]
    rows = {(r["phase"], r["system"]): r for r in summarize(records, warmup=1)}
    assert rows["gc", "trl_gc"]["step_s"] == 110.0 and rows["gc", "trl_gc"]["step_vs_trl"] == 1.0
    assert rows["gc", "shared"]["step_vs_trl"] == round(25.0 / 110.0, 3)
    assert rows["gc", "shared"]["training_vs_trl"] == round(10.0 / 70.0, 3)
    assert rows["gc", "shared"]["sync_share"] == round(0.5 / 25.0, 4)
    assert rows["no_gc", "shared"]["step_vs_trl"] == 0.5  # against its own phase's TRL, not gc's
    fastest = against_fastest_trl(list(rows.values()))
    assert fastest == [{"system": "shared", "fastest_trl": "trl_no_gc", "trl_step_s": 80.0, "step_s": 40.0,
                        "step_vs_fastest_trl": 0.5, "sync_share": 0.01}]
