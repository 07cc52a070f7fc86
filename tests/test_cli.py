"""cli.py (issue 20, first part): submit --local queues and runs a job as the training service would start
it, and without --local starts the Cloud Run job (against a stand-in for its Admin API); status reads the
document back; cancel asks a job to stop, or cancels an execution that has not started; bad input exits 2 and
queues nothing."""

from __future__ import annotations

import json

import cli
from conftest import env_for, read_doc, sample_request


def request_file(tmp_path, req) -> str:
    path = tmp_path / "request.json"
    path.write_text(json.dumps(req))
    return str(path)


def test_submit_local_runs_the_job_and_status_reads_it(local_dir, tiny_root, tmp_path, capfd):
    req = sample_request(tiny_root)
    req["training_config"]["hyperparameters"].update(epochs=1)
    env = {k: v for k, v in env_for(local_dir, "unused").items() if k != "JOB_ID"}
    assert cli.main(["submit", request_file(tmp_path, req), "--local", "--job-id", "cli-1"], env) == 0
    out = capfd.readouterr().out
    assert out.startswith("job cli-1 queued; follow it with `python cli.py status cli-1`")
    doc = read_doc(local_dir, "cli-1")
    assert doc["status"] == "completed" and doc["job_name"] == req["job_name"]
    assert (local_dir / "gemma-train-config" / "cli-1.json").is_file()
    assert cli.main(["status", "cli-1"], env) == 0
    text = capfd.readouterr().out
    assert text.startswith("job cli-1: completed (completed)\n  step 12/12")
    assert f"eval_loss {doc['metrics']['eval_loss']:.4g}" in text
    assert "adapter_path: gs://gemma-export-bucket/trained_adapters/cli-1/" in text
    assert "against the base: better on rouge_l" in text
    assert cli.main(["status", "cli-1", "--json"], env) == 0
    assert json.loads(capfd.readouterr().out)["status"] == "completed"
    # the same id again: refused, the finished job untouched
    assert cli.main(["submit", request_file(tmp_path, req), "--local", "--job-id", "cli-1"], env) == 2
    assert "job cli-1 exists already" in capfd.readouterr().err
    assert cli.main(["cancel", "cli-1"], env) == 1 and "completed already" in capfd.readouterr().err


def test_bad_input_exits_2_and_queues_nothing(local_dir, tiny_root, tmp_path, capfd):
    env = {k: v for k, v in env_for(local_dir, "unused").items() if k != "JOB_ID"}
    req = sample_request(tiny_root)
    req["training_config"]["hyperparameters"]["learning_rte"] = 0.1
    assert cli.main(["submit", request_file(tmp_path, req), "--local", "--job-id", "bad"], env) == 2
    assert "did you mean 'learning_rate'" in capfd.readouterr().err
    assert not (local_dir / "firestore" / "training_jobs" / "bad.json").exists()
    good = request_file(tmp_path, sample_request(tiny_root))
    assert cli.main(["submit", good, "--job-id", "remote"], env) == 2  # Cloud Run without a project: said so
    assert "starting the Cloud Run job needs BACKEND=gcp and PROJECT_ID" in capfd.readouterr().err
    assert not (local_dir / "firestore" / "training_jobs" / "remote.json").exists()  # nothing queued
    assert cli.main(["status", "nosuch"], env) == 1
    assert cli.main(["status", "../x"], env) == 2  # an id that could leave its folder


def test_cancel_sets_the_flag_a_running_job_reads(local_dir, capfd):
    from job_manager import LocalJobStore

    store = LocalJobStore(local_dir)
    store.create("running", {"job_id": "running", "status": "training"})
    env = {k: v for k, v in env_for(local_dir, "unused").items() if k != "JOB_ID"}
    assert cli.main(["cancel", "running"], env) == 0
    assert read_doc(local_dir, "running")["cancel_requested"] is True
    assert cli.main(["cancel", "nosuch"], env) == 1


def test_list_and_download_locally(local_dir, tiny_root, tmp_path, capfd):
    req = sample_request(tiny_root)
    req["training_config"]["hyperparameters"].update(max_steps=2)
    env = {k: v for k, v in env_for(local_dir, "unused").items() if k != "JOB_ID"}
    for job_id in ("older", "newer"):
        assert cli.main(["submit", request_file(tmp_path, req), "--local", "--job-id", job_id], env) == 0
    capfd.readouterr()
    assert cli.main(["list"], env) == 0
    rows = capfd.readouterr().out.splitlines()
    assert [r.split()[0] for r in rows] == ["newer", "older"] and all(" completed " in r for r in rows)
    assert cli.main(["download", "newer", "--to", str(tmp_path / "got")], env) == 0
    exported = local_dir / "gemma-export-bucket" / "trained_adapters" / "newer"
    assert sorted(p.name for p in (tmp_path / "got").iterdir()) == sorted(p.name for p in exported.iterdir())
    assert (tmp_path / "got" / "adapter_model.safetensors").read_bytes() == \
        (exported / "adapter_model.safetensors").read_bytes()
    assert cli.main(["download", "newer", "--what", "gguf"], env) == 1
    assert "exported no gguf" in capfd.readouterr().err


