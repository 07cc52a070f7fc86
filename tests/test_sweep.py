"""gemma-job sweep (issue 20): Optuna's ask and tell over ordinary jobs, run here (--local) or as Cloud Run
executions (against the stand-in for its Admin API, which runs each execution's container command on the
Firestore and GCS emulators); the study in a journal beside the exports, resumed after the command is killed
without rerunning a finished trial; a space the job would refuse is refused before any trial runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import GEMMA_JOB, ROOT, env_for, read_doc, sample_request
from operating import cli

SPACE = "learning_rate: {low: 1.0e-4, high: 1.0e-2, log: true}\nlora_rank: {choices: [4, 8]}\n"


def write(tmp_path: Path, name: str, text: str) -> str:
    (tmp_path / name).write_text(text)
    return str(tmp_path / name)


def short_request(tiny_root, epochs: int = 2, **hp) -> dict:
    """A trial as short as a job gets: no base/tuned comparison (a sweep reads eval_loss)."""
    req = sample_request(tiny_root)
    req["training_config"]["hyperparameters"].update(epochs=epochs, **hp)
    req["training_config"]["eval_config"]["generation_rows"] = 0
    return req


def trial_docs(local_dir: Path, sweep_id: str) -> dict[str, dict]:
    folder = local_dir / "firestore" / "training_jobs"
    return {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob(f"{sweep_id}-*.json"))}


@pytest.mark.slow
def test_local_sweep_of_six_trials_killed_midway_resumes_without_rerunning_finished_trials(local_dir, tiny_root,
                                                                                        tmp_path):
    env = {k: v for k, v in env_for(local_dir, "unused", OMP_NUM_THREADS="1").items() if k != "JOB_ID"}
    req = write(tmp_path, "req.json", json.dumps(short_request(tiny_root, max_steps=10)))
    space = write(tmp_path, "s.yaml", SPACE)
    first = subprocess.Popen(
        [GEMMA_JOB, "sweep", req, "--space", space, "--trials", "6", "--parallel", "2", "--local",
         "--seed", "0", "--interval", "0.3", "--sweep-id", "sw"], cwd=ROOT, env={**os.environ, **env},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 240
    while True:  # kill it (SIGKILL: no clean-up) once two trials are done and two more are running
        docs = trial_docs(local_dir, "sw")
        done = {k for k, d in docs.items() if d["status"] == "completed"}
        if len(done) >= 2 and any(d.get("step") for k, d in docs.items() if k not in done):
            break
        assert first.poll() is None and time.monotonic() < deadline, first.stdout.read() if first.poll() else docs
        time.sleep(0.2)
    first.kill()
    before_kill = first.communicate()[0]
    finished = {k: read_doc(local_dir, k)["completed_at"] for k in done}
    # Until the stopped trials have recorded their SIGTERM (a second attempt beside a first still writing its end
    # would be two processes on one job, which Cloud Run never runs): its final write may replay an older state
    wait_until = time.monotonic() + 30
    while time.monotonic() < wait_until and any(
            d["status"] not in ("failed", "completed") for k, d in trial_docs(local_dir, "sw").items()
            if k not in finished):
        time.sleep(0.2)
    time.sleep(1.0)
    # the trials it had started were stopped with it (SIGTERM on their parent's death), each with a checkpoint
    interrupted = {k: d for k, d in trial_docs(local_dir, "sw").items() if k not in finished}
    assert interrupted and all(d["status"] != "completed" for d in interrupted.values())

    resumed = subprocess.run([GEMMA_JOB, "sweep", "--resume", "sw", "--interval", "0.3",
                              "--best-out", str(tmp_path / "best.json")], cwd=ROOT, env={**os.environ, **env},
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    out = resumed.stdout
    for job_id in finished:  # told, never started again
        assert f"({job_id}) started" not in out and read_doc(local_dir, job_id)["completed_at"] == finished[job_id]
    assert any(f"({k}) started, attempt 1" in out for k in interrupted), out  # resumed from its checkpoint
    docs = trial_docs(local_dir, "sw")
    assert sorted(docs) == [f"sw-{n:03d}" for n in range(6)] and all(d["status"] == "completed" for d in docs.values())
    assert all(d["sweep_id"] == "sw" and d["trial"] == int(k[-3:]) for k, d in docs.items())
    assert all(d["last_eval"]["step"] == d["total_steps"] for d in docs.values()), \
        {k: (d["last_eval"], d["total_steps"], d.get("resumed_from_step")) for k, d in docs.items()}  # the pruner's

    results = json.loads((local_dir / "gemma-export-bucket" / "sweeps" / "sw" / "results.json").read_text())
    values = {r["job_id"]: r["eval_loss"] for r in results["trials"]}
    assert values == {k: d["metrics"]["eval_loss"] for k, d in docs.items()}
    best = results["best"]
    assert best["value"] == min(values.values()) and values[best["job_id"]] == best["value"]
    best_request = json.loads((tmp_path / "best.json").read_text())
    hp = best_request["training_config"]["hyperparameters"]
    assert {k: hp[k] for k in best["params"]} == best["params"] == docs[best["job_id"]]["sweep_params"]
    # the table: one row per trial with its job and value; the resumed sampler drew new values, not the first ones
    assert all(f"{k}" in out for k in docs) and f"best: trial {best['trial']} ({best['job_id']})" in out
    params = [tuple(sorted(d["sweep_params"].items())) for d in docs.values()]
    assert len(set(params)) > 3, (before_kill, params)


def test_a_space_the_job_would_refuse_is_refused_before_any_trial(local_dir, tiny_root, tmp_path, capfd):
    env = {k: v for k, v in env_for(local_dir, "unused").items() if k != "JOB_ID"}
    req = write(tmp_path, "req.json", json.dumps(short_request(tiny_root)))

    def refused(space: str, *extra: str) -> str:
        assert cli.main(["sweep", req, "--space", write(tmp_path, "s.yaml", space), "--local", *extra], env) == 2
        return capfd.readouterr().err

    assert "space.learning_rte: not a hyperparameter of the request" in refused("learning_rte: {low: 0.1, high: 1}")
    err = refused("lora_rank: {low: 4, high: 4096}")
    assert "space.lora_rank=4096 makes a request the job refuses" in err and "lora_rank" in err
    assert "space.epochs: low and high are numbers with low <= high" in refused("epochs: {low: 3, high: 1}")
    assert "space.learning_rate: " in refused("learning_rate: {low: 0, high: 0.1, log: true}")
    assert "space.batch_size: choices is a non-empty list" in refused("batch_size: {choices: []}")
    assert "the space file must map hyperparameter names" in refused("- a list")
    assert "--trials and --parallel are at least 1" in refused("epochs: {low: 1, high: 2}", "--trials", "0")
    assert not (local_dir / "firestore" / "training_jobs").exists()  # nothing queued
    assert cli.main(["sweep", "--resume", "nosuch"], env) == 2
    assert "no sweep nosuch" in capfd.readouterr().err
    assert cli.main(["sweep", req], env) == 2  # Cloud Run needs a project
    assert "sweep: running trials on Cloud Run needs BACKEND=gcp and PROJECT_ID" in capfd.readouterr().err


def test_the_pruner_cancels_a_trial_that_trails_and_it_is_told_as_pruned(local_dir, tiny_root):
    """Optuna's MedianPruner over the `last_eval` the jobs write: two trials told with their evaluations, a
    third whose evaluation at the same step is worse is cancelled (cancel_requested, which the job reads at its
    next step), and once its job ends cancelled it is told to Optuna as pruned."""
    from optuna.trial import TrialState

    from job_manager import LocalJobStore
    from operating.sweep import Sweep, SweepSpec

    env = {k: v for k, v in env_for(local_dir, "unused").items() if k != "JOB_ID"}
    spec = SweepSpec(sweep_id="pr", request=short_request(tiny_root), space={"lora_dropout": {"low": 0.0, "high": 0.1}},
                     trials=3, parallel=1, metric="eval_loss", direction="minimize", local=True, prune=True)
    Sweep.create(spec, env)
    said: list[str] = []
    sweep, store = Sweep(spec, env, out=said.append), LocalJobStore(local_dir)
    for number, loss in enumerate((1.0, 1.2)):
        trial = sweep.study.ask(sweep.dists)
        trial.report(loss, 4)
        sweep.study.tell(trial, loss)
    from operating.sweep import Running

    trial = sweep.study.ask(sweep.dists)
    run = Running(2, sweep.job_id(2), trial)
    store.create(run.job_id, {"job_id": run.job_id, "status": "training", "last_eval": {"step": 2, "eval_loss": 9.0}})
    sweep.report(run, store.get(run.job_id))  # no other trial was evaluated at step 2: not pruned yet
    assert not store.get(run.job_id).get("cancel_requested")
    store.merge(run.job_id, {"last_eval": {"step": 4, "eval_loss": 5.0}})
    sweep.report(run, store.get(run.job_id))
    assert store.get(run.job_id)["cancel_requested"] is True and "pruned at step 4: eval_loss 5" in said[-1]
    store.merge(run.job_id, {"status": "failed", "cancelled": True, "error_type": "cancelled", "error": "cancelled"})
    sweep.running[2] = run
    sweep.tell(run, store.get(run.job_id))
    assert sweep.study.trials[2].state == TrialState.PRUNED and not sweep.running


def test_the_journal_in_a_gcs_bucket_keeps_both_writers_records(gcp):
    """Two commands on one sweep: each append a new object created only if its name is free (the emulator
    enforces the precondition), so neither loses the other's records; a study reloaded from it has both."""
    import optuna

    from operating.sweep import BlobJournal
    from storage import GcsBlobStore

    prefix = f"gs://{gcp.export_bucket}/sweeps/two/journal/"
    one, two = BlobJournal(GcsBlobStore(), prefix), BlobJournal(GcsBlobStore(), prefix)
    assert one.blobs.write_new(prefix + "probe", b"a") is True and one.blobs.write_new(prefix + "probe", b"b") is False
    one.blobs.delete_prefix(prefix)
    one.append_logs([{"n": 0}])
    two.chunks = {}
    two.append_logs([{"n": 1}, {"n": 2}])  # its listing is fresh: the next name
    one.append_logs([{"n": 3}])
    assert [log["n"] for log in one.read_logs(0)] == [0, 1, 2, 3] and two.read_logs(2) == [{"n": 2}, {"n": 3}]
    # a retry of an append whose first answer was lost finds its own bytes there and stops
    data = json.dumps({"writer": "w", "at": 0, "logs": []}).encode()
    assert one.blobs.write_new(prefix + "00000009.json", data) and not one.blobs.write_new(prefix + "00000009.json", data)

    storage = optuna.storages.JournalStorage(BlobJournal(GcsBlobStore(), f"gs://{gcp.export_bucket}/sweeps/s/j/"))
    study = optuna.create_study(study_name="s", storage=storage)
    study.tell(study.ask({"x": optuna.distributions.FloatDistribution(0, 1)}), 0.5)
    again = optuna.load_study(study_name="s", storage=optuna.storages.JournalStorage(
        BlobJournal(GcsBlobStore(), f"gs://{gcp.export_bucket}/sweeps/s/j/")))
    assert [t.value for t in again.trials] == [0.5]


