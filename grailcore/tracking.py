"""Optional online tracking: Weights & Biases metrics beside the local metrics.jsonl
(`logging.wandb_project`), and uploading the final export to the Hugging Face Hub
(`checkpoint.push_to_hub`). Both libraries are imported only when configured (optional);
`check_tracking` (run by grailcore.validation before anything is built) fails at start, not
after training, when a setting cannot work.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import re
import uuid
from pathlib import Path
from typing import Mapping

from grailcore.config import Config, ConfigError
from grailcore.metrics_log import MetricsLogger

WANDB_ID_FILE = "wandb_run_id"
"""In run_dir: the W&B run id, so a resumed run continues the same W&B run."""
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def check_tracking(cfg: Config) -> None:
    """Raise ConfigError naming the field when a tracking setting cannot work."""
    log_cfg, hub = cfg.logging, cfg.checkpoint.push_to_hub
    if log_cfg.wandb_entity is not None and log_cfg.wandb_project is None:
        raise ConfigError("logging.wandb_entity is set without logging.wandb_project; set the project too")
    if log_cfg.wandb_project is not None:
        if not log_cfg.wandb_project.strip():
            raise ConfigError("logging.wandb_project is empty; give a project name or leave it unset (None)")
        if importlib.util.find_spec("wandb") is None:
            raise ConfigError(f"logging.wandb_project={log_cfg.wandb_project!r} needs the `wandb` package: "
                              "`pip install wandb`, or unset logging.wandb_project")
    if hub is not None:
        if not _REPO_ID.match(hub):
            raise ConfigError(f"checkpoint.push_to_hub={hub!r} is not a Hub repo id; use 'owner/name'")
        if not cfg.checkpoint.export_final:
            raise ConfigError("checkpoint.push_to_hub uploads the final export; set checkpoint.export_final=True")
        if importlib.util.find_spec("huggingface_hub") is None:
            raise ConfigError("checkpoint.push_to_hub needs the `huggingface_hub` package: `pip install huggingface_hub`")


class WandbLogger:
    """MetricsLogger's interface (`log`, `close`, context manager) onto one W&B run; a no-op
    unless `enabled` (rank 0). The run id is kept in run_dir so `--resume` continues it."""

    def __init__(self, cfg: Config, enabled: bool, resume_step: int | None = None) -> None:
        self._run = None
        if not enabled:
            return
        try:
            import wandb
        except ImportError as err:
            raise ConfigError(f"logging.wandb_project={cfg.logging.wandb_project!r} needs the `wandb` package: "
                              "`pip install wandb`, or unset logging.wandb_project") from err
        run_dir = Path(cfg.run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        id_file = run_dir / WANDB_ID_FILE
        if resume_step is None or not id_file.exists():
            id_file.write_text(uuid.uuid4().hex[:16])
        self._run = wandb.init(project=cfg.logging.wandb_project, entity=cfg.logging.wandb_entity,
                               name=run_dir.name, id=id_file.read_text().strip(), resume="allow",
                               dir=str(run_dir), config=dataclasses.asdict(cfg))

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        if self._run is not None:
            self._run.log({name: float(value) for name, value in metrics.items()}, step=step)

    def close(self) -> None:
        if self._run is not None:
            self._run.finish()
            self._run = None

    def __enter__(self) -> WandbLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Loggers:
    """Several loggers behind one MetricsLogger-shaped interface (local first)."""

    def __init__(self, *loggers) -> None:
        self.loggers = loggers

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        for logger in self.loggers:
            logger.log(step, metrics)

    def close(self) -> None:
        for logger in self.loggers:
            logger.close()

    def __enter__(self) -> Loggers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def build_logger(cfg: Config, enabled: bool, resume_step: int | None = None) -> MetricsLogger | Loggers:
    """The run's metric logger: metrics.jsonl (+ TensorBoard), plus W&B when configured."""
    local = MetricsLogger(cfg.run_dir, cfg.logging.tensorboard, enabled=enabled, resume_step=resume_step)
    if cfg.logging.wandb_project is None:
        return local
    return Loggers(local, WandbLogger(cfg, enabled, resume_step))


def push_export(export_dir: str | Path, repo_id: str) -> str:
    """Upload an HF export dir to the Hub repo `repo_id` (created private if absent, since a
    research checkpoint should not go public by accident); returns the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, exist_ok=True, private=True)
    info = api.upload_folder(folder_path=str(export_dir), repo_id=repo_id,
                             commit_message=f"grailcore export from {Path(export_dir).parent.name}")
    return str(getattr(info, "commit_url", info))
