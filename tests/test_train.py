"""The Hugging Face provider on the tiny Gemma 3, step by step through the workflow: the loss falls,
metrics are what they claim, and the exported adapter reproduces the trained model."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch

from conftest import make_job, sample_request
from models.artifacts import sha256
from training.evaluation import token_accuracy


def test_token_accuracy_hand_counted():
    # position t predicts label t+1; -100 labels are not counted
    preds = np.array([[5, 7, 9, 1], [3, 3, 3, 3]])
    labels = np.array([[-100, 5, 7, 2], [-100, -100, 3, 4]])
    # row 0: pred 5 vs 5 ok, 7 vs 7 ok, 9 vs 2 wrong; row 1: 3 vs 3 ok, 3 vs 4 wrong  -> 3 of 5
    assert token_accuracy(preds, labels) == (3, 5)


@pytest.fixture(scope="module")
def trained(tiny_root, tmp_path_factory):
    local_dir = tmp_path_factory.mktemp("local")
    shutil.copytree(tiny_root / "gemma-dataset-bucket", local_dir / "gemma-dataset-bucket")
    # one eval batch (32 >= 18 eval rows), so the trainer's batch-averaged accuracy is the token-weighted one
    req = sample_request(tiny_root)
    req["training_config"]["hyperparameters"].update(batch_size=32, epochs=20)
    job = make_job(local_dir, req)
    prep = job.preflight()
    model = job.load_model(prep.tokenizer)
    base_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = job.build_trainer(model, prep)
    before = trainer.evaluate()
    train_metrics = job.train(trainer)
    metrics = job.evaluate(trainer, prep, train_metrics)
    artifacts = job.export(trainer, prep.tokenizer, metrics, prep)
    return dict(job=job, prep=prep, trainer=trainer, before=before, metrics=metrics, artifacts=artifacts,
                base_before=base_before, blobs=job.services.blobs)


def test_eval_loss_falls_clearly(trained):
    assert trained["metrics"]["eval_loss"] < 0.6 * trained["before"]["eval_loss"]


def test_perplexity_is_exp_eval_loss(trained):
    m = trained["metrics"]
    assert m["perplexity"] == pytest.approx(math.exp(m["eval_loss"]), rel=1e-12)
    assert {"accuracy", "perplexity", "eval_loss", "eval_runtime"} <= set(m)


def batch(prep, rows):
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.tensor([r["input_ids"] + [0] * (width - len(r["input_ids"])) for r in rows])
    labels = np.array([r["labels"] + [-100] * (width - len(r["labels"])) for r in rows])
    mask = (torch.arange(width)[None, :] < torch.tensor([len(r["input_ids"]) for r in rows])[:, None]).long()
    return ids, mask, labels


def test_accuracy_matches_independent_count(trained):
    model = trained["trainer"].model.eval()
    ids, mask, labels = batch(trained["prep"], trained["prep"].eval.rows)
    with torch.no_grad():
        preds = model(input_ids=ids, attention_mask=mask).logits.argmax(-1).numpy()
    correct, total = token_accuracy(preds, labels)
    assert trained["metrics"]["accuracy"] == pytest.approx(correct / total, abs=1e-6)
    assert correct / total > 0.5


def test_lora_changed_and_base_frozen(trained):
    params = dict(trained["trainer"].model.named_parameters())
    changed = {n for n, p in params.items() if not torch.equal(p.detach(), trained["base_before"][n])}
    assert changed and all("lora_" in n for n in changed)
    assert any("lora_B" in n for n in changed)


def test_exported_adapter_reproduces_trained_logits(trained):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    uri = trained["artifacts"]["adapter_path"]
    assert uri == "gs://gemma-export-bucket/trained_adapters/unit/"
    assert trained["artifacts"]["artifacts"] == {"raw": {"adapter": uri}}
    folder = trained["blobs"].path(uri)
    base = AutoModelForCausalLM.from_pretrained(trained["job"].cfg.base_model_id, dtype=torch.float32)
    loaded = PeftModel.from_pretrained(base, str(folder)).eval()
    ids, mask, _ = batch(trained["prep"], trained["prep"].eval.rows[:4])
    with torch.no_grad():
        want = trained["trainer"].model.eval()(input_ids=ids, attention_mask=mask).logits
        got = loaded(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(got, want, atol=1e-4)
    # the job's own check, before completion: PEFT on the base predicts the trained model's continuations
    check = trained["artifacts"]["verification"]["adapter"]
    assert check["consumer"] == "PEFT" and check["top1_agreement"] == 1.0 and check["tokens"] >= 60
    assert json.loads((folder / "manifest.json").read_text())["verification"] == {"adapter": check}


def test_export_layout_and_manifest(trained):
    folder = trained["blobs"].path(trained["artifacts"]["adapter_path"])
    custom = json.loads((folder / "custom_config.json").read_text())
    assert custom == {"job_id": "unit", "base_model_id": trained["job"].cfg.base_model_id,
                      "provider": "huggingface", "export_format": "adapter", "hf_repo_id": None}
    manifest = json.loads((folder / "manifest.json").read_text())
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "tokenizer.model",
            "custom_config.json"} <= set(manifest["files"])
    for name, entry in manifest["files"].items():
        assert sha256(folder / name) == entry["sha256"]
    assert manifest["versions"]["transformers"] and manifest["metrics"]["eval_loss"] == trained["metrics"]["eval_loss"]
    assert not (trained["job"].workdir / "export" / "adapter").exists()  # local copy deleted after upload


def test_the_adapter_s_model_card_says_what_was_trained_and_how_to_load_it(trained):
    """README.md in the adapter folder: the job's card, not PEFT's placeholder, with its values from this run."""
    from huggingface_hub import ModelCard

    folder = trained["blobs"].path(trained["artifacts"]["adapter_path"])
    card = ModelCard.load(folder / "README.md")
    job, m, check = trained["job"], trained["metrics"], trained["artifacts"]["verification"]["adapter"]
    hp = job.cfg.hyperparameters
    assert card.data.license == "apache-2.0"  # read from the base's own card (scripts/make_tiny.py writes it)
    assert card.data.library_name == "peft" and card.data.pipeline_tag == "text-generation"
    assert {"gemma", "lora", "sft"} <= set(card.data.tags)
    text = card.text
    assert "[More Information Needed]" not in text  # PEFT's placeholder is gone
    assert f"of `{job.cfg.base_model_id}` on the dataset `{job.request.processed_dataset_id}`" in text
    for name in ("lora_rank", "lora_alpha", "learning_rate", "epochs", "batch_size", "max_length"):
        assert f"| {name} | {getattr(hp, name)} |" in text, name
    assert f"| eval_loss | {m['eval_loss']:.4g} |" in text and f"| accuracy | {m['accuracy']:.4g} |" in text
    assert f"| adapter | adapter | PEFT | {check['top1_agreement']:.3f} | {check['required']:.2f} | " \
           f"{check['tokens']} |" in text
    uri = trained["artifacts"]["adapter_path"]
    assert f"gcloud storage cp -r {uri} ./model" in text
    assert 'AutoPeftModelForCausalLM.from_pretrained("./model")' in text
    assert "llama-cli" not in text  # no GGUF in this folder
    assert "README.md" in json.loads((folder / "manifest.json").read_text())["files"]  # checksummed like the rest


def test_token_accuracy_recomputed_when_the_trainer_reports_none(trained):
    """Unsloth replaces TRL's SFT compute_loss by transformers' (its fused loss has no logits), so TRL logs no
    token accuracy; evaluate() must then compute the same figure itself. Done here on the real trainer, with
    the same replacement Unsloth makes, over several eval batches (TRL averages per batch)."""
    import types

    from transformers import Trainer

    from training.evaluation import eval_token_accuracy

    job, trainer, prep = trained["job"], trained["trainer"], trained["prep"]
    assert eval_token_accuracy(trainer) == pytest.approx(trained["metrics"]["accuracy"], abs=1e-6)
    old_batch = trainer.args.per_device_eval_batch_size
    trainer.args.per_device_eval_batch_size = 4  # 18 eval rows: 5 batches, the last one short
    try:
        trl_figure = trainer.evaluate()["eval_mean_token_accuracy"]
        trainer.compute_loss = types.MethodType(Trainer.compute_loss, trainer)
        assert "eval_mean_token_accuracy" not in trainer.evaluate()
        metrics = job.evaluate(trainer, prep, {})
    finally:
        trainer.args.per_device_eval_batch_size = old_batch
        trainer.__dict__.pop("compute_loss", None)  # the class's own again, even if the swap never happened
    assert metrics["accuracy"] == pytest.approx(trl_figure, abs=1e-6)
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["eval_loss"]))
    assert job.timings["eval_token_accuracy"] > 0


def test_token_accuracy_takes_its_labels_off_the_gpu(trained, monkeypatch):
    """On a GPU the eval dataloader leaves the labels there, and numpy refuses them (this failed every Unsloth
    job on the H100, benchmarks/results/gpu-check-h100.md): stood in for by a tensor that refuses the same way."""
    import torch

    from training.evaluation import eval_token_accuracy

    class OnGpu(torch.Tensor):
        def numpy(self, *args, **kwargs):
            raise TypeError("can't convert cuda:0 device type tensor to numpy")

        def cpu(self, *args, **kwargs):
            return self.as_subclass(torch.Tensor)

    trainer, loader = trained["trainer"], trained["trainer"].get_eval_dataloader

    def on_gpu():
        for batch in loader():
            yield {**batch, "labels": batch["labels"].as_subclass(OnGpu)}

    monkeypatch.setattr(trainer, "get_eval_dataloader", on_gpu)
    assert eval_token_accuracy(trainer) == pytest.approx(trained["metrics"]["accuracy"], abs=1e-6)


def test_cast_saved_rewrites_a_saved_model_in_the_asked_dtype(tiny_root, tmp_path):
    """Unsloth's merge keeps the dtype the base is stored in; the job then rewrites it as merged_dtype asks."""
    from safetensors.torch import load_file

    from models.artifacts import cast_saved

    folder = shutil.copytree(tiny_root / "models" / "tiny-gemma3", tmp_path / "merged")
    original = load_file(folder / "model.safetensors")
    assert {t.dtype for t in original.values()} == {torch.bfloat16}
    assert cast_saved(folder, torch.float16) is True
    cast = load_file(folder / "model.safetensors")
    assert json.loads((folder / "config.json").read_text())["dtype"] == "float16"
    assert cast.keys() == original.keys() and all(torch.equal(cast[k], original[k].half()) for k in original)
    assert cast_saved(folder, torch.float16) is False  # already stored so: left alone
    assert cast_saved(folder, torch.bfloat16) is True
    assert all(torch.equal(load_file(folder / "model.safetensors")[k], cast[k].bfloat16()) for k in original)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]  # no scratch folder left
    assert (folder / "tokenizer.json").is_file()
