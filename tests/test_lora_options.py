"""The LoRA options users reach for (issue 22): DoRA, rsLoRA, a choice of target modules, NEFTune. Each is a
schema field that reaches PEFT or TRL through the one mapping, trains, and exports an adapter that PEFT loads
with the option set and that reproduces the trained logits."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import make_job, sample_request
from runtime.errors import RequestError
from runtime.request import parse_request


def train(local_dir, tiny_root, job_id, export=None, **hp):
    req = sample_request(tiny_root, **({"export_config": export} if export else {}))
    req["training_config"]["hyperparameters"].update(epochs=2, **hp)
    job = make_job(local_dir, req, job_id)
    prep = job.preflight()
    model = job.load_model(prep.tokenizer)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = job.build_trainer(model, prep)
    job.train(trainer)
    return job, prep, trainer, before


def logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


@pytest.mark.parametrize("option", ["use_dora", "use_rslora"])
def test_dora_and_rslora_train_and_their_adapters_reproduce_the_trained_logits(option, local_dir, tiny_root):
    """Trained with the option; the adapter loads in PEFT with it set and gives the trained logits; the job's
    export (an adapter for rsLoRA, the merge for DoRA: see below) agrees with the trained model."""
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM

    export = {"format": "merged"} if option == "use_dora" else None
    job, prep, trainer, before = train(local_dir, tiny_root, option, export, **{option: True})
    peft_config = trainer.model.peft_config["default"]
    assert getattr(peft_config, option) is True
    if option == "use_dora":  # DoRA's magnitude vectors, trained beside lora_A and lora_B
        assert any("lora_magnitude_vector" in n for n, p in trainer.model.named_parameters() if p.requires_grad)
    else:  # rsLoRA's scale: alpha / sqrt(r), not alpha / r
        layer = trainer.model.base_model.model.model.layers[0].self_attn.q_proj
        assert layer.scaling["default"] == pytest.approx(peft_config.lora_alpha / peft_config.r ** 0.5)
    ids = prep.eval.rows[0]["input_ids"]
    trained = logits(trainer.model.eval(), ids)
    adapter = local_dir / f"{option}-adapter"
    trainer.model.save_pretrained(str(adapter))
    assert json.loads((adapter / "adapter_config.json").read_text())[option] is True
    assert getattr(PeftConfig.from_pretrained(str(adapter)), option) is True
    base = AutoModelForCausalLM.from_pretrained(job.cfg.base_model_id, dtype=torch.float32)
    assert torch.allclose(logits(PeftModel.from_pretrained(base, str(adapter)).eval(), ids), trained, atol=1e-4)
    artifacts = job.export(trainer, prep.tokenizer, {}, prep)
    exported = "merged" if export else "adapter"
    assert artifacts["verification"][exported]["top1_agreement"] == 1.0
    folder = job.services.blobs.path(artifacts["adapter_path"])
    if exported == "adapter":
        assert json.loads((folder / "adapter_config.json").read_text())[option] is True


def test_a_dora_adapter_serves_what_was_trained_in_the_inference_service(local_dir, tiny_root):
    """The platform's inference service loads an adapter folder with `AutoModelForCausalLM.from_pretrained`
    (transformers 4.56.0, peft 0.14.0): a DoRA adapter gives the trained logits there, and through PEFT in
    the job's libraries. transformers 5.17's own adapter loading does not (a trap the card warns of):
    should that part start failing, transformers has mended it and the card's warning can go."""
    from peft import AutoPeftModelForCausalLM
    from test_consumers import consumer_loads
    from transformers import AutoModelForCausalLM

    job, prep, trainer, _ = train(local_dir, tiny_root, "dora", use_dora=True)
    artifacts = job.export(trainer, prep.tokenizer, {}, prep)
    folder = job.services.blobs.path(artifacts["adapter_path"])
    got = consumer_loads({"dora": folder}, local_dir)["dora"]
    assert (got["peft"], got["transformers"]) == ("0.14.0", "4.56.0")
    ours = logits(AutoPeftModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval(), got["input_ids"])
    assert torch.allclose(torch.tensor(got["auto_logits"]), ours, atol=1e-4)  # the service's way
    assert torch.allclose(torch.tensor(got["peft_logits"]), ours, atol=1e-4)
    plain = logits(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval(), got["input_ids"])
    assert (plain - ours).abs().max() > 1e-2
    assert "AutoPeftModelForCausalLM" in (folder / "README.md").read_text()
    assert "DoRA" in (folder / "README.md").read_text()


