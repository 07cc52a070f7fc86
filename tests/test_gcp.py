"""The job in its home: BACKEND=gcp against the Firestore and GCS emulators (real Google clients),
and a local server speaking the Hub's HTTP API. Started as the training service starts it, and by hand."""

from __future__ import annotations

import hashlib
import json
import time
from datetime import datetime, timezone

import pytest

import job_manager
from conftest import sample_request
from hub_stub import HubStub
from main import main
from reader import problems

SECRET_HF = "hf_stubTOKEN_5a1b2c3d4e5f"


@pytest.fixture
def watched(monkeypatch, gcp):
    """Every write the job makes to its document, read back right after by a separate client, as a
    reader would see it: [(monotonic time, fields written, document after)]."""
    seen: list[tuple[float, dict, dict]] = []
    original = job_manager.FirestoreJobStore.merge

    def merge(self, job_id, fields):
        original(self, job_id, fields)
        seen.append((time.monotonic(), fields, gcp.doc(job_id)))

    monkeypatch.setattr(job_manager.FirestoreJobStore, "merge", merge)
    return seen


def manifest_matches(files: dict[str, bytes]) -> dict:
    """The manifest's checksums (taken from the local files before upload) equal the uploaded bytes."""
    manifest = json.loads(files["manifest.json"])
    assert set(files) == set(manifest["files"]) | {"manifest.json"}
    for name, meta in manifest["files"].items():
        assert hashlib.sha256(files[name]).hexdigest() == meta["sha256"], name
        assert len(files[name]) == meta["bytes"]
    return manifest


def test_as_the_training_service_starts_it(gcp, watched, tiny_root, capsys):
    job_id = "svc-job-1"
    gcp.put_dataset(tiny_root)
    gcp.put_request(job_id, sample_request(tiny_root))
    created = datetime(2026, 11, 1, 12, 0, tzinfo=timezone.utc)
    gcp.fs.collection("training_jobs").document(job_id).set({
        "job_id": job_id, "job_name": "Animal sounds", "user_id": "user-42", "processed_dataset_id": "tiny-animals",
        "base_model_id": "google/gemma-3-1b-it", "status": "queued", "created_at": created, "updated_at": created})
    assert problems(gcp.doc(job_id)) == []

    assert main([], {**gcp.env, "JOB_ID": job_id, "CLOUD_RUN_JOB": "training-job"}) == 0

    # A reader accepts the document after every write the job made, through every status it passed.
    for _, fields, doc in watched:
        assert problems(doc) == [], (fields, doc)
    statuses = [doc["status"] for _, _, doc in watched]
    assert list(dict.fromkeys(statuses)) == ["queued", "preparing", "training", "completed"]
    doc = gcp.doc(job_id)
    assert (doc["job_name"], doc["user_id"], doc["created_at"]) == ("Animal sounds", "user-42", created)
    assert doc["base_model_id"] == str(tiny_root / "models" / "tiny-gemma3")
    assert doc["metrics"]["perplexity"] == pytest.approx(2.718281828 ** doc["metrics"]["eval_loss"], rel=1e-6)
    assert 0.5 < doc["metrics"]["accuracy"] <= 1.0
    uri = f"gs://{gcp.export_bucket}/trained_adapters/{job_id}/"
    assert doc["adapter_path"] == doc["artifacts"]["raw"]["adapter"] == uri
    assert doc["step"] == doc["total_steps"] > 0 and doc["progress"] == 1.0 and doc["attempt"] == 0
    assert doc["estimate"]["gpu"] == "NVIDIA L4" and doc["estimate"]["steps"] == doc["total_steps"]  # issue 37

    # The artifacts, at DESIGN.md's paths, byte-identical to what was written locally.
    files = gcp.blobs(gcp.export_bucket, f"trained_adapters/{job_id}/")
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.model", "custom_config.json"} <= set(files)
    manifest = manifest_matches(files)
    assert json.loads(files["custom_config.json"]) == {
        "job_id": job_id, "base_model_id": str(tiny_root / "models" / "tiny-gemma3"), "provider": "huggingface",
        "export_format": "adapter", "hf_repo_id": None}
    assert manifest["metrics"]["eval_loss"] == doc["metrics"]["eval_loss"]

    # Progress writes during training: at most one per 5 s (the last, forced at the end, excepted).
    progress = [t for t, fields, _ in watched if "step" in fields]
    assert len(progress) >= 2
    gaps = [b - a for a, b in zip(progress, progress[1:-1])]
    assert all(g >= 4.9 for g in gaps), gaps
    start = next(t for t, f, _ in watched if f.get("phase") == "training")
    end = next(t for t, f, _ in watched if f.get("phase") == "evaluating")
    during = sum(1 for t, _, _ in watched if start < t < end)
    assert during <= 2 + (end - start) / 5, (during, end - start)

    # On Cloud Run every log line is JSON that Cloud Logging reads: severity, message, the job id.
    # (Trainer's own printed dicts are replaced by logged lines.)
    logs = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert len(logs) > 5 and all(e["severity"] and e["job_id"] == job_id and e["message"] for e in logs)
    assert any(e["message"].startswith("phase: training") for e in logs)
    # The job's events in the subcollection training_jobs/{job_id}/events, through the real client: queued when
    # the service queued it, then each phase, the end last; the command reads them from Firestore.
    events = [snap.to_dict() | {"id": snap.id} for snap in
              gcp.fs.collection("training_jobs").document(job_id).collection("events").stream()]
    kinds = [e["kind"] for e in events]
    assert kinds[:2] == ["queued", "started"] and kinds[-1] == "completed" and "phase" in kinds
    assert events[0]["queued_at"] == created and events[-1]["adapter_path"] == uri
    from operating.cli import main as cli

    assert cli(["events", job_id], gcp.env) == 0
    assert len(capsys.readouterr().out.splitlines()) == len(events)

    print(f"document writes: {len(watched)} in all, {during} during {end - start:.1f}s of training")


