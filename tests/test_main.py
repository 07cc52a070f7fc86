"""Exit codes 0/1/2 through main(), in-process and as a subprocess with BACKEND=local."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

import base
import main
from conftest import ROOT, env_for, put_request, read_doc, run_subprocess, sample_request


def test_job_completes_and_rerun_does_nothing(local_dir, tiny_root, capsys):
    put_request(local_dir, "job-ok", sample_request(tiny_root))
    assert main.main([], env_for(local_dir, "job-ok")) == 0
    doc = read_doc(local_dir, "job-ok")
    assert doc["status"] == "completed" and doc["error"] is None and doc["progress"] == 1.0
    m = doc["metrics"]
    assert m["perplexity"] == pytest.approx(math.exp(m["eval_loss"])) and 0 < m["accuracy"] <= 1
    assert m["eval_runtime"] > 0
    assert doc["base_model_id"] == str(tiny_root / "models" / "tiny-gemma3")
    assert doc["processed_dataset_id"] == "tiny-animals" and doc["step"] == doc["total_steps"] > 0
    adapter = local_dir / "gemma-export-bucket" / "trained_adapters" / "job-ok"
    assert doc["adapter_path"] == "gs://gemma-export-bucket/trained_adapters/job-ok/"
    assert (adapter / "adapter_model.safetensors").is_file() and (adapter / "custom_config.json").is_file()
    assert f"adapter:      {adapter}" in capsys.readouterr().out
    assert not (local_dir / "work" / "job-ok").exists()  # the work folder is removed on success
    # the data report made at pre-flight (tests/test_data_report.py checks its figures), its picture in the folder
    report = doc["data_report"]
    assert report["rows"] == doc["dataset"]["train_rows"] and report["left_out"] == {}
    assert report["answer_tokens"]["mean"] * report["rows"] == pytest.approx(doc["dataset"]["trained_tokens"], abs=5)
    from PIL import Image

    with Image.open(adapter / "data_lengths.png") as picture:
        assert picture.format == "PNG" and picture.size == (800, 400)
    assert "data_lengths.png" in json.loads((adapter / "manifest.json").read_text())["files"]
    assert main.main([], env_for(local_dir, "job-ok")) == 0
    assert read_doc(local_dir, "job-ok")["updated_at"] == doc["updated_at"]  # nothing was done again


def test_crash_mid_training_exits_1_and_is_recorded(local_dir, tiny_root, monkeypatch):
    from transformers import TrainerCallback

    class Crash(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                raise RuntimeError("simulated GPU fault at step 3")

    monkeypatch.setattr(base, "progress_callback", lambda tracker: Crash())
    put_request(local_dir, "job-crash", sample_request(tiny_root))
    assert main.main([], env_for(local_dir, "job-crash")) == 1
    doc = read_doc(local_dir, "job-crash")
    assert doc["status"] == "failed" and doc["error_type"] == "retryable" and doc["phase"] == "training"
    assert "RuntimeError: simulated GPU fault at step 3" in doc["error"]


def test_bad_request_exits_2_fast_without_model_libraries(local_dir, tiny_root):
    req = sample_request(tiny_root)
    req["training_config"]["hyperparameters"]["learning_rte"] = 0.1
    put_request(local_dir, "job-bad", req)
    out, seconds = run_subprocess(local_dir, "job-bad")
    assert out.returncode == 2, out.stderr
    assert "MODEL_LIBS_LOADED=False" in out.stdout
    assert seconds < 5  # docs/outputs.md's target (1 s) is measured by benchmarks/cpu_bench.py, not here
    doc = read_doc(local_dir, "job-bad")
    assert doc["status"] == "failed" and doc["error_type"] == "permanent"
    assert "unknown key 'learning_rte'; did you mean 'learning_rate'" in doc["error"]
    # a Cloud Run retry of a permanent failure stops at once, without reading the request again
    put_request(local_dir, "job-bad", sample_request(tiny_root))
    out, _ = run_subprocess(local_dir, "job-bad", CLOUD_RUN_TASK_ATTEMPT="1")
    assert out.returncode == 2 and "MODEL_LIBS_LOADED=False" in out.stdout
    assert "learning_rte" in read_doc(local_dir, "job-bad")["error"]


@pytest.mark.parametrize("request_text,match", [
    ("{not json", "not valid JSON"),
    (None, "gs://gemma-train-config/job-x.json not found"),
])
def test_unreadable_request_exits_2(local_dir, request_text, match):
    if request_text is not None:
        put_request(local_dir, "job-x", request_text)
    out, _ = run_subprocess(local_dir, "job-x")
    assert out.returncode == 2
    doc = read_doc(local_dir, "job-x")
    assert doc["status"] == "failed" and match in doc["error"]
    assert isinstance(doc["base_model_id"], str) and isinstance(doc["job_name"], str)


def test_missing_dataset_exits_2_naming_paths(local_dir, tiny_root):
    req = {**sample_request(tiny_root), "processed_dataset_id": "no-such-data"}
    put_request(local_dir, "job-nodata", req)
    assert main.main([], env_for(local_dir, "job-nodata")) == 2
    err = read_doc(local_dir, "job-nodata")["error"]
    assert "gs://gemma-dataset-bucket/processed_datasets/no-such-data/train.parquet" in err


def test_unsloth_refused_without_gpu(local_dir, tiny_root):
    put_request(local_dir, "job-unsloth", sample_request(tiny_root, provider="unsloth"))
    assert main.main([], env_for(local_dir, "job-unsloth")) == 2
    assert "'unsloth' needs an NVIDIA GPU" in read_doc(local_dir, "job-unsloth")["error"]



FAKE_UNSLOTH = """import sys, torch
LOADED_BEFORE = sorted(m for m in ("transformers", "peft", "trl") if m in sys.modules)
torch.cuda.is_available = torch.cuda.real_is_available  # a GPU only until Unsloth is imported
"""


def test_unsloth_is_imported_first_and_failing_to_import_is_permanent(local_dir, tiny_root):
    """Unsloth patches transformers, PEFT and TRL when it is imported, so it must come first. Unsloth
    cannot be imported here, so a stand-in records which of them were loaded when it was; the check
    for a GPU sees one until then. The rest of the pre-flight then runs as on any CPU."""
    (local_dir / "fake" / "unsloth.py").parent.mkdir()
    (local_dir / "fake" / "unsloth.py").write_text(FAKE_UNSLOTH)
    code = f"""import sys, torch
