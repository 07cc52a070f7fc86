"""Several processes (issue 18), on this CPU with gloo: `python main.py` with NPROC_PER_NODE=2 launches two
workers itself (torch.distributed.run) and trains as one process would, the same global batch to the same
result; rank 0 alone writes the document and uploads; stops are agreed by both ranks; a killed rank costs
the attempt, not the progress; a permanent error on one rank is the job's exit 2."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from conftest import ROOT, env_for, put_request, read_doc, sample_request

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the workers' checks read /proc")


def request(tiny_root, **hp) -> dict:
    req = sample_request(tiny_root)
    # 90 train rows: a global batch of 6 fills every step, so both runs see the very same batches
    req["training_config"]["hyperparameters"].update({"batch_size": 6, "epochs": 8, **hp})
    return req


def start(local_dir: Path, job_id: str, nproc: int = 2, **env: str) -> subprocess.Popen:
    """The launcher starts from scratch, so that its ranks are its children (tests/prefork: PREFORK_SKIP)."""
    return subprocess.Popen([sys.executable, "main.py"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, **env_for(local_dir, job_id), "OMP_NUM_THREADS": "1",
                                            "NPROC_PER_NODE": str(nproc), "PREFORK_SKIP": "1", **env})


def finish(job: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    out, _ = job.communicate(timeout=timeout)
    return job.returncode, out


def workers(job: subprocess.Popen) -> dict[int, psutil.Process]:
    """The launcher's worker processes by rank (their RANK variable)."""
    found = {}
    for child in psutil.Process(job.pid).children(recursive=True):
        try:
            rank = child.environ().get("RANK")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if rank is not None and "main.py" in " ".join(child.cmdline()):
            found[int(rank)] = child
    return found


def checkpoints(local_dir: Path, job_id: str) -> list[int]:
    folder = local_dir / "gemma-export-bucket" / "checkpoints" / job_id
    return sorted(int(p.parent.name.split("-")[1]) for p in folder.glob("checkpoint-*/_COMPLETE.json"))


@pytest.mark.slow
def test_two_processes_train_as_one_and_rank_0_alone_records_and_exports(local_dir, tiny_root):
    # a save by the clock as well as each epoch's: each process reads its own clock, and the ranks must agree
    req = request(tiny_root, checkpoint_minutes=0.005, epochs=4)
    put_request(local_dir, "one", req)
    put_request(local_dir, "two", req)
    single = subprocess.run([sys.executable, "main.py"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, **env_for(local_dir, "one"), "OMP_NUM_THREADS": "1"})
    assert single.returncode == 0, single.stderr[-3000:]
    code, out = finish(start(local_dir, "two"))
    assert code == 0, out[-5000:]
    one, two = read_doc(local_dir, "one"), read_doc(local_dir, "two")
    assert two["status"] == "completed" and two["distributed"] == {"world_size": 2, "strategy": "ddp",
                                                                  "per_device_batch_size": 3}
    assert two["total_steps"] == one["total_steps"] == 60 and two["step"] == 60  # the same global batch
    assert abs(two["metrics"]["eval_loss"] - one["metrics"]["eval_loss"]) <= 0.02 * one["metrics"]["eval_loss"]
    writes = dict(re.findall(r"\[rank (\d)\] INFO main: rank \d wrote the job document (\d+) times", out))
    assert writes["1"] == "0" and int(writes["0"]) > 5, out[-3000:]  # counted in each process
    assert out.count("INFO exporting.export: uploaded adapter to") == 1
    assert "[rank 0] INFO exporting.export: uploaded adapter" in out
    # one download per machine: rank 1 read the dataset rank 0 had downloaded
    assert "[rank 1] INFO runtime.distributed: " \
        "gs://gemma-dataset-bucket/processed_datasets/tiny-animals/train.parquet: " \
        "read where the node's first process downloaded it" in out
    uploaded = re.findall(r"\[rank (\d)\] INFO training.checkpoints: checkpoint-(\d+) uploaded", out)
    steps = [int(step) for _, step in uploaded]
    assert {rank for rank, _ in uploaded} == {"0"} and len(steps) == len(set(steps))  # once each, by rank 0
    assert set(steps) - {15 * e for e in range(1, 5)}, steps  # and saves the clock asked for, between epochs
    exported = local_dir / "gemma-export-bucket" / "trained_adapters" / "two"
    manifest = json.loads((exported / "manifest.json").read_text())
    assert (exported / "adapter_model.safetensors").is_file() and manifest["files"]
    assert not checkpoints(local_dir, "two")  # cleared once done, by rank 0
    # what two processes trained loads in the inference service's pinned peft and transformers as one's does
    from test_consumers import consumer_loads, our_logits

    got = consumer_loads({"two": exported}, local_dir)["two"]
    import torch

    ours = our_logits(exported, got["input_ids"])
    assert (got["peft"], got["transformers"]) == ("0.14.0", "4.56.0")
    assert torch.allclose(torch.tensor(got["auto_logits"]), ours, atol=1e-4)
    assert torch.allclose(torch.tensor(got["peft_logits"]), ours, atol=1e-4)