def test_started_by_hand_with_an_explicit_request_path(gcp, tiny_root):
    """No document yet, the request at TRAINING_CONFIG_GCS_PATH, the splits named by the dataset's
    metadata document (in a place the bucket listing would not find)."""
    job_id = "by-hand-1"
    gcp.put_dataset(tiny_root, key_prefix="exports/v2/")
    gcp.fs.collection("processed_datasets").document("animals-v2").set({"modality": "text", "splits": [
        {"split_name": "train", "num_rows": 90, "path": f"gs://{gcp.data_bucket}/exports/v2/train.parquet"},
        {"split_name": "test", "num_rows": 18, "path": "exports/v2/test.parquet"}]})
    request = sample_request(tiny_root)
    request["processed_dataset_id"] = "animals-v2"
    request["training_config"]["hyperparameters"].update(epochs=1, max_steps=3)
    uri = gcp.put_request(job_id, request, uri=f"gs://{gcp.config_bucket}/manual/req.json")
    assert gcp.doc(job_id) is None

    assert main([], {**gcp.env, "JOB_ID": job_id, "TRAINING_CONFIG_GCS_PATH": uri}) == 0
    doc = gcp.doc(job_id)
    assert problems(doc) == []
    assert (doc["status"], doc["job_name"], doc["processed_dataset_id"]) == (
        "completed", request["job_name"], "animals-v2")
    assert doc["dataset"]["train_rows"] == 90 and doc["dataset"]["eval_rows"] == 18
    assert doc["created_at"] <= doc["updated_at"]
    manifest_matches(gcp.blobs(gcp.export_bucket, f"trained_adapters/{job_id}/"))


def test_missing_dataset_names_the_paths_looked_at(gcp, tiny_root):
    job_id = "no-data-1"
    request = sample_request(tiny_root)
    request["processed_dataset_id"] = "never-made"
    gcp.put_request(job_id, request)
    assert main([], {**gcp.env, "JOB_ID": job_id}) == 2
    doc = gcp.doc(job_id)
    assert problems(doc) == [] and doc["status"] == "failed" and doc["error_type"] == "permanent"
    assert f"gs://{gcp.data_bucket}/processed_datasets/never-made/train.parquet" in doc["error"]
    assert "no processed_datasets metadata document" in doc["error"]
    # a Cloud Run retry of it stops at once
    assert main([], {**gcp.env, "JOB_ID": job_id, "CLOUD_RUN_TASK_ATTEMPT": "1"}) == 2


def put_hub_job(gcp, tiny_root, job_id: str, repo_id: str, max_steps: int) -> str:
    """A short adapter job whose export goes to the Hub repo, its dataset and request in the emulated buckets."""
    gcp.put_dataset(tiny_root)
    request = sample_request(tiny_root)
    request["training_config"]["hyperparameters"].update(epochs=1, max_steps=max_steps)
    request["training_config"]["export_config"] = {"format": "adapter", "destination": "hfhub", "hf_repo_id": repo_id}
    gcp.put_request(job_id, request)
    return job_id


