"""GPU check: the whole job (train, evaluate, export, verify) with each provider and method that needs a
GPU, on the tiny Gemma-3-architecture model that scripts/make_tiny.py makes from a config (random weights,
nothing downloaded). Each job runs as `python main.py` with BACKEND=local in its own process, so Unsloth
is imported first there as in production.

    python scripts/gpu_check.py                     # on a GPU: every job in JOBS, then the CANDIDATES
    python scripts/gpu_check.py --only huggingface:LoRA unsloth:LoRA:dpo --out /tmp/c.json

A job is provider:method[:trainer_type[:model]] (sft when left out; model, one of MODELS: mm, the tiny model
in Gemma 3's image+text architecture, Gemma3ForConditionalGeneration as at 4B and up, instead of the
text-only one; vision: that model trained on the image+text dataset tiny-shapes with modality 'vision', no
GGUF; g4, g4-e2b, g4-moe, g4-unified: the tiny Gemma 4 architectures; g3n: the tiny Gemma 3n, g3n-vision on its images).
Each exports `merged` (bf16) and, where llama-cpp-python is installed, a q4_k_m GGUF beside it, so
Unsloth's merge and the shared GGUF exporter are both checked by the job's verification before
completion.

CANDIDATES are what the Unsloth provider still refuses (Full, the RL trainer types) until they have run
on a GPU: they run here with that gate opened, so their results say whether it can be.

Writes benchmarks/results/gpu-check-<device>.json (or --out): per job the exit code, status, error,
metrics (and any of DESIGN.md's metrics missing), verification and timings, with the device and
library versions.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

JOBS = ["huggingface:LoRA", "huggingface:QLoRA", "unsloth:LoRA", "unsloth:QLoRA", "huggingface:QLoRA:sft:mm",
        "unsloth:LoRA:sft:mm", "unsloth:QLoRA:sft:mm", "huggingface:LoRA:sft:vision", "huggingface:QLoRA:sft:vision",
        "huggingface:QLoRA:sft:g4-moe", "huggingface:QLoRA:sft:g4-e2b", "huggingface:QLoRA:sft:g3n",
        "huggingface:QLoRA:sft:g3n-vision",
        "unsloth:LoRA:sft:g4-e2b", "unsloth:QLoRA:sft:g4"]
# The tiny models besides the text-only Gemma 3 (scripts/make_tiny.py): mm, Gemma 3's image+text architecture
# (4B and up) trained on text, vision the same on images; g4*, Gemma 4's architectures; g3n, Gemma 3n (g3n-vision on
# its images).
MODELS = {"mm": "tiny-gemma3-mm", "vision": "tiny-gemma3-mm", "g4": "tiny-gemma4", "g4-e2b": "tiny-gemma4-e2b",
          "g4-moe": "tiny-gemma4-moe", "g4-unified": "tiny-gemma4-unified", "g3n": "tiny-gemma3n",
          "g3n-vision": "tiny-gemma3n"}
CANDIDATES = ["unsloth:Full", "unsloth:LoRA:dpo", "unsloth:LoRA:orpo", "unsloth:QLoRA:grpo"]
DATASETS = {"sft": "tiny-animals", "dpo": "tiny-animals-pref", "orpo": "tiny-animals-pref",
            "grpo": "tiny-animals-prompts"}
# What readers need in the job document's metrics (DESIGN.md): SFT's four; RL readers take missing as null.
CONTRACT = {"sft": ("accuracy", "perplexity", "eval_loss", "eval_runtime"), "dpo": (), "orpo": (), "grpo": ()}
# The child process of a candidate (run in ROOT, which `-c` puts on sys.path): the provider's gate opened,
# then the job exactly as main.py runs it.
OPEN_GATE = """import sys
import providers
providers.UnslothTrainingJob.methods = ("LoRA", "QLoRA", "Full")
providers.UnslothTrainingJob.trainer_types = ("sft", "dpo", "orpo", "grpo")
import main
sys.exit(main.main([]))
"""


def device_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def image_env(name: str) -> str:
    """The value the Dockerfile's ENV gives name."""
    found = re.search(rf"^ENV {name}=(\S+)$", (ROOT / "Dockerfile").read_text(), re.M)
    assert found, f"{name} is not set in the Dockerfile"
    return found.group(1)


def unsloth_compile_disable() -> str:
    """Unsloth as the image runs it (the Dockerfile's value), unless this environment sets it."""
    return os.environ.get("UNSLOTH_COMPILE_DISABLE", image_env("UNSLOTH_COMPILE_DISABLE"))


def has_gguf() -> bool:
    from exporting.export import converter

    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return converter().is_file()


