"""Seconds per optimizer step for every method and trainer type on this CPU, on the tiny Gemma 3
(batch 8, max_length 128; GRPO: 2 prompts x 4 completions of up to 16 tokens). Writes
benchmarks/results/methods_cpu.json.

    python benchmarks/methods_cpu.py [--steps 20]
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CASES = [("sft", "LoRA", "tiny-animals"), ("sft", "QLoRA", "tiny-animals"), ("sft", "Full", "tiny-animals"),
         ("dpo", "LoRA", "tiny-animals-pref"), ("orpo", "LoRA", "tiny-animals-pref"),
         ("grpo", "LoRA", "tiny-animals-prompts")]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    from models.artifacts import library_versions
    from scripts.testbed import demo_request, local_job, make_tiny_fixtures

    work = make_tiny_fixtures(Path(tempfile.mkdtemp()))
    results = []
    for trainer_type, method, dataset in CASES:
        req = demo_request(work, trainer_type=trainer_type, method=method)
        req["processed_dataset_id"] = dataset
        hp = req["training_config"]["hyperparameters"]
        hp.update(max_steps=args.steps, epochs=100, save_strategy="no", max_prompt_length=64)
        if trainer_type == "grpo":
            hp.update(max_length=80)
            req["training_config"]["eval_config"] = {"eval_strategy": "no"}
            req["training_config"]["reward_config"] = [
                {"name": "sound", "type": "text_similarity", "reference_field": "answer",
                 "evaluation_metric": "fuzzy_match"}]
        job = local_job(req, work, f"bench-{trainer_type}-{method}")
        prep = job.preflight()
        trainer = job.build_trainer(job.load_model(prep.tokenizer), prep)
        t = time.perf_counter()
        trainer.train()
        step_s = (time.perf_counter() - t) / trainer.state.global_step
        results.append({"trainer_type": trainer_type, "method": method, "seconds_per_step": round(step_s, 4)})
        print(results[-1], flush=True)
    out = {"date": date.today().isoformat(), "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}",
           "cpu_count": __import__("os").cpu_count(), "steps": args.steps, "versions": library_versions(),
           "results": results}
    (ROOT / "benchmarks" / "results" / "methods_cpu.json").write_text(json.dumps(out, indent=2) + "\n")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
