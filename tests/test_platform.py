"""Contract tests: the requests the platform's training service (gemma-facet/cloud-services `POST /train`)
and its predecessor (gemma-fine-tuning/services, grouped and flat forms) write, exactly as they serialise
them (tests/platform_requests.py), validate and reach TRL's configuration as they say, for every
max_length the web UI offers and every trainer type."""

from __future__ import annotations

import json

import pytest

from base import Prepared
from conftest import put_request, read_doc
from platform_requests import facet_flat, facet_request, grader, predecessor_flat, predecessor_grouped
from runtime.errors import RequestError
from runtime.libraries import trl_classes
from runtime.request import parse_request
from schema import RL_DEFAULTS, TRL_DEFAULTS
from scripts.testbed import local_job

LENGTHS = [128, 256, 512, 1024, 4096]
GRADERS = [grader("built_in", name="format", function_name="format_reward"),
           grader("string_check", name="exact", reference_field="answer", operation="eq"),
           grader("text_similarity", name="close", reference_field="answer", evaluation_metric="rouge_l")]


def serialised(request: dict) -> str:
    """What the service uploads: json.dumps of model_dump(), nulls included."""
    return json.dumps(request)


def trl_config(request, tmp_path, evaluate: bool = False):
    """The TRL configuration object the job builds for `request` (TRL's own checks run in it)."""
    job = local_job(json.loads(serialised(request)), tmp_path)
    config_cls, _ = trl_classes(job.cfg.trainer_type)
    prep = Prepared(None, None, object() if evaluate else None, 10)
    return config_cls(**(job.trainer_kwargs(prep) | job.sft_overrides()))


def test_the_fixture_is_what_model_dump_writes():
    """The nulls the issue lists are all in the fixture, so the tests below see them."""
    tc = facet_request("sft")["training_config"]
    assert tc["reward_config"] is None and tc["export_config"]["hf_repo_id"] is None
    assert tc["export_config"]["gguf_quantization"] is None and tc["eval_config"] is None
    assert facet_request(wandb_config={"api_key": "k" * 40})["training_config"]["wandb_config"]["project"] is None
    assert GRADERS[0]["parameters"] is None and GRADERS[2]["gemini_api_key"] is None
    assert predecessor_grouped()["training_config"]["hyperparameters"]["max_seq_length"] is None
    assert predecessor_flat()["training_config"]["max_seq_length"] is None


@pytest.mark.parametrize("length", LENGTHS)
def test_facet_sft_request_trains_at_every_length(length, tmp_path):
    request = facet_request("sft", hyperparameters={"max_length": length},
                            export_config={"hf_repo_id": ""})  # the web UI's default
    req = parse_request(serialised(request))
    hp = req.training_config.hyperparameters
    assert hp.max_length == length and req.training_config.reward_config == []
    args = trl_config(request, tmp_path)
    assert args.max_length == length and not hasattr(args, "max_prompt_length")
    # the service serialises its optimiser defaults in every request: sent values are applied as sent
    assert (args.max_grad_norm, args.adam_beta1, args.adam_beta2, args.warmup_steps) == (0.1, 0.9, 0.99, 0.1)


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("trainer_type", ["dpo", "orpo", "grpo"])
def test_facet_rl_request_at_every_length(trainer_type, length, tmp_path):
    """The service always sends max_prompt_length 512: a completion must fit after it."""
    request = facet_request(trainer_type, hyperparameters={"max_length": length},
                            reward_config=GRADERS if trainer_type == "grpo" else None)
    if length <= 512:
        with pytest.raises(RequestError) as err:
            parse_request(serialised(request))
        assert f"max_prompt_length (512) must be below max_length ({length})" in str(err.value)
        assert "training_config" in str(err.value)
        return
    args = trl_config(request, tmp_path)
    if trainer_type == "dpo":
        assert args.max_length == length
    else:
        assert args.max_completion_length == length - 512
    assert args.beta == 0.1


