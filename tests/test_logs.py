"""JSON log lines for Cloud Logging, and secrets masked in logs, the job document, the manifest
and the offline W&B run."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys

import pytest

import base
import main
from conftest import ROOT, env_for, put_request, read_doc, sample_request
from runtime import tracking
from runtime.logs import JsonFormatter, RedactingFilter

HF_SECRET = "hf_FAKEsecretVALUE1234567890abcdefghij"
ORIGINAL_START = tracking.WandbRunLogger.start


def test_json_line_has_severity_message_job_id():
    record = logging.LogRecord("base", logging.WARNING, __file__, 1, "rows truncated: %d", (3,), None)
    line = json.loads(JsonFormatter("job-7").format(record))
    assert line["severity"] == "WARNING" and line["message"] == "rows truncated: 3" and line["job_id"] == "job-7"


def test_redaction_covers_arguments_and_tracebacks():
    f = RedactingFilter()
    f.add(HF_SECRET)
    try:
        raise ValueError(f"401 for token {HF_SECRET}")
    except ValueError:
        import sys
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "calling with %s", (HF_SECRET,), sys.exc_info())
    f.filter(record)
    text = JsonFormatter("j").format(record)
    assert HF_SECRET not in text and "calling with **********" in text and "401 for token **********" in text


def test_on_cloud_run_progress_bars_are_off_in_the_libraries_already_imported(monkeypatch):
    """huggingface_hub, datasets and transformers read their progress-bar switch once, as they are imported:
    setup_logging also turns the bars off in those a process imported before it (as a job forked from the
    suite's servers did, tests/prefork)."""
    import datasets
    import huggingface_hub.utils as hub
    import transformers.utils.logging as hf_logging

    from runtime.logs import setup_logging

    for name in ("HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS"):
        monkeypatch.delenv(name, raising=False)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level

    def enable():
        hub.enable_progress_bars()
        datasets.enable_progress_bars()
        hf_logging.enable_progress_bar()

    enable()
    try:
        assert not hub.are_progress_bars_disabled() and datasets.is_progress_bar_enabled()
        assert hf_logging.is_progress_bar_enabled()
        setup_logging("j", json_lines=True)
        assert hub.are_progress_bars_disabled() and not datasets.is_progress_bar_enabled()
        assert not hf_logging.is_progress_bar_enabled()
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        logging.captureWarnings(False)
        enable()


def test_on_cloud_run_every_line_is_json_and_training_can_be_followed(local_dir, tiny_root):
    """The job as Cloud Run runs it (CLOUD_RUN_JOB set, its own process, the default level): every line
    it prints is one JSON record, transformers' own warnings included and no progress bar, and at INFO
    they tell how far training is and what each evaluation found."""
    req = sample_request(tiny_root)
    req["training_config"]["hyperparameters"]["epochs"] = 2
    put_request(local_dir, "cr-logs", req)
    env = {"PATH": os.environ["PATH"], **env_for(local_dir, "cr-logs", CLOUD_RUN_JOB="training-job",
                                                   HOST_MEMORY_GIB="16")}
    out = subprocess.run([sys.executable, "main.py"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    records = [json.loads(line) for line in (out.stdout + out.stderr).splitlines() if line.strip()]
    assert {r["job_id"] for r in records} == {"cr-logs"}
    assert any(r["logger"].startswith("transformers") for r in records)  # once '[transformers] ...' lines
    messages = [r["message"] for r in records if r["severity"] == "INFO"]
    steps = [m for m in messages if re.fullmatch(r"step \d+/24 \(\d+%\), epoch [\d.]+, loss [\d.]+.*", m)]
    assert steps[0].startswith("step 1/24 (4%)") and steps[-1].startswith("step 24/24 (100%), epoch 2.00")
    evals = [m for m in messages if m.startswith("eval at step")]
    # one per epoch, and the final evaluation of the trained model
    assert [m.split(":")[0] for m in evals] == ["eval at step 12/24 (epoch 1.00)", "eval at step 24/24 (epoch 2.00)",
                                                "eval at step 24/24 (epoch 2.00)"]
    assert all("eval_loss=" in m and "eval_mean_token_accuracy=" in m for m in evals)


WANDB_SECRET = "wandbFAKEkey0123456789abcdefghijklmnopqrstu"
# The other trackers' keys, from the environment (their own clients read them there; this image has neither)
TRACKER_SECRETS = {"COMET_API_KEY": "cometFAKEkey0123456789", "MLFLOW_TRACKING_TOKEN": "mlflowFAKEtoken0123456789",
                   "MLFLOW_TRACKING_PASSWORD": "mlflowFAKEpassword0123"}


@pytest.mark.parametrize("outcome", ["completed", "permanent failure", "crash", "crash on the last attempt"])
def test_secrets_appear_nowhere(outcome, local_dir, tiny_root, capfd, monkeypatch):
    """Recognizable fake secrets (the request's token, the environment's W&B key, every other tracker's key)
    through a job reporting to W&B and TensorBoard that completes, one that fails permanently and one that
    crashes with the token in its exception: zero hits in every log line, the document, the W&B offline
    files, the TensorBoard event files, the artifacts and, once the job is over for good, the request object
    itself (a retry still needs it after a crash, but not after a crash on the attempt MAX_RETRIES names)."""
    req = sample_request(tiny_root)
    req["hf_token"] = HF_SECRET
    req["training_config"]["wandb_config"] = {"project": "leak-test", "api_key": WANDB_SECRET}
    req["training_config"]["report_to"] = ["wandb", "tensorboard"]
    req["training_config"]["hyperparameters"].update(epochs=1, max_steps=2)
    if outcome == "permanent failure":
        req["processed_dataset_id"] = "no-such-data"
    if outcome.startswith("crash"):
        def crash(self, trainer):
            raise ConnectionError(f"HTTP 500 from https://example.invalid/?token={HF_SECRET}")
        monkeypatch.setattr(base.BaseTrainingJob, "train", crash)
    monkeypatch.setattr(tracking.WandbRunLogger, "start", offline_start)
    job = "secret-" + "-".join(outcome.split()[:2])
    put_request(local_dir, job, req)
    expected = {"completed": 0, "permanent failure": 2, "crash": 1, "crash on the last attempt": 1}[outcome]
    last = {"CLOUD_RUN_TASK_ATTEMPT": "3", "MAX_RETRIES": "3"} if outcome.endswith("last attempt") else \
        {"CLOUD_RUN_TASK_ATTEMPT": "1", "MAX_RETRIES": "3"}
    assert main.main([], env_for(local_dir, job, WANDB_API_KEY=WANDB_SECRET, **TRACKER_SECRETS, **last)) == expected
    out = capfd.readouterr()
    logs = out.out + out.err
    assert "**********" in logs  # the request was logged, masked
    request_file = local_dir / "gemma-train-config" / f"{job}.json"
    files = [p for p in local_dir.rglob("*") if p.is_file() and p != request_file]
    if outcome != "permanent failure":  # (that one stops at pre-flight, before W&B starts)
        assert any("wandb" in p.parts for p in files), "the offline W&B run wrote nothing"
    if outcome == "completed":  # (the crash comes before the first step)
        assert any(p.name.startswith("events.out.tfevents") for p in files), "TensorBoard wrote nothing"
    for secret in (HF_SECRET, WANDB_SECRET, *TRACKER_SECRETS.values()):
        assert secret not in logs
        hits = [p for p in files if secret.encode() in p.read_bytes()]
        assert hits == [], hits
    doc = read_doc(local_dir, job)
    if outcome.startswith("crash"):
        assert "token=**********" in doc["error"] and doc["error_type"] == "retryable"
    if outcome == "crash":
        assert HF_SECRET in request_file.read_text() and "retries_exhausted" not in doc  # the retry needs it
    else:
        assert doc.get("retries_exhausted") is (True if outcome.endswith("last attempt") else None)
        kept = json.loads(request_file.read_text())
        assert "hf_token" not in kept and "api_key" not in kept["training_config"]["wandb_config"]
        assert kept["training_config"]["wandb_config"]["project"] == "leak-test"


def offline_start(self, job_id, config):
    """W&B offline even with a key (nothing can reach wandb.ai from a test), keeping the key as given."""
    key, self.api_key = self.api_key, None
    try:
        return ORIGINAL_START(self, job_id, config)
    finally:
        self.api_key = key


def test_a_request_whose_secrets_cannot_be_removed_says_so_without_them(local_dir, tiny_root, capfd, monkeypatch):
    """The bucket refuses the rewrite (with the token in its message): the job ends as it would have, and
    the document and the log say that the request object still holds secrets, naming it, masking them."""
    from storage import LocalBlobStore

    req = sample_request(tiny_root)
    req["hf_token"] = HF_SECRET
    req["processed_dataset_id"] = "no-such-data"  # a permanent failure at pre-flight: over for good
    put_request(local_dir, "unscrubbed", req)
    written = LocalBlobStore.write_bytes

    def refuse(self, uri, data):
        if uri.startswith("gs://gemma-train-config/"):
            raise PermissionError(f"403 Forbidden: PUT {uri}?access_token={HF_SECRET}")
        return written(self, uri, data)

    monkeypatch.setattr(LocalBlobStore, "write_bytes", refuse)
    assert main.main([], env_for(local_dir, "unscrubbed")) == 2
    doc = read_doc(local_dir, "unscrubbed")
    uri = "gs://gemma-train-config/unscrubbed.json"
    assert doc["request_scrub_error"].startswith(f"the request object {uri} may still hold secrets")
    assert "PermissionError: 403 Forbidden" in doc["request_scrub_error"]
    assert doc["error_type"] == "permanent" and "processed_dataset_id" in doc["error"]  # the failure is kept
    logs = "".join(capfd.readouterr())
    assert f"the request object {uri} may still hold secrets" in logs
    assert HF_SECRET not in logs and HF_SECRET not in json.dumps(doc)
    assert HF_SECRET in (local_dir / "gemma-train-config" / "unscrubbed.json").read_text()  # it is there, as said

    put_request(local_dir, "not-json", '{"hf_token": "' + HF_SECRET + '", oops}')
    assert main.main([], env_for(local_dir, "not-json")) == 2
    doc = read_doc(local_dir, "not-json")
    assert "the request is not JSON, so its secrets cannot be found" in doc["request_scrub_error"]
    assert doc["error"].startswith("the request is not valid JSON")