def run_job(root: Path, job: str, epochs: int, gguf: bool, job_timeout: float | None = None,
            logs: Path | None = None) -> dict:
    parts = job.split(":")
    provider, method, trainer_type, model = parts + ["sft", "text"][len(parts) - 2:]
    job_id = re.sub(r"[^a-z0-9-]", "-", job.lower())
    from scripts.testbed import demo_request

    request = demo_request(root, provider=provider, method=method, trainer_type=trainer_type)
    if model in MODELS:  # another tiny architecture than the text-only Gemma 3
        base = Path(request["training_config"]["base_model_id"])
        request["training_config"]["base_model_id"] = str(base.with_name(MODELS[model]))
    images = model.endswith("vision")
    request["processed_dataset_id"] = "tiny-shapes" if images else DATASETS[trainer_type]
    if images:
        request["training_config"]["modality"] = "vision"
        gguf = False  # the image projector's GGUF is not built: refused
    tc = request["training_config"]
    tc["hyperparameters"].update(epochs=epochs, max_prompt_length=64)
    if trainer_type != "sft":
        tc["hyperparameters"]["max_steps"] = 20
    if trainer_type == "grpo":
        tc["hyperparameters"]["max_length"] = 80
        tc["eval_config"] = {"eval_strategy": "no"}
        tc["reward_config"] = [{"name": "sound", "type": "text_similarity", "reference_field": "answer",
                                "evaluation_metric": "fuzzy_match"}]
    tc["export_config"] = {"format": "merged"}
    if gguf:
        tc["export_config"].update(include_gguf=True, gguf_quantization="q4_k_m")
    (root / "gemma-train-config").mkdir(exist_ok=True)
    (root / "gemma-train-config" / f"{job_id}.json").write_text(json.dumps(request))
    env = {**os.environ, "UNSLOTH_COMPILE_DISABLE": unsloth_compile_disable(), "BACKEND": "local",
           "LOCAL_DIR": str(root), "JOB_ID": job_id}
    cmd = [sys.executable, "-c", OPEN_GATE] if job in CANDIDATES else [sys.executable, str(ROOT / "main.py")]
    t = time.perf_counter()
    try:
        run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=job_timeout)
    except subprocess.TimeoutExpired as e:  # recorded, and the next job runs
        run = subprocess.CompletedProcess(cmd, -9, "", f"timed out after {job_timeout}s\n" + (
            e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else e.stderr or ""))
    if logs:
        logs.mkdir(parents=True, exist_ok=True)
        (logs / f"{job_id}.log").write_text(run.stdout + run.stderr)
    doc_file = root / "firestore" / "training_jobs" / f"{job_id}.json"
    doc = json.loads(doc_file.read_text()) if doc_file.is_file() else {}
    metrics = doc.get("metrics") or {}
    keep = ("eval_loss", "perplexity", "accuracy", "eval_runtime", "reward_accuracy", "reward_margin",
            "train_loss", "train_reward", "train_runtime")
    return {"job": job, "base_model_id": tc["base_model_id"], "candidate": job in CANDIDATES,
            "exit_code": run.returncode,
            "seconds": round(time.perf_counter() - t, 1), "status": doc.get("status"), "error": doc.get("error"),
            "metrics": {k: v for k, v in metrics.items() if k in keep},
            "missing_metrics": [k for k in CONTRACT[trainer_type] if metrics.get(k) is None] if metrics else None,
            "verification": doc.get("verification"), "timings": doc.get("timings"),
            "log_tail": None if run.returncode == 0 else run.stderr[-2000:]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", default=JOBS + CANDIDATES,
                        help="provider:method[:trainer_type[:model]], model one of " + ", ".join(MODELS))
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--job-timeout", type=float, help="seconds one job may take before it is stopped")
    parser.add_argument("--logs", type=Path, help="a folder for each job's whole output, <job>.log")
    args = parser.parse_args()
    from models.artifacts import library_versions

    device, gguf = device_name(), has_gguf()
    out = args.out or ROOT / "benchmarks" / "results" / f"gpu-check-{re.sub(r'[^a-z0-9]+', '-', device.lower())}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        from scripts.testbed import make_tiny_fixtures

        root = make_tiny_fixtures(Path(tmp))
        results = []
        for job in args.only:
            results.append(run_job(root, job, args.epochs, gguf, args.job_timeout, args.logs))
            print(json.dumps({k: results[-1][k] for k in ("job", "exit_code", "status", "error", "seconds")}),
                  flush=True)
            # after every job: a run stopped by its time limit still leaves what it finished
            out.write_text(json.dumps({"date": date.today().isoformat(), "device": device, "gguf": gguf,
                                       "unsloth_compile_disable": unsloth_compile_disable(),
                                       "epochs": args.epochs,
                                       "versions": library_versions(), "results": results}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
