"""Every export form on the tiny Gemma 3 after the demo's LoRA training (20 epochs): seconds to make it,
size, seconds to verify it in its consumer, and its top-1 agreement with the trained model.

    python benchmarks/export_cpu.py            # writes benchmarks/results/export_cpu.json

The same steps as export.export_artifacts, one form at a time, so each is timed apart.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

GGUF = ["f16", "bf16", "q8_0", "q5_k_m", "q4_k_m", "q2_k"]


def timed(fn, *args):
    t = time.perf_counter()
    out = fn(*args)
    return out, round(time.perf_counter() - t, 2)


def size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def in_peft(ref, folder: Path, job):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from exporting.verification import check_transformers

    def load(device: str):
        base = AutoModelForCausalLM.from_pretrained(job.cfg.base_model_id, device_map=device,
                                                    **job.base_model_kwargs())
        return PeftModel.from_pretrained(base, str(folder))

    return check_transformers(ref, load, 0)


def in_transformers(ref, folder: Path):
    from transformers import AutoModelForCausalLM

    from exporting.verification import check_transformers
    from models.artifacts import weight_bytes

    return check_transformers(ref, lambda device: AutoModelForCausalLM.from_pretrained(str(folder), device_map=device),
                              weight_bytes(folder))


def main() -> None:
    from transformers import set_seed

    from exporting.export import export_gguf
    from exporting.verification import (
        check_gguf,
        greedy_reference,
        greedy_reference_unbatched,
        pad_id,
        probe_prompts,
        stop_ids,
    )
    from models.artifacts import complete_tokenizer_files, library_versions, save_4bit
    from scripts.testbed import demo_request, local_job, make_tiny_fixtures

    with tempfile.TemporaryDirectory() as tmp:
        root = make_tiny_fixtures(Path(tmp))
        request = demo_request(root)
        request["training_config"]["hyperparameters"]["epochs"] = 20
        job = local_job(request, root, "bench")
        set_seed(job.cfg.hyperparameters.seed)
        prep = job.preflight()
        trainer = job.build_trainer(job.load_model(prep.tokenizer), prep)
        job.train(trainer)
        tok = prep.tokenizer
        prompts, stops = probe_prompts(prep), stop_ids(trainer.model, tok)
        ref, ref_s = timed(greedy_reference, trainer.model, prompts, stops, pad_id(tok))
        old, old_s = timed(greedy_reference_unbatched, trainer.model, prompts, stops)
        assert old.sequences == ref.sequences, "the batched reference differs from the unbatched one"
        rows = []

        def row(form, consumer, path, make_s, check):
            found, check_s = timed(check)
            rows.append({"form": form, "consumer": consumer, "make_s": make_s, "verify_s": check_s,
                         "bytes": size(path), "top1_agreement": found.share, "decided_tokens": found.decided,
                         "near_ties": found.near_ties, "near_ties_flipped": found.flipped_ties})
            print(rows[-1])

        adapter = root / "adapter"
        _, s = timed(lambda: (trainer.model.save_pretrained(str(adapter)), tok.save_pretrained(str(adapter)),
                              complete_tokenizer_files(adapter, tok, job.cfg.base_model_id, None)))
        row("adapter", "PEFT", adapter, s, lambda: in_peft(ref, adapter, job))
        merged = root / "merged16"
        _, s = timed(lambda: (job.save_merged(trainer.model, tok, merged),
                              complete_tokenizer_files(merged, tok, job.cfg.base_model_id, None)))
        row("merged bf16", "transformers", merged, s, lambda: in_transformers(ref, merged))
        q4, s = timed(save_4bit, merged, root / "merged-q4")
        row("merged q4", "transformers", q4, s, lambda: in_transformers(ref, q4))
        for quant in GGUF:
            path, s = timed(export_gguf, merged, root / f"gguf-{quant}", quant)
            row(f"gguf {quant}", "llama.cpp", path, s, lambda: check_gguf(ref, path))
            shutil.rmtree(path.parent)
    out = ROOT / "benchmarks" / "results" / "export_cpu.json"
    out.write_text(json.dumps({"date": date.today().isoformat(), "machine": platform.machine(),
                               "cpu_count": os.cpu_count(), "reference_s": ref_s, "reference_unbatched_s": old_s,
                               "reference_same_tokens": True, "reference_tokens": ref.tokens,
                               "reference_prompts": len(ref.sequences), "versions": library_versions(),
                               "results": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