@pytest.mark.parametrize("length", [*LENGTHS, None])
def test_predecessor_grouped_request_at_every_length(length, tmp_path):
    request = predecessor_grouped(hyperparameters={"max_seq_length": length})
    args = trl_config(request, tmp_path)
    assert args.max_length == (length or 1024)  # null: the default
    # the predecessor never sends the optimiser fields: an SFT job trains with TRL's defaults
    assert (args.max_grad_norm, args.adam_beta2, args.warmup_steps) == \
           (TRL_DEFAULTS["max_grad_norm"], TRL_DEFAULTS["adam_beta2"], TRL_DEFAULTS["warmup_ratio"])


@pytest.mark.parametrize("length", [*LENGTHS, None])
def test_predecessor_flat_request_at_every_length(length, tmp_path):
    request = predecessor_flat(max_seq_length=length, packing=False)
    args = trl_config(request, tmp_path)
    assert args.max_length == (length or 1024) and args.per_device_train_batch_size == 4
    # its form's default is packing: true, which the job honours with rows kept apart (test_packing.py)
    packed = trl_config(predecessor_flat(max_seq_length=length), tmp_path / "packed")
    assert packed.packing is True


FLAT_EXPORTS = {  # the flat form's format and quantization -> the job's export fields
    ("adapter", "none"): {"format": "adapter"},
    ("merged", "none"): {"format": "merged", "merged_dtype": "bf16"},
    ("merged", "fp16"): {"format": "merged", "merged_dtype": "fp16"},
    ("merged", "q4"): {"format": "merged", "merged_dtype": "q4"},
    ("gguf", "not_quantized"): {"format": "gguf", "gguf_quantization": "bf16"},  # Unsloth's names
    ("gguf", "fast_quantized"): {"format": "gguf", "gguf_quantization": "q8_0"},
    ("gguf", "quantized"): {"format": "gguf", "gguf_quantization": "q4_k_m"},
    ("gguf", "q5_k_m"): {"format": "gguf", "gguf_quantization": "q5_k_m"},
    ("gguf", "none"): {"format": "gguf", "gguf_quantization": "q8_0"},
}


@pytest.mark.parametrize("modality", ["text", "vision"])
@pytest.mark.parametrize("form", list(FLAT_EXPORTS))
def test_facet_flat_request_with_its_top_level_modality(form, modality):
    """The training service's flat generation sends `modality` twice and one `quantization` for every format."""
    fmt, quant = form
    cfg = parse_request(serialised(facet_flat(modality=modality, export_config={
        "format": fmt, "quantization": quant}))).training_config
    assert cfg.modality == modality
    ex = cfg.export_config.model_dump()
    assert {k: ex[k] for k in FLAT_EXPORTS[form]} == FLAT_EXPORTS[form]
    if fmt != "gguf":
        assert not cfg.export_config.wants_gguf


def test_facet_flat_quantization_that_does_not_apply_and_disagreeing_modalities_are_refused():
    with pytest.raises(RequestError, match="quantization 'not_quantized' does not apply to format 'merged'"):
        parse_request(serialised(facet_flat(export_config={"format": "merged", "quantization": "not_quantized"})))
    with pytest.raises(RequestError, match="quantization 'q4' does not apply to format 'adapter'"):
        parse_request(serialised(facet_flat(export_config={"quantization": "q4"})))
    request = facet_flat(modality="vision")
    request["training_config"]["modality"] = "text"
    with pytest.raises(RequestError, match="modality 'vision' \\(top level\\) and training_config.modality 'text' differ"):
        parse_request(serialised(request))


@pytest.mark.parametrize("make", [facet_request, facet_flat, predecessor_flat])
@pytest.mark.parametrize("model, provider", [("google/gemma-3n-E2B-it", "huggingface"),
                                             ("google/gemma-3n-E4B-pt", "huggingface"),
                                             ("unsloth/gemma-3n-E2B-it", "unsloth"),
                                             ("unsloth/gemma-3n-E4B-it-unsloth-bnb-4bit", "unsloth")])