sys.path.insert(0, {str(local_dir / "fake")!r})
torch.cuda.real_is_available, torch.cuda.is_available = torch.cuda.is_available, lambda: True
from scripts.testbed import demo_request, local_job
job = local_job(demo_request({str(tiny_root)!r}, provider="unsloth"), {str(local_dir)!r}, "order")
prep = job.preflight()
print(sys.modules["unsloth"].LOADED_BEFORE, all(m in sys.modules for m in ("transformers", "peft", "trl")))
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["[]", "True"]  # none of them before Unsloth; all of them after
    # an Unsloth that cannot be imported (a library mismatch in the image) fails every retry alike: permanent
    (local_dir / "fake" / "unsloth.py").write_text("raise ImportError('unsloth_zoo is too old')")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert "PermanentError: training_config.provider: 'unsloth' cannot be imported in this image (ImportError: " \
           "unsloth_zoo is too old)" in out.stderr


def test_an_unsloth_import_that_fails_for_this_attempt_only_is_retried(local_dir, tiny_root, monkeypatch):
    """A CUDA error while Unsloth probes the GPU is not the image's library set: exit 1, retryable."""
    import torch

    fake = local_dir / "fake"
    fake.mkdir()
    (fake / "unsloth.py").write_text("raise RuntimeError('CUDA error: initialization error')")
    monkeypatch.syspath_prepend(str(fake))
    monkeypatch.delitem(sys.modules, "unsloth", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    put_request(local_dir, "flaky", sample_request(tiny_root, provider="unsloth"))
    assert main.main([], env_for(local_dir, "flaky")) == 1
    doc = read_doc(local_dir, "flaky")
    assert doc["error_type"] == "retryable" and doc["status"] == "failed"
    assert doc["error"] == "RuntimeError: CUDA error: initialization error"

def test_validate_checks_without_training(local_dir, tiny_root, capsys):
    config = local_dir / "req.json"
    config.write_text(json.dumps(sample_request(tiny_root)))
    assert main.main(["--validate", "--config", str(config)], env_for(local_dir, "job-v")) == 0
    assert "request and dataset are valid" in capsys.readouterr().out
    assert not (local_dir / "firestore" / "training_jobs" / "job-v.json").exists()  # a dry run leaves no state
    assert not (local_dir / "gemma-export-bucket").exists()
    assert not (local_dir / "work" / "job-v").exists()  # the downloaded splits are gone too


def test_invalid_job_id_exits_2(local_dir, capsys):
    assert main.main([], env_for(local_dir, "../escape")) == 2
    assert "JOB_ID '../escape' is not valid" in capsys.readouterr().err
    assert main.main([], {"BACKEND": "gcp"}) == 2  # no JOB_ID: nothing to run, nothing to record it in
    assert "JOB_ID is not set" in capsys.readouterr().err



def test_invalid_environment_exits_2_and_says_so_in_the_document(local_dir, capsys):
    """A variable that does not validate: exit 2, an error naming the variable, and the job document
    failed (not left `queued`) wherever its store can be reached with the variables that are valid."""
    assert main.main([], env_for(local_dir, "job-env", TASK_TIMEOUT_SECONDS="1h")) == 2
    assert "TASK_TIMEOUT_SECONDS='1h': Input should be a valid number" in capsys.readouterr().err
    doc = read_doc(local_dir, "job-env")
    assert doc["status"] == "failed" and doc["error_type"] == "permanent" and doc["job_id"] == "job-env"
    assert doc["error"].startswith("invalid environment: TASK_TIMEOUT_SECONDS='1h'")
    completed = local_dir / "firestore" / "training_jobs" / "job-done.json"
    completed.parent.mkdir(parents=True, exist_ok=True)
    completed.write_text(json.dumps({"job_id": "job-done", "status": "completed", "error": None}))
    assert main.main([], env_for(local_dir, "job-done", TASK_TIMEOUT_SECONDS="1h")) == 2
    assert read_doc(local_dir, "job-done")["status"] == "completed"  # a finished job stays finished
    # the backend itself invalid: nothing to write to, the exit code and stderr say it
    assert main.main([], env_for(local_dir, "job-env2", BACKEND="aws")) == 2
    assert "BACKEND='aws': Input should be 'gcp' or 'local'" in capsys.readouterr().err
    assert not (local_dir / "firestore" / "training_jobs" / "job-env2.json").exists()
    # a dry run writes no state, even to say the environment is wrong
    assert main.main(["--validate"], env_for(local_dir, "job-env3", GPU_MEMORY_GIB="-4")) == 2
    assert "GPU_MEMORY_GIB='-4': Input should be greater than 0" in capsys.readouterr().err
    assert not (local_dir / "firestore" / "training_jobs" / "job-env3.json").exists()
    # a launcher's variables that are not its (several processes: tests/test_distributed.py)
    assert main.main([], env_for(local_dir, "job-env4", WORLD_SIZE="two", LOCAL_RANK="0")) == 2
    assert "WORLD_SIZE='two', LOCAL_RANK='0': torchrun sets these to integers" in capsys.readouterr().err
    assert "torchrun sets these to integers" in read_doc(local_dir, "job-env4")["error"]


def test_parallel_tasks_are_refused_and_the_execution_is_recorded(local_dir, tiny_root, capsys):
    """`gcloud run jobs execute --tasks 2` would run the same job twice, racing on one document: exit 2,
    said in the document. The execution's name (CLOUD_RUN_EXECUTION) is recorded for the logs."""
    env = env_for(local_dir, "tasks2", CLOUD_RUN_TASK_COUNT="2", CLOUD_RUN_EXECUTION="train-x7k2p")
    assert main.main([], env) == 2
    assert "CLOUD_RUN_TASK_COUNT='2': the execution has 2 tasks, and each would run this same job" \
        in capsys.readouterr().err
    doc = read_doc(local_dir, "tasks2")
    assert doc["status"] == "failed" and doc["error_type"] == "permanent" and "--tasks 1" in doc["error"]
    req = sample_request(tiny_root)
    req["processed_dataset_id"] = "no-such-data"  # fails at pre-flight, after the document is described
    put_request(local_dir, "tasks1", req)
    assert main.main([], env_for(local_dir, "tasks1", CLOUD_RUN_TASK_COUNT="1",
                                 CLOUD_RUN_EXECUTION="train-x7k2p")) == 2
    doc = read_doc(local_dir, "tasks1")
    assert doc["execution"] == "train-x7k2p" and doc["attempt"] == 0

def test_missing_base_model_exits_2(local_dir, tiny_root):
    put_request(local_dir, "job-nomodel", sample_request(tiny_root, base_model_id=str(local_dir / "no-model")))
    assert main.main([], env_for(local_dir, "job-nomodel")) == 2
    assert "base_model_id" in read_doc(local_dir, "job-nomodel")["error"]
