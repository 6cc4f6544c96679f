"""Every preset in configs/ loads and passes validation; the CLI overrides and rejects."""

from __future__ import annotations

from pathlib import Path

import pytest

from grailcore.cli import load_preset, parse_config
from grailcore.config import ConfigError
from grailcore.validation import validate

PRESETS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.py"))


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.name)
def test_preset_loads_and_validates(path):
    cfg = load_preset(str(path))
    validate(cfg)
    assert cfg.run_dir.startswith("runs/")


def test_overrides_reach_nested_fields():
    cfg = parse_config(["--cfg", str(PRESETS[0]), "--optim.lr", "1e-6", "--grpo.group-size", "8"])
    assert cfg.optim.lr == 1e-6 and cfg.grpo.group_size == 8


@pytest.mark.parametrize("args, message", [
    (["--grpo.group-size", "1"], "group_size must be >= 2"),
    (["--optim.lr", "-1"], "optim.lr must be > 0"),
    (["--rewards.names", "nope", "--rewards.weights", "1"], "unknown reward"),
    (["--rewards.names", "format", "--rewards.weights", "1", "2"], "same length"),
])
def test_invalid_settings_fail_with_the_field_named(args, message):
    with pytest.raises(ConfigError, match=message):
        validate(parse_config(args))


def test_unknown_field_in_yaml_is_named(tmp_path):
    preset = tmp_path / "x.yaml"
    preset.write_text("optim:\n  lr: 1.0e-6\n  learning_rate: 3\n")
    with pytest.raises(ConfigError, match="learning_rate"):
        load_preset(str(preset))


def test_yaml_preset_round_trip(tmp_path):
    preset = tmp_path / "x.yaml"
    preset.write_text("run_dir: runs/y\ngrpo:\n  group_size: 6\nrewards:\n  names: [format]\n  weights: [1.0]\n")
    cfg = load_preset(str(preset))
    assert cfg.grpo.group_size == 6 and cfg.rewards.names == ("format",)
