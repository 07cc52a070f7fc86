"""What the job builds on an L4, built on this CPU (issue 36). The job's GPU decisions (the dtypes, the 4-bit
configuration, bf16 or fp16, gradient checkpointing, 8-bit AdamW for Full and Unsloth, pinned memory, the
device, FlashAttention) are made only where `torch.cuda` says a GPU is there; here `torch.cuda` says an L4
is (available, bf16, one device of 24 GB), and the job's own code builds each configuration, which TRL's
and transformers' own checks then validate. Nothing trains on the pretend GPU: gradient checkpointing, the one
of those decisions that changes how training computes, runs for real on the CPU in the last test."""

from __future__ import annotations

import pytest
import torch

from base import Prepared
from conftest import make_job, sample_request
from runtime.errors import PermanentError
from runtime.libraries import check_attention, trl_classes
from scripts.testbed import local_job

GB = 10**9
COMBINATIONS = [("huggingface", method, kind) for method in ("LoRA", "QLoRA", "Full")
                for kind in ("sft", "dpo", "orpo", "simpo", "grpo")] + [("unsloth", m, "sft") for m in ("LoRA", "QLoRA")]
GRADER = {"name": "says", "type": "string_check", "reference_field": "word", "operation": "ilike"}


class Device:
    name, major, minor, total_memory, multi_processor_count = "NVIDIA L4", 8, 9, 24 * GB, 58


@pytest.fixture
def gpu(monkeypatch):
    """torch.cuda as on a Cloud Run L4 (`bf16=False`: a pre-Ampere card), for the test's body only."""
    for kind in ("sft", "dpo", "orpo", "simpo", "grpo"):
        trl_classes(kind)  # imported on the CPU as they are: a library's import-time probes see no GPU

    def pretend(bf16: bool = True):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
        monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=0: Device())

    yield pretend
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # TrainingArguments made a CUDA PartialState


def request_for(tiny_root, provider: str, method: str, kind: str, **hp) -> dict:
    req = sample_request(tiny_root, provider=provider, method=method, trainer_type=kind,
                         reward_config=[GRADER] if kind == "grpo" else [])
    req["training_config"]["hyperparameters"].update(hp)
    return req


def built(job):
    config_cls, _ = trl_classes(job.cfg.trainer_type)
    return config_cls(**(job.trainer_kwargs(Prepared(None, None, None, 7)) | job.sft_overrides()))


@pytest.mark.parametrize("provider,method,kind", COMBINATIONS)
def test_every_configuration_an_l4_gets_is_built_and_validated(gpu, provider, method, kind, tmp_path, tiny_root):
    gpu()
    job = local_job(request_for(tiny_root, provider, method, kind), tmp_path)
    assert job.compute_dtype() == torch.bfloat16
    kwargs = job.base_model_kwargs()
    assert kwargs["dtype"] == torch.bfloat16 and "attn_implementation" not in kwargs
    quant = kwargs.get("quantization_config")
    if method == "QLoRA":
        assert quant.load_in_4bit and quant.bnb_4bit_quant_type == "nf4" and quant.bnb_4bit_use_double_quant
        assert quant.bnb_4bit_compute_dtype == torch.bfloat16 and not quant.load_in_8bit
    else:
        assert quant is None
    args = built(job)  # TRL's and transformers' checks, on a machine they take for a GPU one
    assert args.device == torch.device("cuda:0") and args.n_gpu == 1
    assert args.bf16 and not args.fp16 and not args.use_cpu
    assert args.gradient_checkpointing and args.dataloader_pin_memory
    eight_bit = method == "Full" or provider == "unsloth"
    assert (args.optim == "adamw_8bit") is eight_bit, args.optim
    if kind == "grpo":
        assert args.num_generations == job.cfg.hyperparameters.num_generations


