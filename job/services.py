"""The job's services for its backend, built from `Settings` (main.py reads the environment into them):
the job document store, the buckets, the Hub and the W&B run logger, each the local implementation
(BACKEND=local, tests, `make demo`) or the cloud one. Only the implementing classes import the
Google, Hugging Face and W&B clients.
"""

from __future__ import annotations

import importlib.util
import tempfile
from pathlib import Path

from job_manager import FirestoreJobStore, LocalJobStore
from runtime.errors import PermanentError
from runtime.settings import Settings
from runtime.tracking import NullRunLogger, TensorBoardLog, WandbRunLogger
from schema import TrainRequest, WandbConfig
from storage import GcsBlobStore, HfModelHub, LocalBlobStore, LocalModelHub

# Trackers handed to the Trainer's own integration where their package (of the same name) is installed; this
# image has neither.
INTEGRATIONS = ("comet_ml", "mlflow")


def open_store(settings: Settings, dry_run: bool = False):
    if dry_run:
        return LocalJobStore(tempfile.mkdtemp())  # --validate leaves no state behind
    if settings.backend == "local":
        return LocalJobStore(settings.local_dir)
    # a call waits 10 s at most (training goes on, the tracker catches up), and never past the give-up
    return FirestoreJobStore(settings.project_id, settings.firestore_db, min(10.0, settings.give_up_s))


def make_blobs(settings: Settings):
    if settings.backend == "local":
        return LocalBlobStore(settings.local_dir)
    return GcsBlobStore(settings.project_id, give_up_s=settings.give_up_s)


def make_services(settings: Settings, request: TrainRequest, tracker, blobs, guard=None):
    """The rest of the services once the request is known (its token and W&B settings choose them)."""
    from base import Services  # numpy and the workflow: not needed to reject a bad request

    local = settings.backend == "local"
    hub = LocalModelHub(settings.local_dir) if local else HfModelHub(settings.hub_token(request), settings.hf_endpoint)
    trackers = request.training_config.trackers
    for name in trackers:
        if name in INTEGRATIONS and importlib.util.find_spec(name) is None:
            raise PermanentError(f"training_config.report_to: '{name}' needs the {name} package, which this image "
                                 f"does not have; add `{name}` to requirements.txt and rebuild the image (pip "
                                 f"install {name}), or remove '{name}' from report_to.")
    wb = request.training_config.wandb_config or WandbConfig()
    runs = NullRunLogger()
    if settings.rank != 0:  # one of several processes: rank 0 alone talks to the trackers
        return Services(blobs, hub, tracker, runs, guard, None, ())
    if "wandb" in trackers and settings.wandb_mode != "disabled":
        key, key_name = settings.wandb_key(request)
        runs = WandbRunLogger(wb.project, key, wb.log_model,
                              Path(settings.local_dir) / "wandb", settings.wandb_mode, key_name,
                              settings.wandb_init_timeout_s)
        runs.check()  # a malformed key: exit 2 now, not after the model has loaded
    runs.listener = lambda message: tracker.event("warning", message=message)
    tensorboard = TensorBoardLog(settings.workdir / "tensorboard") if "tensorboard" in trackers else None
    return Services(blobs, hub, tracker, runs, guard, tensorboard, tuple(t for t in trackers if t in INTEGRATIONS))
