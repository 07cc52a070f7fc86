"""GPU benchmark: tokens per second, model FLOPs utilization and peak memory of LoRA and QLoRA on
Gemma-3-architecture models built from a config (random weights: throughput does not depend on
them, and nothing can be downloaded on the GPU machine), side by side for
  trl      TRL's SFTTrainer with its defaults (what a user would write first),
  job      the Hugging Face provider with the job's defaults (its load_model and trainer_kwargs),
  unsloth  the Unsloth provider (CUDA only),
on the same synthetic data (random token ids, every position trained). Each variant runs in a process
of its own: importing Unsloth patches transformers and TRL for the whole process, which would make
the other two rows Unsloth's too.

    python benchmarks/gpu_bench.py                       # 1B and 4B, LoRA and QLoRA, seq 2048
    python benchmarks/gpu_bench.py --small --steps 3     # a tiny shape on CPU: checks the script runs

MFU = tokens/s x FLOPs per token / the GPU's dense bf16 peak, where FLOPs per token =
4 N_base (forward 2N, backward through the frozen base 2N; no weight gradients) + 6 N_lora
+ 6 L s d_attn (causal attention: QK^T and AV, forward and backward, with d_attn = heads x head_dim).
Gradient checkpointing's recomputation is not counted (it is overhead, not model work). The L4
projection scales tokens/s by the ratio of dense bf16 peaks (121 TFLOPS for the L4) at the same MFU.
Writes benchmarks/results/gpu-<device>.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SHAPES = {
    "1b": dict(hidden_size=1152, intermediate_size=6912, num_hidden_layers=26, num_attention_heads=4,
               num_key_value_heads=1, head_dim=256, vocab_size=262144),
    "4b": dict(hidden_size=2560, intermediate_size=10240, num_hidden_layers=34, num_attention_heads=8,
               num_key_value_heads=4, head_dim=256, vocab_size=262144),
    "small": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=1, head_dim=64, vocab_size=512),
}
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0, "cpu": None}
L4_TFLOPS = 121.0


def peak_tflops(device_name: str) -> float | None:
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in device_name), None)


def make_model_dir(shape: str, out: Path) -> Path:
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(**SHAPES[shape], max_position_embeddings=8192)
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(config).to(torch.bfloat16)
    folder = out / f"gemma3-{shape}"
    model.save_pretrained(folder)
    sys.path.insert(0, str(ROOT / "scripts"))
    from make_tiny import conversations, make_tokenizer  # an offline tokenizer, for padding only

    make_tokenizer(folder, [m["content"] for row in conversations() for m in row["messages"]] * 4)
    return folder


def synthetic_rows(vocab: int, seq: int, n: int) -> list[dict]:
    import torch

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, vocab, (n, seq), generator=g).tolist()
    return [{"input_ids": row, "labels": row} for row in ids]


def flops_per_token(n_base: int, n_lora: int, layers: int, seq: int, d_attn: int) -> float:
    return 4 * n_base + 6 * n_lora + 6 * layers * seq * d_attn


class StepTimer:
    """Wall time of the steps after the warm-up ones (compilation, allocator growth)."""

    def __init__(self, warmup: int):
        from transformers import TrainerCallback

        timer = self

        class Callback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                if state.global_step == warmup:
                    timer.sync()
                    timer.start = time.perf_counter()

            def on_train_end(self, args, state, control, **kw):
                timer.sync()
                timer.end, timer.steps = time.perf_counter(), state.global_step - warmup

        self.callback, self.start, self.end, self.steps = Callback(), 0.0, 0.0, 0

    @staticmethod
    def sync() -> None:
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()


def run_variant(variant: str, method: str, model_dir: Path, shape: str, seq: int, batch: int, steps: int,
                work: Path) -> dict:
    import torch
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    gpu = torch.cuda.is_available()
    if gpu:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)  # only its pad token is used: the rows are token ids
    rows = synthetic_rows(SHAPES[shape]["vocab_size"], seq, batch * steps)
    warmup = min(2, steps - 1)
    timer = StepTimer(warmup)
    request = job_request(model_dir, method, seq, batch, steps)
    if variant == "trl":
        from peft import LoraConfig
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        kwargs = {"dtype": torch.bfloat16 if gpu else torch.float32}
        if method == "QLoRA":
            kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                               bnb_4bit_compute_dtype=torch.bfloat16)
        model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
        args = SFTConfig(output_dir=str(work / "trl"), per_device_train_batch_size=batch, max_steps=steps,
                         max_length=seq, report_to=[], save_strategy="no", logging_steps=steps, use_cpu=not gpu,
                         **({} if gpu else {"bf16": False, "gradient_checkpointing": False}))
        trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                             peft_config=LoraConfig(r=16, lora_alpha=16, target_modules="all-linear",
                                                    task_type="CAUSAL_LM"), callbacks=[timer.callback])
    else:
        from base import Prepared
        from scripts.testbed import local_job

        request["training_config"]["provider"] = "huggingface" if variant == "job" else "unsloth"
        job = local_job(request, work, f"bench-{variant}")
        model = job.load_model(None)
        prep = Prepared(None, type("T", (), {"rows": rows})(), None, steps)
        kwargs = job.trainer_kwargs(prep) | job.sft_overrides() | {"save_strategy": "no", "report_to": []}
        trainer = SFTTrainer(model=model, args=SFTConfig(**kwargs), train_dataset=Dataset.from_list(rows),
                             processing_class=tok, callbacks=[timer.callback])
    trainer.train()
    model = trainer.model
    n_all = sum(p.numel() for p in model.parameters())
    n_lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    tokens_s = timer.steps * batch * seq / (timer.end - timer.start)
    cfg = SHAPES[shape]
    fpt = flops_per_token(n_all - n_lora, n_lora, cfg["num_hidden_layers"], seq,
                          cfg["num_attention_heads"] * cfg["head_dim"])
    device = torch.cuda.get_device_name(0) if gpu else "cpu"
    peak = peak_tflops(device)
    out = {"tokens_per_s": round(tokens_s, 1), "timed_steps": timer.steps,
           "flops_per_token": fpt, "mfu": round(tokens_s * fpt / (peak * 1e12), 4) if peak else None,
           "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2 ** 30, 2) if gpu else None}
    if peak:
        out["l4_tokens_per_s_projected"] = round(tokens_s * L4_TFLOPS / peak, 1)
    del trainer, model
    return out


def job_request(model_dir: Path, method: str, seq: int, batch: int, steps: int) -> dict:
    return {"processed_dataset_id": "bench", "training_config": {
        "base_model_id": str(model_dir), "method": method,
        "hyperparameters": {"batch_size": batch, "gradient_accumulation_steps": 1, "max_steps": steps,
                            "max_length": seq, "max_prompt_length": min(512, seq // 2), "logging_steps": steps,
                            "lora_dropout": 0.0}}}


def skipped(variant: str, method: str, gpu: bool) -> str | None:
    """Why a variant is not measured on this machine, decided before a child is started for it."""
    if variant == "unsloth" and not gpu:
        return "Unsloth needs an NVIDIA GPU"
    if method == "QLoRA" and not gpu and variant != "job":
        return "QLoRA through TRL's defaults is measured on a GPU only"
    return None


def run_in_child(args, shape: str, method: str, variant: str, model_dir: Path, work: Path) -> dict:
    """One variant in a fresh interpreter (Unsloth, where it runs, imported first as it requires)."""
    import subprocess

    cmd = [sys.executable, __file__, "--one", f"{shape}:{method}:{variant}", "--model-dir", str(model_dir),
           "--work", str(work), "--seq", str(args.seq), "--batch", str(args.batch), "--steps", str(args.steps)]
    run = subprocess.run(cmd, capture_output=True, text=True)
    lines = run.stdout.strip().splitlines()
    if run.returncode != 0 or not lines:
        return {"error": f"exit {run.returncode}: {run.stderr.strip()[-300:]}"}
    return json.loads(lines[-1])


def one(args) -> None:
    """The child: one variant, its row as the last line of stdout."""
    shape, method, variant = args.one.split(":")
    if variant == "unsloth":
        try:
            import unsloth  # noqa: F401  (before transformers, peft and trl, as Unsloth requires)
        except Exception as e:  # ImportError on a CPU machine, NotImplementedError without a GPU
            print(f"unsloth not importable here ({type(e).__name__})", file=sys.stderr)
    try:
        row = run_variant(variant, method, Path(args.model_dir), shape, args.seq, args.batch, args.steps,
                          Path(args.work))
    except Exception as e:  # one failing variant (say, out of memory) does not stop the others
        row = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    print(json.dumps(row), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", default="1b,4b")
    parser.add_argument("--methods", default="LoRA,QLoRA")
    parser.add_argument("--variants", default="trl,job,unsloth")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--small", action="store_true", help="tiny shape, seq 64, batch 2: a check that it runs")
    parser.add_argument("--out", help="results file (default benchmarks/results/gpu-<device>.json)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # shape:method:variant, in a child process
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        return one(args)
    if args.small:
        args.shapes, args.seq, args.batch = "small", 64, 2
    import torch

    from models.artifacts import library_versions

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    work = Path(tempfile.mkdtemp())
    results = []
    for shape in args.shapes.split(","):
        model_dir = make_model_dir(shape, work)
        for method in args.methods.split(","):
            for variant in args.variants.split(","):
                row = {"shape": shape, "method": method, "variant": variant, "seq": args.seq, "batch": args.batch}
                why = skipped(variant, method, torch.cuda.is_available())
                row |= {"skipped": why} if why else run_in_child(args, shape, method, variant, model_dir, work)
                print(json.dumps(row), flush=True)
                results.append(row)
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / \
        f"gpu-{device.replace(' ', '_').lower()}.json"
    out.write_text(json.dumps({"date": date.today().isoformat(), "device": device, "host": platform.node(),
                               "versions": library_versions(), "results": results}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
