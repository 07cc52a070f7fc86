"""The job loses nothing: kill -9 at random points, SIGTERM, task timeouts, cancellation, and the
document store and bucket going away mid-run. Real processes and signals, on the tiny model."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone

import pytest

from conftest import ROOT, env_for, put_request, read_doc, sample_request
from job_manager import LocalJobStore
from main import main
from reader import problems
from runtime.errors import Interrupted
from storage import LocalBlobStore
from training.checkpoints import MARKER, CheckpointStore, Guard

STEP_LOSS = re.compile(r"step (\d+)/\d+: loss=([0-9.e+-]+)")
RESUMED = re.compile(r"resuming from checkpoint-(\d+)")


def checkpoint_store(local_dir, job_id) -> CheckpointStore:
    return CheckpointStore(LocalBlobStore(local_dir), f"gs://gemma-export-bucket/checkpoints/{job_id}/")


def short_request(tiny_root, epochs: int = 6) -> dict:
    req = sample_request(tiny_root)
    req["training_config"]["hyperparameters"].update(epochs=epochs, logging_steps=4)
    return req


class Job:
    """The job as a separate process, the way Cloud Run runs it (so it can be killed for real)."""

    def __init__(self, local_dir, job_id, attempt: int, **env):
        self.proc = subprocess.Popen(
            [sys.executable, "main.py"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={"PATH": os.environ["PATH"], "LOG_LEVEL": "DEBUG", "CLOUD_RUN_TASK_ATTEMPT": str(attempt),
                 **env_for(local_dir, job_id), **env})
        self.output = ""

    def wait(self, timeout: float = 120) -> int:
        self.output, _ = self.proc.communicate(timeout=timeout)
        return self.proc.returncode

    def losses(self) -> dict[int, float]:
        return {int(s): float(v) for s, v in STEP_LOSS.findall(self.output)}


def wait_for_phase(local_dir, job_id, phase: str, job: Job, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and job.proc.poll() is None:
        try:
            if read_doc(local_dir, job_id).get("phase") == phase:
                return
        except (FileNotFoundError, json.JSONDecodeError):
            pass
        time.sleep(0.05)
    raise AssertionError(f"phase {phase!r} not reached (exit code {job.proc.poll()})")


# ---- checkpoints and the guard, alone --------------------------------------------------------------

def test_checkpoint_store_keeps_the_newest_complete(tmp_path):
    blobs = LocalBlobStore(tmp_path / "root")
    store = CheckpointStore(blobs, "gs://exp/checkpoints/j/", keep=2)
    for step in (5, 10, 15):
        local = tmp_path / "out" / f"checkpoint-{step}"
        local.mkdir(parents=True)
        (local / "adapter.bin").write_bytes(b"w" * step)
        (local / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        store.upload(local)
    assert store.complete() == [10, 15]  # checkpoint-5 pruned
    # a half-uploaded checkpoint (no marker) and one that lost a file are never taken
    blobs.write_bytes("gs://exp/checkpoints/j/checkpoint-20/adapter.bin", b"half")
    blobs.write_bytes("gs://exp/checkpoints/j/checkpoint-25/adapter.bin", b"x")
    blobs.write_bytes(f"gs://exp/checkpoints/j/checkpoint-25/{MARKER}",
                      json.dumps({"step": 25, "files": {"adapter.bin": 1, "trainer_state.json": 9}}).encode())
    assert store.complete() == [10, 15]
    restored = store.restore(tmp_path / "resume")
    assert restored == tmp_path / "resume" / "checkpoint-15"
    assert (restored / "adapter.bin").read_bytes() == b"w" * 15 and not (restored / MARKER).exists()
    store.clear()
    assert store.complete() == [] and store.restore(tmp_path / "resume") is None


def test_checkpoint_uploads_run_beside_training_one_at_a_time(tmp_path):
    """The Trainer's order of callbacks, driven by hand with a store whose upload waits to be released:
    the step after a save does not wait for its upload; the next save waits for it (the Trainer's rotation
    then cannot delete a folder mid-upload); the end of training waits for the last; an upload's error is
    raised in the training thread."""
    from types import SimpleNamespace

    from transformers import TrainerControl, TrainerState

    from training.checkpoints import checkpoint_callback

    events, release = [], threading.Event()

    class SlowStore:
        def upload(self, local):
            events.append(("upload starts", local.name))
            assert release.wait(10)
            assert local.is_dir(), "the folder went during its upload"
            if local.name == "checkpoint-4":
                raise OSError("bucket gone")
            events.append(("uploaded", local.name))
            return f"gs://b/c/{local.name}/"

    tracker = SimpleNamespace(job_id="j", defer=lambda f: events.append(("recorded", f["checkpoint"]["step"])),
                              event=lambda kind, **f: None, latest={}, last_eval=None)
    cb = checkpoint_callback(SlowStore(), Guard(), tracker, minutes=1e9, save_strategy="steps")
    args, state = SimpleNamespace(output_dir=str(tmp_path)), TrainerState(max_steps=10)

    def step(n: int, save: bool) -> TrainerControl:
        state.global_step = n
        control = TrainerControl(should_save=save)
        cb.on_step_begin(args, state, control)
        cb.on_step_end(args, state, control)
        if control.should_save:
            (tmp_path / f"checkpoint-{n}").mkdir()
            cb.on_save(args, state, control)
        return control

    step(1, save=True)
    step(2, save=False)  # returns while checkpoint-1 is still uploading
    assert events == [("upload starts", "checkpoint-1")]
    waiting = threading.Thread(target=step, args=(3, True))
    waiting.start()
    waiting.join(0.3)
    assert waiting.is_alive()  # the save at step 3 waits for checkpoint-1's upload
    release.set()
    waiting.join(10)
    assert events[:3] == [("upload starts", "checkpoint-1"), ("uploaded", "checkpoint-1"), ("recorded", 1)]
    cb.on_train_end(args, state, TrainerControl())  # waits for checkpoint-3
    assert events[3:] == [("upload starts", "checkpoint-3"), ("uploaded", "checkpoint-3"), ("recorded", 3)]
    step(4, save=True)
    with pytest.raises(OSError, match="bucket gone"):
        cb.on_train_end(args, state, TrainerControl())


def test_guard_deadline_and_cancel():
    now = [100.0]
    doc = {}
    guard = Guard(lambda: doc, timeout_s=60, reserve_s=10, started=100.0, poll_s=3, clock=lambda: now[0])
    assert guard.check(needed_s=5) is None
    now[0] = 144.0  # 16 s left: more than 10 s reserve + 5 s for a step and a save
    assert guard.check(needed_s=5) is None
    now[0] = 146.0
    assert "task timeout is 14s away" in guard.check(needed_s=5) and not guard.cancelled
    cancel = Guard(lambda: doc, poll_s=3, clock=lambda: now[0])
    assert cancel.check() is None
    doc["cancel_requested"] = True
    assert cancel.check() is None  # read at most every poll_s
    now[0] += 3
    assert "cancelled on request" in cancel.check() and cancel.cancelled



def test_guard_handles_sigterm_only_inside_its_block():
    """Outside training a SIGTERM raises Interrupted (exit 1, the retry resumes); during training it only
    sets the reason; once the block ends, the handler from before is back."""
    before = signal.getsignal(signal.SIGTERM)
    with Guard() as guard:
        with pytest.raises(Interrupted, match="SIGTERM"):
            os.kill(os.getpid(), signal.SIGTERM)
        guard.reason, guard.training = None, True
        os.kill(os.getpid(), signal.SIGTERM)
        assert guard.reason.startswith("SIGTERM")
    assert signal.getsignal(signal.SIGTERM) is before

# ---- real interruptions ----------------------------------------------------------------------------

def wait_for_checkpoint(local_dir, job_id: str, job: Job, timeout: float = 60) -> None:
    """Until a complete checkpoint newer than those in the bucket now is uploaded, or the job ends."""
    store, deadline = checkpoint_store(local_dir, job_id), time.monotonic() + timeout
    before = max(store.complete(), default=0)
    while time.monotonic() < deadline and job.proc.poll() is None:
        try:
            if max(store.complete(), default=0) > before:
                return
        except (FileNotFoundError, json.JSONDecodeError):  # a checkpoint being written or rotated out
            pass
        time.sleep(0.05)


def problems_local(doc: dict) -> list[str]:
    """The reader's checks on a local document, whose timestamps are ISO strings."""
    return problems({**doc, **{k: datetime.fromisoformat(doc[k]) for k in ("created_at", "updated_at")}})


