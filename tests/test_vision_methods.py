"""Image+text fine-tuning by other methods and exports than tests/test_vision.py's: QLoRA (the tower kept in
16 bits) and Full, DPO and GRPO on the preprocessing service's preference and prompt-only rows with pictures,
and GGUF with llama.cpp's mmproj projector, read by llama.cpp itself."""

from __future__ import annotations

import json

import pytest

from reader import export_job_problems
from test_vision import (
    COLOURS,
    EXPORT,
    colour_of,
    distinct_colours,
    eval_rows,
    new_root,
    prompt_inputs,
    run_job,
    vision_request,
)


@pytest.mark.parametrize("method,export", [("QLoRA", "adapter"), ("Full", "merged")])
def test_qlora_keeps_the_tower_in_16_bits_and_full_trains_everything(method, export, tmp_path, tiny_root,
                                                                      monkeypatch):
    """QLoRA on an image+text base: the language model's layers in NF4, the SigLIP tower, the projector and
    the head in 16 bits; Full: every weight trains, the tower included. Both complete and verify their
    export with the pictures."""
    import torch

    import base

    seen = {}
    build = base.BaseTrainingJob.build_trainer

    def spy(self, model, prep):
        seen["4bit"] = [n for n, m in model.named_modules()  # bitsandbytes' layers (PEFT's wrapper shares the name)
                        if type(m).__name__ == "Linear4bit" and type(m).__module__.startswith("bitsandbytes")]
        seen["tower_trains"] = any(p.requires_grad for n, p in model.named_parameters() if "vision_tower" in n)
        seen["tower_before"] = {n: p.detach().clone() for n, p in model.named_parameters()
                                if "vision_tower" in n and n.endswith("fc1.weight")}
        seen["model"] = model
        return build(self, model, prep)

    monkeypatch.setattr(base.BaseTrainingJob, "build_trainer", spy)
    root = new_root(tiny_root, tmp_path)
    request = vision_request(tiny_root, method=method, export_config={"format": export})
    request["training_config"]["hyperparameters"].update(max_steps=6, save_strategy="no")
    # no base/tuned comparison (test_vision.py has it): in 4 bits on a CPU it was 18 s of this test's 25
    request["training_config"]["eval_config"] = {"eval_strategy": "no", "generation_rows": 0}
    doc = run_job(root, f"vis-{method}", request)
    assert doc["status"] == "completed"
    (form, check), = doc["verification"].items()
    assert check["top1_agreement"] >= check["required"]
    if method == "QLoRA":
        assert len(seen["4bit"]) == 2 * 7 and all(".language_model.layers." in n for n in seen["4bit"])
        assert not seen["tower_trains"]
    else:
        assert seen["tower_trains"] and form == "merged"
        after = dict(seen["model"].named_parameters())
        assert any(not torch.equal(before, after[n].detach()) for n, before in seen["tower_before"].items())


