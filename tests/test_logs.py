"""JSON log lines for Cloud Logging, and secrets masked in logs, the job document, the manifest
and the offline W&B run."""

from __future__ import annotations

import json
import logging

import main
from conftest import env_for, put_request, read_doc, sample_request
from logs import JsonFormatter, RedactingFilter

HF_SECRET = "hf_FAKEsecretVALUE1234567890abcdefghij"


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


def test_secret_in_request_appears_nowhere(local_dir, tiny_root, capfd):
    req = sample_request(tiny_root)
    req["hf_token"] = HF_SECRET
    req["training_config"]["wandb_config"] = {"project": "leak-test"}  # no key: W&B runs offline
    req["training_config"]["hyperparameters"]["epochs"] = 1
    put_request(local_dir, "job-secret", req)
    assert main.main([], env_for(local_dir, "job-secret")) == 0
    out = capfd.readouterr()
    assert HF_SECRET not in out.out + out.err
    assert "**********" in out.out + out.err  # the request was logged, masked
    assert HF_SECRET not in json.dumps(read_doc(local_dir, "job-secret"))
    exported = list((local_dir / "gemma-export-bucket").rglob("*"))
    wandb_files = list((local_dir / "wandb").rglob("*"))
    assert wandb_files, "the offline W&B run wrote nothing"
    for path in exported + wandb_files:
        if path.is_file():
            assert HF_SECRET.encode() not in path.read_bytes(), path