def test_sigterm_saves_a_checkpoint_and_exits_1(local_dir, tiny_root):
    put_request(local_dir, "term", short_request(tiny_root, epochs=12))
    job = Job(local_dir, "term", 0)
    wait_for_phase(local_dir, "term", "training", job)
    time.sleep(1.5)
    job.proc.send_signal(signal.SIGTERM)
    t = time.monotonic()
    assert job.wait() == 1, job.output
    assert time.monotonic() - t < 10  # inside Cloud Run's grace period
    doc = read_doc(local_dir, "term")
    assert doc["status"] == "failed" and doc["error_type"] == "retryable" and "SIGTERM" in doc["error"]
    saved = checkpoint_store(local_dir, "term").complete()
    assert saved and 0 < saved[-1] < doc["total_steps"]
    assert doc["checkpoint"]["step"] == saved[-1]
    again = Job(local_dir, "term", 1)
    assert again.wait() == 0, again.output
    assert int(RESUMED.search(again.output)[1]) == saved[-1]
    doc = read_doc(local_dir, "term")
    assert doc["status"] == "completed" and doc["error"] is None and doc["resumed_from_step"] == saved[-1]
    assert checkpoint_store(local_dir, "term").complete() == []  # cleared once completed


def test_task_timeout_shorter_than_the_job_completes_over_attempts(local_dir, tiny_root):
    put_request(local_dir, "deadline", short_request(tiny_root, epochs=12))
    env = env_for(local_dir, "deadline", TASK_TIMEOUT_SECONDS="5", DEADLINE_RESERVE_SECONDS="0")
    codes, errors = [], []
    for attempt in range(10):
        codes.append(main([], {**env, "CLOUD_RUN_TASK_ATTEMPT": str(attempt)}))
        doc = read_doc(local_dir, "deadline")
        if codes[-1] == 0:
            break
        errors.append(doc["error"])
    assert codes[-1] == 0 and len(codes) >= 2 and set(codes[:-1]) == {1}, codes
    assert all("task timeout" in e for e in errors), errors
    assert doc["status"] == "completed" and doc["step"] == doc["total_steps"] == 144
    assert doc["resumed_from_step"] > 0


