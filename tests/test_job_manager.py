"""Job document: fields and types readers need, throttled progress, failures recorded and re-raised."""

from __future__ import annotations

import logging

import pytest

from job_manager import JobStatus, JobTracker, LocalJobStore
from runtime.errors import Cancelled, PermanentError

READER_STATUSES = {"queued", "preparing", "training", "completed", "failed"}


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_created_when_missing_and_service_fields_kept(tmp_path):
    store = LocalJobStore(tmp_path)
    tracker = JobTracker(store, "j1")
    doc = tracker.open()
    assert doc["status"] == "queued" and doc["job_id"] == "j1"
    assert all(isinstance(doc[k], str) for k in ("job_name", "processed_dataset_id", "base_model_id"))
    store.merge("j2", {"job_id": "j2", "job_name": "Named by service", "status": "queued"})
    t2 = JobTracker(store, "j2")
    existing = t2.open()
    t2.describe("ds", "google/gemma-3-1b-it", "Name in request", existing)
    doc2 = store.get("j2")
    assert doc2["job_name"] == "Named by service"
    assert doc2["processed_dataset_id"] == "ds" and doc2["base_model_id"] == "google/gemma-3-1b-it"


def test_status_transitions_to_completed_clears_error(tmp_path):
    store = LocalJobStore(tmp_path)
    store.merge("j", {"status": "failed", "error": "earlier attempt crashed"})
    tracker = JobTracker(store, "j")
    seen = []
    for status in (JobStatus.PREPARING, JobStatus.TRAINING):
        tracker.phase(status.value, status)
        seen.append(store.get("j")["status"])
    tracker.complete({"eval_loss": 1.0}, {"adapter_path": "gs://b/x/"})
    doc = store.get("j")
    seen.append(doc["status"])
    assert seen == ["preparing", "training", "completed"] and set(seen) <= READER_STATUSES
    assert doc["error"] is None and doc["metrics"] == {"eval_loss": 1.0} and doc["progress"] == 1.0


def test_progress_is_throttled_and_has_eta(tmp_path):
    store, clock = LocalJobStore(tmp_path), FakeClock()
    tracker = JobTracker(store, "j", min_interval=5.0, clock=clock)
    written = []
    for step in range(1, 101):  # one step every 0.5 s for 50 s
        clock.t = step * 0.5
        written.append(tracker.progress(step, 100, step / 100, 10.0 / step))
    assert sum(written) == 10  # one write per 5 s, not one per step
    doc = store.get("j")
    assert doc["step"] == 91 and doc["total_steps"] == 100 and doc["progress"] == pytest.approx(0.91)
    assert doc["eta_seconds"] == pytest.approx(4.5, abs=0.1)  # 9 steps left at 0.5 s each
    tracker.progress(100, 100, 1.0, None, force=True)
    assert store.get("j")["loss"] == pytest.approx(0.1)  # the last loss seen, though it came while throttled


def test_progress_reaches_the_log_every_30_s(tmp_path, caplog):
    from types import SimpleNamespace

    from runtime.progress import progress_callback

    clock = FakeClock()
    tracker = JobTracker(LocalJobStore(tmp_path), "j", clock=clock)
    callback = progress_callback(tracker, log_every_s=30.0, clock=clock)
    with caplog.at_level(logging.INFO, logger="runtime.progress"):
        for step in range(1, 121):  # one step a second for two minutes, each one logged by the Trainer
            clock.t = float(step)
            callback.on_log(None, SimpleNamespace(global_step=step, max_steps=120, epoch=step / 60), None,
                            logs={"loss": 100.0 / step, "learning_rate": 1e-4})
        callback.on_evaluate(None, SimpleNamespace(global_step=120, max_steps=120, epoch=2.0), None,
                             metrics={"eval_loss": 1.25, "eval_runtime": 0.5, "eval_samples_per_second": 9.0,
                                      "epoch": 2.0})
        callback.on_train_end(None, SimpleNamespace(global_step=120, max_steps=120, epoch=2.0), None)
    assert [r.getMessage() for r in caplog.records if r.name == "runtime.progress"] == [
        "step 1/120 (1%), epoch 0.02, loss 100",  # no time left to tell from one step
        "step 31/120 (26%), epoch 0.52, loss 3.226, about 1m29s left",  # 1 s a step, 89 to go
        "step 61/120 (51%), epoch 1.02, loss 1.639, about 59s left",
        "step 91/120 (76%), epoch 1.52, loss 1.099, about 29s left",
        "eval at step 120/120 (epoch 2.00): eval_loss=1.25",
        "step 120/120 (100%), epoch 2.00, loss 0.8333",
    ]


