"""Every request generation validates; every validator has a passing and a failing case."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from conftest import EXAMPLES, ROOT
from runtime.errors import RequestError
from runtime.request import parse_request
from schema import TrainRequest


def load(name: str) -> dict:
    return json.loads((EXAMPLES / name).read_text())


def with_tc(**tc) -> dict:
    return {"processed_dataset_id": "ds1", "training_config": {"base_model_id": "google/gemma-3-1b-it", **tc}}


def test_flat_form_normalises():
    req = parse_request(json.dumps(load("request_flat.json")))
    tc = req.training_config
    assert tc.method == "LoRA"  # lower-case accepted
    assert tc.hyperparameters.learning_rate == 2e-4 and tc.hyperparameters.batch_size == 4
    assert tc.hyperparameters.max_length == 2048  # max_seq_length alias
    assert tc.eval_config.eval_strategy == "steps" and tc.eval_config.eval_steps == 25
    assert tc.export_config.format == "gguf" and tc.export_config.gguf_quantization == "q4_k_m"


def test_grouped_form():
    req = parse_request(json.dumps(load("request_grouped.json")))
    tc = req.training_config
    assert (tc.method, tc.trainer_type, tc.provider) == ("QLoRA", "sft", "huggingface")
    assert tc.export_config.destination == "hfhub" and tc.export_config.include_gguf
    assert tc.wandb_config.log_model == "end"


def test_newer_form_with_rl_fields():
    req = parse_request(json.dumps(load("request_rl.json")))
    tc = req.training_config
    assert tc.trainer_type == "grpo" and tc.provider == "unsloth"
    assert tc.hyperparameters.num_generations == 4 and tc.hyperparameters.beta == 0.04
    assert tc.export_config.format == "merged"  # 'full' is the merged model
    assert [g.type for g in tc.reward_config] == ["built_in", "string_check", "text_similarity"]


def test_local_default_validates():
    assert parse_request((EXAMPLES / "local_default.json").read_text()).training_config.method == "LoRA"


def test_defaults_live_in_schema():
    hp = TrainRequest.model_validate(with_tc()).training_config.hyperparameters
    assert (hp.learning_rate, hp.batch_size, hp.gradient_accumulation_steps, hp.epochs) == (2e-4, 2, 4, 3)
    assert (hp.max_length, hp.lora_rank, hp.lora_alpha, hp.lora_dropout) == (1024, 16, 16, 0.05)
    tc = TrainRequest.model_validate(with_tc()).training_config
    assert (tc.provider, tc.method, tc.trainer_type, tc.modality) == ("huggingface", "QLoRA", "sft", "text")


def test_unknown_key_names_closest():
    with pytest.raises(RequestError, match=r"training_config.hyperparameters.learning_rte: unknown key "
                                           r"'learning_rte'; did you mean 'learning_rate'"):
        parse_request(json.dumps(with_tc(hyperparameters={"learning_rte": 1e-4})))


def test_unknown_top_level_key():
    with pytest.raises(RequestError, match=r"unknown key 'procesed_dataset_id'; did you mean 'processed_dataset_id'"):
        parse_request(json.dumps({**with_tc(), "procesed_dataset_id": "x"}))


def test_invalid_value_names_path_value_and_allowed():
    with pytest.raises(RequestError, match=r"training_config.hyperparameters.learning_rate: .*less than or equal "
                                           r"to 0.01 \(got 5\)"):
        parse_request(json.dumps(with_tc(hyperparameters={"learning_rate": 5})))
    with pytest.raises(RequestError, match=r"training_config.method: Input should be 'QLoRA', 'LoRA' or 'Full' "
                                           r"\(got \"dora\"\)"):
        parse_request(json.dumps(with_tc(method="dora")))


def test_wrong_type():
    with pytest.raises(RequestError, match=r"hyperparameters.batch_size: .*integer.*\(got \"two\"\)"):
        parse_request(json.dumps(with_tc(hyperparameters={"batch_size": "two"})))


def test_malformed_json_and_missing_field():
    with pytest.raises(RequestError, match="not valid JSON"):
        parse_request('{"processed_dataset_id": ')
    with pytest.raises(RequestError, match=r"training_config.base_model_id: required field is missing"):
        parse_request(json.dumps({"processed_dataset_id": "x", "training_config": {}}))


@pytest.mark.parametrize("bad", ["../other", "a/b", "/abs", ".hidden"])
def test_dataset_id_cannot_escape_prefix(bad):
    with pytest.raises(RequestError, match="processed_dataset_id"):
        parse_request(json.dumps({**with_tc(), "processed_dataset_id": bad}))


def test_eval_steps_null_is_the_default():
    cfg = TrainRequest.model_validate(with_tc(eval_config={"eval_strategy": "steps", "eval_steps": None}))
    assert cfg.training_config.eval_config.eval_steps == 50


def test_packing_without_fa2_is_accepted_for_sft_only():
    hp = TrainRequest.model_validate(with_tc(hyperparameters={"packing": True})).training_config.hyperparameters
    assert hp.packing and not hp.use_fa2  # rows are kept apart without FA2: tests/test_packing.py
    with pytest.raises(RequestError, match=r"packing is an SFT option"):
        parse_request(json.dumps(with_tc(trainer_type="dpo", hyperparameters={"packing": True})))
    with pytest.raises(RequestError, match=r"provider 'unsloth' with `packing: true`"):
        parse_request(json.dumps(with_tc(provider="unsloth", hyperparameters={"packing": True})))


def test_prompt_length_rule_is_for_rl_trainer_types_only():
    sft = TrainRequest.model_validate(with_tc(hyperparameters={"max_length": 256, "max_prompt_length": 512}))
    assert sft.training_config.hyperparameters.max_length == 256
    dpo = TrainRequest.model_validate(with_tc(trainer_type="dpo", hyperparameters={"max_length": 256}))
    assert dpo.training_config.hyperparameters.prompt_length == 128  # unset: min(512, max_length / 2)
    with pytest.raises(RequestError, match=r"trainer_type 'dpo': max_prompt_length \(512\) must be below max_length "
                                           r"\(256\)"):
        parse_request(json.dumps(with_tc(trainer_type="dpo", hyperparameters={"max_length": 256,
                                                                              "max_prompt_length": 512})))


def test_hfhub_needs_repo_id():
    ok = with_tc(export_config={"destination": "hfhub", "hf_repo_id": "acme/model"})
    assert TrainRequest.model_validate(ok).training_config.export_config.hf_repo_id == "acme/model"
    with pytest.raises(RequestError, match="destination 'hfhub' needs hf_repo_id"):
        parse_request(json.dumps(with_tc(export_config={"destination": "hfhub"})))
    with pytest.raises(RequestError, match="hf_repo_id"):
        parse_request(json.dumps(with_tc(export_config={"destination": "hfhub", "hf_repo_id": "../x"})))


@pytest.mark.parametrize("quant", [{}, {"gguf_quantization": None}, {"gguf_quantization": "none"}])
def test_gguf_without_quantization_is_q8_0_in_every_form(quant):
    grouped = TrainRequest.model_validate(with_tc(export_config={"include_gguf": True, **quant}))
    assert grouped.training_config.export_config.gguf_quantization == "q8_0"
    flat = TrainRequest.model_validate({**with_tc(), "export_config": {"format": "gguf", **quant}})
    assert flat.training_config.export_config.gguf_quantization == "q8_0"
    plain = TrainRequest.model_validate(with_tc(export_config=quant))
    assert plain.training_config.export_config.gguf_quantization == "none"  # no GGUF: nothing to quantize


VISION_REFUSED = {
    "unsloth": ({"provider": "unsloth"}, "FastVisionModel has not been shown"),
    "orpo": ({"trainer_type": "orpo"}, "trainer_type 'orpo'"),
    "simpo": ({"trainer_type": "simpo"}, "trainer_type 'simpo': TRL's CPO (SimPO) trainer takes no images"),
    "packing": ({"hyperparameters": {"packing": True}}, "`packing: true`"),
    "full with towers": ({"method": "Full", "hyperparameters": {"finetune_vision_layers": True}}, "method 'Full'"),
    "no tower": ({"hyperparameters": {"finetune_language_layers": False}}, "LoRA would adapt nothing"),
}


@pytest.mark.parametrize("case", list(VISION_REFUSED))
def test_vision_refuses_what_is_not_built_naming_the_field(case):
    change, message = VISION_REFUSED[case]
    with pytest.raises(RequestError, match=re.escape(message)):
        parse_request(json.dumps(with_tc(modality="vision", **change)))


def test_vision_defaults_and_tower_options():
    cfg = TrainRequest.model_validate(with_tc(modality="vision")).training_config
    assert cfg.vision and cfg.comparison_rows == 64  # the base/tuned comparison shows the pictures too
    assert cfg.hyperparameters.finetune_language_layers and not cfg.hyperparameters.finetune_vision_layers
    both = TrainRequest.model_validate(with_tc(modality="vision", hyperparameters={"finetune_vision_layers": True}))
    assert both.training_config.hyperparameters.finetune_vision_layers
    with pytest.raises(RequestError, match="finetune_language_layers is for modality 'vision'"):
        parse_request(json.dumps(with_tc(hyperparameters={"finetune_language_layers": True})))


def test_grpo_needs_graders_and_python_graders_refused():
    grader = {"name": "f", "type": "built_in", "function_name": "format_reward"}
    assert TrainRequest.model_validate(with_tc(trainer_type="grpo", reward_config=[grader]))
    with pytest.raises(RequestError, match="needs reward_config"):
        parse_request(json.dumps(with_tc(trainer_type="grpo")))
    with pytest.raises(RequestError, match="never does"):
        parse_request(json.dumps(with_tc(trainer_type="grpo", reward_config=[
            {"name": "p", "type": "python", "source": "import os"}])))
    with pytest.raises(RequestError, match="needs reference_field, operation"):
        parse_request(json.dumps(with_tc(trainer_type="grpo", reward_config=[{"name": "s", "type": "string_check"}])))


def test_full_exports_merged_model():
    assert TrainRequest.model_validate(with_tc(method="Full")).training_config.export_format == "merged"
    assert TrainRequest.model_validate(with_tc(method="LoRA")).training_config.export_format == "adapter"


def test_secrets_never_print():
    req = parse_request(json.dumps(load("request_grouped.json")))
    dumped = json.dumps(req.model_dump(mode="json")) + repr(req) + str(req)
    assert "hf_example_not_a_real_token" not in dumped and "wandb_example_not_a_real_key" not in dumped
    assert req.secrets() == ["hf_example_not_a_real_token", "wandb_example_not_a_real_key"]


def test_schema_flag_prints_json_schema():
    out = subprocess.run([sys.executable, "main.py", "--schema"], cwd=ROOT, capture_output=True, text=True,
                         check=True)
    schema = json.loads(out.stdout)
    assert "training_config" in schema["properties"] and "Hyperparameters" in schema["$defs"]


def test_the_request_s_secrets_win_over_the_environment_s_decided_in_one_place():
    from runtime.settings import Settings

    def req(tc=None, **top):
        return TrainRequest.model_validate({"processed_dataset_id": "d", **top, "training_config": {
            "base_model_id": "m", **(tc or {})}})

    env = Settings(job_id="j", hf_token="hf_env", wandb_api_key="wb_env")
    bare = Settings(job_id="j")
    with_both = req(hf_token="hf_req", tc={"wandb_config": {"api_key": "wb_req"}})
    assert env.hub_token(with_both) == "hf_req"
    assert env.wandb_key(with_both) == ("wb_req", "wandb_config.api_key")
    assert env.hub_token(req()) == "hf_env"
    assert env.wandb_key(req(tc={"wandb_config": {}})) == ("wb_env", "WANDB_API_KEY")
    assert bare.hub_token(req()) is None and bare.wandb_key(req()) == (None, "WANDB_API_KEY")


def test_grader_reference_column_is_the_schema_s():
    def grader(**kw):
        return TrainRequest.model_validate({"processed_dataset_id": "d", "training_config": {
            "base_model_id": "m", "trainer_type": "grpo", "hyperparameters": {"batch_size": 2, "num_generations": 2},
            "reward_config": [{"name": "g", **kw}]}}).training_config.reward_config[0]

    assert grader(type="built_in", function_name="expression_accuracy").reference_column == "answer"
    assert grader(type="built_in", function_name="numerical_accuracy", reference_field="sol").reference_column == "sol"
    assert grader(type="built_in", function_name="format_reward").reference_column is None
    assert grader(type="string_check", reference_field="label", operation="eq").reference_column == "label"
    tags = grader(type="built_in", function_name="count_xml").parameters
    assert (tags.think_tag, tags.answer_tag) == ("think", "answer")