def test_a_sweep_on_cloud_run_runs_each_trial_as_an_execution(gcp, tiny_root, tmp_path, capfd):
    """The trials as Cloud Run executions: each RunJob carries the one override JOB_ID, the stand-in runs the
    container's command (main.py on the emulators) for it, the sweep reads the trials' Firestore documents and
    ends with the best; the study and the promoted exports are in the export bucket."""
    from cloud_run_stub import CloudRunStub

    gcp.put_dataset(tiny_root)

    def container(overrides: dict[str, str]) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "main.py"], cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL,
                                env={**os.environ, **gcp.env, "OMP_NUM_THREADS": "1", **overrides})

    stub = CloudRunStub({"training-job"}, launch=container)
    env = {**gcp.env, "CLOUD_RUN_ENDPOINT": stub.url}
    try:
        req = write(tmp_path, "req.json", json.dumps(short_request(tiny_root, epochs=1)))
        code = cli.main(["sweep", req, "--space", write(tmp_path, "s.yaml", "lora_rank: {choices: [4, 8]}"),
                         "--trials", "2", "--parallel", "2", "--seed", "1", "--interval", "0.5", "--sweep-id", "cs",
                         "--promote", "--best-out", str(tmp_path / "best.json")], env)
        out = capfd.readouterr().out
        assert code == 0, out
    finally:
        stub.stop()
    runs = [body for method, path, body in stub.calls if path.endswith("/jobs/training-job:run")]
    assert [r["overrides"]["containerOverrides"] for r in runs] == [
        [{"env": [{"name": "JOB_ID", "value": f"cs-{n:03d}"}]}] for n in range(2)]
    docs = {n: gcp.doc(f"cs-{n:03d}") for n in range(2)}
    assert all(d["status"] == "completed" and d["sweep_id"] == "cs" and d["cloud_run_execution"] for d in docs.values())
    results = json.loads(gcp.blobs(gcp.export_bucket, "sweeps/cs/results.json")[""])
    assert results["best"]["value"] == min(d["metrics"]["eval_loss"] for d in docs.values())
    best = f"cs-{results['best']['trial']:03d}"
    promoted = gcp.blobs(gcp.export_bucket, "sweeps/cs/best/adapter/")
    assert promoted and promoted == gcp.blobs(gcp.export_bucket, f"trained_adapters/{best}/")
    assert json.loads(gcp.blobs(gcp.config_bucket, f"{best}.json")[""])["training_config"]["hyperparameters"][
        "lora_rank"] == results["best"]["params"]["lora_rank"]


