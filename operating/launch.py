"""Starting a job as the training service does, for gemma-job's submit and its sweeps: the request stored in
the config bucket, the job document created `queued` (never over a job that exists), then either the Cloud
Run job executed with the one override env JOB_ID, or main.py run here in a process of its own with its
output in LOCAL_DIR/logs/JOB_ID.log (what `gemma-job logs --local` reads).
"""

from __future__ import annotations

import ctypes
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from job_manager import JobStatus, now
from main import read_settings
from schema import TrainRequest

ROOT = Path(__file__).resolve().parent.parent  # the checkout, where main.py is


def settings_for(job_id: str, env):
    return read_settings({**env, "JOB_ID": job_id})


def queue_job(settings, store, blobs, text: str, request: TrainRequest, extra: dict[str, Any] | None = None) -> bool:
    """The request to gs://{config bucket}/{job_id}.json and training_jobs/{job_id} created `queued` with the
    training service's fields (and `extra`: a sweep's id and trial). False, and nothing written, if the job
    exists already."""
    job_id = settings.job_id
    if store.get(job_id) is not None:
        return False
    blobs.write_bytes(settings.request_uri, text.encode())
    stamp = now()
    tc = request.training_config
    return store.create(job_id, {"job_id": job_id, "job_name": request.job_name or job_id,
                                 "status": JobStatus.QUEUED.value, "processed_dataset_id": request.processed_dataset_id,
                                 "base_model_id": tc.base_model_id, "created_at": stamp, "updated_at": stamp,
                                 **(extra or {})})


def cloud_run_options(endpoint: str | None) -> dict[str, Any]:
    """The Cloud Run Admin client's settings: Google's endpoint with the environment's credentials, or an
    endpoint given (a test's stand-in speaks REST without credentials)."""
    if not endpoint:
        return {}
    from google.auth.credentials import AnonymousCredentials

    return {"transport": "rest", "credentials": AnonymousCredentials(), "client_options": {"api_endpoint": endpoint}}


def cloud_run_job_name(project: str, region: str | None, job: str, env) -> str:
    return f"projects/{project}/locations/{region or env.get('CLOUD_RUN_REGION') or 'us-central1'}/jobs/{job}"


def run_cloud_job(name: str, job_id: str, env) -> str | None:
    """Execute the Cloud Run job once with JOB_ID overridden; the execution's name (None if Cloud Run gave
    none). Raises google.api_core's errors."""
    from google.cloud import run_v2

    client = run_v2.JobsClient(**cloud_run_options(env.get("CLOUD_RUN_ENDPOINT")))
    overrides = run_v2.RunJobRequest.Overrides(container_overrides=[
        run_v2.RunJobRequest.Overrides.ContainerOverride(env=[run_v2.EnvVar(name="JOB_ID", value=job_id)])])
    operation = client.run_job(request=run_v2.RunJobRequest(name=name, overrides=overrides))
    return operation.metadata.name if operation.metadata is not None else None


def execution_finished(execution: str, env) -> bool:
    """Whether Cloud Run has finished an execution, its retries included (its completion time is set)."""
    from google.cloud import run_v2

    client = run_v2.ExecutionsClient(**cloud_run_options(env.get("CLOUD_RUN_ENDPOINT")))
    return bool(client.get_execution(name=execution).completion_time)


def cancel_execution(execution: str, env) -> None:
    from google.cloud import run_v2

    run_v2.ExecutionsClient(**cloud_run_options(env.get("CLOUD_RUN_ENDPOINT"))).cancel_execution(name=execution)


def log_path(settings) -> Path:
    return Path(settings.local_dir) / "logs" / f"{settings.job_id}.log"


def _die_with_parent() -> None:  # pragma: no cover - runs in the child, between fork and exec
    """Linux: the job gets SIGTERM when the command that started it dies, however it died (a SIGKILL too):
    it saves a checkpoint and stops, and is never left training with nobody to read its end."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def start_local(settings, env, attempt: int = 0, tee: bool = False) -> subprocess.Popen:
    """main.py for the job in a process of its own, its output appended to LOCAL_DIR/logs/JOB_ID.log (and
    passed through to this terminal with tee). An attempt after the first resumes from the job's checkpoint,
    as Cloud Run's retry would."""
    path = log_path(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    child_env = {**env, "JOB_ID": settings.job_id, "BACKEND": settings.backend,
                 "LOCAL_DIR": str(Path(settings.local_dir).resolve()), "CLOUD_RUN_TASK_ATTEMPT": str(attempt),
                 "PYTHONUNBUFFERED": "1"}
    log = path.open("ab")
    try:
        return subprocess.Popen([sys.executable, str(ROOT / "main.py")], cwd=ROOT, env=child_env,
                                stdout=subprocess.PIPE if tee else log, stderr=subprocess.STDOUT,
                                preexec_fn=_die_with_parent)
    finally:
        log.close()  # the child holds its own descriptor


def tee_output(process: subprocess.Popen, settings) -> int:
    """Copy a tee'd job's output to this terminal and to its log file until it ends; its exit code."""
    with log_path(settings).open("ab") as log:
        for line in iter(process.stdout.readline, b""):
            log.write(line)
            log.flush()
            sys.stdout.buffer.write(line)
            sys.stdout.flush()
    return process.wait()


def stop_local(processes: list[subprocess.Popen], grace_s: float = 120.0) -> None:
    """SIGTERM to each job still running, as Cloud Run stops a task: each saves a checkpoint and stops."""
    for p in processes:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in processes:
        try:
            p.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            p.kill()
