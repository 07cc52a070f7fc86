"""Gemma 3n's text (models/language_model.py), on the tiny whole checkpoint (scripts/tiny_gemma3n.py): its language
model trains alone (no tower is loaded for text), and its adapter and merges are keyed for the whole model that the
platform's inference service loads (AutoModelForImageTextToText, model.language_model.*). Its images:
tests/test_vision_gemma3n.py."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open

from conftest import make_job, read_doc, sample_request, train_steps


def tensors(path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.fixture(scope="module")
def trained(tiny_root, tmp_path_factory):
    local_dir = tmp_path_factory.mktemp("g3n")
    shutil.copytree(tiny_root / "gemma-dataset-bucket", local_dir / "gemma-dataset-bucket")
    req = sample_request(tiny_root, base_model_id=str(tiny_root / "models" / "tiny-gemma3n"))
    req["training_config"]["hyperparameters"].update(epochs=8, batch_size=16)
    job, prep, model, trainer, before, metrics = train_steps(local_dir, req, "gemma3n")
    adapter = job.export(trainer, prep.tokenizer, metrics, prep)
    req["training_config"]["export_config"].update(format="merged")
    merged = make_job(local_dir, req, "gemma3n-merged").export(trainer, prep.tokenizer, metrics, prep)
    req["training_config"]["export_config"].update(merged_dtype="q4")
    q4 = make_job(local_dir, req, "gemma3n-q4").export(trainer, prep.tokenizer, metrics, prep)
    return dict(model=model, before=before, metrics=metrics, adapter=adapter, merged=merged, q4=q4, local_dir=local_dir,
                doc=read_doc(local_dir, "gemma3n"), base=tiny_root / "models" / "tiny-gemma3n")


def test_the_language_model_trains_alone_and_learns(trained):
    assert type(trained["model"].base_model.model).__name__ == "Gemma3nForCausalLM"
    assert trained["metrics"]["eval_loss"] < 0.6 * trained["before"]["eval_loss"]
    assert trained["doc"]["dataset"]["dropped_rows"] == 0
    assert {m.rsplit(".", 1)[-1] for m in trained["doc"]["lora_targets"]["modules"]} == \
        {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_the_adapter_is_checked_then_keyed_for_the_whole_model(trained):
    check = trained["adapter"]["verification"]["adapter"]
    assert check["consumer"] == "PEFT" and check["top1_agreement"] >= check["required"]
    folder = trained["local_dir"] / "gemma-export-bucket" / "trained_adapters" / "gemma3n"
    base = tensors(trained["base"] / "model.safetensors")
    keys = list(tensors(folder / "adapter_model.safetensors"))
    assert keys and all(k.startswith("base_model.model.model.language_model.layers.") for k in keys)
    # each adapted layer is a weight of the whole checkpoint, by the path the whole model gives it
    for key in keys:
        layer = key.removeprefix("base_model.model.").rsplit(".lora_", 1)[0]
        assert layer + ".weight" in base, key


def test_the_merge_is_the_whole_checkpoint_with_the_trained_language_model(trained):
    check = trained["merged"]["verification"]["merged"]
    assert check["consumer"] == "transformers" and check["top1_agreement"] >= check["required"]
    folder = trained["local_dir"] / "gemma-export-bucket" / "merged_models" / "gemma3n-merged"
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "gemma3n" and config["architectures"] == ["Gemma3nForConditionalGeneration"]
    base, merged = tensors(trained["base"] / "model.safetensors"), tensors(folder / "model.safetensors")
    assert set(merged) == set(base)  # every tensor where the whole model has it, towers and embedders included
    towers = [k for k in base if not k.startswith("model.language_model.")]
    assert towers and all(torch.equal(merged[k], base[k]) for k in towers)
    q = "model.language_model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(merged[q], base[q])  # the adapter merged in


def test_a_4_bit_merge_is_the_whole_model_in_4_bits_and_passes_its_check(trained, tiny_root):
    """merged_dtype q4: the whole merged checkpoint loaded 4-bit (its image tower built by timm) and saved; its
    check against the trained model passes. Where timm cannot be imported, the request is refused before
    training, naming the field and the library."""
    import sys

    from models.base_models import check_base_model
    from runtime.errors import PermanentError

    check = trained["q4"]["verification"]["merged"]
    assert check["form"] == "q4" and check["passed"] is True
    folder = trained["local_dir"] / "gemma-export-bucket" / "merged_models" / "gemma3n-q4"
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["Gemma3nForConditionalGeneration"]
    assert config["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    names = tensors(folder / "model.safetensors")
    assert any(k.startswith("model.vision_tower.timm_model.") for k in names)
    sys.modules["timm"] = None  # as where it is not installed
    try:
        with pytest.raises(PermanentError, match="export_config.merged_dtype: 'q4' .*Gemma 3n.*built by timm"):
            check_base_model(str(tiny_root / "models" / "tiny-gemma3n"), None, False, False, merged_q4=True)
    finally:
        del sys.modules["timm"]
    assert check_base_model(str(tiny_root / "models" / "tiny-gemma3n"), None, False, False).name == "Gemma 3n"


def test_qlora_keeps_the_altup_coefficients_in_16_bits_and_trains(local_dir, tiny_root):
    """Gemma 3n's forward pass clamps its AltUp coefficients in place while training, which bitsandbytes' packed
    4-bit bytes cannot take: the 4-bit load leaves them in 16 bits, and QLoRA trains."""
    req = sample_request(tiny_root, base_model_id=str(tiny_root / "models" / "tiny-gemma3n"), method="QLoRA")
    req["training_config"]["hyperparameters"].update(epochs=3, batch_size=16)
    _, _, model, _, before, metrics = train_steps(local_dir, req, "gemma3n-qlora")
    kinds = {n.rsplit(".", 1)[-1]: type(m).__name__ for n, m in model.named_modules()
             if n.endswith(("prediction_coefs", "correction_coefs", "modality_router", "q_proj.base_layer"))}
    assert kinds["prediction_coefs"] == kinds["correction_coefs"] == kinds["modality_router"] == "Linear"
    assert kinds["base_layer"] == "Linear4bit"
    assert metrics["eval_loss"] < 0.8 * before["eval_loss"]


CONSUMER_CHECK = """
import json, sys, torch, peft
from transformers import Gemma3nForCausalLM
merged, adapter, ids = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
model, info = Gemma3nForCausalLM.from_pretrained(merged, torch_dtype=torch.float32, output_loading_info=True)
with torch.no_grad():
    logits = model(torch.tensor([ids])).logits[0].tolist()
