"""The job's events (job_manager.JobTracker.event): an append-only list beside the document
(training_jobs/{job_id}/events; a folder of JSON files locally), read with `gemma-job events JOB [--follow]`. Through
whole jobs on the local backend here; on the Firestore emulator in tests/test_gcp.py."""

from __future__ import annotations

import json
import threading
import time
from types import SimpleNamespace

import pytest

from conftest import env_for, put_request, read_doc, sample_request


@pytest.fixture(scope="module")
def finished(tiny_root, tmp_path_factory):
    """A job that evaluates and saves a checkpoint every 2 steps of 4, and one refused at pre-flight (exit 2)."""
    import shutil

    import main

    root = tmp_path_factory.mktemp("events")
    shutil.copytree(tiny_root / "gemma-dataset-bucket", root / "gemma-dataset-bucket")
    request = sample_request(tiny_root)
    request["training_config"]["hyperparameters"].update(max_steps=4, save_strategy="steps", save_steps=2)
    request["training_config"]["eval_config"] = {"eval_strategy": "steps", "eval_steps": 2}
    put_request(root, "ev-done", request)
    assert main.main([], env_for(root, "ev-done")) == 0
    bad = sample_request(tiny_root)
    bad["training_config"]["hyperparameters"]["lora_target_modules"] = ["no_such_proj"]
    put_request(root, "ev-bad", bad)
    assert main.main([], env_for(root, "ev-bad")) == 2
    return root


def events_of(root, job_id: str) -> list[dict]:
    from job_manager import LocalJobStore

    return LocalJobStore(root).events(job_id)


def test_a_job_records_each_step_of_its_life_once_in_order(finished):
    """queued, started, each phase, each evaluation and checkpoint with its step and metrics, each export step,
    and completed last with the metrics and where the adapter went; ids unique and in the order written."""
    events = events_of(finished, "ev-done")
    kinds = [e["kind"] for e in events]
    assert kinds[:3] == ["queued", "started", "phase"] and kinds[-1] == "completed" and kinds.count("completed") == 1
    ids = [e["id"] for e in events]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert [e["at"] for e in events] == sorted(e["at"] for e in events)
    phases = [e["phase"] for e in events if e["kind"] == "phase"]
    assert phases.index("training") < phases.index("evaluating") < phases.index("exporting")
    evaluations = [e for e in events if e["kind"] == "evaluation"]
    assert [e["step"] for e in evaluations][:2] == [2, 4] and all("eval_loss" in e["metrics"] for e in evaluations)
    checkpoints = [e for e in events if e["kind"] == "checkpoint"]
    assert [e["step"] for e in checkpoints] == [2, 4]
    assert all(e["uri"].endswith(f"/checkpoint-{e['step']}/") and e["last_eval"]["step"] == e["step"]
               for e in checkpoints)
    assert "verify_adapter" in [e["step"] for e in events if e["kind"] == "export_step"]
    doc = read_doc(finished, "ev-done")
    assert events[-1]["metrics"]["eval_loss"] == doc["metrics"]["eval_loss"]
    assert events[-1]["adapter_path"] == doc["adapter_path"]
    assert events[1]["attempt"] == doc["attempt"] == 0


def test_a_refused_job_ends_with_its_failure_and_the_field_named(finished):
    events = events_of(finished, "ev-bad")
    assert [e["kind"] for e in events][:2] == ["queued", "started"] and events[-1]["kind"] == "failed"
    assert events[-1]["error_type"] == "permanent" and "lora_target_modules" in events[-1]["error"]
    assert events[-1]["error"] == read_doc(finished, "ev-bad")["error"]


def test_the_command_prints_them_and_says_how_the_job_ended(finished, capsys):
    from operating.cli import main

    env = {"BACKEND": "local", "LOCAL_DIR": str(finished)}
    assert main(["events", "ev-done"], env) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(events_of(finished, "ev-done"))
    assert " queued " in lines[0] and " completed " in lines[-1] and "adapter_path=gs://" in lines[-1]
    assert any(" checkpoint " in line and "step=2" in line for line in lines)
    assert main(["events", "ev-bad", "--json"], env) == 1
    parsed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert parsed[-1]["kind"] == "failed" and parsed == events_of(finished, "ev-bad")
    assert main(["events", "no-such-job", "--follow", "--wait-start", "0.2", "--interval", "0.05"], env) == 1


def test_events_are_never_overwritten_and_an_outage_costs_none(tmp_path):
    """An id is written once (a second append with it is refused and leaves the first); an event the store does
    not take is kept and written, in order, with the next one; the run is not stopped by it."""
    from job_manager import JobTracker, LocalJobStore

    store = LocalJobStore(tmp_path)
    assert store.append_event("j", "a", {"kind": "x", "n": 1}) is True
    assert store.append_event("j", "a", {"kind": "x", "n": 2}) is False
    assert store.events("j") == [{"kind": "x", "n": 1, "id": "a"}]

    class Flaky(LocalJobStore):
        down = True

        def append_event(self, job_id, event_id, fields):
            if self.down:
                raise ConnectionError("Firestore unavailable")
            return super().append_event(job_id, event_id, fields)

    flaky = Flaky(tmp_path)
    tracker = JobTracker(flaky, "k")
    tracker.event("phase", phase="training")  # not written: kept
    assert flaky.events("k") == []
    flaky.down = False
    tracker.event("evaluation", step=2)
    assert [(e["kind"], e.get("phase"), e.get("step")) for e in flaky.events("k")] == [
        ("phase", "training", None), ("evaluation", None, 2)]


def test_follow_waits_for_the_end_and_gives_up_at_its_timeout(tmp_path, capsys):
    """--follow prints events as they come and returns when one ends the job (exit 0 completed, 1 failed);
    with --timeout and no end, exit 2."""
    from job_manager import LocalJobStore
    from operating.events import show

    store = LocalJobStore(tmp_path)
    store.append_event("f", "0001", {"kind": "started", "at": "2026-12-08T00:00:01", "attempt": 0})

    def later():
        time.sleep(0.3)
        store.append_event("f", "0002", {"kind": "phase", "phase": "training", "at": "2026-12-08T00:00:02",
                                        "attempt": 0})
        store.append_event("f", "0003", {"kind": "failed", "error": "boom", "at": "2026-12-08T00:00:03",
                                        "attempt": 0})

    writer = threading.Thread(target=later)
    writer.start()
    args = SimpleNamespace(job_id="f", follow=True, json=False, interval=0.05, timeout=10.0, wait_start=10.0)
    assert show(store, args) == 1
    writer.join()
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[2] for line in out] == ["started", "phase", "failed"]
    store.append_event("g", "0001", {"kind": "started", "attempt": 0})
    assert show(store, SimpleNamespace(job_id="g", follow=True, json=False, interval=0.05, timeout=0.2,
                                       wait_start=10.0)) == 2
