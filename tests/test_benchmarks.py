"""The GPU benchmark stays runnable where no GPU is: its tiny shape on CPU, and its FLOPs formula."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))


def test_flops_formula():
    from gpu_bench import flops_per_token, peak_tflops

    # 4 N_base + 6 N_lora + 6 L s d_attn
    assert flops_per_token(1_000_000, 10_000, 2, 64, 256) == 4_000_000 + 60_000 + 6 * 2 * 64 * 256
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.0 and peak_tflops("NVIDIA L4") == 121.0
    assert peak_tflops("cpu") is None


def test_gpu_benchmark_runs_its_small_shape_on_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    run = subprocess.run([sys.executable, "benchmarks/gpu_bench.py", "--small", "--steps", "4", "--out", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = {(r["method"], r["variant"]): r for r in json.loads(out.read_text())["results"]}
    for key in (("LoRA", "trl"), ("LoRA", "job"), ("QLoRA", "job")):
        assert rows[key]["tokens_per_s"] > 0 and rows[key]["timed_steps"] == 2, rows[key]
        assert rows[key]["flops_per_token"] > 0 and rows[key]["mfu"] is None  # no bf16 peak for a CPU
    assert rows[("LoRA", "unsloth")]["skipped"] == "Unsloth needs an NVIDIA GPU"


@pytest.mark.slow
def test_gpu_check_script_runs_the_whole_job_where_it_can(tmp_path):
    """On CPU: the Hugging Face job completes with its exports verified and DESIGN.md's metrics; Unsloth is
    refused with exit 2, and so is a candidate (GRPO) once its gate is open: by the GPU check, not the gate."""
    out = tmp_path / "check.json"
    run = subprocess.run([sys.executable, "scripts/gpu_check.py", "--only", "huggingface:LoRA", "unsloth:LoRA:sft:mm",
                          "unsloth:QLoRA:grpo", "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(out.read_text())
    hf, unsloth, candidate = report["results"]
    assert report["device"] == "cpu" and report["versions"]["transformers"]
    assert hf["exit_code"] == 0 and hf["status"] == "completed" and hf["metrics"]["eval_loss"] > 0
    assert hf["missing_metrics"] == [] and 0 < hf["metrics"]["accuracy"] <= 1
    assert hf["verification"]["merged"]["top1_agreement"] == 1.0
    if report["gguf"]:  # where llama-cpp-python is installed (make setup-gguf installs it)
        assert hf["verification"]["gguf"]["top1_agreement"] == 1.0
    assert unsloth["exit_code"] == 2 and "needs an NVIDIA GPU" in unsloth["error"]
    assert unsloth["job"] == "unsloth:LoRA:sft:mm" and unsloth["base_model_id"].endswith("tiny-gemma3-mm")
    assert not unsloth["candidate"] and candidate["candidate"]
    assert candidate["exit_code"] == 2 and "needs an NVIDIA GPU" in candidate["error"]
