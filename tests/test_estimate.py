"""Time and cost before training (models/estimate.py): the table in the repo and its sources, the estimate of a
request on a real Gemma size, and through whole jobs: --validate and `gemma-job submit --estimate` print it, the
document keeps it, and as the job runs its progress carries the cost so far and the cost to finish."""

from __future__ import annotations

import json
import sys

import pytest

import main
from conftest import ROOT, env_for, put_request, read_doc, sample_request
from test_auto_batch import config_for, shaped


def test_the_table_is_what_its_script_writes_and_says_where_each_entry_comes_from():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from throughput_table import entries

    from models.estimate import TABLE

    committed = json.loads(TABLE.read_text())
    assert committed["gpu"] == "NVIDIA L4" and committed["entries"] == json.loads(json.dumps(entries()))
    models = {e["model"] for e in committed["entries"]}
    assert models == {"gemma-3-270m", "gemma-3-1b", "gemma-3-4b", "gemma-3-12b"}
    assert all(e["source"].startswith(("modelled: ", "measured on ")) for e in committed["entries"])
    by = {(e["model"], e["method"], e["seq"]): e["tokens_per_s"] for e in committed["entries"]}
    assert by[("gemma-3-1b", "LoRA", 1024)] > by[("gemma-3-4b", "LoRA", 1024)] > by[("gemma-3-12b", "LoRA", 1024)]
    assert by[("gemma-3-1b", "QLoRA", 1024)] < by[("gemma-3-1b", "LoRA", 1024)]  # dequantizing costs time


def stats(rows: int, tokens: int, steps: int) -> dict:
    return {"train_rows": rows, "train_tokens": tokens, "total_steps": steps}


def test_a_1b_request_is_priced_from_its_table_entry(tmp_path):
    from models.estimate import DEFAULT_PRICE_PER_HOUR, estimate, estimate_text, model_shape, table
    from models.memory import meta_model

    folder = shaped(tmp_path, "gemma-3-1b")
    cfg = config_for(folder, "LoRA", epochs=2, max_length=1024)
    shape = model_shape(meta_model(str(folder), None, False), "LoRA")
    found = estimate(cfg, stats(1000, 512_000, 250), shape, None)  # rows of 512 tokens on average
    entry = next(e for e in table()["entries"] if (e["model"], e["method"], e["seq"]) == ("gemma-3-1b", "LoRA", 512))
    assert found["table_entry"]["tokens_per_s"] == entry["tokens_per_s"] and found["mean_row_tokens"] == 512
    assert found["tokens"] == 1_024_000 and found["tokens_per_s"] == pytest.approx(entry["tokens_per_s"], rel=0.01)
    assert found["seconds"] == pytest.approx(1_024_000 / found["tokens_per_s"], abs=1)
    assert DEFAULT_PRICE_PER_HOUR == 1.42 and found["price_per_hour_usd"] == 1.42
    assert found["cost_usd"] == pytest.approx(found["seconds"] / 3600 * 1.42, abs=1e-3)
    assert "modelled" in found["why"] and found["table_entry"]["source"].startswith("modelled")
    dpo = estimate(config_for(folder, "LoRA", epochs=2, max_length=1024).model_copy(update={"trainer_type": "dpo"}),
                   stats(1000, 512_000, 250), shape, 2.0)
    assert dpo["seconds"] == pytest.approx(1.5 * found["seconds"], rel=0.01) and dpo["price_per_hour_usd"] == 2.0
    assert estimate_text(found).startswith(f"estimate on NVIDIA L4 at $1.42/h (default: Cloud Run, 1 L4 + 8 vCPU + "
                                           f"32 GiB, list price (models/estimate.py)): training about "
                                           f"{found['seconds'] // 60}m")
    assert "training about 2h46m" in estimate_text(found | {"seconds": 9960})
    grpo = estimate(cfg.model_copy(update={"trainer_type": "grpo"}), stats(1000, 512_000, 250), shape, None)
    assert grpo["seconds"] is None and "sampling" in grpo["why"]


def test_validate_and_submit_estimate_print_it_and_the_job_keeps_it_and_its_running_cost(local_dir, tiny_root,
                                                                                        capsys):
    from operating import cli

    req = sample_request(tiny_root)
    req["training_config"]["hyperparameters"].update(max_steps=4, logging_steps=1)
    req["training_config"]["eval_config"] = {"eval_strategy": "no", "generation_rows": 0}
    put_request(local_dir, "est", req)
    assert main.main(["--validate"], env_for(local_dir, "est", GPU_PRICE_PER_HOUR="2.5")) == 0
    out = capsys.readouterr().out
    assert "estimate on NVIDIA L4 at $2.50/h (GPU_PRICE_PER_HOUR): training about" in out
    assert "far outside the table's sizes" in out  # the tiny model: scaled, and said so
    path = local_dir / "request.json"
    path.write_text(json.dumps(req))
    assert cli.main(["submit", str(path), "--estimate", "--job-id", "est2"], env_for(local_dir, "unused")) == 0
    assert "estimate on NVIDIA L4 at $1.42/h (default: Cloud Run" in capsys.readouterr().out
    assert not (local_dir / "firestore" / "training_jobs" / "est2.json").exists()  # nothing queued
    assert main.main([], env_for(local_dir, "est", GPU_PRICE_PER_HOUR="2.5")) == 0
    doc = read_doc(local_dir, "est")
    assert doc["estimate"]["price_per_hour_usd"] == 2.5 and doc["estimate"]["steps"] == 4
    assert doc["estimate"]["tokens"] > 0 and doc["estimate"]["cost_usd"] >= 0
    assert doc["cost"]["elapsed_usd"] > 0 and doc["cost"]["to_finish_usd"] == 0.0  # its last progress: step 4 of 4


def test_a_bad_price_exits_2_naming_it(local_dir, tiny_root, capsys):
    put_request(local_dir, "price", sample_request(tiny_root))
    assert main.main(["--validate"], env_for(local_dir, "price", GPU_PRICE_PER_HOUR="-1")) == 2
    assert "GPU_PRICE_PER_HOUR='-1'" in capsys.readouterr().err


def test_an_estimate_that_fails_costs_the_estimate_alone(local_dir, tiny_root, capsys, monkeypatch):
    import base

    def unreadable(*args, **kwargs):
        raise RuntimeError("no such architecture")

    monkeypatch.setattr(base, "model_shape", unreadable)  # the model the estimate reads, and only it
    put_request(local_dir, "noest", sample_request(tiny_root))
    assert main.main(["--validate"], env_for(local_dir, "noest")) == 0
    out = capsys.readouterr().out
    assert "request and dataset are valid" in out
    assert "estimate on NVIDIA L4 at $1.42/h (default): not estimated (RuntimeError: no such architecture)" in out


@pytest.mark.parametrize("model", ["tiny-gemma3", "tiny-gemma3-mm", "tiny-gemma3n", "tiny-gemma4", "tiny-gemma4-e2b",
                                   "tiny-gemma4-moe", "tiny-gemma4-unified"])
def test_every_family_is_estimated(model, tiny_root):
    """Gemma 4's config refuses a global head_dim (its sliding and full layers differ): the estimate reads the
    attention's width from the model itself, for every family the job trains."""
    from models.estimate import estimate, model_shape
    from models.memory import meta_model

    folder = tiny_root / "models" / model
    shape = model_shape(meta_model(str(folder), None, False), "LoRA")
    assert shape["d_attn"] > 0 and shape["layers"] >= 2
    found = estimate(config_for(folder, "LoRA"), stats(90, 3088, 36), shape, None)
    assert found["seconds"] is not None and found["tokens"] == 3 * 3088