def test_chosen_target_modules_are_the_only_ones_adapted(local_dir, tiny_root):
    job, prep, trainer, before = train(local_dir, tiny_root, "qv", lora_target_modules=["q_proj", "v_proj"])
    adapted = {n.split(".lora_")[0].rsplit(".", 1)[1] for n, _ in trainer.model.named_parameters() if ".lora_" in n}
    assert adapted == {"q_proj", "v_proj"}
    changed = {n for n, p in trainer.model.named_parameters() if n in before and not torch.equal(p, before[n])}
    assert changed and all(".q_proj.lora_" in n or ".v_proj.lora_" in n for n in changed)
    assert set(trainer.model.peft_config["default"].target_modules) == {"q_proj", "v_proj"}


def test_a_module_the_model_lacks_is_a_permanent_error_naming_the_field(local_dir, tiny_root):
    import main
    from conftest import env_for, put_request, read_doc

    req = sample_request(tiny_root)
    req["training_config"]["hyperparameters"]["lora_target_modules"] = ["q_proj", "qkv_proj"]
    put_request(local_dir, "nomod", req)
    assert main.main([], env_for(local_dir, "nomod")) == 2
    doc = read_doc(local_dir, "nomod")
    assert doc["error_type"] == "permanent" and doc["error"].startswith("hyperparameters.lora_target_modules: ")
    assert "qkv_proj" in doc["error"] and "'all-linear'" in doc["error"]


def test_all_linear_adapts_every_linear_layer_of_the_decoder(local_dir, tiny_root):
    req = sample_request(tiny_root)
    req["training_config"]["hyperparameters"]["lora_target_modules"] = "all-linear"
    job = make_job(local_dir, req, "all")
    model = job.load_model(job.preflight().tokenizer)
    adapted = {n.split(".lora_")[0].rsplit(".", 1)[1] for n, _ in model.named_parameters() if ".lora_" in n}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_8bit_loads_linear8bitlt_layers_trains_and_exports_a_verified_adapter(local_dir, tiny_root):
    import bitsandbytes as bnb
    from transformers import AutoConfig

    from models.memory import count_params, estimate_bytes, int8_bytes

    job, prep, trainer, before = train(local_dir, tiny_root, "int8", {"format": "merged"}, load_in_8bit=True)
    layers = [m for n, m in trainer.model.named_modules() if n.endswith("mlp.down_proj.base_layer")]
    assert layers and all(isinstance(m, bnb.nn.Linear8bitLt) for m in layers)
    changed = {n for n, p in trainer.model.named_parameters() if n in before and not torch.equal(p, before[n])}
    assert changed and all(".lora_" in n for n in changed)  # the 8-bit base stayed as it was
    metrics = job.evaluate(trainer, prep, {})
    assert metrics["eval_loss"] < 3.5  # it learned (the base starts at about 6.2)
    artifacts = job.export(trainer, prep.tokenizer, metrics, prep)
    check = artifacts["verification"]["merged"]  # merged into the 16-bit base, checked against the 8-bit model
    assert check["top1_agreement"] >= check["required"]
    config = AutoConfig.from_pretrained(job.cfg.base_model_id)
    total, embeddings = count_params(config)
    weights = estimate_bytes(total, embeddings, "LoRA", 2, 64, config, load_in_8bit=True)["weights_and_optimizer"]
    assert weights == int8_bytes(total, embeddings) < estimate_bytes(total, embeddings, "LoRA", 2, 64,
                                                                     config)["weights_and_optimizer"]


def test_neftune_reaches_trl_and_the_trainer(local_dir, tiny_root):
    from runtime.libraries import trl_classes

    req = sample_request(tiny_root)
    req["training_config"]["hyperparameters"]["neftune_noise_alpha"] = 5.0
    job = make_job(local_dir, req, "neft")
    prep = job.preflight()
    config_cls, _ = trl_classes("sft")
    assert config_cls(**job.trainer_kwargs(prep)).neftune_noise_alpha == 5.0
    trainer = job.build_trainer(job.load_model(prep.tokenizer), prep)
    assert trainer.args.neftune_noise_alpha == 5.0
    assert make_job(local_dir, sample_request(tiny_root), "plain").trainer_kwargs(prep)["neftune_noise_alpha"] is None


