"""Experiment tracking: the trackers `training_config.report_to` names (W&B where only wandb_config is set).

TensorBoard: transformers' TensorBoardCallback writing to the job's own folder, uploaded when the attempt ends
to `gs://{export bucket}/tensorboard/{job_id}/attempt-{n}/` (one run per attempt under one logdir); the
document's `tensorboard_path` is that logdir. comet_ml and mlflow go to the Trainer's own integrations,
where their packages are installed (job/services.py refuses them otherwise), with their keys from the
environment (COMET_API_KEY, MLFLOW_TRACKING_TOKEN, MLFLOW_TRACKING_PASSWORD), masked in every log line.
Every tracker's callback is wrapped in `Tolerant`: its failure is a warning, never the job's.

W&B runs online with a key (the request's, else WANDB_API_KEY) and offline without one, or as
WANDB_MODE says; the run's config is the request with secrets masked. Tracking never costs a run:
- a key W&B itself rejects as malformed is a permanent error at pre-flight (`check`), before any model;
- W&B unreachable or failing at start: the run continues offline (`init_timeout_s` bounds the wait), the
  job document gets a warning, and the offline folder is uploaded for `wandb sync` (base.py);
- W&B failing later (logging, an artifact, finishing): a warning, and training goes on (`Tolerant` wraps
  the Trainer's W&B callback, whose first failure stops it for the rest of the run).
`log_model`: `end` logs the exported, verified model folder as a W&B artifact; `checkpoint` logs each
checkpoint as it is uploaded to the bucket.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Protocol

from runtime.errors import PermanentError

logger = logging.getLogger(__name__)


class RunLogger(Protocol):
    report_to: list[str]
    warnings: list[str]
    listener: Any  # called with each warning's message (the job's events), or None

    def start(self, job_id: str, config: dict[str, Any]) -> str | None:
        """Start the run; return its URL (None offline)."""
    def log_model(self, folder: Path, name: str, kind: str) -> None:
        """Log a model folder as an artifact, if the request's log_model asks for that kind (end|checkpoint)."""
    def finish(self, ok: bool) -> Path | None:
        """End the run; the run's folder if it ran offline (to upload for `wandb sync`), else None."""
    def warn(self, message: str) -> None:
        """Record a tracking problem: logged, written to the job document's `warnings`, and handed to `listener`
        (the job's events), where one is set."""
    def log_image(self, name: str, png: bytes) -> None:
        """Log a figure (PNG bytes) to the run, where there is one."""


class NullRunLogger:
    def __init__(self):
        self.report_to: list[str] = []
        self.warnings: list[str] = []
        self.listener = None

    def warn(self, message: str) -> None:
        logger.warning("%s", message)
        self.warnings.append(message)
        if self.listener is not None:
            self.listener(message)

    def start(self, job_id: str, config: dict[str, Any]) -> str | None:
        return None

    def log_model(self, folder: Path, name: str, kind: str) -> None:
        return None

    def log_image(self, name: str, png: bytes) -> None:
        return None

    def finish(self, ok: bool) -> Path | None:
        return None


