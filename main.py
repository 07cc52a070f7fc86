"""Run one fine-tuning job. The only reader of the environment (see docs/operating.md and DESIGN.md).

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
import time
from pathlib import Path

from job.lifecycle import process_age, record_failure, run_attempt, summary
from job.services import make_blobs, make_services, open_store
from job_manager import JobTracker
from runtime.distributed import NodeFiles, Nodes, ReadOnlyStore, Topology, processes_per_node, record_error, start
from runtime.errors import Cancelled, PermanentError, RequestError
from runtime.logs import setup_logging
from runtime.settings import Settings, check_job_id, parse_settings
from schema import TrainRequest
from training.checkpoints import Guard

logger = logging.getLogger("main")
DEFAULT_REQUEST = Path(__file__).parent / "examples" / "local_default.json"

# Settings field -> the environment variable it comes from (DESIGN.md's table, and the job's own).
ENV = {"job_id": "JOB_ID", "backend": "BACKEND", "project_id": "PROJECT_ID", "firestore_db": "FIRESTORE_DB",
       "config_bucket": "GCS_CONFIG_BUCKET_NAME", "config_uri": "TRAINING_CONFIG_GCS_PATH",
       "data_bucket": "GCS_DATA_BUCKET_NAME", "export_bucket": "GCS_EXPORT_BUCKET_NAME",
       "export_files_bucket": "GCS_EXPORT_FILES_BUCKET_NAME", "hf_token": "HF_TOKEN",
       "hf_endpoint": "HF_ENDPOINT", "wandb_api_key": "WANDB_API_KEY", "wandb_mode": "WANDB_MODE",
       "wandb_init_timeout_s": "WANDB_INIT_TIMEOUT", "local_dir": "LOCAL_DIR", "work_dir": "WORK_DIR",
       "attempt": "CLOUD_RUN_TASK_ATTEMPT", "task_timeout_s": "TASK_TIMEOUT_SECONDS",
       "deadline_reserve_s": "DEADLINE_RESERVE_SECONDS", "gpu_memory_gib": "GPU_MEMORY_GIB",
       "gpu_price_per_hour": "GPU_PRICE_PER_HOUR",
       "host_memory_gib": "HOST_MEMORY_GIB", "task_count": "CLOUD_RUN_TASK_COUNT",
       "execution": "CLOUD_RUN_EXECUTION", "max_retries": "MAX_RETRIES",
       "give_up_s": "STORE_GIVE_UP_SECONDS"}
TRACKER_SECRETS = ("COMET_API_KEY", "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_PASSWORD")
STORE_VARS = ("JOB_ID", "BACKEND", "CLOUD_RUN_JOB", "PROJECT_ID", "FIRESTORE_DB", "LOCAL_DIR")


def read_settings(env) -> Settings:
    backend = env.get("BACKEND") or ("gcp" if env.get("CLOUD_RUN_JOB") else "local")
    job_id = env.get("JOB_ID") or (f"local-{time.strftime('%Y%m%d-%H%M%S')}" if backend == "local" else "")
    if not job_id:
        raise RequestError("JOB_ID is not set: on gcp it names the job to run (gcloud run jobs execute ... "
                           "--update-env-vars JOB_ID=<id>; the request is then read from the config bucket).")
    values = {k: env[v] for k, v in ENV.items() if env.get(v)}
    cloud_run = {"disk_is_memory": True} if env.get("CLOUD_RUN_JOB") else {}  # its disk is memory
    place = Topology.from_env(env)  # a torchrun worker's; WORLD_SIZE alone is Vertex's count of machines
    return parse_settings(values | cloud_run | {"job_id": check_job_id(job_id), "backend": backend,
                                                "world_size": place.world_size, "rank": place.rank,
                                                "local_rank": place.local_rank}, ENV)


def main(argv: list[str] | None = None, env=None) -> int:
    parser = argparse.ArgumentParser(description="Fine-tune a Gemma model: one process, one job.")
    parser.add_argument("--config", help="request JSON file (instead of the config bucket)")
    parser.add_argument("--validate", action="store_true", help="pre-flight checks only; no model is loaded")
    parser.add_argument("--schema", action="store_true", help="print the request's JSON Schema")
    args = parser.parse_args(argv)
    argv = list(sys.argv[1:] if argv is None else argv)
    started, startup_s = time.monotonic(), process_age()
    if args.schema:
        print(json.dumps(TrainRequest.model_json_schema(), indent=2))
        return 0
    env = os.environ if env is None else env
    try:
        settings = read_settings(env)
    except PermanentError as e:
        print(f"invalid environment: {e}", file=sys.stderr)
        if env.get("JOB_ID") and not args.validate:  # the job document says so too, not `queued` for ever
            record_failure(lambda: open_store(read_settings({k: env[k] for k in STORE_VARS if k in env})),
                           env["JOB_ID"], RequestError(f"invalid environment: {e}"))
        return 2
    json_lines = bool(env.get("CLOUD_RUN_JOB"))
    place = settings.place
    redact = setup_logging(settings.job_id, json_lines, level=env.get("LOG_LEVEL", "INFO").upper(),
                           rank=place.rank if place.distributed else None)
    redact.add(*(s.get_secret_value() for s in (settings.hf_token, settings.wandb_api_key) if s))
    redact.add(*(env.get(name, "") for name in TRACKER_SECRETS))  # read by comet_ml's and mlflow's own clients
    store = open_store(settings, dry_run=args.validate)
    try:  # the machines, for a launcher (a worker's MASTER_ADDR and WORLD_SIZE are torchrun's, not Vertex's)
        nodes = Nodes() if place.distributed else Nodes.from_env(env)
    except PermanentError as e:
        print(f"invalid environment: {e}", file=sys.stderr)
        return 2
    # of several processes, rank 0 alone writes the document (a launcher only on the first machine); the node's
    # first process downloads for the others
    writes = place.main and (place.distributed or nodes.node_rank == 0)
    tracker = JobTracker(store if writes else ReadOnlyStore(store), settings.job_id, settings.attempt,
                         redact=redact.redact, execution=settings.execution, final_retry_s=settings.give_up_s)
    if place.distributed:  # said at the end of each worker: rank 0 writes, the others do not
        import atexit

        atexit.register(lambda: logger.info("rank %d wrote the job document %d times", place.rank, tracker.writes))
    guard = Guard(tracker.read if place.main else None, settings.task_timeout_s, settings.deadline_reserve_s,
                  started)
    blobs = make_blobs(settings) if place.node_main else NodeFiles(make_blobs(settings))
    request_file = Path(args.config or DEFAULT_REQUEST) if args.config or (
        settings.backend == "local" and not env.get("JOB_ID")) else None
    launcher = None
    if not args.validate and not place.distributed:  # more than one GPU: checked here once, then one worker each
        launcher = lambda request: launch_workers(request, env, nodes, settings, tracker, argv)  # noqa: E731
    try:
        start(place)
        with guard:
            result = run_attempt(settings, tracker, blobs, request_file,
                                 lambda request: make_services(settings, request, tracker, blobs, guard), redact,
                                 validate=args.validate, startup_s=startup_s, launcher=launcher)
    except Cancelled:
        return 0
    except PermanentError as e:
        record_error(e)  # for the launcher, in a worker
        return 2
    except Exception as e:
        logger.exception("job failed; a retry can resume it")
        record_error(e)
        return 1
    if result and "launched" in result:
        return result["launched"]
    if result and not place.main:
        return 0  # rank 0 says how it ended
    if result and json_lines:  # on Cloud Run, a record like every other line
        logger.info("%s", summary(settings, result, blobs, store))
    elif result:
        print(summary(settings, result, blobs, store))
    return 0


def launch_workers(request: TrainRequest, env, nodes: Nodes, settings: Settings, tracker: JobTracker,
                   argv: list[str]) -> int | None:
    """With more than one GPU visible (or NPROC_PER_NODE above 1) or several nodes, one worker per GPU, each
    `main.py` again, and the job's exit code from theirs; None (run here, in this process) otherwise. A
    permanent error on any rank is exit 2, and said in the document if rank 0 did not say it (it was stopped
    by the launcher when another rank failed). Called once the request is valid: counting the GPUs imports
    torch, which a bad request never waits for."""
    from runtime.distributed import WorkersFailed, describe_failure, launch

    nproc = processes_per_node(env)
    if nproc <= 1 and nodes.nnodes <= 1:
        return None
    if request.training_config.provider == "unsloth":
        raise PermanentError("training_config.provider: Unsloth trains in one process on one GPU; this machine "
                             f"would start {nproc * nodes.nnodes}. Set NPROC_PER_NODE=1 (or expose one GPU), or use "
                             "provider 'huggingface'.")
    logger.info("starting %d processes per node on %d node(s) (torch.distributed.run)", nproc, nodes.nnodes)
    code, failures = launch(nproc, nodes, settings.job_id, argv)
    doc = (tracker.read() or {}) if code else {}  # what rank 0 recorded before it stopped
    if code == 2:  # on the first machine (the others' trackers do not write)
        rank, failure = min((r, f) for r, f in failures.items() if f.exitcode == 2)
        if not (doc.get("status") == "failed" and doc.get("error_type") == "permanent"):
            # torch elastic's error file: {"message": "Type: text", "extraInfo": {...}} (record_error wrote it)
            message = failure.message.get("message") if isinstance(failure.message, dict) else failure.message
            tracker.fail(PermanentError(f"rank {rank}: {message}"))
    elif code:  # a rank crashed or was killed; rank 0 may have been stopped before it could say so
        if doc.get("status") not in ("failed", "completed"):
            ranks = "; ".join(f"rank {r}: {describe_failure(f)}" for r, f in sorted(failures.items()))
            tracker.fail(WorkersFailed(f"{ranks} (a retry resumes from the newest complete checkpoint)"))
    if code:
        logger.error("workers failed: %s", {r: f.exitcode for r, f in failures.items()})
    return code


if __name__ == "__main__":
    sys.exit(main())