@pytest.mark.parametrize("form", ["facet", "facet_flat", "predecessor_flat"])
def test_a_trial_of_a_platform_request_trains_with_the_trials_values(form, tiny_root):
    """A request exactly as the training service (or its predecessor) serialises it, nulls included: the
    space is checked against it, and each trial's values are what the job reads, also in the flat forms,
    where training_config's own learning_rate would otherwise win over a merged `hyperparameters` group."""
    import platform_requests
    from operating.sweep import check_space, distributions, trial_request
    from runtime.request import parse_request

    base = str(tiny_root / "models" / "tiny-gemma3")
    build = {"facet": platform_requests.facet_request, "facet_flat": platform_requests.facet_flat,
             "predecessor_flat": platform_requests.predecessor_flat}[form]
    req = build(base_model_id=base, dataset="tiny-animals") if form != "facet" else \
        build("sft", base_model_id=base, dataset="tiny-animals")
    space = {"learning_rate": {"low": 1.0e-4, "high": 1.0e-2, "log": True}, "lora_rank": {"choices": [4, 8]}}
    check_space(req, distributions(space))
    trial = trial_request(req, {"learning_rate": 0.0042, "lora_rank": 4}, "s", 3)
    hp = parse_request(json.dumps(trial)).training_config.hyperparameters
    assert (hp.learning_rate, hp.lora_rank) == (0.0042, 4)
    assert hp.batch_size == parse_request(json.dumps(req)).training_config.hyperparameters.batch_size  # kept
    assert trial["job_name"].endswith("(sweep s, trial 3)")
