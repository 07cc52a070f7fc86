"""Gemma 4 on its tiny fixtures (scripts/tiny_gemma4.py), one per architecture: dense with keys shared with
values (31B-like), per-layer embeddings with key/value sharing and audio (E2B-like), mixture of experts
(26B-A4B-like) and unified (12B-like), each with the chat template its size ships. A grouped SFT request
with the default assistant_only_loss trains every answer token, the loss falls, the adapter agrees with the
trained model in PEFT; the families the job cannot fine-tune are refused before any weight is read."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from conftest import make_job, read_doc, sample_request, train_steps

ARCHITECTURES = ["tiny-gemma4", "tiny-gemma4-e2b", "tiny-gemma4-moe", "tiny-gemma4-unified"]
ROOT = Path(__file__).resolve().parent.parent
# llama.cpp's copy of the template Gemma 4 31B ships (make setup-gguf installs it with the converter)
SHIPPED_31B = Path(sys.prefix) / "share" / "llama.cpp" / "models" / "templates" / "google-gemma-4-31B-it.jinja"


def demo_rows() -> list[list[dict]]:
    sys.path.insert(0, str(ROOT / "scripts"))
    from make_tiny import conversations

    return [row["messages"] for row in conversations()]


def end_of_turn(tokenizer) -> str:
    """The family's end-of-turn marker as its template closes an answer: Gemma 4's, else Gemma 3's (and 3n's)."""
    return "<turn|>\n" if "<turn|>" in tokenizer.get_vocab() else "<end_of_turn>\n"


def answer_tokens(tokenizer, rows) -> int:
    """The tokens of every answer with its end-of-turn marker, counted on their own: what must be trained."""
    return sum(len(tokenizer(m["content"] + end_of_turn(tokenizer), add_special_tokens=False)["input_ids"])
               for row in rows for m in row if m["role"] == "assistant")


@pytest.mark.parametrize("model", ["tiny-gemma3", "tiny-gemma3n", *ARCHITECTURES, "llama.cpp 31B"])
def test_every_answer_token_is_trained_under_each_shipped_template(model, tiny_root):
    """Each family's own template (Gemma 3's, which Gemma 3n shares; Gemma 4's E2B-style and 31B-style): every
    answer token and its end-of-turn marker trained, nothing else, no row dropped; the answer follows the
    generation prompt the model is given at inference (31B-style: the empty thought channel before it)."""
    from training.data import load_tokenizer, tokenize

    if model == "llama.cpp 31B":
        if not SHIPPED_31B.is_file():
            pytest.skip("llama.cpp's copy of the 31B template comes with make setup-gguf")
        tokenizer = load_tokenizer(str(tiny_root / "models" / "tiny-gemma4"), None, False)
        tokenizer.chat_template = SHIPPED_31B.read_text()
    else:
        tokenizer = load_tokenizer(str(tiny_root / "models" / model), None, False)
    rows = demo_rows()
    prompt = tokenizer.apply_chat_template(rows[0][:2], tokenize=False, add_generation_prompt=True)
    history = tokenizer.apply_chat_template(rows[0], tokenize=False)
    # Gemma 3's and E2B's generation prompt is a prefix of the answered history; 31B's, 26B's and 12B's are not
    thought = model not in ("tiny-gemma3", "tiny-gemma3n", "tiny-gemma4-e2b")
    assert prompt.endswith("<|channel>thought\n<channel|>") == thought and history.startswith(prompt) != thought
    out = tokenize(rows, tokenizer, 128, assistant_only=True)
    assert out.dropped == 0 and len(out.rows) == len(rows)
    assert out.trained_tokens == answer_tokens(tokenizer, rows)
    first = out.rows[0]
    trained = tokenizer.decode([t for t, label in zip(first["input_ids"], first["labels"]) if label != -100])
    assert trained == rows[0][2]["content"] + end_of_turn(tokenizer)
    # the answer follows the generation prompt, thought channel included, as the model is given it at inference
    given = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert first["input_ids"][:len(given)] == given and first["labels"][len(given)] != -100


def test_a_template_that_renders_an_earlier_answer_otherwise_is_found_or_refused(tiny_root):
    """Where a turn renders differently once later turns follow, its answer is looked for in the whole rendering;
    where it is not there either, the row is refused with what to do, never trained on the wrong tokens."""
    from training.data import DatasetError, encode, load_tokenizer

    tokenizer = load_tokenizer(str(tiny_root / "models" / "tiny-gemma4"), None, False)
    turns = [{"role": "user", "content": "What does the cow say?"}, {"role": "assistant", "content": "moo"},
             {"role": "user", "content": "And the dog?"}, {"role": "assistant", "content": "woof"}]
    body = "{% for m in messages %}<|turn>{{ m.role }}\n{{ m.content }}{{ extra }}<turn|>\n{% endfor %}" \
           "{% if add_generation_prompt %}<|turn>assistant\n{% endif %}"
    # a question renders with a marker once another question follows: the first answer's history differs in the
    # whole rendering, and the answer is found after it
    tokenizer.chat_template = body.replace(
        "{{ extra }}", "{% if m.role == 'user' and loop.index0 + 2 < messages | length %} [earlier]{% endif %}")
    assert "[earlier]" in tokenizer.apply_chat_template(turns, tokenize=False)
    row = encode(turns, tokenizer, 128, True)
    trained = tokenizer.decode([t for t, x in zip(row["input_ids"], row["labels"]) if x != -100])
    assert trained == "moo<turn|>\nwoof<turn|>\n"
    # an earlier answer rendered with a marker only while it is the last turn: not in the whole rendering
    tokenizer.chat_template = body.replace("{{ extra }}", "{% if loop.last %} (final){% endif %}")
    with pytest.raises(DatasetError, match="renders assistant turn 1 differently .*assistant_only_loss false"):
        encode(turns, tokenizer, 128, True)


def test_the_fixtures_thought_template_renders_as_the_31b_ships_it(tiny_root):
    if not SHIPPED_31B.is_file():
        pytest.skip("llama.cpp's copy of the 31B template comes with make setup-gguf")
    from training.data import load_tokenizer

    ours = load_tokenizer(str(tiny_root / "models" / "tiny-gemma4"), None, False)
    shipped = load_tokenizer(str(tiny_root / "models" / "tiny-gemma4"), None, False)
    shipped.chat_template = SHIPPED_31B.read_text()
    for row in demo_rows()[:12]:
        for messages, prompt in ((row, False), (row[:2], True)):
            assert ours.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt) == \
                shipped.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)


def test_rows_with_nothing_to_train_beyond_a_small_share_are_refused(tiny_root):
    from training.data import MAX_DROPPED_SHARE, DatasetError, check_dropped, load_tokenizer, tokenize

    tokenizer = load_tokenizer(str(tiny_root / "models" / "tiny-gemma4"), None, False)
    rows = demo_rows()
    full = tokenize(rows, tokenizer, 128, assistant_only=True)
    check_dropped(full, 128)  # none dropped
    # a max_length that cuts every answer off: each row is dropped, and the message says why and what to do
    lengths = sorted(len(r["input_ids"]) - sum(x != -100 for x in r["labels"]) for r in full.rows)
    cut = tokenize(rows, tokenizer, lengths[0], assistant_only=True)
    assert cut.dropped > MAX_DROPPED_SHARE * len(rows)
    with pytest.raises(DatasetError, match=r"train rows have no token to train on .* beyond max_length"):
        check_dropped(cut, lengths[0])
    # one row in 108 without an answer to train is under the share: it is counted, not refused
    long_question = [rows[-1][0], {"role": "user", "content": "moo " * 200}, rows[-1][2]]
    few = tokenize(rows[:-1] + [long_question], tokenizer, 128, True)
    assert few.dropped == 1 and few.dropped_truncated == 1
    check_dropped(few, 128)


@pytest.fixture(scope="module", params=ARCHITECTURES)
def trained(request, tiny_root, tmp_path_factory):
    """The demo's grouped SFT request (default assistant_only_loss) on one architecture, step by step."""
    local_dir = tmp_path_factory.mktemp("g4")
    shutil.copytree(tiny_root / "gemma-dataset-bucket", local_dir / "gemma-dataset-bucket")
    req = sample_request(tiny_root, base_model_id=str(tiny_root / "models" / request.param))
    req["training_config"]["hyperparameters"].update(epochs=5, batch_size=16)
    req["training_config"]["export_config"].update(include_gguf=True, gguf_quantization="q8_0")
    job, prep, _, trainer, before, metrics = train_steps(local_dir, req, request.param)
    artifacts = job.export(trainer, prep.tokenizer, metrics, prep)  # the adapter, and GGUF from its merge
    job.finish_tracking(True)
    # the same trained model exported merged, by a job that asks for that form
    req["training_config"]["export_config"].update(format="merged", include_gguf=False)
    merged = make_job(local_dir, req, job_id=request.param + "-merged").export(trainer, prep.tokenizer, metrics, prep)
    return dict(name=request.param, prep=prep, before=before, metrics=metrics, artifacts=artifacts,
                merged=merged, doc=read_doc(local_dir, request.param), local_dir=local_dir)