def test_the_frontends_gemma_3n_choices_train_and_are_refused_with_unsloth(make, model, provider):
    """The frontend offers gemma-3n-E2B and -E4B (frontend-ui src/lib/models.ts; its review page appends -it or
    -pt, and constructFullModelId the google/ or unsloth/ prefix and Unsloth's 4-bit suffix). Its text and images
    train with the Hugging Face provider (tests/test_gemma3n.py, test_vision_gemma3n.py); with Unsloth it is
    refused as the request is read, naming the field and what to do, not after three retries."""
    request = make(base_model_id=model)
    request["training_config"]["provider"] = provider
    for group in (request["training_config"], request["training_config"].get("hyperparameters") or {}):
        if group.get("packing"):  # the predecessor's flat form packs, which Unsloth refuses first
            group["packing"] = False
    if provider == "huggingface":
        assert parse_request(serialised(request)).training_config.base_model_id == model
        return
    with pytest.raises(RequestError, match=f"training_config.provider: 'unsloth' with '{model}' \\(Gemma 3n\\): "
                                           "Unsloth's Gemma 3n path .* provider 'huggingface'"):
        parse_request(serialised(request))


def test_rl_defaults_reach_grpo_only(tmp_path):
    """A request that leaves the optimiser fields unset: GRPO gets the platform's values, SFT TRL's."""
    def unset(trainer_type):
        hp = {"max_length": 1024, "max_grad_norm": None, "adam_beta1": None, "adam_beta2": None,
              "warmup_ratio": None}
        return facet_request(trainer_type, hyperparameters=hp,
                             reward_config=GRADERS if trainer_type == "grpo" else None)
    grpo, sft = trl_config(unset("grpo"), tmp_path / "g"), trl_config(unset("sft"), tmp_path / "s")
    for values, args in ((RL_DEFAULTS, grpo), (TRL_DEFAULTS, sft)):
        assert (args.max_grad_norm, args.adam_beta1, args.adam_beta2, args.warmup_steps) == tuple(values.values())


def test_grpo_with_evaluation_and_the_forms_default_batch(tmp_path):
    """2 x 4 with num_generations 4 and eval during training: TRL accepts the eval batch the job sets."""
    request = facet_request("grpo", hyperparameters={"max_length": 1024}, reward_config=GRADERS,
                            eval_config={"eval_strategy": "steps"})
    args = trl_config(request, tmp_path, evaluate=True)
    assert args.eval_strategy == "steps" and args.per_device_eval_batch_size % args.num_generations == 0
    assert args.per_device_eval_batch_size >= 2


def test_include_gguf_without_quantization_in_the_grouped_form():
    for request in (facet_request(export_config={"include_gguf": True}),
                    predecessor_grouped(export_config={"include_gguf": True})):
        export = parse_request(serialised(request)).training_config.export_config
        assert export.include_gguf and export.gguf_quantization == "q8_0"


def test_wandb_project_and_grader_nulls_are_unset():
    request = facet_request("grpo", reward_config=GRADERS, wandb_config={"api_key": "a" * 40})
    tc = parse_request(serialised(request)).training_config
    assert tc.wandb_config.project == "gemma-fine-tuning" and tc.wandb_config.log_model == "end"  # the default
    assert tc.reward_config[0].parameters.think_tag == "think"  # parameters: null -> the defaults
    assert tc.reward_config[2].gemini_api_key is None