def request_with(tc: dict, **hp) -> str:
    return json.dumps({"processed_dataset_id": "d", "training_config": {
        "base_model_id": "m", **tc, "hyperparameters": hp}})


@pytest.mark.parametrize("tc,hp", [
    ({}, {"use_dora": True}), ({}, {"use_rslora": True, "lora_target_modules": ["q_proj", "self_attn.v_proj"]}),
    ({}, {"lora_target_modules": "all-linear"}), ({}, {"neftune_noise_alpha": 5}),
    ({"provider": "unsloth"}, {"use_rslora": True, "lora_target_modules": ["q_proj"]}),
    ({"method": "QLoRA", "export_config": {"format": "gguf"}}, {"use_dora": True}),
    ({"method": "LoRA"}, {"load_in_8bit": True}),
    ({}, {"modules_to_save": ["lm_head", "model.norm"]}),
    ({"peft_method": "lora"}, {"use_rslora": True}),
])
def test_lora_options_accepted(tc, hp):
    cfg = parse_request(request_with(tc, **hp)).training_config
    assert all(getattr(cfg.hyperparameters, k) == v for k, v in hp.items())


@pytest.mark.parametrize("tc,hp,message", [
    ({"method": "Full"}, {"use_dora": True}, "use_dora: LoRA options, and method 'Full' trains every weight"),
    ({"method": "Full"}, {"lora_target_modules": ["q_proj"]}, "lora_target_modules: LoRA options"),
    ({"provider": "unsloth", "export_config": {"format": "merged"}}, {"use_dora": True},
     "provider 'unsloth' with `use_dora: true`"),
    ({"provider": "unsloth"}, {"lora_target_modules": "all-linear"}, "Unsloth takes module names"),
    ({"trainer_type": "dpo"}, {"neftune_noise_alpha": 5}, "neftune_noise_alpha is an SFT option"),
    ({"method": "QLoRA"}, {"load_in_8bit": True}, "QLoRA loads the base in 4 bits already"),
    ({"method": "Full"}, {"load_in_8bit": True}, "load_in_8bit is for method 'LoRA'"),
    ({"method": "LoRA", "provider": "unsloth"}, {"load_in_8bit": True}, "provider 'unsloth' with `load_in_8bit"),
    ({}, {"neftune_noise_alpha": 0}, "neftune_noise_alpha: Input should be greater than 0"),
    ({}, {"lora_target_modules": []}, "name at least one module"),
    ({}, {"lora_target_modules": ["q_proj", "q proj;"]}, "are not module names"),
    ({}, {"lora_target_modules": ["q_proj", "q_proj"]}, "a module is named twice"),
    ({}, {"lora_target_modules": "every-linear"}, "lora_target_modules"),
    ({}, {"modules_to_save": []}, "leave modules_to_save unset"),
    ({"method": "Full"}, {"modules_to_save": ["lm_head"]}, "modules_to_save: LoRA options"),
    ({"provider": "unsloth"}, {"modules_to_save": ["lm_head"]}, "provider 'unsloth' with modules_to_save"),
    ({}, {"modules_to_save": ["q_proj"]}, "['q_proj'] in both lora_target_modules and modules_to_save"),
    ({"peft_method": "adalora"}, {}, "peft_method 'adalora': AdaLoRA reallocates its ranks only when"),
    ({"peft_method": "ia3"}, {}, "peft_method: Input should be 'lora' or 'adalora'"),
])
def test_lora_options_refused_with_the_field_named(tc, hp, message):
    with pytest.raises(RequestError) as err:
        parse_request(request_with(tc, **hp))
    assert message in str(err.value), str(err.value)


