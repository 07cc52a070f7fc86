"""gemma-job, the command line (operating/cli.py; issue 20, first part): submit --local queues and runs a job as
the training service would start it, and without --local starts the Cloud Run job (against a stand-in for its
Admin API); status reads the document back; cancel asks a job to stop, or cancels an execution that has not
started; bad input exits 2 and
queues nothing."""

from __future__ import annotations

import json

from conftest import GEMMA_JOB, env_for, read_doc, sample_request
from operating import cli


def request_file(tmp_path, req) -> str:
    path = tmp_path / "request.json"
    path.write_text(json.dumps(req))
    return str(path)


def test_the_installed_command_runs_one_job_as_main_py_does(local_dir, tiny_root, tmp_path):
    """`gemma-job run` (pyproject.toml's console script, installed by make setup) takes main.py's options and gives
    its exit codes, from any folder."""
    import os
    import subprocess

    env = {"PATH": os.environ["PATH"], **env_for(local_dir, "cli-run")}
    ok = subprocess.run([GEMMA_JOB, "run", "--validate", "--config", request_file(tmp_path, sample_request(tiny_root))],
                        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and "request and dataset are valid" in ok.stdout, ok.stderr[-2000:]
    bad = sample_request(tiny_root)
    bad["training_config"]["method"] = "LoRAX"
    refused = subprocess.run([GEMMA_JOB, "run", "--config", request_file(tmp_path, bad)], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "training_config.method" in refused.stdout + refused.stderr
    schema = subprocess.run([GEMMA_JOB, "run", "--schema"], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=120)
    assert schema.returncode == 0 and json.loads(schema.stdout)["title"] == "TrainRequest"


def test_submit_local_runs_the_job_and_status_reads_it(local_dir, tiny_root, tmp_path, capfd):
    req = sample_request(tiny_root)
    req["training_config"]["hyperparameters"].update(epochs=1)
    env = {k: v for k, v in env_for(local_dir, "unused").items() if k != "JOB_ID"}
    assert cli.main(["submit", request_file(tmp_path, req), "--local", "--job-id", "cli-1"], env) == 0
    out = capfd.readouterr().out
    assert out.startswith("job cli-1 queued; follow it with `gemma-job status cli-1`")
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
    # its log, as it ran: the lines submit passed through are in LOCAL_DIR/logs, which `logs` prints
    log = (local_dir / "logs" / "cli-1.log").read_text()
    assert "phase: training" in log and "phase: exporting" in log and "job document: " in log
    assert cli.main(["logs", "cli-1"], env) == 0
    assert capfd.readouterr().out.replace("\r", "\n") == log.replace("\r", "\n")  # progress bars' returns aside
    assert cli.main(["logs", "nosuch"], env) == 1 and "no log for job nosuch" in capfd.readouterr().err
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
    """watch beside a job started in the background, twice at once: not on a terminal (one line per change),
    and on a pseudo-terminal as a person runs it, where its progress bar advances with the job's progress
    writes (every 5 s) to the last step, then the summary."""
    import fcntl
    import os
    import re
    import struct
    import subprocess
    import sys
    import termios
    import threading

    from conftest import ROOT, put_request

    req = sample_request(tiny_root)
    req["training_config"]["hyperparameters"].update(epochs=10)
    put_request(local_dir, "watched", req)
    env = {k: v for k, v in env_for(local_dir, "unused").items() if k != "JOB_ID"}
    job = subprocess.Popen([sys.executable, "main.py"], cwd=ROOT, env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1",
                                                                      **env_for(local_dir, "watched")},
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a terminal has a size
    terminal = subprocess.Popen([GEMMA_JOB, "watch", "watched", "--interval", "0.2", "--timeout", "300"],
                                cwd=ROOT, env={**os.environ, **env}, stdin=slave, stdout=slave,
                                stderr=slave)
    os.close(slave)
    screen = bytearray()

    def read() -> None:
        while True:
            try:
                data = os.read(master, 4096)
            except OSError:  # the terminal's other end closed
                return
            if not data:
                return
            screen.extend(data)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        rc = cli.main(["watch", "watched", "--interval", "0.2", "--timeout", "300"], env)
    finally:
        job.wait(timeout=300)
        terminal.wait(timeout=60)
        reader.join(timeout=10)
        os.close(master)
    assert rc == 0 and terminal.returncode == 0
    lines = capfd.readouterr().out.splitlines()
    assert any(line.startswith("job watched: training (training), step ") for line in lines), lines
    assert "job watched: completed (completed)" in lines
    summary = lines.index("job watched: completed (completed)")
    assert lines[summary + 1] == "  step 120/120" or lines[summary + 1].startswith("  step 120/120, loss")
    shown = screen.decode(errors="replace")
    redraws = list(re.finditer(r"watched: +\d+%\|[^|]*\| *(\d+)/120 \[", shown))  # tqdm's bar, each redraw
    bar = [int(m.group(1)) for m in redraws]
    assert bar and bar == sorted(bar) and bar[-1] == 120 and any(0 < n < 120 for n in bar), repr(shown[-3000:])
    assert "job watched: completed (completed)" in shown[redraws[-1].end():]  # the summary under the bar
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


def test_logs_reads_the_jobs_lines_from_cloud_logging_and_follows_them_to_the_end(gcp, capfd):
    """On gcp, `logs` asks Cloud Logging (a stand-in for its REST API) for the entries labelled with the job's
    id since the job was created, oldest first, and prints time, severity and message; --follow reads again
    until the job has ended, and prints the lines that came meanwhile, each once."""
    import threading
    from datetime import datetime, timezone

    from logging_stub import LoggingStub

    project = gcp.env["PROJECT_ID"]
    gcp.fs.collection("training_jobs").document("lg").set(
        {"job_id": "lg", "status": "training", "created_at": datetime(2026, 12, 4, 10, 0, tzinfo=timezone.utc)})
    stub = LoggingStub()
    stub.add(project, "lg", "2026-12-04T09:59:00Z", "INFO", "an earlier job of the same id")
    stub.add(project, "lg", "2026-12-04T10:00:02Z", "INFO", "phase: training")
    stub.add(project, "other", "2026-12-04T10:00:03Z", "INFO", "another job's line")
    stub.add(project, "lg", "2026-12-04T10:00:01Z", "WARNING", "phase: loading_model")
    env = {**gcp.env, "CLOUD_LOGGING_ENDPOINT": stub.url}
    try:
        assert cli.main(["logs", "lg"], env) == 0
        assert capfd.readouterr().out.splitlines() == ["2026-12-04 10:00:01 WARNING  phase: loading_model",
                                                       "2026-12-04 10:00:02 INFO     phase: training"]
        query = stub.requests[-1]
        assert query["resourceNames"] == [f"projects/{project}"] and query["orderBy"] == "timestamp asc"
        assert 'labels.job_id="lg"' in query["filter"] and 'timestamp>="2026-12-04T10:00:00+00:00"' in query["filter"]

        def finish() -> None:  # while --follow reads: a last line, then the job ends
            stub.add(project, "lg", "2026-12-04T10:05:00Z", "INFO", "job completed")
            gcp.fs.collection("training_jobs").document("lg").update({"status": "completed"})

        timer = threading.Timer(0.5, finish)
        timer.start()
        assert cli.main(["logs", "lg", "--follow", "--interval", "0.2"], env) == 0
        timer.join()
        lines = capfd.readouterr().out.splitlines()
        assert lines[-1] == "2026-12-04 10:05:00 INFO     job completed" and len(lines) == 3  # each line once
    finally:
        stub.stop()
