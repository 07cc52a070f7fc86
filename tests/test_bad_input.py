"""Every kind of bad input, one table: a clear message naming the field or file and what to do,
written to the job document, exit 2, and no model loaded."""

from __future__ import annotations

import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import main
import providers
from conftest import env_for, put_request, read_doc, sample_request
from runtime.errors import PermanentError

USER_ASSISTANT = [{"role": "user", "content": "What does a cow say?"}, {"role": "assistant", "content": "Moo."}]


def dataset(local_dir, dataset_id: str, table: dict) -> None:
    folder = local_dir / "gemma-dataset-bucket" / "processed_datasets" / dataset_id
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(table), folder / "train.parquet")


def hp(**values):
    return lambda req, local_dir: req["training_config"]["hyperparameters"].update(values)


def on_data(dataset_id: str, table: dict):
    def change(req, local_dir):
        dataset(local_dir, dataset_id, table)
        req["processed_dataset_id"] = dataset_id
    return change


def export(**values):
    return lambda req, local_dir: req["training_config"]["export_config"].update(values)


def top(**values):
    return lambda req, local_dir: req.update(values)


def config_copy(local_dir, config_class: str = "Gemma3nConfig", **fields) -> str:
    """A base under a name that does not say what it is: its config.json alone (nothing else is read before the
    refusal)."""
    import transformers

    folder = local_dir / "models" / "renamed-model"
    getattr(transformers, config_class)(**fields).save_pretrained(str(folder))
    assert [p.name for p in folder.iterdir()] == ["config.json"]
    return str(folder)


def base(config_class: str, **fields):
    return lambda req, local_dir: req["training_config"].update(
        base_model_id=config_copy(local_dir, config_class, **fields))


def tiny(model: str, **hyperparameters):
    """The request on another of the tiny models, beside the one it names."""
    def change(req, local_dir):
        tc = req["training_config"]
        tc["base_model_id"] = str(Path(tc["base_model_id"]).with_name(model))
        tc["hyperparameters"].update(hyperparameters)
    return change


CANNOT_FINE_TUNE = "This job cannot fine-tune it; choose a Gemma 4 or Gemma 3 model"


