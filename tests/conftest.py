"""Shared fixtures: the tiny Gemma 3 model and dataset (made once per session, offline), local
services in a temporary LOCAL_DIR, and sample requests of each generation."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

EXAMPLES = ROOT / "examples"
# The installed command (pyproject.toml's console script; `make setup` installs the project editable)
GEMMA_JOB = str(Path(sys.executable).with_name("gemma-job"))

# The longest files, started first so that none is left to run alone at the end (`make test` hands each
# worker a whole file at a time: pytest-xdist's --dist loadfile, with --no-loadscope-reorder, which keeps
# this order instead of putting the files with the most tests first).
LONGEST_FIRST = ("test_vision_gemma3n", "test_reliability", "test_export", "test_rl", "test_gemma4_rl", "test_platform",
                 "test_distributed", "test_gemma4", "test_vision_gemma4", "test_gcp", "test_tracking",
                 "test_vision_methods", "test_vision", "test_gemma3n", "test_kill", "test_divergence", "test_benchmarks",
                 "test_sweep", "test_hub_base", "test_cli", "test_auto_batch", "test_main", "test_lora_options",
                 "test_generation", "test_train", "test_consumers", "test_best", "test_notify", "test_data_report",
                 "test_prefork", "test_methods", "test_logs", "test_lineage")


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "slow: a whole job of more than about 10 s (learning on a second family, fault "
                            "injection with fresh processes, the GPU check script): `make test` leaves them out of the "
                            "edit-and-test loop; `make test-all`, which CI runs, runs every test")


def pytest_collection_modifyitems(items) -> None:
    def rank(item) -> int:
        name = item.path.stem
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: each file's own order stays


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> Path:
    from scripts.testbed import make_tiny_fixtures

    return make_tiny_fixtures(tmp_path_factory.mktemp("tiny"))


@pytest.fixture
def local_dir(tmp_path, tiny_root) -> Path:
    """A LOCAL_DIR holding the tiny dataset in the data bucket; the model stays in the session dir."""
    shutil.copytree(tiny_root / "gemma-dataset-bucket", tmp_path / "gemma-dataset-bucket")
    return tmp_path


def sample_request(tiny_root: Path, **training) -> dict:
    from scripts.testbed import demo_request

    return demo_request(tiny_root, **training)


# `make test` runs one thread per worker; a job in a process of its own keeps to it (two OpenMP threads in each
# of several processes on two cores only spin against each other).
THREADS = {k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") if k in os.environ}


def harness_env() -> dict[str, str]:
    """What a process the suite starts needs to fork from tests/prefork's servers (set by `prefork` below)."""
    return {k: os.environ[k] for k in ("PREFORK_DIR", "PYTHONPATH") if k in os.environ}


def env_for(local_dir: Path, job_id: str, **extra: str) -> dict[str, str]:
    return {"BACKEND": "local", "LOCAL_DIR": str(local_dir), "JOB_ID": job_id, **THREADS, **harness_env(), **extra}


@pytest.fixture(autouse=True)
def restore_environment():
    """A job run in the test's own process sets variables (logs.setup_logging's progress-bar switches, torch's
    inductor cache): undone after each test, so that no test, nor any process it starts, sees another's."""
    saved = dict(os.environ)
    yield
    if os.environ != saved:
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture(scope="session", autouse=True)
def prefork(tmp_path_factory):
    """The jobs this session starts as processes fork from a server that has imported torch, transformers,
    PEFT and TRL (tests/prefork): about 6 CPU-seconds less for each of over a hundred. PREFORK=0 starts each
    from scratch."""
    if os.environ.get("PREFORK") == "0":
        yield
        return
    from prefork.prefork import join, leave

    base = tmp_path_factory.getbasetemp()
    directory = (base.parent if "PYTEST_XDIST_WORKER" in os.environ else base) / "prefork"  # the workers share
    directory.mkdir(exist_ok=True)
    join(str(directory))
    os.environ["PREFORK_DIR"] = str(directory)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, (str(ROOT / "tests" / "prefork"), os.environ.get("PYTHONPATH"))))
    yield
    leave(str(directory))


def put_request(local_dir: Path, job_id: str, request: dict | str) -> None:
    path = local_dir / "gemma-train-config" / f"{job_id}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(request if isinstance(request, str) else json.dumps(request))


def run_subprocess(local_dir: Path, job_id: str, *args: str, **env: str):
    """main.py in a fresh interpreter on the local backend; prints whether any model library was imported."""
    code = ("import sys, main; rc = main.main(sys.argv[1:]); "
            "print('MODEL_LIBS_LOADED=' + str(any(m in sys.modules for m in ('torch', 'transformers', 'trl')))); "
            "sys.exit(rc)")
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True,
                         env={"PATH": "/usr/bin:/bin", **env_for(local_dir, job_id), **env})
    return out, time.perf_counter() - t


