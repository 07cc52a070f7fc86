"""One attempt of a job around the training workflow: open the job document, take the short cuts
(already completed, cancelled, a retry of a permanent failure), read and validate the request, run
the provider's workflow, and once the job is over for good, remove the secrets from the request
object in the config bucket (retries before that still need them).

main.py builds the services and turns what this raises into an exit code (DESIGN.md).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from job_manager import JobStatus, JobTracker
from models.estimate import estimate_text
from runtime.errors import Cancelled, PermanentError
from runtime.request import parse_request, strip_secrets
from runtime.settings import Settings
from schema import TrainRequest
from storage import BlobStore
from training.checkpoints import CANCEL

logger = logging.getLogger(__name__)


def run_attempt(settings: Settings, tracker: JobTracker, blobs: BlobStore, request_file: Path | None,
                make_services: Callable[[TrainRequest], Any], redact, validate: bool = False,
                startup_s: float = 0.0, launcher: Callable[[TrainRequest], int | None] | None = None
                ) -> dict[str, Any] | None:
    """The job's result, or None when there was nothing to do. Raises what ended the job. With a launcher,
    the request is checked here once, then the launcher may run the job in several workers (each of which
    comes back here): the result is then {"launched": their exit code}."""
    with tracker:
        doc = tracker.open()
        if doc.get(CANCEL):
            raise Cancelled("cancelled on request (cancel_requested: true) before training started")
        if doc.get("status") == JobStatus.COMPLETED:
            logger.info("job %s has completed already: nothing to do", settings.job_id)
            return None
        if doc.get("error_type") == "permanent" and doc.get("status") == JobStatus.FAILED and settings.attempt > 0:
            logger.error("retry of a permanently failed job: %s", doc.get("error"))
            raise PermanentError(doc.get("error") or "failed permanently")
        uri = None if request_file else settings.request_uri
        text = request_file.read_text() if request_file else blobs.read_bytes(uri).decode()
        request = None
        try:
            t = time.perf_counter()
            request = parse_request(text)
            parse_s = time.perf_counter() - t
            redact.add(*request.secrets())
            logger.info("request: %s", json.dumps(request.model_dump(mode="json")))
            tracker.describe(request.processed_dataset_id, request.training_config.base_model_id,
                             request.job_name, doc)
            services = make_services(request)  # a tracker's refusal, before any model library is imported
            launched = launcher(request) if launcher is not None else None
            if launched is not None:
                return {"launched": launched}  # the workers recorded the job and scrubbed the request
            from providers import PROVIDERS

            job = PROVIDERS[request.training_config.provider](request, settings, services, settings.workdir)
            job.timings.update(startup=round(startup_s, 3), validate_request=round(parse_s, 3))
            if validate:
                prep = job.preflight()
                shutil.rmtree(job.workdir, ignore_errors=True)
                return {"valid": True, "data_report": prep.report, "estimate": prep.estimate}
            result = job.run()
            if settings.local_rank == 0:  # the node's other processes have finished with it (after evaluation)
                shutil.rmtree(job.workdir, ignore_errors=True)  # its files are uploaded; checkpoints are cleared
        except (PermanentError, Cancelled) as e:
            tracker.fail(e)  # recorded before the request loses its secrets
            if settings.rank == 0:
                announce(request, settings, tracker, "cancelled" if isinstance(e, Cancelled) else "failed", e)
                scrub_request(blobs, uri, text, tracker)
            raise
        except Exception as e:
            if settings.last_attempt and settings.rank == 0:  # retryable, but no retry is left to need them
                tracker.fail(e)
                tracker.write({"retries_exhausted": True}, final=True)
                announce(request, settings, tracker, "failed", e)
                scrub_request(blobs, uri, text, tracker)
            raise
    if settings.rank == 0:  # (a launcher's run returned above: its workers' rank 0 announces and scrubs)
        announce(request, settings, tracker, "completed", None, result)
        scrub_request(blobs, uri, text, tracker)
    return result


def announce(request: TrainRequest | None, settings: Settings, tracker: JobTracker, status: str,
             error: BaseException | None, result: dict[str, Any] | None = None) -> None:
    """The request's webhook, where it names one (runtime/notify.py), called once the job has ended for good; what
    happened is recorded in the document. Never raises: a webhook never costs the run."""
    if request is None or request.notify is None:
        return
    from runtime.notify import post_event

    try:
        event = {"job_id": settings.job_id, "status": status, "job_name": request.job_name,
                 "processed_dataset_id": request.processed_dataset_id,
                 "base_model_id": request.training_config.base_model_id,
                 "error": tracker.redact(str(error) or type(error).__name__) if error is not None else None,
                 **{k: (result or {}).get(k) for k in ("adapter_path", "gguf_path", "artifacts", "metrics")}}
        outcome = post_event(request.notify.url, request.notify.secret.get_secret_value(), event)
        tracker.write({"notify": outcome})
    except Exception as e:  # noqa: BLE001
        logger.warning("the webhook could not be called: %s: %s", type(e).__name__, e)


def record_failure(open_store: Callable[[], Any], job_id: str, error: PermanentError) -> None:
    """Fail the job document for what stopped the job before an attempt could begin (an invalid
    environment), where the store can be reached at all: the document must not stay `queued`. A
    completed job stays completed. Best effort, retried for 30 s: the exit code says it in any case."""
    try:
        tracker = JobTracker(open_store(), job_id, final_retry_s=30)
        if tracker.open().get("status") != JobStatus.COMPLETED:
            tracker.fail(error)
    except Exception as e:
        logger.warning("could not record the failure in training_jobs/%s: %s", job_id, e)


def summary(settings: Settings, result: dict[str, Any], blobs, store) -> str:
    """What main() prints at the end: "valid" after --validate, else the result as JSON and, locally,
    where the adapter and the job document are on disk."""
    if result.get("valid"):
        from training.data_report import as_text

        report, cost = result.get("data_report"), result.get("estimate")
        return "request and dataset are valid" + (f"\n{as_text(report)}" if report else "") + \
            (f"\n{estimate_text(cost)}" if cost else "")
    text = json.dumps({"job_id": settings.job_id, "status": "completed", **result}, default=str)
    if settings.backend == "local" and str(result["adapter_path"]).startswith("gs://"):
        text += f"\nadapter:      {blobs.path(result['adapter_path'])}\njob document: {store.path(settings.job_id)}"
    return text


def process_age() -> float:
    """Seconds since this process started (interpreter start-up and imports so far), from /proc on Linux."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


def scrub_request(blobs: BlobStore, uri: str | None, text: str, tracker: JobTracker) -> None:
    """Rewrite the request object without its secrets, once no retry can need them. If that fails, the job
    still ends as it ended, but the secrets left in the bucket are said, in the log and in the job document
    (`request_scrub_error`), by where they are and never by what they are."""
    if uri is None:
        return
    try:
        try:
            raw = json.loads(text)
        except ValueError:
            raise ValueError("the request is not JSON, so its secrets cannot be found") from None
        clean, removed = strip_secrets(raw)
        if removed:
            blobs.write_bytes(uri, json.dumps(clean, indent=2).encode())
            logger.info("removed %d secret(s) from %s", removed, uri)
    except Exception as e:
        message = tracker.redact(f"the request object {uri} may still hold secrets (hf_token, api_key): it could not "
                                 f"be rewritten without them ({type(e).__name__}: {e}); delete them from it by hand, "
                                 "or delete the object")
        logger.error("%s", message)
        tracker.write({"request_scrub_error": message[:1000]})  # never raises: the log line stays the record
