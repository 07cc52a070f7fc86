"""Shared fixtures: the tiny Gemma 3 model and dataset (made once per session, offline), local
services in a temporary LOCAL_DIR, and sample requests of each generation."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

EXAMPLES = ROOT / "examples"


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny")
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_tiny.py"), "--out", str(out)], check=True,
                   capture_output=True)
    return out


@pytest.fixture
def local_dir(tmp_path, tiny_root) -> Path:
    """A LOCAL_DIR holding the tiny dataset in the data bucket; the model stays in the session dir."""
    shutil.copytree(tiny_root / "gemma-dataset-bucket", tmp_path / "gemma-dataset-bucket")
    return tmp_path


def sample_request(tiny_root: Path, **training) -> dict:
    req = json.loads((EXAMPLES / "local_default.json").read_text())
    req["training_config"]["base_model_id"] = str(tiny_root / "models" / "tiny-gemma3")
    req["training_config"].update(training)
    return copy.deepcopy(req)


def env_for(local_dir: Path, job_id: str, **extra: str) -> dict[str, str]:
    return {"BACKEND": "local", "LOCAL_DIR": str(local_dir), "JOB_ID": job_id, **extra}


def put_request(local_dir: Path, job_id: str, request: dict | str) -> None:
    path = local_dir / "gemma-train-config" / f"{job_id}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(request if isinstance(request, str) else json.dumps(request))


def read_doc(local_dir: Path, job_id: str) -> dict:
    return json.loads((local_dir / "firestore" / "training_jobs" / f"{job_id}.json").read_text())


def make_job(local_dir: Path, request: dict, job_id: str = "unit"):
    """A provider job wired to local services, for driving the workflow step by step."""
    from base import Services
    from job_manager import JobTracker, LocalJobStore
    from providers import PROVIDERS
    from schema import Settings, TrainRequest
    from storage import LocalBlobStore, LocalModelHub
    from tracking import NullRunLogger

    req = TrainRequest.model_validate(request)
    services = Services(LocalBlobStore(local_dir), LocalModelHub(local_dir),
                        JobTracker(LocalJobStore(local_dir), job_id), NullRunLogger())
    return PROVIDERS[req.training_config.provider](req, Settings(job_id=job_id, local_dir=str(local_dir)),
                                                   services, local_dir / "work" / job_id)