def read_doc(local_dir: Path, job_id: str) -> dict:
    return json.loads((local_dir / "firestore" / "training_jobs" / f"{job_id}.json").read_text())


def make_job(local_dir: Path, request: dict, job_id: str = "unit"):
    """A provider job wired to local services, for driving the workflow step by step."""
    from scripts.testbed import local_job

    return local_job(request, local_dir, job_id)


def train_steps(local_dir: Path, request: dict, job_id: str):
    """A job driven through pre-flight, the model (its LoRA targets recorded), training and evaluation:
    (job, prep, model, trainer, eval metrics before training, the job's metrics after)."""
    job = make_job(local_dir, request, job_id)
    prep = job.preflight()
    model = job.model_to_train(prep.tokenizer)
    trainer = job.build_trainer(model, prep)
    before = trainer.evaluate()
    return job, prep, model, trainer, before, job.evaluate(trainer, prep, job.train(trainer))


# ---- the cloud: Firestore and GCS emulators, reached through the real Google clients -------------

def need(reason: str) -> None:
    """Skip on a developer's machine that lacks a server; in CI a missing server is a failure."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI must run the cloud tests, not skip them)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def firestore_emulator():
    from emulators import FIRESTORE_HELP, FirestoreEmulator

    script = FirestoreEmulator.find()
    if script is None:
        need(FIRESTORE_HELP)
    emu = FirestoreEmulator(script)
    emu.start()
    yield emu
    emu.stop()


@pytest.fixture(scope="session")
def gcs_emulator():
    from emulators import GcsEmulator

    if GcsEmulator.find() is None:
        need("fake-gcs-server was not found: pip install -r requirements-dev.txt")
    emu = GcsEmulator()
    emu.start()
    yield emu
    emu.stop()


@dataclass
class Gcp:
    """One test's cloud: its own Firestore project and buckets on the shared emulators."""
    env: dict[str, str]
    fs: Any
    gcs: Any
    config_bucket: str
    data_bucket: str
    export_bucket: str

    def put_request(self, job_id: str, request: dict | str, uri: str | None = None) -> str:
        uri = uri or f"gs://{self.config_bucket}/{job_id}.json"
        bucket, key = uri[5:].split("/", 1)
        self.gcs.bucket(bucket).blob(key).upload_from_string(
            request if isinstance(request, str) else json.dumps(request))
        return uri

    def put_dataset(self, tiny_root: Path, dataset_id: str = "tiny-animals", key_prefix: str | None = None) -> None:
        src = tiny_root / "gemma-dataset-bucket" / "processed_datasets" / "tiny-animals"
        prefix = key_prefix or f"processed_datasets/{dataset_id}/"
        for f in sorted(src.glob("*.parquet")):
            self.gcs.bucket(self.data_bucket).blob(prefix + f.name).upload_from_filename(str(f))

    def doc(self, job_id: str, collection: str = "training_jobs") -> dict | None:
        snap = self.fs.collection(collection).document(job_id).get()
        return snap.to_dict() if snap.exists else None

    def blobs(self, bucket: str, prefix: str) -> dict[str, bytes]:
        return {b.name[len(prefix):]: b.download_as_bytes() for b in self.gcs.list_blobs(bucket, prefix=prefix)}


@pytest.fixture
def gcp(tmp_path, firestore_emulator, gcs_emulator, monkeypatch) -> Gcp:
    from google.cloud import firestore, storage

    monkeypatch.setenv("FIRESTORE_EMULATOR_HOST", firestore_emulator.host)
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_emulator.url)
    # huggingface_hub sends LFS files through Xet where hf_xet is installed; tests/hub_stub.py speaks the
    # Hub's classic LFS batch API only
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_DISABLE_XET", True)
    suffix = uuid.uuid4().hex[:10]
    project = f"test-{suffix}"
    gcs = storage.Client(project=project)
    names = {kind: f"{kind}-{suffix}" for kind in ("config", "data", "export")}
    for name in names.values():
        gcs.create_bucket(name)
    env = {"BACKEND": "gcp", "PROJECT_ID": project, "GCS_CONFIG_BUCKET_NAME": names["config"],
           "GCS_DATA_BUCKET_NAME": names["data"], "GCS_EXPORT_BUCKET_NAME": names["export"],
           "LOCAL_DIR": str(tmp_path / "job")}
    return Gcp(env, firestore.Client(project=project), gcs, names["config"], names["data"], names["export"])