@pytest.mark.parametrize("model", ["tiny-gemma3", "tiny-gemma4", "tiny-gemma3n"])
def test_platform_sft_request_runs_end_to_end(model, local_dir, tiny_root):
    """The service's upload, nulls and all, with only the model, data and size made local: exit 0, on Gemma 3, on
    Gemma 4 (the 31B-style template) and on Gemma 3n (its language model alone, the adapter keyed for the whole
    model)."""
    import main

    request = facet_request("sft", base_model_id=str(tiny_root / "models" / model),
                            dataset="tiny-animals", method="LoRA",
                            hyperparameters={"max_length": 128, "max_steps": 4, "batch_size": 4,
                                             "gradient_accumulation_steps": 1, "logging_steps": 2},
                            export_config={"hf_repo_id": ""})
    request["hf_token"] = None
    put_request(local_dir, "platform-sft", serialised(request))
    env = {"BACKEND": "local", "LOCAL_DIR": str(local_dir), "JOB_ID": "platform-sft"}
    assert main.main([], env) == 0
    doc = read_doc(local_dir, "platform-sft")
    assert doc["status"] == "completed" and doc["step"] == 4
    assert doc["adapter_path"] == "gs://gemma-export-bucket/trained_adapters/platform-sft/"
    assert (local_dir / "gemma-export-bucket" / "trained_adapters" / "platform-sft" / "adapter_config.json").is_file()
    assert doc["dataset"]["dropped_rows"] == 0 and doc["dataset"]["trained_tokens"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("modality", ["text", "vision"])
def test_platform_flat_request_evaluating_each_epoch_runs_end_to_end(modality, tmp_path, tiny_root):
    """The flat generation's request, nulls and duplicates as it writes them, with an eval_strategy and the
    form's compute_eval_metrics false (which once crashed the Trainer: an eval_strategy without an eval set,
    exit 1 on every retry), for a text and an image+text dataset; only the model, the data and the size made
    local. It evaluates each epoch, and exits 0."""
    import shutil

    import main

    shutil.copytree(tiny_root / "gemma-dataset-bucket", tmp_path / "gemma-dataset-bucket")
    shutil.copytree(tiny_root / "firestore", tmp_path / "firestore")
    vision = modality == "vision"
    request = facet_flat(modality=modality, base_model_id=str(tiny_root / "models" / (
        "tiny-gemma3-mm" if vision else "tiny-gemma3")), dataset="tiny-shapes" if vision else "tiny-animals",
        max_seq_length=128, max_steps=4, batch_size=4, gradient_accumulation_steps=1, logging_steps=2,
        eval_strategy="steps", eval_steps=2)
    request["hf_token"] = ""
    put_request(tmp_path, "flat", serialised(request))
    assert main.main([], {"BACKEND": "local", "LOCAL_DIR": str(tmp_path), "JOB_ID": "flat"}) == 0
    doc = read_doc(tmp_path, "flat")
    assert doc["status"] == "completed" and doc["step"] == 4
    assert doc["metrics"]["eval_loss"] > 0 and doc["metrics"]["perplexity"] > 1
    assert doc["verification"]["adapter"]["top1_agreement"] >= 0.95
    adapter = tmp_path / "gemma-export-bucket" / "trained_adapters" / "flat"
    assert (adapter / "processor_config.json").is_file() == vision
    if vision:
        assert doc["dataset"]["images"] == 72


@pytest.mark.parametrize("modality", ["text", "vision"])
def test_a_pretrained_base_without_a_chat_template_trains_in_gemma_3s_turn_format(modality, tmp_path, tiny_root):
    """The frontend's 'Pre-trained (PT)' choice sends google/gemma-3-1b-pt and the like, whose tokenizer may
    carry no chat template (once a retryable ValueError on every attempt). Here the tiny base without its
    template: the job renders the conversations in Gemma 3's turn format, which is the instruction-tuned
    fixture's own, so it trains exactly as on that base (the same eval loss, step for step), says so in the
    document, and saves the template with the export."""
    import shutil

    import main
    from models.chat_templates import GEMMA3, GEMMA3_TEXT

    vision = modality == "vision"
    model = "tiny-gemma3-mm" if vision else "tiny-gemma3"
    shutil.copytree(tiny_root / "gemma-dataset-bucket", tmp_path / "gemma-dataset-bucket")
    shutil.copytree(tiny_root / "firestore", tmp_path / "firestore")
    pretrained = tmp_path / "models" / "tiny-pt"
    shutil.copytree(tiny_root / "models" / model, pretrained)
    (pretrained / "chat_template.jinja").unlink()
    assert not (pretrained / "chat_template.json").exists() and \
        "chat_template" not in (pretrained / "tokenizer_config.json").read_text()
    losses = {}
    for job, base in (("it", tiny_root / "models" / model), ("pt", pretrained)):
        request = facet_flat(modality=modality, base_model_id=str(base), dataset="tiny-shapes" if vision
                             else "tiny-animals", max_seq_length=128, max_steps=4, batch_size=4,
                             gradient_accumulation_steps=1, logging_steps=2, eval_strategy="steps", eval_steps=4)
        request["training_config"]["eval_config"] = {"generation_rows": 0}  # the eval loss is the comparison here
        put_request(tmp_path, job, serialised(request))
        assert main.main([], {"BACKEND": "local", "LOCAL_DIR": str(tmp_path), "JOB_ID": job}) == 0
        doc = read_doc(tmp_path, job)
        assert doc["status"] == "completed"
        losses[job] = doc["metrics"]["eval_loss"]
    assert "chat_template" not in read_doc(tmp_path, "it")["dataset"]
    assert "has no chat template (a pretrained base)" in doc["dataset"]["chat_template"]
    assert losses["pt"] == losses["it"]
    exported = tmp_path / "gemma-export-bucket" / "trained_adapters" / "pt"
    assert (exported / "chat_template.jinja").read_text() == (GEMMA3 if vision else GEMMA3_TEXT)
    if vision:
        return
    # the inference service's pinned peft 0.14.0 / transformers 4.56.0 render prompts with the exported template
    # (the base has none to give them) and answer as the job's own libraries do
    import torch
    from test_consumers import PROMPT, consumer_loads, our_logits
    from transformers import AutoTokenizer

    got = consumer_loads({"pt": exported}, tmp_path)["pt"]
    assert (got["peft"], got["transformers"]) == ("0.14.0", "4.56.0")
    tok = AutoTokenizer.from_pretrained(str(tiny_root / "models" / "tiny-gemma3"))  # the template's own rendering
    text = tok.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False, add_generation_prompt=True)
    assert got["input_ids"] == tok(text, add_special_tokens=False)["input_ids"]
    ours = our_logits(exported, got["input_ids"])
    assert torch.allclose(torch.tensor(got["auto_logits"]), ours, atol=1e-4)
    assert torch.allclose(torch.tensor(got["peft_logits"]), ours, atol=1e-4)