def test_list_reads_firestore_newest_first(gcp):
    from datetime import datetime, timedelta, timezone

    t = datetime(2026, 12, 1, tzinfo=timezone.utc)
    for i, job_id in enumerate(("a", "b", "c")):
        gcp.fs.collection("training_jobs").document(job_id).set(
            {"job_id": job_id, "status": "completed", "updated_at": t + timedelta(minutes=i)})
    import io
    from contextlib import redirect_stdout

    out = io.StringIO()
    with redirect_stdout(out):
        assert cli.main(["list", "--limit", "2"], gcp.env) == 0
    assert [r.split()[0] for r in out.getvalue().splitlines()] == ["c", "b"]


def test_watch_follows_a_running_job_to_its_end(local_dir, tiny_root, tmp_path, capfd):
    """watch beside a job started in the background (not on a terminal: one line per change), to its end."""
    import subprocess
    import sys

    from conftest import ROOT, put_request

    req = sample_request(tiny_root)
    req["training_config"]["hyperparameters"].update(epochs=2)
    put_request(local_dir, "watched", req)
    env = {k: v for k, v in env_for(local_dir, "unused").items() if k != "JOB_ID"}
    job = subprocess.Popen([sys.executable, "main.py"], cwd=ROOT, env={"PATH": "/usr/bin:/bin",
                                                                      **env_for(local_dir, "watched")},
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        rc = cli.main(["watch", "watched", "--interval", "0.2", "--timeout", "300"], env)
    finally:
        job.wait(timeout=300)
    assert rc == 0
    lines = capfd.readouterr().out.splitlines()
    assert any(line.startswith("job watched: training (training), step ") for line in lines), lines
    assert "job watched: completed (completed)" in lines
    summary = lines.index("job watched: completed (completed)")
    assert lines[summary + 1] == "  step 24/24" or lines[summary + 1].startswith("  step 24/24, loss")
    assert cli.main(["watch", "nosuch", "--interval", "0.1", "--wait-start", "0.3"], env) == 1


def test_submit_starts_the_cloud_run_job_with_the_job_id_and_cancel_stops_it_before_it_starts(gcp, tiny_root,
                                                                                               tmp_path, capfd):
    """Against the Firestore and GCS emulators and a stand-in for the Cloud Run Admin API: submit stores the
    request where the job reads it, creates the document `queued` as the training service does, and runs the
    Cloud Run job once with the one override the service sends, env JOB_ID; cancel, before the job has
    started, cancels that execution and ends the document. A job Cloud Run does not have: exit 2, failed."""
    from cloud_run_stub import CloudRunStub

    stub = CloudRunStub({"training-job"})
    env = {**gcp.env, "CLOUD_RUN_ENDPOINT": stub.url}
    try:
        req = tmp_path / "req.json"
        req.write_text(json.dumps(sample_request(tiny_root)))
        assert cli.main(["submit", str(req), "--job-id", "cr-1", "--region", "europe-west4"], env) == 0
        (method, path, body), = stub.calls
        assert path == f"/v2/projects/{gcp.env['PROJECT_ID']}/locations/europe-west4/jobs/training-job:run"
        assert body["overrides"]["containerOverrides"] == [{"env": [{"name": "JOB_ID", "value": "cr-1"}]}]
        doc = gcp.doc("cr-1")
        assert doc["status"] == "queued" and doc["cloud_run_execution"].endswith("/executions/training-job-00001")
        assert {"job_id", "job_name", "processed_dataset_id", "base_model_id", "created_at", "updated_at"} <= set(doc)
        assert json.loads(gcp.blobs(gcp.config_bucket, "cr-1.json")[""]) == json.loads(req.read_text())
        assert "started on Cloud Run" in capfd.readouterr().out

        assert cli.main(["cancel", "cr-1"], env) == 0
        assert stub.calls[-1][1] == f"/v2/{doc['cloud_run_execution']}:cancel"
        doc = gcp.doc("cr-1")
        assert doc["status"] == "failed" and doc["cancelled"] is True and doc["cancel_requested"] is True

        assert cli.main(["submit", str(req), "--job-id", "cr-2", "--cloud-run-job", "no-such-job"], env) == 2
        doc = gcp.doc("cr-2")
        assert doc["status"] == "failed" and "could not be started" in doc["error"] and "no-such-job" in doc["error"]
    finally:
        stub.stop()