def test_cancel_stops_training_and_is_not_retried(local_dir, tiny_root):
    put_request(local_dir, "cancel", short_request(tiny_root, epochs=12))
    job = Job(local_dir, "cancel", 0)
    wait_for_phase(local_dir, "cancel", "training", job)
    time.sleep(0.5)
    # once, as a user does, while the job keeps writing its progress: the store's lock keeps the write
    LocalJobStore(local_dir).merge("cancel", {"cancel_requested": True})
    assert job.wait() == 0, job.output
    doc = read_doc(local_dir, "cancel")
    assert doc["status"] == "failed" and doc["cancelled"] is True and doc["error_type"] == "cancelled"
    assert "cancelled on request" in doc["error"] and doc["step"] < doc["total_steps"]
    assert not (local_dir / "gemma-export-bucket" / "trained_adapters" / "cancel").exists()
    # a rerun does nothing and still exits 0
    assert main([], env_for(local_dir, "cancel")) == 0
    assert read_doc(local_dir, "cancel")["status"] == "failed"


@pytest.mark.slow
def test_emulators_stopped_and_restarted_mid_run(gcp, tiny_root, firestore_emulator, gcs_emulator):
    """Firestore and GCS go away for a while during training (the Firestore emulator comes back
    empty): training goes on, uploads are retried, and the document catches up."""
    job_id = "outage-1"
    gcp.put_dataset(tiny_root)
    gcp.put_request(job_id, short_request(tiny_root, epochs=12))
    created = datetime.now(timezone.utc)
    gcp.fs.collection("training_jobs").document(job_id).set({
        "job_id": job_id, "job_name": "Outage", "user_id": "u-7", "processed_dataset_id": "tiny-animals",
        "base_model_id": "x", "status": "queued", "created_at": created, "updated_at": created})
    outage = {}

    def break_things():
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (gcp.doc(job_id) or {}).get("phase") != "training":
            time.sleep(0.05)
        firestore_emulator.stop()
        gcs_emulator.stop()
        outage["start"] = time.monotonic()
        time.sleep(3)
        gcs_emulator.start()
        firestore_emulator.start()
        outage["end"] = time.monotonic()

    thread = threading.Thread(target=break_things)
    thread.start()
    try:
        rc = main([], {**gcp.env, "JOB_ID": job_id})
    finally:
        thread.join()
    assert rc == 0 and outage["end"] - outage["start"] >= 3
    doc = gcp.doc(job_id)
    assert problems(doc) == [], doc
    assert (doc["status"], doc["job_name"], doc["user_id"]) == ("completed", "Outage", "u-7")
    assert doc["step"] == doc["total_steps"] == 144
    files = gcp.blobs(gcp.export_bucket, f"trained_adapters/{job_id}/")
    assert "adapter_model.safetensors" in files and "manifest.json" in files


