"""What tests, benchmarks and the GPU check build jobs from, kept out of the job itself (no production
module imports this): the tiny Gemma 3 model and datasets, the demo request pointed at them, and a
provider's job wired to the local services.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def local_job(request: dict[str, Any], root: Path, job_id: str = "unit"):
    """A provider's job wired to the local services under `root`, for driving the workflow step by step
    (tests and benchmarks): the same classes main() builds for BACKEND=local, without W&B, and the
    random generators seeded with the request's seed."""
    import random

    import numpy
    import torch

    from base import Services
    from job.services import make_blobs, open_store
    from job_manager import JobTracker
    from providers import PROVIDERS
    from runtime.settings import Settings
    from runtime.tracking import NullRunLogger
    from schema import TrainRequest
    from storage import LocalModelHub

    req, settings = TrainRequest.model_validate(request), Settings(job_id=job_id, local_dir=str(root))
    # Seeded as run() seeds before the model is loaded (transformers.set_seed: Python's, NumPy's and torch's
    # generators), so that a job driven step by step starts from the same LoRA initialisation whatever ran
    # before it in the process (under pytest-xdist, that varies). Not through transformers itself: Unsloth
    # must be imported before it (tests/test_main.py).
    seed = req.training_config.hyperparameters.seed
    random.seed(seed)
    numpy.random.seed(seed)
    torch.manual_seed(seed)
    services = Services(make_blobs(settings), LocalModelHub(root), JobTracker(open_store(settings), job_id),
                        NullRunLogger())
    return PROVIDERS[req.training_config.provider](req, settings, services, settings.workdir)


def make_tiny_fixtures(root: Path) -> Path:
    """scripts/make_tiny.py's model and datasets under root (tests, benchmarks, the GPU check)."""
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_tiny.py"), "--out", str(root)], check=True,
                   capture_output=True)
    return Path(root)


def demo_request(root: Path, **training: Any) -> dict[str, Any]:
    """examples/local_default.json with its base model at root's tiny Gemma 3, and `training` merged into
    its training_config."""
    request = json.loads((ROOT / "examples" / "local_default.json").read_text())
    request["training_config"].update({"base_model_id": str(Path(root) / "models" / "tiny-gemma3"), **training})
    return copy.deepcopy(request)