@pytest.mark.slow
def test_a_rank_killed_mid_training_fails_the_attempt_and_the_rerun_resumes(local_dir, tiny_root):
    put_request(local_dir, "kill", request(tiny_root, epochs=12, save_strategy="steps", save_steps=20))
    job = start(local_dir, "kill")
    deadline = time.monotonic() + 240
    while not checkpoints(local_dir, "kill"):
        assert job.poll() is None and time.monotonic() < deadline, job.stdout.read()[-3000:]
        time.sleep(0.2)
    workers(job)[1].kill()  # SIGKILL: no clean-up on that rank
    code, out = finish(job)
    assert code == 1, out[-3000:]
    doc = read_doc(local_dir, "kill")
    assert doc["status"] == "failed" and doc["error_type"] == "retryable"
    saved = checkpoints(local_dir, "kill")
    assert saved and max(saved) < 180
    # the retry, under plain torchrun this time (the launcher's own path was the first attempt's)
    rerun = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "main.py"],
                           cwd=ROOT, capture_output=True, text=True, timeout=300,
                           env={**os.environ, **env_for(local_dir, "kill"), "OMP_NUM_THREADS": "1",
                                "CLOUD_RUN_TASK_ATTEMPT": "1"})
    code, out = rerun.returncode, rerun.stdout + rerun.stderr
    assert code == 0, out[-3000:]
    doc = read_doc(local_dir, "kill")
    assert doc["status"] == "completed" and doc["resumed_from_step"] == max(saved) and doc["step"] == 180
    assert "[rank 1] INFO base: resuming from checkpoint-%d" % max(saved) in out  # both ranks, the same one


def test_sigterm_saves_one_checkpoint_and_exits_1_in_time(local_dir, tiny_root):
    put_request(local_dir, "term", request(tiny_root, epochs=40, save_strategy="steps", save_steps=1000))
    job = start(local_dir, "term")
    deadline = time.monotonic() + 240
    while (read_doc(local_dir, "term") if (local_dir / "firestore/training_jobs/term.json").exists() else {}).get(
            "status") != "training":
        assert job.poll() is None and time.monotonic() < deadline
        time.sleep(0.2)
    time.sleep(1.0)
    job.send_signal(signal.SIGTERM)  # as Cloud Run stops the container: the launcher passes it to the workers
    sent = time.monotonic()
    code, out = finish(job, timeout=60)
    assert code == 1 and time.monotonic() - sent < 10, out[-3000:]
    saved = checkpoints(local_dir, "term")
    doc = read_doc(local_dir, "term")
    assert len(saved) == 1 and 0 < saved[0] < 600 and doc["error_type"] == "retryable", (saved, doc.get("error"))
    assert "checkpoint saved" in doc["error"]


def test_cancel_stops_every_rank(local_dir, tiny_root):
    put_request(local_dir, "stop", request(tiny_root, epochs=40))
    job = start(local_dir, "stop")
    path = local_dir / "firestore" / "training_jobs" / "stop.json"
    deadline = time.monotonic() + 240
    while not path.exists() or read_doc(local_dir, "stop").get("status") != "training":
        assert job.poll() is None and time.monotonic() < deadline
        time.sleep(0.2)
    from job_manager import LocalJobStore

    LocalJobStore(local_dir).merge("stop", {"cancel_requested": True})
    code, out = finish(job, timeout=120)
    assert code == 0, out[-3000:]
    doc = read_doc(local_dir, "stop")
    assert doc["status"] == "failed" and doc["cancelled"] is True and doc["step"] < 600
    assert out.count("job failed (cancelled)") == 2  # each rank stopped on its own, at the same step