@pytest.mark.slow
def test_an_outage_longer_than_the_give_up_fails_the_attempt_and_the_next_resumes(gcp, tiny_root, firestore_emulator,
                                                                                  gcs_emulator):
    """Firestore and GCS go away after the first checkpoints and stay away past STORE_GIVE_UP_SECONDS: the attempt
    stops retrying and exits 1 (not hanging on, not training on with nowhere to save); once they are back the next
    attempt, a new process as Cloud Run's retry is, resumes from the newest complete checkpoint and completes."""
    from storage import GcsBlobStore

    job_id = "outage-2"
    gcp.put_dataset(tiny_root)
    gcp.put_request(job_id, short_request(tiny_root, epochs=12))
    env = {**os.environ, **gcp.env, "JOB_ID": job_id, "STORE_GIVE_UP_SECONDS": "3"}
    store = CheckpointStore(GcsBlobStore(gcp.env["PROJECT_ID"]), f"gs://{gcp.export_bucket}/checkpoints/{job_id}/")
    first = subprocess.Popen([sys.executable, "main.py"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    saved, deadline = [], time.monotonic() + 90
    while len(saved) < 2 and time.monotonic() < deadline and first.poll() is None:
        try:
            saved = store.complete()
        except Exception:  # a checkpoint being written
            pass
        time.sleep(0.1)
    firestore_emulator.stop()
    gcs_emulator.stop()
    down = time.monotonic()
    try:
        output, _ = first.communicate(timeout=120)
        ended = time.monotonic()
    finally:
        gcs_emulator.start()
        firestore_emulator.start()
    assert first.returncode == 1 and len(saved) >= 2, output[-3000:]
    assert ended - down < 45  # gave up: 3 s for each write and read, the document's too, not the default 300
    saved = store.complete()
    assert saved and saved[-1] < 144
    again = subprocess.run([sys.executable, "main.py"], cwd=ROOT, env={**env, "CLOUD_RUN_TASK_ATTEMPT": "1"},
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
    doc = gcp.doc(job_id)  # the Firestore emulator came back empty: the second attempt made the document again
    assert doc["status"] == "completed" and doc["resumed_from_step"] == saved[-1]
    assert doc["step"] == doc["total_steps"] == 144
