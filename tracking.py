"""Experiment tracking: Weights & Biases when the request asks for it, nothing otherwise.

W&B runs online with a key (the request's, else WANDB_API_KEY) and offline without one; the run's
config is the request with secrets masked.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Protocol

logger = logging.getLogger(__name__)


class RunLogger(Protocol):
    report_to: list[str]

    def start(self, job_id: str, config: dict[str, Any]) -> str | None:
        """Start the run; return its URL (None offline)."""
    def finish(self, ok: bool) -> None: ...


class NullRunLogger:
    report_to: list[str] = []

    def start(self, job_id: str, config: dict[str, Any]) -> str | None:
        return None

    def finish(self, ok: bool) -> None:
        return None


class WandbRunLogger:
    report_to = ["wandb"]

    def __init__(self, project: str, api_key: str | None, log_model: str, directory: Path):
        self.project, self.api_key, self.log_model, self.dir = project, api_key, log_model, directory
        self.run = None

    def start(self, job_id: str, config: dict[str, Any]) -> str | None:
        import wandb

        self.dir.mkdir(parents=True, exist_ok=True)
        mode = "online" if self.api_key else "offline"
        settings = wandb.Settings(api_key=self.api_key, silent=True) if self.api_key else wandb.Settings(silent=True)
        # id=job_id with resume="allow": a retried attempt continues the same run.
        self.run = wandb.init(project=self.project, name=job_id, id=job_id, resume="allow", mode=mode,
                              config=config, dir=str(self.dir), settings=settings)
        logger.info("W&B run %s (%s)", self.run.id, mode)
        return self.run.url if mode == "online" else None

    def finish(self, ok: bool) -> None:
        if self.run is not None:
            self.run.finish(exit_code=0 if ok else 1)
            self.run = None
