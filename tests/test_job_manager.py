"""Job document: fields and types readers need, throttled progress, failures recorded and re-raised."""

from __future__ import annotations

import pytest

from errors import Cancelled, PermanentError
from job_manager import JobStatus, JobTracker, LocalJobStore

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
