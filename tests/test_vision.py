"""Image+text fine-tuning (modality 'vision'): the tiny Gemma 3 with its SigLIP tower learns to name the
colour of the shape it is shown, from the preprocessing service's exact parquet layout and metadata
document; its exports load as image+text models, in the job's libraries and in the inference service's
pinned ones, and answer from the image; bad image data is refused or counted."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
from pathlib import Path

import pytest

import main
from conftest import ROOT, env_for, need, put_request, read_doc

EXPORT = "gemma-export-bucket"
CONSUMER = ROOT / ".venv-consumer" / "bin" / "python"
COLOURS = ("red", "green", "blue", "yellow", "purple", "white")


def vision_request(tiny_root: Path, **training) -> dict:
    request = json.loads((ROOT / "examples" / "local_vision.json").read_text())
    request["training_config"].update({"base_model_id": str(tiny_root / "models" / "tiny-gemma3-mm"), **training})
    return request


def new_root(tiny_root: Path, root: Path) -> Path:
    """A LOCAL_DIR with the datasets and the processed_datasets metadata documents."""
    shutil.copytree(tiny_root / "gemma-dataset-bucket", root / "gemma-dataset-bucket")
    shutil.copytree(tiny_root / "firestore", root / "firestore")
    return root


def run_job(root: Path, job_id: str, request: dict) -> dict:
    put_request(root, job_id, request)
    rc = main.main([], env_for(root, job_id))
    doc = read_doc(root, job_id)
    assert rc == 0, doc.get("error")
    return doc


@pytest.fixture(scope="module")
def jobs(tiny_root, tmp_path_factory):
    """One job exporting the adapter and one the merged model (the demo's request: 12 epochs)."""
    root = new_root(tiny_root, tmp_path_factory.mktemp("vision"))
    adapter = run_job(root, "vis-adapter", vision_request(tiny_root))
    merged = run_job(root, "vis-merged", vision_request(tiny_root, export_config={"format": "merged"}))
    return {"root": root, "adapter": adapter, "merged": merged,
            "adapter_dir": root / EXPORT / "trained_adapters" / "vis-adapter",
            "merged_dir": root / EXPORT / "merged_models" / "vis-merged"}


def eval_rows(tiny_root: Path) -> list[dict]:
    import pyarrow.parquet as pq

    return pq.read_table(tiny_root / "gemma-dataset-bucket" / "processed_datasets" / "tiny-shapes" /
                         "test.parquet").to_pylist()


def distinct_colours(tiny_root: Path, n: int) -> list[dict]:
    """The first n eval rows whose pictures have different colours."""
    rows: list[dict] = []
    for row in eval_rows(tiny_root):
        if len(rows) < n and colour_of(row) not in map(colour_of, rows):
            rows.append(row)
    return rows


def colour_of(row: dict) -> str:
    return row["messages"][-1]["content"][0]["text"].split()[-1].rstrip(".")


def prompt_inputs(processor, row: dict, image_bytes: bytes):
    """The processor's inputs for a row's system and user turns with the given picture, as the inference
    service builds them."""
    from PIL import Image

    text = processor.apply_chat_template(row["messages"][:2], tokenize=False, add_generation_prompt=True)
    image = Image.open(io.BytesIO(image_bytes)).convert("RGB")
    return processor(text=[text], images=[[image]], return_tensors="pt", add_special_tokens=False)


def answer(model, processor, row: dict, image_bytes: bytes) -> str:
    import torch

    inputs = prompt_inputs(processor, row, image_bytes)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    return processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def test_the_job_learns_to_name_the_colour_it_is_shown(jobs, tiny_root):
    """Eval loss on the assistant's text falls by a clear margin from the base's, measured with the job's
    own encoding and collator on the base model, and the eval split's colours are named."""
    import torch
    from transformers import AutoModelForImageTextToText

    from training.vision import VisionCollator, encode_vision, load_processor
    from training.vision_rows import check_vision_rows, vision_form

    doc = jobs["adapter"]
    assert doc["status"] == "completed"
    assert doc["dataset"]["images"] == 72 and doc["dataset"]["train_rows"] == 60 and doc["dataset"]["eval_rows"] == 12
    assert doc["dataset"]["rows_images_undecodable"] == doc["dataset"]["rows_images_mismatched"] == 0
    base_dir = str(tiny_root / "models" / "tiny-gemma3-mm")
    processor = load_processor(base_dir, None, False)
    rows = eval_rows(tiny_root)
    split = check_vision_rows(rows, vision_form(list(rows[0])), "test")
    encoded = encode_vision(split, processor, 128, True)
    batch = VisionCollator(processor, processor.tokenizer.pad_token_id)(encoded.rows)
    assert batch["pixel_values"].shape == (12, 3, 28, 28)
    assert int(batch["token_type_ids"].sum()) == 12 * 4  # four image tokens per picture, none trained
    assert not (batch["labels"][batch["token_type_ids"] == 1] != -100).any()
    base = AutoModelForImageTextToText.from_pretrained(base_dir, dtype=torch.float32)
    with torch.no_grad():
        base_loss = base(**batch).loss.item()
    tuned = doc["metrics"]["eval_loss"]
    assert tuned < base_loss - 2.0, (base_loss, tuned)  # measured: about 6.4 -> 1.4
    assert doc["metrics"]["accuracy"] >= 0.95
    assert doc["metrics"]["perplexity"] == pytest.approx(2.718281828 ** tuned, rel=1e-6)
    # the base/tuned comparison, shown the pictures: the base rambles, the tuned model names the colour
    found = doc["generation"]
    assert found["rows"] == 12 and found["verdict"] == "better"
    assert found["exact_match"]["base"] == 0.0 and found["exact_match"]["tuned"] >= 0.9
    sample = doc["samples"][0]
    assert sample["image"].startswith("eval row 0: ") and len(sample["image"].split(": ")[1]) == 12
    assert sample["tuned"] == sample["reference"] == f"It is {colour_of(eval_rows(tiny_root)[0])}."
    lines = (jobs["adapter_dir"] / "eval_generations.jsonl").read_text().splitlines()
    assert len(lines) == 12 and json.loads(lines[0])["image"] == sample["image"]


def test_the_tuned_answer_follows_the_image(jobs, tiny_root):
    """The exported adapter, loaded with PEFT on the image+text base, with the processor saved beside it:
    two rows of different colours answer their own colours, and swapping their pictures swaps the answers."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, AutoProcessor

    folder = jobs["adapter_dir"]
    assert (folder / "processor_config.json").is_file()
    processor = AutoProcessor.from_pretrained(folder)
    base = AutoModelForImageTextToText.from_pretrained(str(tiny_root / "models" / "tiny-gemma3-mm"),
                                                       dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(folder)).eval()
    rows = eval_rows(tiny_root)
    a = rows[0]
    b = next(r for r in rows if colour_of(r) != colour_of(a))
    image_a, image_b = a["images"][0]["bytes"], b["images"][0]["bytes"]
    assert colour_of(a) in answer(model, processor, a, image_a)
    assert colour_of(b) in answer(model, processor, b, image_b)
    # the same text, the other picture: the other colour
    assert colour_of(b) in answer(model, processor, a, image_b)
    assert colour_of(a) in answer(model, processor, b, image_a)
    named = [c for r in rows for c in COLOURS if c in answer(model, processor, r, r["images"][0]["bytes"])]
    assert named == [colour_of(r) for r in rows]


def test_the_merged_model_is_an_image_text_model_that_agrees(jobs, tiny_root):
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    doc = jobs["merged"]
    assert doc["verification"]["merged"]["top1_agreement"] >= 0.95
    assert doc["artifacts"]["raw"]["merged"].endswith("merged_models/vis-merged/")
    folder = jobs["merged_dir"]
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["Gemma3ForConditionalGeneration"] and "vision_config" in config
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as f:  # where transformers 4.x reads the tower
        tower = [k for k in f.keys() if k.startswith("vision_tower.")]
    assert tower and all(k.startswith("vision_tower.vision_model.") for k in tower)
    model = AutoModelForImageTextToText.from_pretrained(str(folder), dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(folder)
    rows = eval_rows(tiny_root)
    right = sum(colour_of(r) in answer(model, processor, r, r["images"][0]["bytes"]) for r in rows)
    assert right >= len(rows) - 1


def test_exports_load_in_the_inference_services_pinned_libraries(jobs, tiny_root, tmp_path):
    """peft 0.14.0 / transformers 4.56.0 load the vision adapter (through AutoModelForImageTextToText on the
    folder, as the inference service does, and PeftModel on the base) and the merged model, with the logits
    the job's own libraries give for a prompt with its picture."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, AutoProcessor

    if not CONSUMER.is_file():
        need("the consumer environment is missing: run `make consumer`")
    base_dir = tiny_root / "models" / "tiny-gemma3-mm"
    row = eval_rows(tiny_root)[0]
    image = tmp_path / "image.png"
    image.write_bytes(row["images"][0]["bytes"])
    text = json.dumps(row["messages"][:2])
    outs = {name: tmp_path / f"{name}.json" for name in ("adapter", "merged")}
    run = subprocess.run([str(CONSUMER), str(ROOT / "tests" / "consumer_vision.py"), str(base_dir), str(image), text,
                          str(jobs["adapter_dir"]), str(outs["adapter"]), str(jobs["merged_dir"]),
                          str(outs["merged"])], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    processor = AutoProcessor.from_pretrained(base_dir)
    inputs = prompt_inputs(processor, row, row["images"][0]["bytes"])
    base = AutoModelForImageTextToText.from_pretrained(str(base_dir), dtype=torch.float32)
    ours = {"adapter": PeftModel.from_pretrained(base, str(jobs["adapter_dir"])).eval(),
            "merged": AutoModelForImageTextToText.from_pretrained(str(jobs["merged_dir"]), dtype=torch.float32)}
    for name, model in ours.items():
        found = json.loads(outs[name].read_text())
        assert found["peft"] == "0.14.0" and found["transformers"] == "4.56.0"
        assert found["input_ids"] == inputs["input_ids"][0].tolist()
        with torch.no_grad():
            logits = model(**inputs).logits[0].float()
        for key in ("auto_logits", "peft_logits") if name == "adapter" else ("auto_logits",):
            assert torch.allclose(torch.tensor(found[key]), logits, atol=1e-4), (name, key)


# ---- bad image data -----------------------------------------------------------------------------------

def png(colour=(200, 30, 30)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (32, 32), colour).save(buf, format="PNG")
    return buf.getvalue()


def row(images: list, placeholders: int = 1, answer_text: str = "It is red.") -> dict:
    return {"messages": [
        {"role": "user", "content": [{"type": "image", "text": None}] * placeholders +
         [{"type": "text", "text": "What colour is it?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": answer_text}]}],
        "images": [{"bytes": b, "path": None} if isinstance(b, bytes) else b for b in images]}


def put_dataset(root: Path, dataset_id: str, train: list[dict], test: list[dict] | None = None) -> None:
    from datasets import Dataset

    folder = root / "gemma-dataset-bucket" / "processed_datasets" / dataset_id
    folder.mkdir(parents=True, exist_ok=True)
    for split, rows in (("train", train), ("test", test)):
        if rows:
            Dataset.from_list(rows).to_parquet(str(folder / f"{split}.parquet"))


def test_rows_with_bad_images_are_left_out_and_counted(tmp_path, tiny_root):
    """Pre-flight only (no model is loaded): an undecodable picture, placeholders that do not match the
    images, and more images than max_length holds, each counted in the document with its rows."""
    from conftest import make_job

    root = new_root(tiny_root, tmp_path)
    good = [row([png()]) for _ in range(6)]
    bad = [row([b"not a picture"]), row([png(), png()]), row([png()], placeholders=2), row([png()] * 20, 20)]
    put_dataset(root, "bad-images", good[:3] + bad + good[3:])
    request = vision_request(tiny_root)
    request["processed_dataset_id"] = "bad-images"
    job = make_job(root, request, "bad-images")
    prep = job.preflight()
    stats = read_doc(root, "bad-images")["dataset"]
    assert stats["rows_images_undecodable"] == 1 and stats["rows_images_undecodable_first"] == ["train:3"]
    assert stats["rows_images_mismatched"] == 2 and stats["rows_images_mismatched_first"] == ["train:4", "train:5"]
    assert stats["rows_images_too_many"] == 1  # 20 pictures: 20 x 8 tokens do not fit in max_length 128
    assert stats["train_rows"] == len(prep.train.rows) == 6 and stats["images"] == 6 + 20


@pytest.mark.parametrize("case", ["url", "no-images", "text-only-base", "audio", "inline-url", "text-rows"])
def test_bad_vision_inputs_exit_2_naming_what_to_change(case, tmp_path, tiny_root):
    root = new_root(tiny_root, tmp_path)
    request = vision_request(tiny_root)
    expected = {"url": "give an image by URL", "inline-url": "give an image by URL",
                "no-images": "train split has no images column", "text-only-base": "is a text-only model",
                "audio": "audio", "text-rows": "do not fit modality 'vision'"}[case]
    if case == "url":
        put_dataset(root, "d", [row([png()]), row([{"bytes": None, "path": "https://example.com/cat.png"}])])
    elif case == "inline-url":
        inline = row([])
        inline["messages"][0]["content"] = [{"type": "image_url", "image_url": {"url": "https://example.com/c.png"}},
                                            {"type": "text", "text": "What colour is it?"}]
        put_dataset(root, "d", [inline])
    elif case == "no-images":
        request["processed_dataset_id"] = "tiny-animals"
    elif case == "text-only-base":
        request["training_config"]["base_model_id"] = str(tiny_root / "models" / "tiny-gemma3")
    elif case == "audio":
        audio = row([png()])
        audio["messages"][0]["content"].append({"type": "audio", "text": None})
        put_dataset(root, "d", [audio])
    elif case == "text-rows":
        put_dataset(root, "d", [{"text": "a plain line"}])
    if case in ("url", "inline-url", "audio", "text-rows"):
        request["processed_dataset_id"] = "d"
    put_request(root, case, request)
    assert main.main([], env_for(root, case)) == 2
    doc = read_doc(root, case)
    assert doc["status"] == "failed" and doc["error_type"] == "permanent"
    assert expected in doc["error"], doc["error"]
    if case in ("url", "inline-url"):
        assert "row 1" in doc["error"] or "row 0" in doc["error"]
    if case == "text-only-base":
        assert "training_config.base_model_id" in doc["error"] and "gemma-3-4b" in doc["error"]
    assert not (root / "work" / case / "checkpoints").exists()


@pytest.mark.parametrize("vision_layers,language_layers", [(False, True), (True, True), (True, False)])
def test_tower_options_pick_the_layers_lora_adapts(vision_layers, language_layers, tmp_path, tiny_root):
    """finetune_vision_layers / finetune_language_layers, as Unsloth names them: LoRA on the SigLIP tower's
    layers and the projector trained whole, on the language model's layers, or both."""
    from conftest import make_job

    request = vision_request(tiny_root)
    request["training_config"]["hyperparameters"].update(finetune_vision_layers=vision_layers,
                                                         finetune_language_layers=language_layers)
    model = make_job(new_root(tiny_root, tmp_path), request, "towers").load_model(None)
    adapted = [n for n, m in model.named_modules() if hasattr(m, "lora_A") and "lora_A" not in n.split(".")[-1]]
    assert any("vision_tower" in n for n in adapted) == vision_layers
    assert any("vision_tower" in n and n.endswith(("fc1", "out_proj")) for n in adapted) == vision_layers
    assert any("language_model" in n for n in adapted) == language_layers
    projector = [n for n, p in model.named_parameters() if "multi_modal_projector" in n and p.requires_grad]
    assert bool(projector) == vision_layers


def test_the_memory_estimate_counts_the_pictures_and_the_tower():
    """Gemma 3 4B's SigLIP (896 px, patch 14, 27 layers of 1152): a batch of 2 rows of 1 image each."""
    from types import SimpleNamespace

    from models.memory import vision_bytes

    tower = 417_000_000
    config = SimpleNamespace(vision_config=SimpleNamespace(image_size=896, patch_size=14, num_hidden_layers=27,
                                                           hidden_size=1152, intermediate_size=4304))
    pixels = 2 * 3 * 896 * 896 * 4  # the processor's fp32 tensors: 19.3 MB
    frozen = 2 * 4096 * (1152 * 6 + 4304) * 2 * 2  # two layers' activations at a time
    assert vision_bytes(config, 2, tower, "LoRA", False) == pixels + frozen
    assert vision_bytes(config, 2, tower, "LoRA", True) == pixels + frozen / 2 * 27  # every layer kept
    assert vision_bytes(config, 2, tower, "QLoRA", False) == pytest.approx(pixels + frozen + 1.48 * tower)
    assert vision_bytes(SimpleNamespace(), 2, 0, "LoRA", False) == 0.0  # a text-only base


def test_gemma_3n_images_and_text_only_bases_are_judged_from_their_config(tmp_path, tiny_root, monkeypatch):
    """Read from config.json alone, before any weight, whatever the folder is called: Gemma 3n's text and images
    train (tests/test_vision_gemma3n.py); Gemma 3n with Unsloth, LoRA on its convolutional tower, and its images
    where timm cannot be imported are refused, each naming the field; images for a text-only Gemma too."""
    import sys

    from transformers import Gemma3nConfig

    from models.base_models import check_base_model
    from runtime.errors import PermanentError

    Gemma3nConfig().save_pretrained(str(tmp_path))
    assert check_base_model(str(tmp_path), None, False, False).name == "Gemma 3n"
    assert check_base_model(str(tmp_path), None, False, True).name == "Gemma 3n"
    with pytest.raises(PermanentError, match=r"training_config.provider: 'unsloth' with .* \(Gemma 3n\)"):
        check_base_model(str(tmp_path), None, False, False, "unsloth")
    with pytest.raises(PermanentError, match=r"hyperparameters.finetune_vision_layers with .* is convolutional"):
        check_base_model(str(tmp_path), None, False, True, vision_layers=True)
    monkeypatch.setitem(sys.modules, "timm", None)  # as where it is not installed
    with pytest.raises(PermanentError, match=r"training_config.modality: 'vision' with .* \(Gemma 3n\): its image "
                                             r"tower is built by timm, which cannot be imported here"):
        check_base_model(str(tmp_path), None, False, True)
    assert check_base_model(str(tmp_path), None, False, False).name == "Gemma 3n"  # its text needs no timm
    with pytest.raises(PermanentError, match="is a text-only model"):
        check_base_model(str(tiny_root / "models" / "tiny-gemma3"), None, False, True)
    check_base_model(str(tiny_root / "models" / "tiny-gemma3"), None, False, False)
    check_base_model(str(tiny_root / "models" / "tiny-gemma3-mm"), None, False, True)  # Gemma 3 with its tower


def test_rows_with_several_pictures_and_turns_reach_the_model_in_order(tmp_path, tiny_root):
    """Two pictures in one turn and a third in a later turn: each image's tokens in the ids, the pixels of all
    three in order, labels on both assistant turns only, and the model takes the batch as it is."""
    import torch
    from transformers import AutoModelForImageTextToText

    from training.vision import VisionCollator, encode_vision, load_processor, pixel_values
    from training.vision_rows import check_vision_rows, vision_form

    base_dir = str(tiny_root / "models" / "tiny-gemma3-mm")
    processor = load_processor(base_dir, None, False)
    two_turns = {"messages": [
        {"role": "user", "content": [{"type": "image", "text": None}, {"type": "image", "text": None},
                                     {"type": "text", "text": "Which is red?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "The first."}]},
        {"role": "user", "content": [{"type": "image", "text": None}, {"type": "text", "text": "And this?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "It is blue."}]}],
        "images": [{"bytes": png((220, 30, 30)), "path": None}, {"bytes": png((30, 180, 40)), "path": None},
                   {"bytes": png((30, 60, 220)), "path": None}]}
    rows = [two_turns, row([png()])]
    split = check_vision_rows(rows, vision_form(list(rows[0])), "train")
    encoded = encode_vision(split, processor, 256, True)
    assert len(encoded.rows) == 2 and not encoded.too_many
    image_id = processor.tokenizer.convert_tokens_to_ids(processor.tokenizer.image_token)
    assert encoded.rows[0]["input_ids"].count(image_id) == 3 * processor.image_seq_length
    batch = VisionCollator(processor, processor.tokenizer.pad_token_id)(encoded.rows)
    assert batch["pixel_values"].shape[0] == 4  # three pictures, then the second row's one, in order
    for i, picture in enumerate([png((220, 30, 30)), png((30, 180, 40)), png((30, 60, 220)), png()]):
        assert torch.equal(batch["pixel_values"][i], pixel_values(processor, [picture]).tensors["pixel_values"][0])
    trained = processor.tokenizer.decode([t for t, x in zip(encoded.rows[0]["input_ids"], encoded.rows[0]["labels"])
                                          if x != -100])
    assert "The first." in trained and "It is blue." in trained and "Which is red" not in trained
    model = AutoModelForImageTextToText.from_pretrained(base_dir, dtype=torch.float32)
    with torch.no_grad():
        assert torch.isfinite(model(**batch).loss)


def test_rows_whose_pictures_never_fit_are_refused_naming_max_length(tmp_path, tiny_root):
    """Every train row holding more image tokens than max_length: exit 2 with the count and the field."""
    root = new_root(tiny_root, tmp_path)
    put_dataset(root, "crowded", [row([png()] * 20, 20) for _ in range(3)])
    request = vision_request(tiny_root)
    request["processed_dataset_id"] = "crowded"
    put_request(root, "crowded", request)
    assert main.main([], env_for(root, "crowded")) == 2
    error = read_doc(root, "crowded")["error"]
    assert "3 hold more image tokens than fit in max_length 128 (4 per image)" in error
    assert "raise hyperparameters.max_length" in error