def test_each_architecture_trains_every_answer_and_learns(trained):
    from training.data import check_rows, row_form

    doc, prep = trained["doc"], trained["prep"]
    import pyarrow.parquet as pq

    table = pq.read_table(trained["local_dir"] / "gemma-dataset-bucket" / "processed_datasets" / "tiny-animals" /
                          "train.parquet")
    rows = check_rows(table.to_pylist(), row_form(table.column_names, "sft"), "train")
    assert doc["dataset"]["dropped_rows"] == 0 and doc["dataset"]["train_rows"] == len(rows)
    assert doc["dataset"]["trained_tokens"] == answer_tokens(prep.tokenizer, rows)
    assert trained["metrics"]["eval_loss"] < 0.6 * trained["before"]["eval_loss"]


def test_each_architectures_exports_agree_with_the_trained_model_in_their_consumers(trained):
    """The adapter in PEFT, the merge in transformers, q8_0 GGUF in llama.cpp, each checked by the job (which
    fails below `required`) on its top-1 agreement with the trained model."""
    checks = {**trained["artifacts"]["verification"], **trained["merged"]["verification"]}
    assert {k: v["consumer"] for k, v in checks.items()} == {"adapter": "PEFT", "gguf": "llama.cpp",
                                                             "merged": "transformers"}
    assert checks["gguf"]["form"] == "q8_0" and checks["merged"]["form"] == "bf16"
    for check in checks.values():
        assert check["top1_agreement"] >= check["required"] >= 0.95 and check["tokens"] >= 48  # decided