def test_hub_destination_uploads_the_same_files(gcp, tiny_root):
    job_id = put_hub_job(gcp, tiny_root, "hub-job-1", "acme/tiny-animals", max_steps=3)
    with HubStub(SECRET_HF) as hub:
        assert main([], {**gcp.env, "JOB_ID": job_id, "HF_TOKEN": SECRET_HF, "HF_ENDPOINT": hub.url}) == 0
    repo = hub.repos["acme/tiny-animals"]
    assert repo["private"] is True  # private unless the request says otherwise
    manifest = manifest_matches({k: v for k, v in repo["files"].items() if k != ".gitattributes"})
    assert manifest["hf_repo_id"] == "acme/tiny-animals"
    # LFS as the Hub asks for weights and tokenizer.model; the rest inline
    assert sorted(hub.lfs_uploads) == ["adapter_model.safetensors", "tokenizer.model"]
    card = repo["files"]["README.md"].decode()
    assert card.startswith("---\n") and "\nlicense: apache-2.0\n" in card  # the (local) base's own card's
    assert "AutoPeftModelForCausalLM.from_pretrained(\"acme/tiny-animals\")" in card
    # every call to the Hub carries the token; the LFS content goes to the href the batch API gave (presigned)
    assert all(auth == f"Bearer {SECRET_HF}" for _, path, auth in hub.requests if not path.startswith("/lfs-upload/"))
    # access to the destination was checked before training, the upload came after
    paths = [p for _, p, _ in hub.requests]
    assert paths.index("/api/models/acme/tiny-animals/auth-check/write") < paths.index(
        "/api/models/acme/tiny-animals/commit/main")
    doc = gcp.doc(job_id)
    assert (doc["status"], doc["adapter_path"], doc["artifacts"]["raw"]["adapter"]) == (
        "completed", "acme/tiny-animals", "acme/tiny-animals")


def test_a_second_push_mirrors_the_repo_and_weights_take_the_lfs_path(gcp, tiny_root):
    """A repo that an earlier run (or a person) filled: this job's files replace it in one commit, what it
    lacks is deleted (the Hub's .gitattributes stays), and the weights go through the LFS batch API."""
    job_id = put_hub_job(gcp, tiny_root, "hub-job-2", "acme/animals", max_steps=2)
    with HubStub(SECRET_HF) as hub:
        hub.repos["acme/animals"] = {"private": True, "writable": True, "files": {
            ".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n",
            "checkpoint-500/adapter_model.safetensors": b"stale weights", "adapter_config.json": b"{}",
            "notes.txt": b"an earlier run's"}}
        assert main([], {**gcp.env, "JOB_ID": job_id, "HF_TOKEN": SECRET_HF, "HF_ENDPOINT": hub.url}) == 0
    files = hub.repos["acme/animals"]["files"]
    assert "checkpoint-500/adapter_model.safetensors" not in files and "notes.txt" not in files
    assert files[".gitattributes"].startswith(b"*.safetensors filter=lfs")
    manifest = manifest_matches({k: v for k, v in files.items() if k != ".gitattributes"})
    assert json.loads(files["adapter_config.json"])["peft_type"] == "LORA"  # this run's, not the stale one
    assert sorted(hub.lfs_uploads) == ["adapter_model.safetensors", "tokenizer.model"]
    weights = manifest["files"]["adapter_model.safetensors"]["sha256"]
    assert files["adapter_model.safetensors"] == hub.lfs_objects[weights]
    commits = [p for m, p, _ in hub.requests if m == "POST" and "/commit/" in p]
    assert len(commits) == 1  # added and deleted in one commit: no moment with a half-mirrored repo
    assert any(m == "PUT" and p.startswith("/lfs-upload/") for m, p, _ in hub.requests)


@pytest.mark.parametrize("case", ["no-write-access", "base-model-not-found"])
def test_hub_access_is_checked_before_training(gcp, tiny_root, case):
    job_id = f"hub-denied-{case}"
    gcp.put_dataset(tiny_root)
    request = sample_request(tiny_root)
    if case == "no-write-access":
        request["training_config"]["export_config"] = {"destination": "hfhub", "hf_repo_id": "google/gemma-3-1b-it"}
        field = "export_config.hf_repo_id"
    else:
        request["training_config"]["base_model_id"] = "nobody/no-such-model"
        field = "training_config.base_model_id"
    gcp.put_request(job_id, request)
    with HubStub(SECRET_HF, readable=("google/gemma-3-1b-it",)) as hub:
        assert main([], {**gcp.env, "JOB_ID": job_id, "HF_TOKEN": SECRET_HF, "HF_ENDPOINT": hub.url}) == 2
    doc = gcp.doc(job_id)
    assert doc["status"] == "failed" and doc["error_type"] == "permanent" and doc["phase"] == "validating"
    assert doc["error"].startswith(field)
    assert SECRET_HF not in json.dumps(doc, default=str)


