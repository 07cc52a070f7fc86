"""QLoRA and full fine-tuning through the Hugging Face provider on the tiny Gemma 3 (CPU)."""

from __future__ import annotations

import torch

from conftest import make_job, sample_request
from training.data import load_tokenizer


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
    artifacts = job.export(trainer, prep.tokenizer, metrics, prep)
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
    # checked against the model as trained, on its 4-bit base: what a 4-bit base explains is allowed
    check = artifacts["verification"]["merged"]
    assert check["required"] == 0.8 and check["top1_agreement"] >= 0.9
    print(f"QLoRA merged bf16 against the 4-bit trained model: {check}")


def test_qlora_base_is_4bit(local_dir, tiny_root):
    import bitsandbytes as bnb

    job = make_job(local_dir, sample_request(tiny_root, method="QLoRA"), "q4")
    model = job.load_model(load_tokenizer(job.cfg.base_model_id, None, False))
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


def test_memory_estimate_matches_gemma_sizes_and_refuses_what_cannot_fit(local_dir, tiny_root):
    from transformers import Gemma3TextConfig

    from models.memory import GIB, count_params, estimate_bytes, fit_message

    gemma_1b = Gemma3TextConfig(vocab_size=262144, hidden_size=1152, intermediate_size=6912, num_hidden_layers=26,
                                num_attention_heads=4, num_key_value_heads=1, head_dim=256)
    total, emb = count_params(gemma_1b)
    assert round(total / 1e9, 2) == 1.0 and emb == 262144 * 1152  # Gemma 3 1B's published size
    full = estimate_bytes(total, emb, "Full", 2, 1024, gemma_1b)
    assert full["weights_and_optimizer"] == 6 * total
    assert fit_message(full, 22 * GIB, "Full", "g", 2, 1024) is None
    too_big = fit_message(estimate_bytes(4 * total, emb, "Full", 2, 1024, gemma_1b), 22 * GIB, "Full", "g", 2, 1024)
    assert too_big.startswith("training_config.method: Full on g needs about") and "use method 'LoRA'" in too_big
    assert estimate_bytes(total, emb, "QLoRA", 2, 1024, gemma_1b)["total"] < estimate_bytes(
        total, emb, "LoRA", 2, 1024, gemma_1b)["total"]
    from models.memory import table

    # docs/request.md's table: the published sizes, 4B and 12B with their vision towers
    sizes = {row["model"]: round(row["params_b"], 1) for row in table()}
    assert sizes == {"gemma-3-270m": 0.3, "gemma-3-1b": 1.0, "gemma-3-4b": 4.3, "gemma-3-12b": 12.2}


def test_container_memory_estimate_where_the_disk_is_memory():
    """Cloud Run (32 GiB): the base's cached files, the merge and the GGUF are memory too."""
    import pytest

    from models.memory import GIB, PROCESS, check_host, host_bytes
    from runtime.errors import PermanentError
    from schema import TrainRequest

    def cfg(method="QLoRA", **export):
        return TrainRequest.model_validate({"processed_dataset_id": "d", "training_config": {
            "base_model_id": "g", "method": method, "export_config": export}}).training_config

    b4, b12 = int(4.30e9), int(12.19e9)
    e4, e12 = 262144 * 2560, 262144 * 3840  # their embeddings

    def host_bytes4(c, cache_dropped=False):
        return host_bytes(b4, e4, c, cache_dropped)

    adapter = host_bytes4(cfg())
    assert adapter == {"train": 2 * b4 + PROCESS, "total": 2 * b4 + PROCESS}  # only the cached base
    both = host_bytes4(cfg(format="merged", include_gguf=True, gguf_quantization="q4_k_m"), cache_dropped=True)
    assert both["merge"] == both["total"] == 6 * b4 + PROCESS  # cache + the base in RAM + the merge
    assert both["gguf"] == pytest.approx((2 + 2 + 0.62) * b4 + PROCESS)  # the merge + the f16 + the k-quant
    # the merge is dropped once converted when it is not exported itself
    only_gguf = host_bytes4(cfg(include_gguf=True, gguf_quantization="q4_k_m"), cache_dropped=True)
    assert only_gguf["gguf"] == pytest.approx(both["gguf"] - 2 * b4)
    assert host_bytes4(cfg("Full"))["train"] == (2 + 2 * 4) * b4 + PROCESS  # two local checkpoints
    # the 4-bit save: the 16-bit merge, and its quantized files with the embeddings still in bf16
    q4 = host_bytes4(cfg(format="merged", merged_dtype="q4"), cache_dropped=True)["quantize_4bit"]
    assert q4 == pytest.approx(2 * b4 + 2 * e4 + 0.52 * (b4 - e4) + PROCESS)
    # an image+text job's GGUF has its projector beside it: the SigLIP tower (417M on 4B) in f16
    text_job = cfg(format="merged", include_gguf=True, gguf_quantization="q4_k_m")
    vision = text_job.model_copy(update={"modality": "vision"})
    assert host_bytes(b4, e4, vision, True, tower=417_000_000)["gguf"] == pytest.approx(both["gguf"] + 2 * 417e6)
    assert host_bytes(b4, e4, text_job, True, tower=417_000_000)["gguf"] == both["gguf"]  # no projector
    check_host(cfg(format="merged", include_gguf=True, gguf_quantization="q4_k_m"), b4, e4, 32 * GIB, True)
    check_host(cfg(), b12, e12, 32 * GIB)  # QLoRA on 12B with its adapter fits
    with pytest.raises(PermanentError, match=r"needs about 72.1 GiB of container memory at its merge stage .* "
                                             r"has 32.0 GiB; export format 'adapter'"):
        check_host(cfg(format="merged"), b12, e12, 32 * GIB, True)


def test_a_request_that_cannot_fit_the_gpu_is_refused_before_loading(local_dir, tiny_root):
    import main
    from conftest import env_for, put_request, read_doc

    put_request(local_dir, "oom", sample_request(tiny_root, method="Full"))
    assert main.main([], env_for(local_dir, "oom", GPU_MEMORY_GIB="0.01")) == 2
    doc = read_doc(local_dir, "oom")
    assert "needs about" in doc["error"] and "but the GPU has 0.0 GiB" in doc["error"]
    assert doc["phase"] == "validating"
    put_request(local_dir, "fits", sample_request(tiny_root, method="Full"))
    assert main.main(["--validate"], env_for(local_dir, "fits", GPU_MEMORY_GIB="22")) == 0
    # the container's memory, where the disk is memory: the process alone is counted as 4 GiB
    put_request(local_dir, "host", sample_request(tiny_root))
    assert main.main([], env_for(local_dir, "host", HOST_MEMORY_GIB="2")) == 2
    doc = read_doc(local_dir, "host")
    assert "of container memory at its train stage" in doc["error"] and doc["phase"] == "validating"
    put_request(local_dir, "host-ok", sample_request(tiny_root))
    assert main.main(["--validate"], env_for(local_dir, "host-ok", HOST_MEMORY_GIB="8")) == 0
