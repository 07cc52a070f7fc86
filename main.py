"""Run one fine-tuning job. The only reader of the environment (see README and DESIGN.md).

    python main.py                       # BACKEND=local: JOB_ID, or a new id on the embedded default request
    python main.py --config req.json     # take the request from a file
    python main.py --validate            # pre-flight checks only, no model loaded
    python main.py --schema              # JSON Schema of the request
Exit codes: 0 done (or already done, or cancelled), 1 retryable failure, 2 permanent failure.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

from checkpoints import Guard
from errors import Cancelled, PermanentError
from job_manager import FirestoreJobStore, JobTracker, LocalJobStore
from lifecycle import process_age, run_attempt, summary
from logs import setup_logging
from schema import Settings, TrainRequest, check_job_id
from storage import GcsBlobStore, HfModelHub, LocalBlobStore, LocalModelHub
from tracking import NullRunLogger, WandbRunLogger

logger = logging.getLogger("main")
DEFAULT_REQUEST = Path(__file__).parent / "examples" / "local_default.json"


def read_settings(env) -> Settings:
    backend = env.get("BACKEND") or ("gcp" if env.get("CLOUD_RUN_JOB") else "local")
    job_id = env.get("JOB_ID") or (f"local-{time.strftime('%Y%m%d-%H%M%S')}" if backend == "local" else "")
    names = {"project_id": "PROJECT_ID", "firestore_db": "FIRESTORE_DB", "config_bucket": "GCS_CONFIG_BUCKET_NAME",
             "config_uri": "TRAINING_CONFIG_GCS_PATH", "data_bucket": "GCS_DATA_BUCKET_NAME",
             "export_bucket": "GCS_EXPORT_BUCKET_NAME", "hf_token": "HF_TOKEN", "hf_endpoint": "HF_ENDPOINT",
             "wandb_api_key": "WANDB_API_KEY", "local_dir": "LOCAL_DIR", "attempt": "CLOUD_RUN_TASK_ATTEMPT",
             "task_timeout_s": "TASK_TIMEOUT_SECONDS", "deadline_reserve_s": "DEADLINE_RESERVE_SECONDS",
             "gpu_memory_gib": "GPU_MEMORY_GIB"}
    return Settings(job_id=check_job_id(job_id), backend=backend,
                    **{k: env[v] for k, v in names.items() if env.get(v)})


def make_services(settings: Settings, request: TrainRequest, tracker, blobs, guard=None):
    """The rest of the services once the request is known (its token and W&B settings choose them)."""
    from base import Services  # numpy and the workflow: not needed to reject a bad request

    local = settings.backend == "local"
    token = request.hf_token or settings.hf_token
    hub = LocalModelHub(settings.local_dir) if local else HfModelHub(
        token.get_secret_value() if token else None, settings.hf_endpoint)
    wb = request.training_config.wandb_config
    key = (wb.api_key or settings.wandb_api_key) if wb else None
    runs = WandbRunLogger(wb.project, key.get_secret_value() if key else None, wb.log_model,
                          Path(settings.local_dir) / "wandb") if wb else NullRunLogger()
    return Services(blobs, hub, tracker, runs, guard)


def main(argv: list[str] | None = None, env=None) -> int:
    parser = argparse.ArgumentParser(description="Fine-tune a Gemma model: one process, one job.")
    parser.add_argument("--config", help="request JSON file (instead of the config bucket)")
    parser.add_argument("--validate", action="store_true", help="pre-flight checks only; no model is loaded")
    parser.add_argument("--schema", action="store_true", help="print the request's JSON Schema")
    args = parser.parse_args(argv)
    started, startup_s = time.monotonic(), process_age()
    if args.schema:
        print(json.dumps(TrainRequest.model_json_schema(), indent=2))
        return 0
    env = os.environ if env is None else env
    try:
        settings = read_settings(env)
    except (PermanentError, ValueError) as e:
        print(f"invalid environment: {e}", file=sys.stderr)
        return 2
    redact = setup_logging(settings.job_id, json_lines=bool(env.get("CLOUD_RUN_JOB")),
                           level=env.get("LOG_LEVEL", "INFO").upper())
    redact.add(*(s.get_secret_value() for s in (settings.hf_token, settings.wandb_api_key) if s))
    store = (LocalJobStore(tempfile.mkdtemp()) if args.validate else LocalJobStore(settings.local_dir)
             if settings.backend == "local" else FirestoreJobStore(settings.project_id, settings.firestore_db))
    tracker = JobTracker(store, settings.job_id, settings.attempt, redact=redact.redact)
    guard = Guard(tracker.read, settings.task_timeout_s, settings.deadline_reserve_s, started)
    blobs = LocalBlobStore(settings.local_dir) if settings.backend == "local" else GcsBlobStore(settings.project_id)
    request_file = Path(args.config or DEFAULT_REQUEST) if args.config or (
        settings.backend == "local" and not env.get("JOB_ID")) else None
    try:
        with guard:
            result = run_attempt(settings, tracker, blobs, request_file,
                                 lambda request: make_services(settings, request, tracker, blobs, guard), redact,
                                 validate=args.validate, startup_s=startup_s)
    except Cancelled:
        return 0
    except PermanentError:
        return 2
    except Exception:
        logger.exception("job failed; a retry can resume it")
        return 1
    if result:
        print(summary(settings, result, blobs, store))
    return 0


if __name__ == "__main__":
    sys.exit(main())