def test_a_permanent_error_on_rank_1_alone_is_exit_2(local_dir, tiny_root, tmp_path):
    """Rank 1 alone refuses (a sitecustomize in the test's PYTHONPATH makes its pre-flight raise): the launcher
    stops rank 0, exits 2, not torchrun's 1, and the document says what rank 1 said."""
    (tmp_path / "inject").mkdir()
    (tmp_path / "inject" / "sitecustomize.py").write_text(
        "import os\n"
        "if os.environ.get('RANK') == '1':\n"
        "    import base\n"
        "    from runtime.errors import PermanentError\n"
        "    def refuse(self):\n"
        "        raise PermanentError('the dataset copy on this machine is unreadable (rank 1 only)')\n"
        "    base.BaseTrainingJob.preflight = refuse\n")
    put_request(local_dir, "perm", request(tiny_root))
    code, out = finish(start(local_dir, "perm", PYTHONPATH=f"{tmp_path / 'inject'}:{ROOT}"))
    assert code == 2, out[-3000:]
    doc = read_doc(local_dir, "perm")
    assert doc["status"] == "failed" and doc["error_type"] == "permanent"
    assert "rank 1" in doc["error"] and "unreadable (rank 1 only)" in doc["error"]


def test_fsdp2_full_state_dict_saves_a_lora_adapter_whose_merge_is_the_sharded_model(tiny_root, tmp_path):
    """The FSDP path without a GPU, as far as it runs (the Trainer's FSDP needs CUDA): the job's LoRA on the
    tiny Gemma 3 sharded with fully_shard per decoder layer over two gloo processes, trained, its full state
    dict gathered as FULL_STATE_DICT gathers it, saved by PEFT on rank 0, merged: the merge answers as the
    sharded model did (tests/fsdp_worker.py)."""
    out = tmp_path / "fsdp.json"
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "tests/fsdp_worker.py", str(tiny_root / "models" / "tiny-gemma3"), str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(out.read_text())
    layers = json.loads((tiny_root / "models" / "tiny-gemma3" / "config.json").read_text())["num_hidden_layers"]
    assert got["lora_missing"] == [] and got["unexpected"] == []  # every LoRA weight came back whole
    assert got["lora_b_trained"] == 3 * layers  # q_proj, v_proj, down_proj of each layer trained
    assert got["max_logit_diff"] < 1e-4, got
    assert got["losses"][-1] < got["losses"][0]


def test_two_machines_from_vertex_cluster_spec(local_dir, tiny_root, tmp_path):
    """Two nodes as Vertex AI describes them (CLUSTER_SPEC: the chief in workerpool0, the other in
    workerpool1), here two launchers on one machine with a disk each (WORK_DIR): they meet at the chief's
    address (c10d rendezvous), train one model as two ranks, and only the chief's rank 0 writes."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cluster = {"workerpool0": [f"localhost:{port}"], "workerpool1": [f"localhost:{port}"]}
    put_request(local_dir, "nodes", request(tiny_root, epochs=2))
    launchers = [start(local_dir, "nodes", nproc=1, WORK_DIR=str(tmp_path / f"disk-{n}"), CLUSTER_SPEC=json.dumps(
        {"cluster": cluster, "task": {"type": f"workerpool{n}", "index": 0}, "job": {}})) for n in (0, 1)]
    (chief, chief_out), (other, other_out) = [finish(job) for job in launchers]
    assert chief == other == 0, (chief_out[-2000:], other_out[-2000:])
    doc = read_doc(local_dir, "nodes")
    assert doc["status"] == "completed" and doc["distributed"]["world_size"] == 2 and doc["step"] == 30
    assert "starting 1 processes per node on 2 node(s)" in chief_out and "on 2 node(s)" in other_out
    assert "rank 1 wrote the job document 0 times" in chief_out + other_out
    assert "created job document" not in other_out  # the second machine's launcher does not write either
    assert (local_dir / "gemma-export-bucket" / "trained_adapters" / "nodes" / "adapter_model.safetensors").is_file()
