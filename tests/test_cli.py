"""The command line (grailcore/cli.py): bad input prints as one line and exits 2 from every
entry point; `--debug` shows the traceback; old GAIL fields say where their setting moved."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from grailcore.cli import load_preset
from grailcore.config import ConfigError

REPO = Path(__file__).resolve().parents[1]


def _command(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("module, args, message", [
    ("grailcore.train", ["--cfg", "configs/no_such_preset.py"], "--cfg configs/no_such_preset.py: no such file"),
    ("grailcore.train", ["--grpo.group-size", "1"], "grpo.group_size must be >= 2, got 1"),
    ("grailcore.sft", ["--cfg", "configs/no_such_preset.py"], "no such file"),
    ("grailcore.eval", ["--cfg", "configs/no_such_preset.py"], "no such file"),
], ids=["train-missing-cfg", "train-group-size", "sft-missing-cfg", "eval-missing-cfg"])
def test_a_config_error_is_one_line_and_exit_2(module, args, message):
    proc = _command(module, *args)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], proc.stderr[-3000:]


def test_debug_shows_the_traceback():
    proc = _command("grailcore.train", "--cfg", "configs/no_such_preset.py", "--debug")
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr and "ConfigError: --cfg configs/no_such_preset.py" in proc.stderr


def test_old_gail_fields_name_where_their_setting_lives_now(tmp_path):
    preset = tmp_path / "old.yaml"
    preset.write_text("gail:\n  enabled: true\n  weight: 0.5\n")
    with pytest.raises(ConfigError, match=r"gail.enabled: list 'gail' in rewards.names.*gail.weight: give 'gail'"):
        load_preset(str(preset))
