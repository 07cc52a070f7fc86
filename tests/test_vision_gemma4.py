"""Image+text fine-tuning of Gemma 4 (modality 'vision'): its processor gives each picture as many image tokens as
its size does, with each patch's position, and the model reads the image tokens' marks as mm_token_type_ids. The
job's expansion and tensors are the processor's own; the tiny E2B-like model learns to name the colour it is shown
from the platform's vision dataset unchanged, its merged export is an image+text model whose answer follows the
picture, and its GGUF with Gemma 4's projector reads the pictures in llama.cpp; the 31B-like template trains every
answer token beside the pictures; LoRA on the tower adapts the linear inside each Gemma4ClippableLinear; the 12B's embedder, and Gemma 4 images without torchvision, are refused."""

from __future__ import annotations

import io
import json

import pytest

from conftest import read_doc
from test_vision import EXPORT, colour_of, distinct_colours, eval_rows, new_root, run_job, vision_request

E2B, DENSE = "tiny-gemma4-e2b", "tiny-gemma4"


def picture(width: int, height: int, colour=(200, 30, 30)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buf, format="PNG")
    return buf.getvalue()


def processor_of(tiny_root, model: str = DENSE):
    from training.vision import load_processor

    return load_processor(str(tiny_root / "models" / model), None, False)


def test_the_expansion_and_the_tensors_are_the_processors_own(tiny_root):
    """Three pictures of three sizes in one turn: the job's rendering, tokenized, is the processor's own call's
    input_ids, and the model's inputs beside them (pixels, patch positions, image-token marks) are its tensors."""
    from training.vision import image_counts

    processor = processor_of(tiny_root)
    pictures = [picture(28, 28), picture(300, 100, (30, 60, 220)), picture(200, 500, (30, 180, 40))]
    messages = [{"role": "user", "content": [{"type": "image", "text": None}, {"type": "text", "text": "This,"},
                                             {"type": "image", "text": None}, {"type": "image", "text": None},
                                             {"type": "text", "text": "which colours?"}]}]
    counts = image_counts(processor, pictures)
    assert len(set(counts)) == 3 and max(counts) <= 70, counts  # by each picture's size, within the budget
    assert processors_own(processor, messages, pictures, counts) == {"pixel_values", "image_position_ids",
                                                                    "mm_token_type_ids"}


def processors_own(processor, messages, pictures, counts) -> set[str]:
    """Check that the job's rendering of `messages`, tokenized, is the processor's own call's input_ids (each picture
    counts[i] image tokens), and that the tensors the model reads beside them are its tensors; the tensors' names."""
    import torch

    from training.vision import image_token_id, pixel_values, render
    from training.vision_rows import decode

    ids = processor.tokenizer(render(processor, messages, True, counts), add_special_tokens=False)["input_ids"]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    theirs = processor(text=[text], images=[[decode(b) for b in pictures]], return_tensors="pt",
                       add_special_tokens=False)
    assert ids == theirs["input_ids"][0].tolist()
    assert ids.count(image_token_id(processor.tokenizer)) == sum(counts)
    ours = pixel_values(processor, pictures).inputs(torch.tensor([ids]), image_token_id(processor.tokenizer))
    for key, tensor in ours.items():
        assert torch.equal(tensor, theirs[key]), key
    return set(ours)


def test_the_31b_template_trains_every_answer_token_beside_the_pictures(tiny_root):
    """The template that ends its generation prompt in an empty thought channel: each shapes row keeps all its
    image tokens, trains its answer and end-of-turn marker alone, after the generation prompt the model is given
    at inference, and none is dropped. (Trained after the history alone, which lacks that channel, the tiny
    31B-like model named no colour right when asked, 12 epochs of the demo's vision request: exact match 0.0;
    after the generation prompt, 1.0.)"""
    from training.vision import encode_vision, image_token_id, render
    from training.vision_rows import check_vision_rows, vision_form

    processor = processor_of(tiny_root)
    rows = eval_rows(tiny_root)
    split = check_vision_rows(rows, vision_form(list(rows[0])), "test")
    encoded = encode_vision(split, processor, 128, True)
    assert len(encoded.rows) == len(rows) and encoded.dropped == 0 and not encoded.too_many
    tok = processor.tokenizer
    for row, enc in zip(rows, encoded.rows):
        assert enc["input_ids"].count(image_token_id(tok)) == 64  # a 28 x 28 picture at the 70-token budget
        # the answer follows the generation prompt as the model is given it at inference, thought channel included
        given = tok(render(processor, row["messages"][:-1], True, [64]), add_special_tokens=False)["input_ids"]
        assert enc["input_ids"][:len(given)] == given and enc["labels"][len(given)] != -100
        trained = tok.decode([t for t, label in zip(enc["input_ids"], enc["labels"]) if label != -100])
        assert trained == row["messages"][-1]["content"][0]["text"] + "<turn|>\n"  # as a text row's