def test_lora_adapts_the_language_model_only_and_the_document_says_what(trained):
    adapted = trained["doc"]["lora_targets"]
    assert adapted and all(".language_model.layers." in name for name in adapted["modules"])
    assert {name.rsplit(".", 1)[-1] for name in adapted["modules"]} == \
        {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    adapter = Path(trained["local_dir"]) / "gemma-export-bucket" / "trained_adapters" / trained["name"]
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"].endswith(trained["name"])


def test_the_document_warns_that_the_inference_service_cannot_load_gemma_4(trained):
    assert any("transformers 4.56" in w and "gemma4" in w for w in trained["doc"]["warnings"])


@pytest.mark.parametrize("name", ["google/gemma-4-31B-it-assistant", "google/embeddinggemma-300m",
                                  "google/t5gemma-2b-2b-ul2", "google/paligemma2-3b-pt-224",
                                  "google/recurrentgemma-2b-it", "google/shieldgemma-2-4b-it"])
def test_their_hub_names_are_refused_at_validation(name):
    from pydantic import ValidationError

    from schema import TrainRequest

    with pytest.raises(ValidationError, match="cannot fine-tune"):
        TrainRequest.model_validate({"processed_dataset_id": "d", "training_config": {"base_model_id": name}})
    # only the model's own name counts: not its owner, nor the folders above a local copy
    for fine in (f"/data/{name.split('/')[-1]}-runs/gemma-3-1b-it", f"{name.split('/')[-1]}-lab/gemma-3-1b-it"):
        TrainRequest.model_validate({"processed_dataset_id": "d", "training_config": {"base_model_id": fine}})



@pytest.mark.parametrize("model", ["tiny-gemma4-moe", "tiny-gemma4-e2b"])
def test_qlora_memory_counts_what_bitsandbytes_leaves_in_16_bits(model, tiny_root):
    """The MoE experts (3-D parameters) and the per-layer embedding table stay in 16 bits under a 4-bit load:
    the estimate counts exactly what bitsandbytes, loading the model for real, leaves unquantized."""
    import torch
    from transformers import AutoModelForCausalLM

    from models.artifacts import nf4_config
    from models.memory import meta_model, sixteen_bit_params

    path = str(tiny_root / "models" / model)
    counted = sixteen_bit_params(meta_model(path, None, False))
    loaded = AutoModelForCausalLM.from_pretrained(path, quantization_config=nf4_config(torch.float32))
    kept = sum(p.numel() for p in loaded.parameters() if type(p).__name__ != "Params4bit")
    assert counted == kept
    named = dict(loaded.named_parameters())
    special = [n for n in named if ".experts." in n or "embed_tokens_per_layer" in n]
    assert special and all(type(named[n]).__name__ != "Params4bit" for n in special)
    assert counted >= sum(named[n].numel() for n in special) + loaded.get_input_embeddings().weight.numel()


def test_qlora_on_the_mixture_of_experts_trains_with_its_experts_in_16_bits(local_dir, tiny_root):
    req = sample_request(tiny_root, base_model_id=str(tiny_root / "models" / "tiny-gemma4-moe"), method="QLoRA")
    req["training_config"]["hyperparameters"].update(epochs=6, batch_size=16)
    _, _, model, _, before, metrics = train_steps(local_dir, req, "qlora-moe")
    experts = {n: type(p).__name__ for n, p in model.named_parameters() if ".experts." in n}
    assert experts and "Params4bit" not in experts.values()
    assert any(type(p).__name__ == "Params4bit" for p in model.parameters())  # the linear layers are 4-bit
    assert metrics["eval_loss"] < 0.7 * before["eval_loss"]


def test_lora_on_the_experts_on_request_trains_merges_and_is_listed(local_dir, tiny_root):
    req = sample_request(tiny_root, base_model_id=str(tiny_root / "models" / "tiny-gemma4-moe"))
    req["training_config"]["hyperparameters"].update(epochs=4, batch_size=16, lora_target_modules=["q_proj"],
                                                     lora_target_parameters=["experts.gate_up_proj",
                                                                             "experts.down_proj"])
    req["training_config"]["export_config"].update(include_gguf=True, gguf_quantization="q8_0")
    job = make_job(local_dir, req, "experts")
    prep = job.preflight()
    model = job.model_to_train(prep.tokenizer)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n and ".experts." in n}
    trainer = job.build_trainer(model, prep)
    metrics = job.evaluate(trainer, prep, job.train(trainer))
    after = dict(trainer.model.named_parameters())
    assert before and all(not torch.equal(after[n].detach(), p) for n, p in before.items())  # the experts' LoRA
    artifacts = job.export(trainer, prep.tokenizer, metrics, prep)
    job.finish_tracking(True)
    doc = read_doc(local_dir, "experts")
    assert {m.rsplit(".", 1)[-1] for m in doc["lora_targets"]["modules"]} == {"q_proj", "experts"}
    adapter = local_dir / "gemma-export-bucket" / "trained_adapters" / "experts"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert sorted(config["target_parameters"]) == ["experts.down_proj", "experts.gate_up_proj"]
    assert {k: v["consumer"] for k, v in artifacts["verification"].items()} == {"adapter": "PEFT", "gguf": "llama.cpp"}
    assert any("PEFT 0.17 or later" in w for w in doc["warnings"])


@pytest.mark.parametrize("training, says", [
    ({"provider": "unsloth"}, "provider 'unsloth' with lora_target_parameters"),
    ({"method": "Full"}, "lora_target_parameters: LoRA options, and method 'Full'"),
])
def test_expert_parameters_are_refused_where_they_cannot_apply(training, says):
    from pydantic import ValidationError

    from schema import TrainRequest

    tc = {"base_model_id": "google/gemma-4-26B-A4B-it", **training,
          "hyperparameters": {"lora_target_parameters": ["experts.gate_up_proj"]}}
    with pytest.raises(ValidationError, match=says):
        TrainRequest.model_validate({"processed_dataset_id": "d", "training_config": tc})