config = peft.PeftConfig.from_pretrained(adapter)
print(json.dumps({"missing": info["missing_keys"], "logits": logits, "targets": sorted(config.target_modules)}))
"""


def test_the_exports_read_in_the_inference_services_pinned_versions(trained):
    """In the inference service's transformers 4.56 and PEFT 0.14: the whole merged checkpoint gives the text
    decoder every weight it has, with the logits the job's transformers gives, and the adapter's config reads.
    (The service builds the whole model, towers included, which needs timm: not importable here.)"""
    import subprocess

    from test_consumers import consumer
    from transformers import Gemma3nForCausalLM

    export = trained["local_dir"] / "gemma-export-bucket"
    merged, adapter = export / "merged_models" / "gemma3n-merged", export / "trained_adapters" / "gemma3n"
    ids = [2, 13, 40, 71, 100, 150, 200]
    out = subprocess.run([consumer(), "-c", CONSUMER_CHECK, str(merged), str(adapter), json.dumps(ids)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    found = json.loads(out.stdout.strip().splitlines()[-1])
    assert found["missing"] == [] and found["targets"] == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    with torch.no_grad():
        ours = Gemma3nForCausalLM.from_pretrained(str(merged), dtype=torch.float32)(torch.tensor([ids])).logits[0]
    assert torch.allclose(torch.tensor(found["logits"]), ours, atol=1e-3)


def test_the_language_model_alone_never_generates_a_token_it_cannot_read_back(tiny_root):
    """Gemma 3n's language model alone has per-layer embeddings for its text tokens only: a media token generated
    (the tiny model's own greedy choice after a few steps, here forced by raising one's logit) would end the next
    forward pass ("index out of range"). The job's generation never picks one, and the same model compared with
    that reference agrees on every decided position: the tokens left out of the reference are left out of every
    model's choice."""
    from transformers import Gemma3nForCausalLM

    from exporting.verification import agreement, greedy_reference, transformers_predict
    from models.language_model import unreadable_tokens

    model = Gemma3nForCausalLM.from_pretrained(str(tiny_root / "models" / "tiny-gemma3n"), dtype=torch.float32)
    never = unreadable_tokens(model.config)
    config = model.config
    assert never == list(range(config.vocab_size_per_layer_input, config.vocab_size)) and len(never) == 256
    media = never[100]

    def favour_a_media_token(module, args, output):
        output[..., media] += 100.0
        return output

    model.lm_head.register_forward_hook(favour_a_media_token)
    prompts = [[2, 5, 40, 71, 100], [2, 5, 13]]
    ref = greedy_reference(model, prompts, {1, 6}, 0, max_new_tokens=6)
    continuations = [seq[start:] for seq, start in zip(ref.sequences, ref.starts)]
    assert all(continuations) and not any(t in never for c in continuations for t in c)
    # the cached, batched generate and the full forward pass may part on a near tie; every decided position agrees
    found = agreement(ref, transformers_predict(model, ref))
    assert found.decided > 0 and found.same == found.decided, found
