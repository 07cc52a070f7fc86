"""The export phase is as watched as training (issue 36): each step named in the job document as it starts,
a cancel and the task deadline honoured between steps, and an artifact that fails its check costing that
artifact alone. On the tiny Gemma 3, through the job's own workflow and the real consumers."""

from __future__ import annotations

import shutil

import pytest

import main
from conftest import env_for, make_job, put_request, read_doc, sample_request
from exporting import export
from job_manager import LocalJobStore
from runtime.errors import Cancelled, Interrupted
from storage import LocalBlobStore
from training.checkpoints import CheckpointStore, Guard

EXPORT = "gemma-export-bucket"


class Watched(LocalJobStore):
    """The local document store, keeping each export step as the job names it; `on_step` may act on one."""

    def __init__(self, root, on_step=lambda step: None):
        super().__init__(root)
        self.steps: list[str] = []
        self.on_step = on_step

    def merge(self, job_id, fields):
        super().merge(job_id, fields)
        if "export_step" in fields:
            self.steps.append(fields["export_step"])
            self.on_step(fields["export_step"])


def watched_job(local_dir, request, job_id, on_step=lambda step: None, guard: Guard | None = None):
    job = make_job(local_dir, request, job_id)
    store = Watched(local_dir, on_step)
    job.tracker.store = store
    job.guard = guard or Guard(read_doc=job.tracker.read, poll_s=0)  # the document read at every step
    return job, store


def merged_request(tiny_root) -> dict:
    req = sample_request(tiny_root)
    # 10 steps, mid-epoch (12 steps make an epoch): where a resumed Trainer would take an 11th
    req["training_config"]["hyperparameters"].update(epochs=2, max_steps=10)
    req["training_config"]["export_config"] = {"format": "merged"}
    return req


def uploaded(local_dir, job_id) -> list[str]:
    return sorted(p.parent.name for p in (local_dir / EXPORT).glob(f"*/{job_id}") if p.is_dir())


def test_each_export_step_is_named_and_a_cancel_stops_the_export_there(local_dir, tiny_root):
    def cancel_at(step):
        if step == "merge":  # as a user does from the web UI, while the merge runs
            LocalJobStore(local_dir).merge("xc", {"cancel_requested": True})

    job, store = watched_job(local_dir, merged_request(tiny_root), "xc", cancel_at)
    job.tracker.open()
    with pytest.raises(Cancelled, match="during the export, before its step verify_merged"):
        job.run()
    assert store.steps == ["verify_reference", "merge"]
    doc = read_doc(local_dir, "xc")
    assert doc["export_step"] == "merge" and doc["phase"] == "exporting" and "heartbeat_at" in doc
    assert uploaded(local_dir, "xc") == ["checkpoints"]  # nothing exported; training's checkpoints stay


def test_the_deadline_during_the_export_stops_it_and_the_next_attempt_exports_without_training(local_dir, tiny_root):
    now = [0.0]

    def near_deadline(step):
        if step == "merge":
            now[0] = 100 - 30  # 30 s of a 100 s task left, under the 60 s reserve

    req = merged_request(tiny_root)
    job, store = watched_job(local_dir, req, "xd", near_deadline,
                             Guard(timeout_s=100, reserve_s=60, clock=lambda: now[0]))
    job.tracker.open()
    with pytest.raises(Interrupted, match="task timeout is 30s away.*before its step verify_merged"):
        job.run()
    assert store.steps == ["verify_reference", "merge"]
    total = read_doc(local_dir, "xd")["total_steps"]
    steps = CheckpointStore(LocalBlobStore(local_dir), f"gs://{EXPORT}/checkpoints/xd/").complete()
    assert steps[-1] == total  # training's last step is saved before the export starts

    again, store = watched_job(local_dir, req, "xd")
    result = again.run()
    assert store.steps == ["verify_reference", "merge", "verify_merged", "upload_merged"]
    doc = read_doc(local_dir, "xd")
    assert doc["resumed_from_step"] == total == 10 and doc["status"] == "completed"
    assert again.timings["train"] < 5 and doc["step"] == total and doc["metrics"]["epoch"] < 1  # no step trained
    assert result["adapter_path"] == f"gs://{EXPORT}/merged_models/xd/"
    assert set(again.timings) >= {"merge", "verify_merged", "upload_merged"}


def test_an_artifact_that_fails_its_check_costs_that_artifact_alone(local_dir, tiny_root, monkeypatch):
    """The adapter and a GGUF made, by a faulty converter, from the base without the training: the adapter passes
    PEFT's check and is uploaded and recorded; the GGUF fails llama.cpp's, is recorded as failed and not uploaded;
    the job fails with exit 2 and a retry does not train again."""
    real = export.export_gguf

    def from_the_base(merged_dir, out_dir, quant, drop_merged=False):
        base = merged_dir.parent / "base"
        shutil.copytree(tiny_root / "models" / "tiny-gemma3", base)
        return real(base, out_dir, quant, True)

    monkeypatch.setattr(export, "export_gguf", from_the_base)
    req = sample_request(tiny_root)
    req["training_config"]["hyperparameters"]["epochs"] = 2
    req["training_config"]["export_config"] = {"format": "adapter", "include_gguf": True, "gguf_quantization": "f16"}
    put_request(local_dir, "part", req)
    assert main.main([], env_for(local_dir, "part")) == 2
    doc = read_doc(local_dir, "part")
    assert doc["status"] == "failed" and doc["error_type"] == "permanent"
    assert doc["error"].startswith("export_config: the exported gguf (f16), loaded in llama.cpp, predicts ")
    adapter_uri = f"gs://{EXPORT}/trained_adapters/part/"
    assert doc["error"].endswith(f"The other exports passed their checks and are uploaded: adapter {adapter_uri}.")
    assert doc["adapter_path"] == doc["artifacts"]["raw"]["adapter"] == adapter_uri and doc["gguf_path"] is None
    assert set(doc["export_failures"]) == {"gguf"} and "it was not uploaded" in doc["export_failures"]["gguf"]
    check = doc["verification"]
    assert check["adapter"]["passed"] is True and check["adapter"]["consumer"] == "PEFT"
    assert check["gguf"]["passed"] is False and check["gguf"]["top1_agreement"] < check["gguf"]["required"]
    assert uploaded(local_dir, "part") == ["trained_adapters"]  # no GGUF; the checkpoints are gone
    assert (local_dir / EXPORT / "trained_adapters" / "part" / "adapter_model.safetensors").is_file()
    # Cloud Run retries a failed task: this one ends at once, nothing trained again
    rerun = main.main([], {**env_for(local_dir, "part"), "CLOUD_RUN_TASK_ATTEMPT": "1"})
    doc = read_doc(local_dir, "part")
    assert rerun == 2 and doc["adapter_path"] == adapter_uri and doc["attempt"] == 0  # it never read the request
