"""CPU benchmark: the whole job against a bare TRL script at equal optimizer steps (same request: batch,
gradient accumulation, epochs), on a 24-step job and on the 144-step demo, and the time to reject a bad
request. The job's own step timings (from its document) break its time down:
start-up, request validation, data, library imports, tokenizer, data preparation, model load,
training, evaluation, export, document writes, and what no step covers. Writes
benchmarks/results/cpu.json and prints it.

    python benchmarks/cpu_bench.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import date
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def timed(cmd: list[str], env: dict[str, str]) -> tuple[float, int, subprocess.CompletedProcess]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t = time.perf_counter()
    out = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True)
    seconds = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB, max over children so far
    return seconds, max(peak, before), out


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def compare(work: Path, request: dict, name: str, repeats: int) -> dict:
    """The job and the bare TRL script on the same request, alternately, `repeats` times each."""
    (work / f"{name}.json").write_text(json.dumps(request))
    env = {"BACKEND": "local", "LOCAL_DIR": str(work)}
    rows: dict[str, list] = {"job": [], "bare_trl": []}
    breakdown, steps = {}, {}
    for i in range(repeats):
        job_id = f"{name}-{i}"
        s, _, out = timed([sys.executable, "main.py", "--config", str(work / f"{name}.json")], {**env, "JOB_ID": job_id})
        assert out.returncode == 0, out.stderr[-2000:]
        doc = json.loads((work / "firestore" / "training_jobs" / f"{job_id}.json").read_text())
        if not rows["job"] or s < min(rows["job"]):
            breakdown = doc["timings"]  # the job's own step timings, from its best run
            breakdown["untimed"] = round(s - sum(breakdown.values()), 3)
        rows["job"].append(s)
        steps["job"] = doc["step"]
        s_bare, _, out = timed([sys.executable, "benchmarks/bare_trl.py", str(work / f"{name}.json"), str(work),
                                str(work / f"bare-{job_id}")], {})
        assert out.returncode == 0, out.stderr[-2000:]
        rows["bare_trl"].append(s_bare)
        steps["bare_trl"] = json.loads(out.stdout.strip().splitlines()[-1])["global_step"]
    assert steps["job"] == steps["bare_trl"], f"unequal optimizer steps: {steps}"
    best = {k: min(v) for k, v in rows.items()}
    hp = request["training_config"]["hyperparameters"]
    return {"optimizer_steps": steps["job"], "batch_size": hp["batch_size"],
            "gradient_accumulation_steps": hp["gradient_accumulation_steps"],
            "job_s": round(best["job"], 2), "bare_trl_s": round(best["bare_trl"], 2),
            "job_overhead_s": round(best["job"] - best["bare_trl"], 2),
            "ratio_job_over_bare": round(best["job"] / best["bare_trl"], 3), "job_step_breakdown_s": breakdown,
            "all_runs_s": rows}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from scripts.testbed import demo_request, make_tiny_fixtures

    work = make_tiny_fixtures(Path(tempfile.mkdtemp()))
    demo = demo_request(work)
    short = json.loads(json.dumps(demo))
    short["training_config"]["hyperparameters"]["epochs"] = 2  # 12 steps an epoch: the 24-step job
    bad = json.loads(json.dumps(demo))
    bad["training_config"]["hyperparameters"]["learning_rte"] = 1
    (work / "bad.json").write_text(json.dumps(bad))
    jobs = {"24_steps": compare(work, short, "short", args.repeats), "demo_144_steps": compare(work, demo, "demo", args.repeats)}
    reject = []
    for i in range(args.repeats):
        s_bad, peak, out = timed([sys.executable, "main.py", "--config", str(work / "bad.json")],
                                 {"BACKEND": "local", "LOCAL_DIR": str(work), "JOB_ID": f"bad-{i}"})
        assert out.returncode == 2
        reject.append(s_bad)
    result = {"date": date.today().isoformat(), "cpu": cpu_model(),
              "cores": os.cpu_count(), "python": platform.python_version(),
              "versions": {n: version(n) for n in ("torch", "transformers", "trl", "peft")},
              "seconds_best_of": args.repeats, "jobs": jobs, "reject_bad_request_s": round(min(reject), 3),
              "peak_rss_mib_any_child": round(peak / 1024, 1)}
    out_path = ROOT / "benchmarks" / "results" / "cpu.json"
    out_path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: {m: v[m] for m in ("optimizer_steps", "job_s", "bare_trl_s", "job_overhead_s",
                                             "ratio_job_over_bare")} for k, v in jobs.items()}, indent=2))
    print(f"reject: {result['reject_bad_request_s']} s; wrote {out_path}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