def test_checkpoints_round_trip_through_gcs_with_concurrent_transfers(gcp, tmp_path):
    """A checkpoint uploaded and restored through the real client and its transfer manager: every file,
    nested ones included, back byte for byte; a checkpoint that lost a file after its marker is passed over."""
    import os

    from storage import GcsBlobStore
    from training.checkpoints import MARKER, CheckpointStore

    store = CheckpointStore(GcsBlobStore(project=gcp.env["PROJECT_ID"], workers=4),
                            f"gs://{gcp.export_bucket}/checkpoints/rt/", keep=2)
    files = {"adapter_model.safetensors": os.urandom(3 << 20), "optimizer.pt": os.urandom(1 << 20),
             "trainer_state.json": b"{}", "nested/rng_state.pth": os.urandom(4096)}
    for step in (10, 20):
        local = tmp_path / "out" / f"checkpoint-{step}"
        for name, data in files.items():
            (local / name).parent.mkdir(parents=True, exist_ok=True)
            (local / name).write_bytes(data[:-1] + bytes([step]))
        store.upload(local)
    gcp.gcs.bucket(gcp.export_bucket).blob("checkpoints/rt/checkpoint-20/optimizer.pt").delete()
    restored = store.restore(tmp_path / "resume")
    assert restored == tmp_path / "resume" / "checkpoint-10"
    got = {p.relative_to(restored).as_posix(): p.read_bytes() for p in restored.rglob("*") if p.is_file()}
    assert got == {name: data[:-1] + bytes([10]) for name, data in files.items()} and MARKER not in got


def test_a_checkpoint_is_complete_by_its_manifest_not_by_its_file_names(gcp, tmp_path):
    """Every file present by name is not enough: an object cut off mid-upload by a second writer after the
    manifest (the same name, fewer bytes), or the same size with other bytes, makes its checkpoint unresumable;
    the restore takes the newest one the manifest vouches for, from sizes and CRC32Cs GCS lists (nothing is
    downloaded to decide)."""
    import json
    import os

    from storage import GcsBlobStore
    from training.checkpoints import MARKER, CheckpointStore

    store = CheckpointStore(GcsBlobStore(project=gcp.env["PROJECT_ID"]), f"gs://{gcp.export_bucket}/checkpoints/mf/",
                            keep=3)
    data = {"adapter_model.safetensors": os.urandom(1 << 20), "optimizer.pt": os.urandom(1 << 19)}
    for step in (10, 20, 30):
        local = tmp_path / "out" / f"checkpoint-{step}"
        local.mkdir(parents=True)
        for name, blob in data.items():
            (local / name).write_bytes(blob[:-1] + bytes([step]))
        store.upload(local)
    bucket = gcp.gcs.bucket(gcp.export_bucket)
    manifest = json.loads(bucket.blob(f"checkpoints/mf/checkpoint-30/{MARKER}").download_as_bytes())
    assert manifest["files"] == {n: len(b) for n, b in data.items()} and set(manifest["crc32c"]) == set(data)
    assert store.complete() == [10, 20, 30]
    bucket.blob("checkpoints/mf/checkpoint-30/optimizer.pt").upload_from_string(data["optimizer.pt"][:1000])
    same_size = bytearray(data["adapter_model.safetensors"][:-1] + bytes([20]))
    same_size[0] ^= 0xFF
    bucket.blob("checkpoints/mf/checkpoint-20/adapter_model.safetensors").upload_from_string(bytes(same_size))
    assert store.complete() == [10]
    restored = store.restore(tmp_path / "resume")
    assert restored.name == "checkpoint-10"
    assert (restored / "optimizer.pt").read_bytes() == data["optimizer.pt"][:-1] + bytes([10])


def test_a_job_continues_another_jobs_adapter_through_gcs(gcp, tiny_root, tmp_path):
    """init_from_job_id on the cloud backend: the parent's adapter found and downloaded through the real
    client (list, then the transfer manager), the lineage in the document and the manifest."""
    from models.artifacts import sha256

    gcp.put_dataset(tiny_root)
    req = sample_request(tiny_root)
    req["training_config"]["hyperparameters"].update(epochs=1)
    gcp.put_request("gcs-parent", req)
    assert main([], {**gcp.env, "JOB_ID": "gcs-parent"}) == 0
    parent = gcp.doc("gcs-parent")
    req["training_config"]["init_from_job_id"] = "gcs-parent"
    gcp.put_request("gcs-child", req)
    assert main([], {**gcp.env, "JOB_ID": "gcs-child"}) == 0
    doc = gcp.doc("gcs-child")
    assert doc["init_eval_loss"] == pytest.approx(parent["metrics"]["eval_loss"], abs=1e-4)
    assert doc["metrics"]["eval_loss"] < doc["init_eval_loss"]
    weights = gcp.blobs(gcp.export_bucket, "trained_adapters/gcs-parent/")["adapter_model.safetensors"]
    (local := tmp_path / "parent-weights").write_bytes(weights)
    assert doc["init_from"]["adapter_sha256"] == sha256(local)
    assert doc["init_from"]["uri"] == f"gs://{gcp.export_bucket}/trained_adapters/gcs-parent/"
    manifest = json.loads(gcp.blobs(gcp.export_bucket, "trained_adapters/gcs-child/")["manifest.json"])
    assert manifest["parent"] == doc["init_from"]
