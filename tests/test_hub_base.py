"""A base model from the Hub, as production has it (issue 36): the tiny Gemma 3 served by the Hub stand-in
(tests/hub_stub.py), downloaded by the real huggingface_hub client inside transformers, in a job process of its
own whose HF_ENDPOINT is the stand-in, against the Firestore and GCS emulators. The token reaches every request,
a gated or missing repo ends the job with exit 2 before training, a retry finds the weights in its cache, and
the export carries the base's tokenizer.model where the repo has one, and goes on without where it has none."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, sample_request
from hub_stub import HubStub

TOKEN = "hf_base_read_token_0123456789"
REPO = "acme/tiny-gemma3"


def serve(hub: HubStub, tiny_root) -> None:
    folder = tiny_root / "models" / "tiny-gemma3"
    hub.repos[REPO] = {"private": True, "writable": False,  # private: nothing is read without the token
                       "files": {p.name: p.read_bytes() for p in folder.iterdir()}}


def run_job(gcp, hub: HubStub, job_id: str, cache) -> tuple[int, str]:
    request = sample_request(gcp.tiny_root, base_model_id=REPO)
    request["training_config"]["hyperparameters"].update(epochs=1, max_steps=2)
    gcp.put_request(job_id, request)
    env = {**os.environ, **gcp.env, "JOB_ID": job_id, "HF_TOKEN": TOKEN, "HF_ENDPOINT": hub.url,
           "HF_HOME": str(cache)}
    for name in ("HF_HUB_OFFLINE", "HF_HUB_DISABLE_XET"):  # Xet on, as in production: no Xet repo here, so
        env.pop(name, None)  # the client downloads over plain HTTP, as it does a repo the Hub serves that way
    out = subprocess.run([sys.executable, "main.py"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    return out.returncode, out.stdout + out.stderr


@pytest.fixture
def hub_gcp(gcp, tiny_root):
    gcp.put_dataset(tiny_root)
    gcp.tiny_root = tiny_root
    return gcp


def weight_downloads(hub: HubStub) -> int:
    return sum(1 for method, path, _ in hub.requests if method == "GET" and path.endswith("/model.safetensors"))


@pytest.mark.slow
def test_a_hub_base_is_downloaded_with_the_token_and_a_retry_uses_the_cache(hub_gcp, tmp_path):
    cache = tmp_path / "hf-home"
    with HubStub(TOKEN) as hub:
        serve(hub, hub_gcp.tiny_root)
        code, output = run_job(hub_gcp, hub, "hub-base-1", cache)
        assert code == 0, output[-3000:]
        ours = [(m, p, auth) for m, p, auth in hub.requests if REPO in p]
        assert ours and all(auth == f"Bearer {TOKEN}" for _, _, auth in ours)  # a private repo: none without it
        assert weight_downloads(hub) == 1
        fetched = {p.rsplit("/", 1)[1] for m, p, _ in ours if m == "GET" and "/resolve/" in p}
        assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer.model"} <= fetched
        doc = hub_gcp.doc("hub-base-1")
        assert doc["status"] == "completed" and doc["base_model_id"] == REPO
        adapter = hub_gcp.blobs(hub_gcp.export_bucket, "trained_adapters/hub-base-1/")
        config = json.loads(adapter["adapter_config.json"])
        assert config["base_model_name_or_path"] == REPO  # what the consumers download it by
        assert adapter["tokenizer.model"] == hub.repos[REPO]["files"]["tokenizer.model"]
        assert TOKEN not in json.dumps(doc, default=str) and TOKEN not in output
        # The same container's next attempt (another job here): the weights come from the cache. The repo has
        # lost its tokenizer.model meanwhile, as Gemma 4's repos hold tokenizer.json alone: the export asks the
        # Hub for it (not the cache's old copy), finds none, and goes on without it.
        del hub.repos[REPO]["files"]["tokenizer.model"]
        code, output = run_job(hub_gcp, hub, "hub-base-2", cache)
        assert code == 0, output[-3000:]
        assert weight_downloads(hub) == 1
    adapter = hub_gcp.blobs(hub_gcp.export_bucket, "trained_adapters/hub-base-2/")
    assert "tokenizer.json" in adapter and "tokenizer.model" not in adapter
    assert hub_gcp.doc("hub-base-2")["status"] == "completed"


def test_a_gated_hub_base_fails_at_pre_flight_with_exit_2(hub_gcp, tmp_path):
    with HubStub(TOKEN) as hub:
        serve(hub, hub_gcp.tiny_root)
        hub.gated.add(REPO)
        code, output = run_job(hub_gcp, hub, "hub-gated", tmp_path / "hf-home")
        assert code == 2, output[-3000:]
        assert weight_downloads(hub) == 0
    doc = hub_gcp.doc("hub-gated")
    assert doc["status"] == "failed" and doc["error_type"] == "permanent" and doc["phase"] == "validating"
    assert doc["error"].startswith(f"training_config.base_model_id: {REPO!r} is gated")
    assert "accept its licence" in doc["error"]
