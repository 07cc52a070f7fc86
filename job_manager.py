"""Job state in the document `training_jobs/{job_id}` that the training service and the frontend read, and the
job's events beside it.

`JobStore` is the small interface (Firestore in the cloud, JSON files locally); `JobTracker` owns
what goes into the document: the status values and field types of DESIGN.md, throttled progress,
and the failure record written before the process exits. Events (`training_jobs/{job_id}/events`, a folder of
JSON files locally; `gemma-job events JOB`) are append-only: queued, started, each phase, evaluation, checkpoint,
export step and warning, and the end, each once, ordered by id (time, attempt, sequence).
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import tempfile
import time
import traceback
from contextlib import contextmanager
from datetime import datetime, timezone
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

from runtime.errors import Cancelled, PermanentError

logger = logging.getLogger(__name__)

COLLECTION = "training_jobs"
DATASETS = "processed_datasets"  # the preprocessing service's metadata: splits[{split_name, num_rows, path}]
EVENTS = "events"  # the subcollection of a job's document that holds its events
ENDS = ("completed", "failed", "cancelled")  # the events that end an attempt for good


class JobStatus(StrEnum):
    QUEUED = "queued"
    PREPARING = "preparing"
    TRAINING = "training"
    COMPLETED = "completed"
    FAILED = "failed"


class JobStore(Protocol):
    def get(self, job_id: str) -> dict[str, Any] | None: ...
    def create(self, job_id: str, fields: dict[str, Any]) -> bool:
        """Write the document only if it does not exist; True if written."""
    def merge(self, job_id: str, fields: dict[str, Any]) -> None:
        """set(fields, merge=True): nested maps merge, other fields are replaced."""
    def append_event(self, job_id: str, event_id: str, fields: dict[str, Any]) -> bool:
        """Add one event; False if one with that id exists (never overwritten)."""
    def events(self, job_id: str, after: str = "") -> list[dict[str, Any]]:
        """The job's events with an id after `after`, in order, each with its `id`."""
    def get_dataset(self, dataset_id: str) -> dict[str, Any] | None:
        """The document processed_datasets/{dataset_id}, if the preprocessing service wrote one."""


def _deep_merge(into: dict[str, Any], fields: dict[str, Any]) -> dict[str, Any]:
    for key, value in fields.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _deep_merge(into[key], value)
        else:
            into[key] = value
    return into


class LocalJobStore:
    """Documents as JSON files under `{root}/firestore/training_jobs/`; timestamps as ISO-8601 strings."""

    def __init__(self, root: str | Path):
        self.dir = Path(root) / "firestore" / COLLECTION
        self.dir.mkdir(parents=True, exist_ok=True)
        self.datasets = Path(root) / "firestore" / DATASETS

    def path(self, job_id: str) -> Path:
        return self.dir / f"{job_id}.json"

    def get(self, job_id: str) -> dict[str, Any] | None:
        p = self.path(job_id)
        return json.loads(p.read_text()) if p.exists() else None

    def get_dataset(self, dataset_id: str) -> dict[str, Any] | None:
        p = self.datasets / f"{dataset_id}.json"
        return json.loads(p.read_text()) if p.is_file() else None

    @contextmanager
    def _locked(self, job_id: str):
        """One writer at a time per document, across processes (the job, a cancel from a user or a test):
        without it a read-modify-write loses what another process wrote in between, e.g. a
        `cancel_requested` set while the job writes its progress. flock: released if a holder is killed."""
        with open(self.dir / f".{job_id}.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def create(self, job_id: str, fields: dict[str, Any]) -> bool:
        with self._locked(job_id):
            if self.path(job_id).exists():
                return False
            self._write(job_id, fields)
            return True

    def merge(self, job_id: str, fields: dict[str, Any]) -> None:
        with self._locked(job_id):
            self._write(job_id, _deep_merge(self.get(job_id) or {}, fields))

    def append_event(self, job_id: str, event_id: str, fields: dict[str, Any]) -> bool:
        folder = self.dir / job_id / EVENTS
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(fields, f, default=lambda v: v.isoformat() if isinstance(v, datetime) else str(v))
            os.link(tmp, folder / f"{event_id}.json")  # whole, and only if no event has the id
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)

    def events(self, job_id: str, after: str = "") -> list[dict[str, Any]]:
        return [json.loads(p.read_text()) | {"id": p.stem} for p in sorted((self.dir / job_id / EVENTS).glob("*.json"))
                if p.stem > after]

    def recent(self, limit: int) -> list[dict[str, Any]]:
        """The most recently updated documents, newest first."""
        docs = [json.loads(p.read_text()) for p in self.dir.glob("*.json")]
        return sorted(docs, key=lambda d: str(d.get("updated_at", "")), reverse=True)[:limit]

    def _write(self, job_id: str, doc: dict[str, Any]) -> None:
        # Atomic replace: a reader never sees half a document, even if the job is killed mid-write.
        fd, tmp = tempfile.mkstemp(dir=self.dir, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f, indent=2, default=lambda v: v.isoformat() if isinstance(v, datetime) else str(v))
        os.replace(tmp, self.path(job_id))