def test_a_gpu_without_bf16_trains_in_fp16_and_flash_attention_needs_its_package(gpu, tmp_path, tiny_root):
    gpu(bf16=False)
    job = local_job(request_for(tiny_root, "huggingface", "QLoRA", "sft"), tmp_path)
    assert job.compute_dtype() == torch.float16
    assert job.base_model_kwargs()["quantization_config"].bnb_4bit_compute_dtype == torch.float16
    args = built(job)
    assert args.fp16 and not args.bf16 and args.device.type == "cuda"
    gpu()
    fa2 = local_job(request_for(tiny_root, "huggingface", "LoRA", "sft", use_fa2=True), tmp_path)
    assert fa2.base_model_kwargs()["attn_implementation"] == "flash_attention_2"
    with pytest.raises(PermanentError, match="flash-attn package is not installed"):  # not in this image
        check_attention(True)


@pytest.mark.parametrize("method", ["LoRA", "QLoRA"])
def test_gradient_checkpointing_as_on_a_gpu_trains_the_adapter_the_same(method, local_dir, tiny_root):
    """The L4 configuration's gradient checkpointing, on this CPU for real: with PEFT, transformers' input-grads
    hook lets the gradient reach the adapter through the checkpointed layers, and the adapter trained is the
    one trained without checkpointing (it recomputes the same forward pass, dropout's random draws included)."""
    adapters = {}
    for checkpointing in (False, True):
        req = request_for(tiny_root, "huggingface", method, "sft", max_steps=3, lora_dropout=0.1)
        job = make_job(local_dir, req, f"gc-{method}-{checkpointing}")
        prep = job.preflight()
        model = job.load_model(prep.tokenizer)
        initial = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
        trainer = job.build_trainer(model, prep)
        trainer.args.gradient_checkpointing = checkpointing  # what the L4 configuration sets (above)
        job.train(trainer)
        layers = [m for m in model.modules() if hasattr(m, "gradient_checkpointing")]
        assert layers and all(m.gradient_checkpointing == checkpointing for m in layers)
        hooks = model.get_input_embeddings()._forward_hooks
        assert (len(hooks) > 0) == checkpointing  # transformers' input-grads hook, only with checkpointing
        adapters[checkpointing] = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
        assert all(not torch.equal(adapters[checkpointing][n], initial[n]) for n in initial)  # every one trained
    for name, plain in adapters[False].items():
        torch.testing.assert_close(adapters[True][name], plain, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method", ["QLoRA", "LoRA"])
def test_the_base_stays_in_the_l4s_16_bits_under_lora_as_the_memory_model_counts_it(method, local_dir, tiny_root,
                                                                                    monkeypatch):
    """Loaded in the dtype the L4 configuration picks (bf16, above), on this CPU: every base parameter the 4-bit
    loader leaves unquantized (embeddings, norms; Gemma 4's experts and per-layer table) stays in bf16, as
    models/memory.py counts it, and only the adapter is fp32. PEFT's prepare_model_for_kbit_training casts them all to
    fp32, twice the memory the pre-flight allowed for (Gemma 3 4B's embeddings alone: 1.3 GB more)."""
    from models.memory import sixteen_bit_params

    job = make_job(local_dir, request_for(tiny_root, "huggingface", method, "sft"), f"dtype-{method}")
    monkeypatch.setattr(type(job), "compute_dtype", lambda self: torch.bfloat16)
    prep = job.preflight()
    model = job.load_model(prep.tokenizer)
    dtypes: dict[str, int] = {}
    for name, p in model.named_parameters():
        kind = "adapter" if "lora_" in name else "4-bit" if type(p).__name__ == "Params4bit" else "base"
        dtypes[f"{kind} {p.dtype}"] = dtypes.get(f"{kind} {p.dtype}", 0) + p.numel()
    base = model.get_base_model()
    expected = {"base torch.bfloat16": sixteen_bit_params(base) if method == "QLoRA" else
                sum(p.numel() for n, p in base.named_parameters() if "lora_" not in n)}
    assert {k: v for k, v in dtypes.items() if not k.startswith(("adapter", "4-bit"))} == expected
    assert set(k for k in dtypes if k.startswith("adapter")) == {"adapter torch.float32"}