@pytest.fixture(scope="module")
def merged_job(tiny_root, tmp_path_factory):
    root = new_root(tiny_root, tmp_path_factory.mktemp("vision-gemma4"))
    request = vision_request(tiny_root, base_model_id=str(tiny_root / "models" / E2B),
                             export_config={"format": "merged", "include_gguf": True, "gguf_quantization": "q8_0"})
    request["training_config"]["hyperparameters"]["epochs"] = 6  # measured: every colour named from 4 on (AMD), 6 (Intel)
    return root, run_job(root, "g4-merged", request)


@pytest.mark.slow
def test_gemma_4_learns_the_colour_it_is_shown_and_its_merge_answers_from_the_picture(merged_job, tiny_root):
    """The demo's vision request on the E2B-like model: eval loss falls clearly from the base's (measured with
    the job's own encoding and collator), the base/tuned comparison names every colour, the merged export
    passes its check and is Gemma 4's whole image+text checkpoint with its processor, and, loaded as the
    inference service loads it, answers each eval row's colour; swapping two rows' pictures swaps the answers."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from test_vision import answer
    from training.vision import VisionCollator, encode_vision
    from training.vision_rows import check_vision_rows, vision_form

    root, doc = merged_job
    assert doc["status"] == "completed"
    assert doc["dataset"]["images"] == 72 and doc["dataset"]["train_rows"] == 60
    assert doc["dataset"]["rows_images_too_many"] == 0 and doc["dataset"]["dropped_rows"] == 0
    processor = processor_of(tiny_root, E2B)
    rows = eval_rows(tiny_root)
    encoded = encode_vision(check_vision_rows(rows, vision_form(list(rows[0])), "test"), processor, 128, True)
    batch = VisionCollator(processor, processor.tokenizer.pad_token_id)(encoded.rows)
    base = AutoModelForImageTextToText.from_pretrained(str(tiny_root / "models" / E2B), dtype=torch.float32)
    with torch.no_grad():
        base_loss = base(**batch).loss.item()
    tuned = doc["metrics"]["eval_loss"]
    assert tuned < base_loss - 2.0, (base_loss, tuned)  # measured: about 6.3 -> 1.6
    found = doc["generation"]
    assert found["exact_match"]["base"] == 0.0 and found["exact_match"]["tuned"] >= 0.9, found
    assert doc["verification"]["merged"]["passed"] is True
    folder = root / EXPORT / "merged_models" / "g4-merged"
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["Gemma4ForConditionalGeneration"]
    assert "vision_config" in config and "audio_config" in config  # the whole checkpoint, towers included
    model = AutoModelForImageTextToText.from_pretrained(str(folder), dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(folder)
    assert type(processor).__name__ == "Gemma4Processor"
    named = [colour_of(r) in answer(model, processor, r, r["images"][0]["bytes"]) for r in rows]
    assert sum(named) >= len(rows) - 1, named
    a = rows[0]
    b = next(r for r in rows if colour_of(r) != colour_of(a))
    assert colour_of(b) in answer(model, processor, a, b["images"][0]["bytes"])
    assert colour_of(a) in answer(model, processor, b, a["images"][0]["bytes"])


@pytest.mark.slow
def test_its_gguf_and_projector_read_the_pictures_in_llama_cpp(merged_job, tiny_root):
    """include_gguf on the Gemma 4 image job: the language model's GGUF and Gemma 4's projector (the pinned
    converter's --mmproj, vision and audio towers) beside it; llama.cpp's mtmd, given each picture at the size
    Gemma 4's processor gives it and the processor's budget as its most tokens, predicts the trained model's
    continuations, and given each other's pictures it no longer does. The card gives llama.cpp the budget."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from exporting.verification import check_gguf_images, fit_picture, greedy_reference, picture_budget, stop_ids
    from training.vision import image_counts, image_token_id, pixel_values, render

    root, doc = merged_job
    check = doc["verification"]["gguf"]
    assert check["passed"] is True and check["consumer"] == "llama.cpp + mtmd (mmproj)"
    assert check["images"] == 12 and check["image_max_tokens"] == 70
    assert check["top1_agreement"] >= check["required"] == 0.95
    assert doc["artifacts"]["file"]["mmproj"] == "gs://gemma-export-bucket/gguf_models/g4-merged/mmproj-f16.gguf"
    folder = root / EXPORT / "gguf_models" / "g4-merged"
    gguf, mmproj = folder / "model-q8_0.gguf", folder / "mmproj-f16.gguf"
    assert "--mmproj mmproj-f16.gguf --image-min-tokens 70 --image-max-tokens 70" in (folder / "README.md").read_text()
    merged = root / EXPORT / "merged_models" / "g4-merged"
    budget = picture_budget(merged)
    assert budget == {"max_soft_tokens": 70, "patch_size": 16, "pooling_kernel_size": 3}
    from PIL import Image

    # the processor's own sizes: 40x40 up to 8x8 pooled patches (64 tokens), 900x300 down to 14x4 (56), both <= 70
    for size, fitted in (((40, 40), (384, 384)), ((900, 300), (672, 192))):
        assert Image.open(io.BytesIO(fit_picture(picture(*size), budget))).size == fitted
        assert processor_of(tiny_root, E2B).image_processor([Image.new("RGB", size)])[
            "num_soft_tokens_per_image"] == [fitted[0] * fitted[1] // 48 ** 2]
    processor = AutoProcessor.from_pretrained(merged)
    model = AutoModelForImageTextToText.from_pretrained(str(merged), dtype=torch.float32).eval()
    rows = distinct_colours(tiny_root, 4)
    files = [[r["images"][0]["bytes"]] for r in rows]
    prompts = [processor.tokenizer(render(processor, r["messages"][:2], True, image_counts(processor, f)),
                                   add_special_tokens=False)["input_ids"] for r, f in zip(rows, files)]
    ref = greedy_reference(model, prompts, stop_ids(model, processor.tokenizer), 0,
                           images=[pixel_values(processor, f) for f in files],
                           image_token_id=image_token_id(processor.tokenizer), image_files=files)
    own = check_gguf_images(ref, gguf, mmproj, budget).share
    ref.image_files = files[1:] + files[:1]
    rotated = check_gguf_images(ref, gguf, mmproj, budget).share
    assert own >= 0.95 and rotated < 0.9, (own, rotated)


def test_lora_on_the_tower_adapts_the_linear_inside_each_clippable_wrapper(tiny_root):
    """finetune_vision_layers on Gemma 4: the tower's attention and MLP linears (inside Gemma4ClippableLinear,
    which PEFT cannot wrap) beside the language model's, the image embedder trained whole; the audio tower, its
    embedder and the per-layer-embedding projections never. Off: the language model alone."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    from base import adapted_modules
    from providers import vision_lora
    from schema import Hyperparameters

    def adapted(**towers) -> list[str]:
        model = AutoModelForImageTextToText.from_pretrained(str(tiny_root / "models" / E2B), dtype=torch.float32)
        kwargs, exclude = vision_lora({"target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                          "up_proj", "down_proj"], "r": 4},
                                      Hyperparameters(**towers), model)
        peft = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", exclude_modules=exclude, **kwargs))
        saved = [n for n, _ in peft.named_modules() if n.endswith("embed_vision.modules_to_save")]
        return adapted_modules(peft)["modules"] + [f"saved: {n}" for n in saved]

    both = adapted(finetune_vision_layers=True)
    tower = [m for m in both if "vision_tower" in m]
    assert sorted(m.rsplit(".", 2)[-2] for m in tower) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj",
                                                           "up_proj", "v_proj"]
    assert all(m.endswith(".linear") for m in tower)
    assert any(m.startswith("saved: ") for m in both)
    assert any("language_model" in m for m in both)
    assert not [m for m in both if "audio" in m or "per_layer" in m]
    language = adapted()
    assert language and all("language_model" in m and "vision" not in m for m in language)
    alone = adapted(finetune_vision_layers=True, finetune_language_layers=False)
    assert alone and not [m for m in alone if "language_model" in m]


def test_gemma_4_images_are_refused_where_the_job_has_not_shown_them(tiny_root, monkeypatch):
    """From the config alone: the 12B's linear embedder, and any Gemma 4 where torchvision cannot be imported (its
    processor's video processor needs it), each naming what to do; text is unaffected. A GGUF of a Gemma 4 image
    job is no longer refused (test_its_gguf_and_projector_read_the_pictures_in_llama_cpp)."""
    import sys

    from models.base_models import check_base_model
    from runtime.errors import PermanentError

    with pytest.raises(PermanentError, match=r"modality: 'vision' with .*gemma4_unified.*modality 'text'"):
        check_base_model(str(tiny_root / "models" / "tiny-gemma4-unified"), None, False, True)
    assert check_base_model(str(tiny_root / "models" / E2B), None, False, True).name == "Gemma 4"
    assert check_base_model(str(tiny_root / "models" / E2B), None, False, True, gguf=True).name == "Gemma 4"
    assert check_base_model(str(tiny_root / "models" / E2B), None, False, False, gguf=True).name == "Gemma 4"
    monkeypatch.setitem(sys.modules, "torchvision", None)  # as where it is not installed
    with pytest.raises(PermanentError, match=r"needs torchvision, which cannot be imported here.*modality 'text'"):
        check_base_model(str(tiny_root / "models" / E2B), None, False, True)
    assert check_base_model(str(tiny_root / "models" / E2B), None, False, False).name == "Gemma 4"


def test_a_gemma_4_vision_job_without_its_processor_exits_2(tiny_root, tmp_path):
    """A Gemma 4 folder without processor files (a text-only copy): AutoProcessor gives the tokenizer alone, and
    the job says which processor it needs, exit 2, nothing trained."""
    import shutil

    import main
    from conftest import env_for, put_request

    root = new_root(tiny_root, tmp_path)
    base = tmp_path / "text-only-gemma4"
    shutil.copytree(tiny_root / "models" / E2B, base)
    (base / "processor_config.json").unlink()
    put_request(root, "g4-noproc", vision_request(tiny_root, base_model_id=str(base)))
    assert main.main([], env_for(root, "g4-noproc")) == 2
    doc = read_doc(root, "g4-noproc")
    assert doc["status"] == "failed" and "needs the base's own image+text processor" in doc["error"]


def test_the_reference_never_generates_an_image_token(tiny_root):
    """A model that puts the image token first (its logit raised by 100) still gets a reference: the token is
    suppressed in the greedy continuation, where it would ask the forward pass for a picture that is not there
    (the job failed so after DPO on the tiny Gemma 4: "Image features and image tokens do not match")."""
    import torch
    from transformers import AutoModelForImageTextToText

    from exporting.verification import greedy_reference, stop_ids
    from training.vision import image_counts, image_token_id, pixel_values, render

    processor = processor_of(tiny_root, E2B)
    image_id = image_token_id(processor.tokenizer)
    model = AutoModelForImageTextToText.from_pretrained(str(tiny_root / "models" / E2B), dtype=torch.float32)

    def favour_the_image_token(module, args, output):
        output[..., image_id] += 100.0
        return output

    model.lm_head.register_forward_hook(favour_the_image_token)
    shown = picture(28, 28)
    messages = [{"role": "user", "content": [{"type": "image", "text": None}, {"type": "text", "text": "Colour?"}]}]
    prompt = processor.tokenizer(render(processor, messages, True, image_counts(processor, [shown])),
                                 add_special_tokens=False)["input_ids"]
    ref = greedy_reference(model, [prompt], stop_ids(model, processor.tokenizer), 0, max_new_tokens=4,
                           images=[pixel_values(processor, [shown])], image_token_id=image_id)
    continuation = ref.sequences[0][ref.starts[0]:]
    assert continuation and image_id not in continuation


@pytest.mark.slow
def test_a_projector_llama_cpp_aborts_on_costs_the_gguf_alone(tiny_root, tmp_path):
    """llama.cpp aborts its whole process on a projector it cannot use (GGML_ASSERT). Here: an E2B whose audio tower's
    first subsampling conv has 16 channels, for which transformers sizes the input projection for 16 / 4 x 8 = 32
    features where llama.cpp's graph hands it 256 (the fixture had it so, and the job's process died in the check,
    training lost). The check runs in a process of its own: the abort costs the GGUF alone; the adapter passes its
    check and is uploaded, the GGUF's failure is recorded, exit 2, and nothing trains again."""
    import shutil

    import torch
    from transformers import AutoConfig, Gemma4ForConditionalGeneration

    import main
    from conftest import env_for, put_request

    folder = tmp_path / "bad-audio"
    shutil.copytree(tiny_root / "models" / E2B, folder)
    config = AutoConfig.from_pretrained(folder)
    config.audio_config.subsampling_conv_channels = [16, 8]
    torch.manual_seed(0)
    Gemma4ForConditionalGeneration(config).to(torch.bfloat16).save_pretrained(folder)
    root = new_root(tiny_root, tmp_path / "root")
    request = vision_request(tiny_root, base_model_id=str(folder),
                             export_config={"format": "adapter", "include_gguf": True, "gguf_quantization": "q8_0"})
    request["training_config"]["hyperparameters"].update(max_steps=2, save_strategy="no")
    request["training_config"]["eval_config"] = {"eval_strategy": "no", "generation_rows": 0}
    put_request(root, "abort", request)
    assert main.main([], env_for(root, "abort")) == 2
    doc = read_doc(root, "abort")
    assert doc["status"] == "failed" and doc["error_type"] == "permanent" and doc["step"] == 2
    assert doc["verification"]["adapter"]["passed"] is True
    assert doc["verification"]["gguf"]["passed"] is False
    assert doc["export_failures"]["gguf"].startswith("export_config: llama.cpp stopped its process while reading the "
                                                     "exported model-q8_0.gguf with mmproj-f16.gguf (an abort")
    assert doc["adapter_path"] == f"gs://{EXPORT}/trained_adapters/abort/" and doc["gguf_path"] is None
    assert not (root / EXPORT / "gguf_models").exists()