CASES = {
    "malformed JSON": ("{not json", "not valid JSON"),
    "missing request": (None, "gs://gemma-train-config/{job}.json not found"),
    "wrong type": (hp(learning_rate="fast"), "training_config.hyperparameters.learning_rate"),
    "out of range": (hp(lora_rank=0), "training_config.hyperparameters.lora_rank"),
    "negative epochs": (hp(epochs=-1), "training_config.hyperparameters.epochs"),
    "unknown key": (hp(learning_rte=1e-4), "unknown key 'learning_rte'; did you mean 'learning_rate'"),
    "fa2 on a cpu": (hp(use_fa2=True), "use_fa2: FlashAttention 2 needs an NVIDIA GPU"),
    "packing for dpo": (lambda req, d: req["training_config"].update(trainer_type="dpo", hyperparameters={
        "packing": True}), "packing is an SFT option"),
    "prompt longer than max": (lambda req, d: req["training_config"].update(trainer_type="dpo", hyperparameters={
        "max_prompt_length": 256, "max_length": 128}), "max_prompt_length (256) must be below"),
    "hub without repo": (export(destination="hfhub"), "hf_repo_id"),
    "missing dataset": (top(processed_dataset_id="no-such-data"),
                        "gs://gemma-dataset-bucket/processed_datasets/no-such-data/train.parquet"),
    "empty dataset": (on_data("empty", {"messages": pa.array([], pa.list_(pa.struct(
        [("role", pa.string()), ("content", pa.string())])))}), "the train split is empty"),
    "wrong columns": (on_data("cols", {"question": ["q"], "reply": ["r"]}),
                      "columns ['question', 'reply'] do not fit trainer_type 'sft'"),
    "roles out of order": (on_data("order", {"messages": [USER_ASSISTANT[::-1]]}),
                           "roles out of order: turn 0 is 'assistant', expected 'user'"),
    "empty content": (on_data("blank", {"messages": [[{"role": "user", "content": " "}, USER_ASSISTANT[1]]]}),
                      "empty content at turn 0"),
    "rows all too long": (hp(max_length=16, max_prompt_length=8), "no trainable token within max_length 16"),
    "dataset id escapes": (top(processed_dataset_id="../../etc"), "processed_dataset_id"),
    "dataset id absolute": (top(processed_dataset_id="/etc/passwd"), "processed_dataset_id"),
    "repo id escapes": (export(destination="hfhub", hf_repo_id="../x"), "export_config.hf_repo_id"),
    "repo id absolute": (export(destination="hfhub", hf_repo_id="/abs/repo"), "export_config.hf_repo_id"),
    "vision on a text-only base": (lambda req, d: req["training_config"].update(modality="vision"),
                                   "training_config.base_model_id: "),
    "base model path missing": (lambda req, d: req["training_config"].update(base_model_id=str(d / "no-model")),
                                "looks like a local path but is not a directory"),
    "base model id malformed": (lambda req, d: req["training_config"].update(base_model_id="google/gemma 3 1b"),
                                "training_config.base_model_id: 'google/gemma 3 1b' cannot be read from the Hub "
                                "(HFValidationError)"),
    "gemma 3n with unsloth by its hub name": (
        lambda req, d: req["training_config"].update(base_model_id="google/gemma-3n-E2B", provider="unsloth"),
        "training_config.provider: 'unsloth' with 'google/gemma-3n-E2B' (Gemma 3n): Unsloth's Gemma 3n path"),
    "lora on gemma 3n's tower from its config": (
        lambda req, d: (req["training_config"].update(base_model_id=config_copy(d), modality="vision"),
                        req["training_config"]["hyperparameters"].update(finetune_vision_layers=True)),
        "(Gemma 3n): its image tower (MobileNetV5) is convolutional, and this job's LoRA adapts the linear layers"),
    "vision with unsloth": (lambda req, d: req["training_config"].update(modality="vision", provider="unsloth"),
                            "modality 'vision' with provider 'unsloth'"),
    "vision with orpo": (lambda req, d: req["training_config"].update(modality="vision", trainer_type="orpo"),
                         "modality 'vision' with trainer_type 'orpo'"),
    "vision layers on text": (hp(finetune_vision_layers=True), "hyperparameters.finetune_vision_layers is for "
                              "modality 'vision'"),
    "grpo batch not divisible": (lambda req, d: req["training_config"].update(
        trainer_type="grpo", hyperparameters={"batch_size": 3, "gradient_accumulation_steps": 1, "num_generations": 4},
        reward_config=[{"name": "x", "type": "built_in", "function_name": "count_xml"}]),
        "batch_size x gradient_accumulation_steps (3) must be divisible by num_generations (4)"),
    "grpo without graders": (lambda req, d: req["training_config"].update(trainer_type="grpo"), "needs reward_config"),
    "LLM judge grader": (lambda req, d: req["training_config"].update(trainer_type="grpo", reward_config=[
        {"name": "j", "type": "score_model", "model": "gpt", "prompt": "rate"}]), "calls an outside model"),
    "graders without grpo": (lambda req, d: req["training_config"].update(reward_config=[
        {"name": "x", "type": "built_in", "function_name": "count_xml"}]), "used only with trainer_type 'grpo'"),
    "dpo on sft rows": (lambda req, d: req["training_config"].update(trainer_type="dpo"),
                        "do not fit trainer_type 'dpo': it needs prompt+chosen+rejected"),
    "python grader": (lambda req, d: req["training_config"].update(
        trainer_type="grpo", reward_config=[{"name": "x", "type": "python", "source": "import os"}]), "python"),
    # Gemma variants the job cannot fine-tune, under a name that does not say so: refused from config.json
    "gemma 4 draft": (base("Gemma4AssistantConfig"), "fine-tune the target instead. " + CANNOT_FINE_TUNE),
    "diffusion gemma": (base("DiffusionGemmaConfig"), "text-diffusion model: it does not generate left to right"),
    "t5gemma": (base("T5GemmaConfig"), "an encoder-decoder model; this job trains decoders. " + CANNOT_FINE_TUNE),
    "paligemma": (base("PaliGemmaConfig"), "prefix-LM format differs from Gemma's chat turns"),
    "recurrent gemma": (base("RecurrentGemmaConfig"), "Griffin recurrent layers are not trained"),
    "shieldgemma 2": (base("ShieldGemma2Config"), "an image-safety classifier"),
    "embedding gemma": (base("Gemma3TextConfig", architectures=["Gemma3TextModel"], use_bidirectional_attention=True),
                        "is saved as Gemma3TextModel (an embedding or classification model, e.g. EmbeddingGemma)"),
    "not a gemma": (base("LlamaConfig"), "is a 'llama' model, not a Gemma this job knows"),
    "expert weights that are not there": (tiny("tiny-gemma4-moe", lora_target_parameters=["experts.up_proj"]),
                                          "hyperparameters.lora_target_parameters: ['experts.up_proj'] name no "
                                          "parameter of"),
    "expert weights without experts": (tiny("tiny-gemma4", lora_target_parameters=["experts.gate_up_proj"]),
                                       "language model; it has no mixture of experts: leave the field unset."),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(case, local_dir, tiny_root, monkeypatch):
    change, expected = CASES[case]

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded for a bad request")

    monkeypatch.setattr(providers.HuggingFaceTrainingJob, "load_model", no_model)
    job = "bad-" + "".join(c if c.isalnum() else "-" for c in case)
    if isinstance(change, str):
        put_request(local_dir, job, change)
    elif change is not None:
        req = sample_request(tiny_root)
        change(req, local_dir)
        put_request(local_dir, job, req)
    assert main.main([], env_for(local_dir, job)) == 2
    doc = read_doc(local_dir, job)
    assert doc["status"] == "failed" and doc["error_type"] == "permanent"
    assert expected.format(job=job) in doc["error"], doc["error"]
    assert isinstance(doc["job_name"], str) and isinstance(doc["base_model_id"], str)


@pytest.mark.parametrize("job_id", ["../x", "a/b", "/abs", ".hidden", ""])
def test_job_id_that_escapes_its_prefix(job_id, local_dir, capsys):
    env = {**env_for(local_dir, job_id), "BACKEND": "gcp"}  # gcp: an empty JOB_ID is not replaced by a new one
    assert main.main([], env) == 2
    assert "JOB_ID" in capsys.readouterr().err
    assert not (local_dir / "firestore").exists()  # nothing written anywhere



def test_gguf_without_llama_cpp_is_refused_at_pre_flight_with_the_command(local_dir, tiny_root, monkeypatch):
    """llama.cpp is an extra (make setup-gguf): where it is absent a GGUF request stops before any model
    is loaded, and the message says what to run."""
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp raises ImportError
    monkeypatch.setattr(providers.HuggingFaceTrainingJob, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    for job, fmt in (("no-llama-gguf", {"format": "gguf"}), ("no-llama-incl", {"include_gguf": True})):
        req = sample_request(tiny_root)
        req["training_config"]["export_config"].update(fmt)
        put_request(local_dir, job, req)
        assert main.main([], env_for(local_dir, job)) == 2
        doc = read_doc(local_dir, job)
        assert doc["status"] == "failed" and doc["error_type"] == "permanent"
        assert "export_config: GGUF export needs llama-cpp-python" in doc["error"]
        assert "`make setup-gguf`" in doc["error"] and "export 'adapter' or 'merged'" in doc["error"]


@pytest.mark.parametrize("flags, missing", [("fpu sse4_2 avx avx2 fma f16c bmi2 avx512f", None),
                                            ("fpu sse4_2 avx", "avx2, fma, f16c, bmi2"),
                                            ("fpu sse4_2 avx avx2 f16c bmi2", "fma")])
def test_gguf_on_a_cpu_the_llama_cpp_build_cannot_run_on(flags, missing, tmp_path, monkeypatch):
    import platform
    import types

    from exporting import export
    monkeypatch.setitem(sys.modules, "llama_cpp", types.ModuleType("llama_cpp"))
    monkeypatch.setattr(export, "converter", lambda: tmp_path / "convert_hf_to_gguf.py")
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    (tmp_path / "convert_hf_to_gguf.py").write_text("")
    (tmp_path / "cpuinfo").write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
    if missing is None:
        export.check_installed(tmp_path / "cpuinfo")
        return
    with pytest.raises(PermanentError, match=f"this CPU lacks {missing}; run the job on a newer machine"):
        export.check_installed(tmp_path / "cpuinfo")