class FirestoreJobStore:
    """The real document, through google-cloud-firestore; datetimes become Firestore timestamps.

    Calls give up after `timeout_s` (the client's default retries for 60 s): during an outage the
    tracker keeps training going and catches the document up later, rather than stalling a step.
    """

    def __init__(self, project: str | None, database: str, timeout_s: float = 10.0):
        from google.api_core.retry import Retry
        from google.cloud import firestore

        self.client = firestore.Client(project=project, database=database)
        self.call = {"retry": Retry(initial=0.2, maximum=2.0, timeout=timeout_s), "timeout": timeout_s}

    def _ref(self, job_id: str):
        return self.client.collection(COLLECTION).document(job_id)

    def get(self, job_id: str) -> dict[str, Any] | None:
        snap = self._ref(job_id).get(**self.call)
        return snap.to_dict() if snap.exists else None

    def get_dataset(self, dataset_id: str) -> dict[str, Any] | None:
        snap = self.client.collection(DATASETS).document(dataset_id).get(**self.call)
        return snap.to_dict() if snap.exists else None

    def create(self, job_id: str, fields: dict[str, Any]) -> bool:
        from google.api_core.exceptions import AlreadyExists, Conflict

        try:
            self._ref(job_id).create(fields, **self.call)
            return True
        except (AlreadyExists, Conflict):
            return False

    def merge(self, job_id: str, fields: dict[str, Any]) -> None:
        self._ref(job_id).set(fields, merge=True, **self.call)

    def append_event(self, job_id: str, event_id: str, fields: dict[str, Any]) -> bool:
        from google.api_core.exceptions import AlreadyExists, Conflict

        try:
            self._ref(job_id).collection(EVENTS).document(event_id).create(fields, **self.call)
            return True
        except (AlreadyExists, Conflict):
            return False

    def events(self, job_id: str, after: str = "") -> list[dict[str, Any]]:
        snaps = self._ref(job_id).collection(EVENTS).stream(**self.call)  # by document id
        return [snap.to_dict() | {"id": snap.id} for snap in snaps if snap.id > after]

    def recent(self, limit: int) -> list[dict[str, Any]]:
        """The most recently updated documents, newest first."""
        from google.cloud import firestore

        query = self.client.collection(COLLECTION).order_by("updated_at", direction=firestore.Query.DESCENDING)
        return [snap.to_dict() for snap in query.limit(limit).stream(**self.call)]


def transient(error: BaseException) -> bool:
    """Whether a failed write can pass on a retry: what google.api_core retries (unavailable, internal,
    too many requests, a dropped connection), the store's own retry running out of time, a deadline, a
    network error. Not InvalidArgument, PermissionDenied, NotFound and the like."""
    from google.api_core import exceptions, retry  # imported on the first failure only: start-up stays light

    return retry.if_transient_error(error) or isinstance(
        error, (exceptions.RetryError, exceptions.DeadlineExceeded, ConnectionError, TimeoutError))


def copy_maps(fields: dict[str, Any]) -> dict[str, Any]:
    """A copy deep enough that later changes to nested maps do not change what was recorded."""
    return {k: copy_maps(v) if isinstance(v, dict) else v for k, v in fields.items()}


def now() -> datetime:
    return datetime.now(timezone.utc)


