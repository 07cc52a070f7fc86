"""QLoRA and full fine-tuning through the Hugging Face provider on the tiny Gemma 3 (CPU)."""

from __future__ import annotations

import torch

from conftest import make_job, sample_request


def train_and_export(local_dir, tiny_root, method, job_id):
    req = sample_request(tiny_root, method=method)
    req["training_config"]["hyperparameters"]["epochs"] = 3
    req["training_config"]["export_config"] = {"format": "merged"}
    job = make_job(local_dir, req, job_id)
    prep = job.preflight()
    model = job.load_model(prep.tokenizer)
    before = {n: p.detach().float().clone() for n, p in model.named_parameters()}
    trainer = job.build_trainer(model, prep)
    loss_before = trainer.evaluate()["eval_loss"]
    job.train(trainer)
    metrics = job.evaluate(trainer, prep, {})
    artifacts = job.export(trainer, prep.tokenizer, metrics)
    changed = {n for n, p in trainer.model.named_parameters() if not torch.equal(p.detach().float(), before[n])}
    return job, trainer, loss_before, metrics, artifacts, changed


def test_qlora_trains_adapter_on_4bit_base_and_merges_in_16bit(local_dir, tiny_root):
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM

    job, _, loss_before, metrics, artifacts, changed = train_and_export(local_dir, tiny_root, "QLoRA", "q")
    assert metrics["eval_loss"] < 0.8 * loss_before
    assert changed and all("lora_" in n for n in changed)
    assert artifacts["artifacts"]["raw"]["merged"] == "gs://gemma-export-bucket/merged_models/q/"
    merged = AutoModelForCausalLM.from_pretrained(str(job.services.blobs.path(artifacts["adapter_path"])))
    assert merged.dtype == torch.bfloat16
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in merged.modules())  # merged into 16-bit, not 4-bit


def test_qlora_base_is_4bit(local_dir, tiny_root):
    import bitsandbytes as bnb

    job = make_job(local_dir, sample_request(tiny_root, method="QLoRA"), "q4")
    model = job.load_model(job.load_tokenizer())
    q = model.get_base_model().model.layers[0].self_attn.q_proj.base_layer
    assert isinstance(q, bnb.nn.Linear4bit) and q.weight.quant_state.quant_type == "nf4"


def test_full_fine_tuning_updates_every_weight_and_exports_model(local_dir, tiny_root):
    job, trainer, loss_before, metrics, artifacts, changed = train_and_export(local_dir, tiny_root, "Full", "full")
    assert metrics["eval_loss"] < 0.8 * loss_before
    names = {n for n, _ in trainer.model.named_parameters()}
    assert any("mlp.down_proj.weight" in n for n in changed) and not any("lora_" in n for n in names)
    folder = job.services.blobs.path(artifacts["adapter_path"])
    assert artifacts["adapter_path"] == "gs://gemma-export-bucket/merged_models/full/"
    assert (folder / "model.safetensors").is_file() and not (folder / "adapter_config.json").exists()