class WandbRunLogger:
    def __init__(self, project: str, api_key: str | None, log_model: str, directory: Path,
                 mode: str | None = None, key_name: str = "wandb_config.api_key", init_timeout_s: float = 20.0):
        self.project, self.api_key, self.log_model_when, self.dir = project, api_key, log_model, directory
        self.mode = mode or ("online" if api_key else "offline")
        self.key_name, self.init_timeout_s = key_name, init_timeout_s
        self.run = None
        self.warnings: list[str] = []
        self.listener = None

    @property
    def report_to(self) -> list[str]:
        return ["wandb"] if self.run is not None else []

    def check(self) -> None:
        """Pre-flight: a key that W&B's own format check rejects can never log in; say so now (exit 2)."""
        if self.mode != "online":
            return
        from wandb.sdk.lib.wbauth.validation import check_api_key

        problem = check_api_key(self.api_key or "")
        if problem:
            raise PermanentError(f"{self.key_name}: W&B rejects this key: {problem} Copy the key from "
                                 "https://wandb.ai/authorize, or remove wandb_config to train without W&B.")

    def start(self, job_id: str, config: dict[str, Any]) -> str | None:
        self.dir.mkdir(parents=True, exist_ok=True)
        try:
            self.run = self._init(job_id, config, self.mode)
        except Exception as e:
            if self.mode == "disabled":
                raise
            self.warn(f"W&B could not start online ({type(e).__name__}: {str(e)[:200]}); the run continues "
                      "offline and its folder is uploaded for `wandb sync`")
            try:
                # The failed start still holds the run id in W&B's service process ("run ID ... is in use"):
                # a fresh service takes the offline run.
                import wandb

                wandb.teardown()
                self.run = self._init(job_id, config, "offline")
                self.mode = "offline"
            except Exception as e2:
                self.warn(f"W&B could not start offline either ({type(e2).__name__}: {str(e2)[:200]}); "
                          "training goes on without W&B")
                self.run = None
                return None
        logger.info("W&B run %s (%s)", self.run.id, self.mode)
        return self.run.url if self.mode == "online" else None

    def _init(self, job_id: str, config: dict[str, Any], mode: str):
        import wandb

        settings = wandb.Settings(silent=True, init_timeout=self.init_timeout_s,
                                  **({"api_key": self.api_key} if self.api_key and mode == "online" else {}))
        # id=job_id with resume="allow": a retried attempt continues the same run.
        return wandb.init(project=self.project, name=job_id, id=job_id, resume="allow", mode=mode,
                          config=config, dir=str(self.dir), settings=settings)

    def warn(self, message: str) -> None:
        logger.warning("%s", message)
        self.warnings.append(message)
        if self.listener is not None:
            self.listener(message)

    def log_model(self, folder: Path, name: str, kind: str) -> None:
        if self.run is None or self.log_model_when != kind:
            return
        try:
            import wandb

            artifact = wandb.Artifact(name=name, type="model")
            artifact.add_dir(str(folder))
            self.run.log_artifact(artifact)
            logger.info("logged %s to W&B as artifact %s", folder.name, name)
        except Exception as e:
            self.warn(f"W&B could not log the model artifact {name} ({type(e).__name__}: {str(e)[:200]})")

    def log_image(self, name: str, png: bytes) -> None:
        if self.run is None:
            return
        try:
            import io

            import wandb
            from PIL import Image

            self.run.log({name: wandb.Image(Image.open(io.BytesIO(png)))})
        except Exception as e:
            self.warn(f"W&B could not log the figure {name} ({type(e).__name__}: {str(e)[:200]})")

    def finish(self, ok: bool) -> Path | None:
        if self.run is None:
            return None
        folder = Path(self.run.dir).parent if self.mode == "offline" else None
        try:
            self.run.finish(exit_code=0 if ok else 1)
            if folder is not None:
                # finish() can return before W&B's service has written the last records (the model artifact)
                # to the run's transaction log; teardown waits for the service to close it, so that the folder
                # uploaded for `wandb sync` is whole (seen once in about five runs of the suite).
                import wandb

                wandb.teardown()
        except Exception as e:
            self.warn(f"W&B could not finish the run ({type(e).__name__}: {str(e)[:200]})")
        self.run = None
        return folder


class TensorBoardLog:
    """The run's TensorBoard event files, in `directory` until they are uploaded."""

    def __init__(self, directory: Path):
        self.dir = directory
        self.callback = None

    def make_callback(self):
        """transformers' TensorBoardCallback, writing to this folder (its default is under output_dir)."""
        from transformers.integrations import TensorBoardCallback

        self.dir.mkdir(parents=True, exist_ok=True)
        self.callback = TensorBoardCallback()
        self.callback.logging_dir = str(self.dir)
        return self.callback

    def close(self) -> Path | None:
        """Flush and close the writer (the final evaluation comes after training's end); the folder if it holds
        event files."""
        writer = getattr(self.callback, "tb_writer", None)
        if writer is not None:
            writer.close()
            self.callback.tb_writer = None
        return self.dir if self.dir.is_dir() and any(self.dir.rglob("events.out.tfevents.*")) else None


class Tolerant:
    """A Trainer callback whose failures cost a warning, not the run: the first exception in any event
    turns the wrapped callback off for the rest of training. For trackers only, never for callbacks the
    job's correctness depends on (checkpoints, the stop guard)."""

    def __init__(self, inner, warn):
        self.inner, self.warn, self.failed = inner, warn, False

    def __getattr__(self, name: str):
        event = getattr(self.inner, name)
        if not name.startswith("on_"):
            return event

        def guarded(*args, **kwargs):
            if self.failed:
                return None
            try:
                return event(*args, **kwargs)
            except Exception as e:
                self.failed = True
                self.warn(f"{type(self.inner).__name__} failed in {name} ({type(e).__name__}: {str(e)[:200]}); "
                          "training goes on without it")
                return None
        return guarded