def test_gguf_with_its_projector_sees_the_pictures_in_llama_cpp(tmp_path, tiny_root):
    """include_gguf on an image+text job: the language model's GGUF and llama.cpp's mmproj projector, both
    from the pinned converter, side by side under gguf_models/{job_id}/, the projector named in
    artifacts.file.mmproj. llama.cpp's mtmd reads the pictures: the pair predicts the trained model's
    continuations, and given each other's pictures it no longer does."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from exporting.verification import Pictures, check_gguf_images, greedy_reference, stop_ids

    root = new_root(tiny_root, tmp_path)
    request = vision_request(tiny_root, export_config={"format": "adapter", "include_gguf": True,
                                                       "gguf_quantization": "q8_0"})
    doc = run_job(root, "vis-gguf", request)
    files = doc["artifacts"]["file"]
    assert export_job_problems({"user_id": "u", **doc}) == []  # the projector's path is one more, ignored there
    assert files["gguf"] == "gs://gemma-export-bucket/gguf_models/vis-gguf/model-q8_0.gguf"
    assert files["mmproj"] == "gs://gemma-export-bucket/gguf_models/vis-gguf/mmproj-f16.gguf"
    check = doc["verification"]["gguf"]
    assert check["consumer"] == "llama.cpp + mtmd (mmproj)" and check["images"] == 12
    assert check["top1_agreement"] >= check["required"] == 0.95
    folder = root / EXPORT / "gguf_models" / "vis-gguf"
    gguf, mmproj = folder / "model-q8_0.gguf", folder / "mmproj-f16.gguf"
    manifest = json.loads((folder / "model-q8_0.manifest.json").read_text())
    assert {"model-q8_0.gguf", "mmproj-f16.gguf", "Modelfile", "README.md"} <= set(manifest["files"])
    assert "FROM ./model-q8_0.gguf\n" in (folder / "Modelfile").read_text()
    assert "FROM ./mmproj-f16.gguf\n" in (folder / "Modelfile").read_text()
    assert "llama-mtmd-cli -m model-q8_0.gguf --mmproj mmproj-f16.gguf" in (folder / "README.md").read_text()
    card = (root / EXPORT / "trained_adapters" / "vis-gguf" / "README.md").read_text()
    assert "AutoModelForImageTextToText.from_pretrained" in card and "AutoProcessor" in card
    # the same check by hand, on four eval rows of different colours, then with their pictures rotated
    adapter = root / EXPORT / "trained_adapters" / "vis-gguf"
    processor = AutoProcessor.from_pretrained(adapter)
    base = AutoModelForImageTextToText.from_pretrained(str(tiny_root / "models" / "tiny-gemma3-mm"),
                                                       dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(adapter)).eval()
    rows = distinct_colours(tiny_root, 4)
    files_of = [[r["images"][0]["bytes"]] for r in rows]
    inputs = [prompt_inputs(processor, r, f[0]) for r, f in zip(rows, files_of)]
    image_id = processor.tokenizer.convert_tokens_to_ids(processor.tokenizer.image_token)
    ref = greedy_reference(model, [x["input_ids"][0].tolist() for x in inputs], stop_ids(model, processor.tokenizer),
                           0, images=[Pictures({"pixel_values": x["pixel_values"]}) for x in inputs],
                           image_token_id=image_id,
                           image_files=files_of)
    own = check_gguf_images(ref, gguf, mmproj).share
    ref.image_files = files_of[1:] + files_of[:1]
    rotated = check_gguf_images(ref, gguf, mmproj).share
    assert own >= 0.95 and rotated < 0.9  # measured: 1.0, and 0.84 (the colour tokens differ)


def test_dpo_on_image_preference_rows_prefers_the_colour_it_sees(tmp_path, tiny_root):
    """The preprocessing service's preference rows with pictures (prompt with an image placeholder, chosen
    and rejected answers, `images`): TRL's DPO with its vision collator and the processor. Chosen and rejected
    differ only in the colour named, so ranking held-out pairs right needs the picture."""
    root = new_root(tiny_root, tmp_path)
    request = vision_request(tiny_root, trainer_type="dpo")
    request["processed_dataset_id"] = "tiny-shapes-pref"
    request["training_config"]["hyperparameters"].update(epochs=1, max_steps=12, learning_rate=0.002)
    doc = run_job(root, "vis-dpo", request)
    assert doc["dataset"]["images"] == 72 and doc["dataset"]["train_rows"] == 60
    m = doc["metrics"]
    assert m["reward_accuracy"] >= 0.8 and m["reward_margin"] > 0.2  # measured: 0.93 and 0.40 at step 12
    check = doc["verification"]["adapter"]
    assert check["top1_agreement"] >= check["required"] and check["prompts"] == 12
    assert (root / EXPORT / "trained_adapters" / "vis-dpo" / "processor_config.json").is_file()


def test_grpo_on_image_prompts_runs_with_its_graders_and_pictures(tmp_path, tiny_root):
    """The preprocessing service's prompt-only rows with pictures (`prompt`, `answer`, `images`): TRL's GRPO
    samples completions with the pictures and scores them with the request's grader. On this fixture the
    random base sampled an image token into a completion, which then asked the forward pass for a picture that
    did not exist ("Image features and image tokens do not match"): image tokens are suppressed in sampling."""
    root = new_root(tiny_root, tmp_path)
    request = vision_request(tiny_root, trainer_type="grpo", reward_config=[
        {"name": "colour", "type": "string_check", "reference_field": "answer", "operation": "ilike"}])
    request["processed_dataset_id"] = "tiny-shapes-prompts"
    request["training_config"]["hyperparameters"].update(epochs=1, max_steps=4, batch_size=4, num_generations=4,
                                                         max_length=80)
    request["training_config"]["eval_config"] = {"eval_strategy": "no", "max_new_tokens": 8, "generation_rows": 4}
    doc = run_job(root, "vis-grpo", request)
    assert doc["status"] == "completed" and doc["step"] == 4 and doc["dataset"]["images"] == 72
    assert {"reward_mean", "train_rewards/colour/mean"} <= set(doc["metrics"])
    assert doc["generation"]["metric"] == "reward" and doc["generation"]["rows"] == 4
    assert doc["samples"][0]["image"].startswith("eval row 0: ") and doc["samples"][0]["reference"] in COLOURS
    check = doc["verification"]["adapter"]
    # the eval rows whose prompt, picture expanded, fits max_prompt_length (40 here) are the probes
    assert check["top1_agreement"] >= check["required"] and check["prompts"] == doc["dataset"]["eval_rows"] > 0