class JobTracker:
    """Writes the job's state. Progress is throttled to one write per `min_interval` seconds.

    Use as a context manager: an exception inside is recorded as `failed` (with `error`,
    `error_type` permanent|retryable) and re-raised, so main() still maps it to an exit code.
    """

    def __init__(self, store: JobStore, job_id: str, attempt: int = 0, min_interval: float = 5.0,
                 clock=time.monotonic, final_retry_s: float = 300.0, outage_backoff_s: float = 30.0,
                 redact=lambda text: text, sleep=time.sleep, execution: str | None = None):
        self.store, self.job_id, self.attempt, self.execution = store, job_id, attempt, execution
        self.min_interval, self.clock, self.final_retry_s, self.sleep = min_interval, clock, final_retry_s, sleep
        self.outage_backoff_s, self.redact = outage_backoff_s, redact
        self.writes = 0
        self.write_s = 0.0  # time spent writing the document, for the benchmark's breakdown
        self._last_progress = -math.inf
        self._started: float | None = None
        self._start_step = 0
        self._loss: float | None = None
        self.latest: dict[str, Any] = {}  # the newest progress fields, written or throttled (for the logs)
        self._deferred: dict[str, Any] = {}
        self._shadow: dict[str, Any] = {}  # everything this process wrote: replayed after an outage
        self._behind = False
        self._retry_at = -math.inf
        self.finished = False
        self._events: list[tuple[str, dict[str, Any]]] = []  # not yet written (the store was unreachable)
        self._sequence = 0
        self.last_eval: dict[str, Any] | None = None  # the newest evaluation, which a checkpoint's event carries
        # US dollars an hour of this machine (models/estimate.py): the progress then carries the attempt's cost so
        # far and training's cost to finish
        self.price_per_hour: float | None = None
        self.born = clock()

    def write(self, fields: dict[str, Any], final: bool = False) -> bool:
        """Merge fields into the document. If the store is unreachable, training goes on: the fields are
        kept and the next write that gets through carries everything written so far (the document
        catches up, even if the store lost it). A final write (completed/failed) is retried with
        backoff for up to final_retry_s before giving up, if what failed can pass on a retry (`transient`);
        a permanent error (a field Firestore refuses, a missing permission) is raised at once."""
        if getattr(self.store, "read_only", False):  # one of several processes, not rank 0: it does not write
            return False
        stamp = now()
        fields = {**self._deferred, **fields, "updated_at": stamp, "heartbeat_at": stamp}
        self._deferred = {}
        _deep_merge(self._shadow, copy_maps(fields))
        if not final and time.monotonic() < self._retry_at:
            return False  # in an outage: not every progress write waits for a timeout
        delay, deadline = 1.0, time.monotonic() + (self.final_retry_s if final else 0)
        started = time.perf_counter()
        while True:
            try:
                self.store.merge(self.job_id, self._shadow if self._behind else fields)
                break
            except Exception as e:
                if time.monotonic() + delay > deadline or (final and not transient(e)):
                    self._behind, self._retry_at = True, time.monotonic() + self.outage_backoff_s
                    if final:
                        raise
                    logger.warning("job document not written (%s: %s); it will catch up on the next write",
                                   type(e).__name__, e)
                    return False
                logger.warning("job document not written (%s: %s); retrying in %.0f s", type(e).__name__, e, delay)
                self.sleep(delay)
                delay = min(delay * 2, 30.0)
        self.write_s += time.perf_counter() - started
        if self._behind:
            logger.info("job document caught up after an outage")
        self._behind = False
        self.writes += 1
        return True

    def event(self, kind: str, final: bool = False, **fields: Any) -> None:
        """Append an event to the job's events. Never costs the run: one the store does not take (an outage) is
        kept and goes with the next; in an outage only a final one (the end) waits for the store's own retries."""
        if getattr(self.store, "read_only", False) or not hasattr(self.store, "append_event"):
            return
        stamp, self._sequence = now(), self._sequence + 1
        event_id = f"{stamp:%Y%m%dT%H%M%S.%f}Z-{self.attempt:02d}-{self._sequence:04d}"
        self._events.append((event_id, {"kind": kind, "at": stamp, "attempt": self.attempt, **fields}))
        if not final and time.monotonic() < self._retry_at:
            return
        while self._events:
            event_id, fields = self._events[0]
            try:
                self.store.append_event(self.job_id, event_id, fields)
            except Exception as e:  # noqa: BLE001 - the events are a record, the run goes on
                logger.warning("event %s not written (%s: %s); it goes with the next", fields["kind"],
                               type(e).__name__, e)
                return
            self._events.pop(0)

    def evaluated(self, step: int, epoch: float | None, metrics: dict[str, Any]) -> None:
        """An evaluation: the document's `last_eval` (carried by the next progress write, not a write of its own:
        a sweep's pruner reads it) and an event."""
        self.last_eval = {"step": step, "epoch": epoch, **metrics}
        self.defer({"last_eval": self.last_eval})
        self.event("evaluation", step=step, epoch=epoch, metrics=metrics)

    def read(self) -> dict[str, Any] | None:
        """The document as it is now. If it has lost what this job wrote (a store restored from an
        older state, or a document deleted by hand), the next write puts all of it back."""
        doc = self.store.get(self.job_id)
        if self._shadow and (doc is None or "job_id" not in doc):
            logger.warning("job document lost its fields: the next write restores them")
            self._behind = True
        return doc

    def defer(self, fields: dict[str, Any]) -> None:
        """Fields to carry with the next write, without a write of their own."""
        self._deferred.update(fields)

    def open(self) -> dict[str, Any]:
        """Create the document if a person started the job by hand; return what is there now."""
        stamp = now()
        if self.store.create(self.job_id, {
                "job_id": self.job_id, "job_name": self.job_id, "processed_dataset_id": "", "base_model_id": "",
                "status": JobStatus.QUEUED.value, "created_at": stamp, "updated_at": stamp}):
            self.writes += 1
            logger.info("created job document training_jobs/%s", self.job_id)
        doc = self.store.get(self.job_id) or {}
        if self.attempt == 0:  # when the job was queued (by the training service, or just now by this process)
            self.event("queued", queued_at=doc.get("created_at", stamp))
        # What readers require, as it is now: replayed (unchanged) if the document must be caught up.
        self._shadow = {k: doc[k] for k in ("job_id", "job_name", "user_id", "created_at", "status") if k in doc}
        return doc

    def describe(self, processed_dataset_id: str, base_model_id: str, job_name: str | None,
                 existing: dict[str, Any]) -> None:
        fields: dict[str, Any] = {"processed_dataset_id": processed_dataset_id, "base_model_id": base_model_id,
                                  "attempt": self.attempt}
        if self.execution:  # Cloud Run's execution name: `gcloud run jobs executions describe` and its logs
            fields["execution"] = self.execution
        if job_name and existing.get("job_name") in (None, "", self.job_id):
            fields["job_name"] = job_name  # never overwrite a name the training service set
        self.write(fields)
        self.event("started", **{k: v for k, v in fields.items() if k != "job_name"})

    def phase(self, phase: str, status: JobStatus | None = None, **fields: Any) -> None:
        logger.info("phase: %s", phase)
        self.write({"phase": phase, **({"status": status.value} if status else {}), **fields})
        self.event("phase", phase=phase, **({"status": status.value} if status else {}))

    def progress(self, step: int, total_steps: int, epoch: float | None, loss: float | None,
                 force: bool = False) -> bool:
        t = self.clock()
        if loss is not None:
            self._loss = loss  # kept while throttled, so the next write carries the latest loss
        if self._started is None:
            self._started, self._start_step = t, step
        done = step - self._start_step
        eta = (t - self._started) / done * (total_steps - step) if done > 0 and total_steps else None
        fields = {"step": step, "total_steps": total_steps, "progress": min(1.0, step / total_steps) if total_steps
                  else 0.0, "epoch": epoch, "eta_seconds": round(eta, 1) if eta is not None else None}
        if self._loss is not None:
            fields["loss"] = self._loss
        if self.price_per_hour is not None:
            fields["cost"] = {"elapsed_usd": round((t - self.born) / 3600 * self.price_per_hour, 4),
                              "to_finish_usd": round(eta / 3600 * self.price_per_hour, 4) if eta is not None else None}
        self.latest = fields
        if not force and t - self._last_progress < self.min_interval:
            return False
        self._last_progress = t
        self.write(fields)
        return True

    def complete(self, metrics: dict[str, Any], artifacts: dict[str, Any]) -> None:
        self.write({"status": JobStatus.COMPLETED.value, "phase": "completed", "progress": 1.0,
                    "metrics": metrics, **artifacts, "error": None, "error_type": None, "completed_at": now()},
                   final=True)
        self.finished = True
        self.event("completed", final=True, metrics=metrics,
                   **{k: artifacts[k] for k in ("adapter_path", "gguf_path") if artifacts.get(k)})

    def fail(self, exc: BaseException) -> None:
        cancelled = isinstance(exc, Cancelled)
        kind = "permanent" if isinstance(exc, PermanentError) else "cancelled" if cancelled else "retryable"
        message = str(exc) or type(exc).__name__
        if kind == "retryable":
            message = f"{type(exc).__name__}: {message}"
        message = self.redact(message)  # an HTTP library's message can carry a token
        fields: dict[str, Any] = {"status": JobStatus.FAILED.value, "error": message[:4000], "error_type": kind,
                                  "failed_at": now()}
        if cancelled:
            fields["cancelled"] = True
        self.write(fields, final=True)
        self.finished = True
        self.event("cancelled" if cancelled else "failed", final=True, error=fields["error"], error_type=kind)
        logger.error("job failed (%s): %s", kind, message)
        if kind == "retryable":
            logger.debug("".join(traceback.format_exception(exc)))

    def __enter__(self) -> JobTracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is not None and not self.finished:
            try:
                self.fail(exc)
            except Exception:  # the store itself is down: the exit code still says what happened
                logger.exception("could not record the failure in the job document")
        return False