def test_modules_to_save_trains_them_whole_and_the_adapter_carries_them(local_dir, tiny_root):
    """model.norm and lm_head (tied to embed_tokens in Gemma) trained whole beside LoRA: both change, the base's
    embedding stays, and the exported adapter holds them and reproduces the trained logits in PEFT."""
    from peft import AutoPeftModelForCausalLM
    from safetensors.torch import load_file

    job, prep, trainer, before = train(local_dir, tiny_root, "saved", modules_to_save=["model.norm", "lm_head"])
    trained = {n: p for n, p in trainer.model.named_parameters() if p.requires_grad}
    copies = sorted(n for n in trained if ".modules_to_save." in n)
    assert copies == ["base_model.model.lm_head.modules_to_save.default.weight",
                      "base_model.model.model.norm.modules_to_save.default.weight"]
    embedding = "base_model.model.model.embed_tokens.weight"  # lm_head's original weight: one tensor, tied
    assert not torch.equal(trained[copies[0]], before[embedding])
    assert not torch.equal(trained[copies[1]], before["base_model.model.model.norm.original_module.weight"])
    assert torch.equal(dict(trainer.model.named_parameters())[embedding], before[embedding])
    ids = prep.eval.rows[0]["input_ids"]
    ours = logits(trainer.model.eval(), ids)
    artifacts = job.export(trainer, prep.tokenizer, {}, prep)
    assert artifacts["verification"]["adapter"]["top1_agreement"] == 1.0
    folder = job.services.blobs.path(artifacts["adapter_path"])
    assert sorted(json.loads((folder / "adapter_config.json").read_text())["modules_to_save"]) == \
        ["lm_head", "model.norm"]
    saved = load_file(str(folder / "adapter_model.safetensors"))
    assert {"base_model.model.lm_head.weight", "base_model.model.model.norm.weight"} <= set(saved)
    loaded = AutoPeftModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert torch.allclose(logits(loaded, ids), ours, atol=1e-4)


@pytest.mark.parametrize("saved,export,message", [
    (["lm_head"], {"format": "merged"}, "is one weight shared by model.embed_tokens and lm_head"),
    (["embed_tokens"], {"include_gguf": True}, "export format 'adapter' without include_gguf"),
    (["norm"], None, "'norm' also matches ['model.layers.0.self_attn.q_norm'"),
    (["final_norm"], None, "['final_norm'] name no module"),
])
def test_modules_to_save_refused_at_preflight_naming_the_field(saved, export, message, local_dir, tiny_root):
    """Exit 2 before any weight is loaded: a tied embedding saved whole where the export merges, a name PEFT would
    match elsewhere too, a name the model lacks."""
    import main
    from conftest import env_for, put_request, read_doc

    req = sample_request(tiny_root, **({"export_config": export} if export else {}))
    req["training_config"]["hyperparameters"]["modules_to_save"] = saved
    put_request(local_dir, "saved", req)
    assert main.main([], env_for(local_dir, "saved")) == 2
    doc = read_doc(local_dir, "saved")
    assert doc["error_type"] == "permanent" and doc["error"].startswith("hyperparameters.modules_to_save: ")
    assert message in doc["error"], doc["error"]
    assert doc["phase"] == "validating"


def test_modules_to_save_are_in_the_memory_estimate(tiny_root):
    from transformers import AutoConfig

    from models.memory import count_params, empty_model, estimate_bytes, saved_params

    config = AutoConfig.from_pretrained(str(tiny_root / "models" / "tiny-gemma3"))
    model = empty_model(config)
    assert saved_params(model, ["lm_head"]) == config.vocab_size * config.hidden_size
    assert saved_params(model, ["lm_head", "embed_tokens"]) == config.vocab_size * config.hidden_size  # tied
    assert saved_params(model, None) == 0
    total, embeddings = count_params(config, model)
    plain, saved = (estimate_bytes(total, embeddings, "QLoRA", 2, 64, config, saved=n)["total"] for n in (0, 1000))
    assert saved - plain == 16 * 1000


def test_no_trainer_of_the_pinned_versions_calls_adalora_s_allocator():
    """The reason peft_method 'adalora' is refused, kept true: should transformers' Trainer or TRL start
    calling update_and_allocate, this fails and AdaLoRA can be built."""
    import inspect

    import transformers.trainer
    import trl

    from runtime.libraries import trl_classes

    sources = [inspect.getsource(transformers.trainer)] + [inspect.getsource(inspect.getmodule(trl_classes(kind)[1]))
                                                           for kind in ("sft", "dpo", "orpo", "grpo")]
    assert trl.__version__ == "1.14.2" and all("update_and_allocate" not in src for src in sources)