def test_conversations_for_a_base_with_no_template_and_no_turn_tokens_are_refused(tiny_root):
    """A base that is not a Gemma and has no chat template: the job has no format to render conversations in,
    and says so (exit 2, naming base_model_id); the same tokenizer still takes plain-text rows."""
    from types import SimpleNamespace

    from models.chat_templates import ensure_chat_template
    from training.data import DatasetError, fit_prompts, load_tokenizer, tokenize

    tok = load_tokenizer(str(tiny_root / "models" / "tiny-gemma3"), None, False)
    tok.chat_template = None
    stranger = SimpleNamespace(chat_template=None, get_vocab=lambda: {"<s>": 0})
    assert ensure_chat_template(stranger, "other/model") is None and stranger.chat_template is None
    conversation = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "moo"}]
    with pytest.raises(DatasetError, match="no chat template to render them with.*training_config.base_model_id"):
        tokenize(["the cow says moo", conversation], tok, 64, True)
    with pytest.raises(DatasetError, match="no chat template to render them with"):  # DPO's and GRPO's prompts
        fit_prompts([{"prompt": conversation[:1]}], tok, 64)
    assert tokenize(["the cow says moo"], tok, 64, True).rows[0]["input_ids"]


def test_the_export_jobs_reading_refuses_what_it_cannot_read():
    """The check the export tests apply (tests/reader.py) is able to fail: a path that is not a string, an
    unknown modality and a document without the training service's user_id are each named."""
    from reader import export_job_problems

    doc = {"job_id": "j", "job_name": "n", "user_id": "u", "base_model_id": "m",
           "artifacts": {"file": {"gguf": "gs://b/g.gguf", "mmproj": "gs://b/p.gguf"}, "raw": {"merged": "gs://b/m/"}}}
    assert export_job_problems(doc) == []
    assert export_job_problems({**doc, "artifacts": {"file": {"gguf": ["gs://b/g.gguf"]}}}) == [
        "export job: artifacts.file.gguf: Input should be a valid string"]
    assert export_job_problems({**doc, "modality": "audio"}) == [
        "export job: modality: Input should be 'text' or 'vision'"]
    assert export_job_problems({k: v for k, v in doc.items() if k != "user_id"}) == [
        "export job: user_id: Field required"]