@pytest.mark.parametrize("exc,kind", [(PermanentError("bad dataset"), "permanent"),
                                      (RuntimeError("CUDA error"), "retryable"),
                                      (Cancelled("cancel_requested"), "cancelled")])
def test_exception_inside_tracker_is_recorded_and_reraised(tmp_path, exc, kind):
    store = LocalJobStore(tmp_path)
    with pytest.raises(type(exc)):
        with JobTracker(store, "j") as tracker:
            tracker.open()
            raise exc
    doc = store.get("j")
    assert doc["status"] == "failed" and doc["error_type"] == kind and str(exc) in doc["error"]
    assert doc.get("cancelled", False) == (kind == "cancelled")


def _write_many(root: str, prefix: str, n: int) -> None:
    store = LocalJobStore(root)
    for i in range(n):
        store.merge("shared", {f"{prefix}{i}": i, "last_writer": prefix})


def test_local_store_keeps_every_write_of_concurrent_processes(tmp_path):
    """The job writes its progress while another process (a user's cancel) writes the same document:
    each read-modify-write holds the document's lock, so no write is lost."""
    import multiprocessing

    LocalJobStore(tmp_path).create("shared", {"status": "training"})
    ctx = multiprocessing.get_context("spawn")
    writers = [ctx.Process(target=_write_many, args=(str(tmp_path), prefix, 150)) for prefix in ("job", "user")]
    for w in writers:
        w.start()
    for w in writers:
        w.join(60)
        assert w.exitcode == 0
    doc = LocalJobStore(tmp_path).get("shared")
    lost = [f"{p}{i}" for p in ("job", "user") for i in range(150) if f"{p}{i}" not in doc]
    assert lost == [] and doc["status"] == "training"


class FlakyStore(LocalJobStore):
    """A store whose merges raise the given errors, one per call, then work."""

    def __init__(self, root, errors):
        super().__init__(root)
        self.errors, self.calls = list(errors), 0

    def merge(self, job_id, fields):
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        super().merge(job_id, fields)


def test_final_write_retries_transient_errors_and_fails_at_once_on_permanent_ones(tmp_path):
    from google.api_core import exceptions

    sleeps: list[float] = []
    transient = [exceptions.ServiceUnavailable("firestore down"), exceptions.RetryError("gave up", None),
                 exceptions.DeadlineExceeded("slow"), ConnectionResetError("reset")]
    store = FlakyStore(tmp_path, transient)
    tracker = JobTracker(store, "t", sleep=sleeps.append)
    tracker.complete({"eval_loss": 1.0}, {})
    assert store.calls == 5 and sleeps == [1.0, 2.0, 4.0, 8.0]  # backoff, then written
    assert store.get("t")["status"] == "completed"

    for permanent in (exceptions.InvalidArgument("bad field"), exceptions.PermissionDenied("no IAM role"),
                      ValueError("cannot encode")):
        store = FlakyStore(tmp_path / type(permanent).__name__, [permanent])
        tracker = JobTracker(store, "p", sleep=sleeps.append)
        sleeps.clear()
        with pytest.raises(type(permanent)):
            tracker.fail(PermanentError("x"))
        assert store.calls == 1 and sleeps == []  # not retried, not waited for

    store = FlakyStore(tmp_path / "out", [exceptions.ServiceUnavailable("down")] * 3)
    with pytest.raises(exceptions.ServiceUnavailable):  # transient, but past final_retry_s
        JobTracker(store, "o", final_retry_s=2.5, sleep=lambda s: None).complete({}, {})


def test_progress_writes_never_raise_whatever_the_error(tmp_path):
    from google.api_core import exceptions

    store = FlakyStore(tmp_path, [exceptions.InvalidArgument("bad")])
    tracker = JobTracker(store, "n", outage_backoff_s=0, sleep=lambda s: pytest.fail("a progress write waited"))
    assert tracker.write({"phase": "training"}) is False  # training goes on; the fields are kept
    assert tracker.write({"step": 1}) is True and store.get("n")["phase"] == "training"
