"""Config from the command line: `--cfg configs/x.py|x.yaml` picks a preset, tyro
overrides any field (`--optim.lr 1e-6 --grpo.group-size 8`); `command` runs an entry
point so that bad input prints as one line (exit 2), with `--debug` for the traceback."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import tyro
import yaml

from grailcore import dist
from grailcore.config import Config, ConfigError
from grailcore.data.schema import SchemaError
from grailcore.model import ModelNotFoundError

USER_ERRORS = (ConfigError, SchemaError, ModelNotFoundError)
"""Bad input (settings, data rows, model dirs) whose message already says what to change."""
DEBUG_FLAG = "--debug"
_MOVED = {"gail.enabled": "list 'gail' in rewards.names instead",
          "gail.weight": "give 'gail' its weight in rewards.weights instead"}
"""Fields that no longer exist, and where their setting lives now."""


def load_preset(path: str) -> Config:
    """A `Config` from a python preset (a module-level `config`) or a YAML/JSON file."""
    file = Path(path)
    if not file.exists():
        raise ConfigError(f"--cfg {path}: no such file (presets live in configs/)")
    if file.suffix == ".py":
        spec = importlib.util.spec_from_file_location(f"grailcore_preset_{file.stem}", file)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        cfg = getattr(module, "config", None)
        if not isinstance(cfg, Config):
            raise ConfigError(f"--cfg {path}: the file must define `config = Config(...)`")
        return cfg
    if file.suffix in (".yaml", ".yml", ".json"):
        data = yaml.safe_load(file.read_text()) or {}
        return from_dict(data, where=str(path))
    raise ConfigError(f"--cfg {path}: expected a .py, .yaml, .yml or .json file")


def from_dict(data: dict[str, Any], where: str, cls: type = Config) -> Any:
    """Build a (nested) config dataclass from a dict; unknown keys are an error naming them."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        section = where.rsplit(":", 1)[-1] if ":" in where else ""
        hints = [f"{section}.{name}: {_MOVED[f'{section}.{name}']}" for name in unknown if f"{section}.{name}" in _MOVED]
        raise ConfigError(f"{where}: unknown config field(s) {unknown} in {cls.__name__}; "
                          f"known: {sorted(fields)}" + "".join(f"; {hint}" for hint in hints))
    kwargs = {}
    for name, value in data.items():
        default = getattr(cls(), name)
        if dataclasses.is_dataclass(default):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: field '{name}' must be a mapping")
            kwargs[name] = from_dict(value, f"{where}:{name}", type(default))
        elif isinstance(default, tuple) and isinstance(value, list):
            kwargs[name] = tuple(tuple(v) if isinstance(v, list) else v for v in value)
        else:
            kwargs[name] = value
    return cls(**kwargs)


def parse_config(argv: Sequence[str], description: str = "") -> Config:
    args = list(argv)
    base = Config()
    if "--cfg" in args:
        i = args.index("--cfg")
        if i + 1 >= len(args):
            raise ConfigError("--cfg needs a file path")
        base = load_preset(args[i + 1])
        del args[i:i + 2]
    return tyro.cli(Config, default=base, args=args, description=description)


def save_config(cfg: Config, run_dir: Path) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    out = run_dir / "config.yaml"
    tmp = out.with_suffix(".yaml.tmp")
    tmp.write_text(yaml.safe_dump(json.loads(json.dumps(dataclasses.asdict(cfg))), sort_keys=False))
    tmp.replace(out)
    return out


def command(main: Callable[[list[str]], object], argv: Sequence[str] | None = None) -> None:
    """Run an entry point's `main(argv)` as a command. Bad input (USER_ERRORS) prints as one
    line on rank 0 and exits 2, like a usage error; `--debug` anywhere in argv re-raises it
    with its traceback. A finished torchrun worker then leaves (dist.exit_finished_worker)."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = DEBUG_FLAG in args
    try:
        main([a for a in args if a != DEBUG_FLAG])
    except USER_ERRORS as err:
        if debug:
            raise
        if dist.get_rank() == 0:
            print(f"error: {' '.join(str(err).split())}", file=sys.stderr, flush=True)
        sys.exit(2)
    dist.exit_finished_worker()
