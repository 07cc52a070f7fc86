"""Did the fine-tune help (issue 19, first part)? The starting model and the tuned model answer the same eval
prompts; exact match, ROUGE-L and BLEU against the reference; a verdict; `require_improvement`."""

from __future__ import annotations

import io
import json

import pytest

import main
from conftest import env_for, make_job, put_request, read_doc, sample_request
from runtime.errors import RequestError
from runtime.request import parse_request
from schema import TrainRequest
from training.generation import Cases, answers, compare, exact_match
from training.rewards import similarity

EXPORT = "gemma-export-bucket"


@pytest.mark.parametrize("answer,reference,expected", [
    ("The cat says meow.", "the cat  says meow", 1.0), ("The cat says meow.", "The cat says woof.", 0.0),
    ("", "", 1.0), ("meow", "meow meow", 0.0)])
def test_exact_match(answer, reference, expected):
    assert exact_match(answer, reference) == expected


def test_rouge_l_and_bleu_literal_cases():
    assert similarity("the cat says meow", "the cat says meow", "rouge_l") == 1.0
    # longest common subsequence 3 of 4 tokens each way: precision = recall = F = 0.75
    assert similarity("the cat says woof", "the cat says meow", "rouge_l") == pytest.approx(0.75)
    assert similarity("dogs bark loudly", "the cat says meow", "rouge_l") == 0.0
    assert similarity("the cat says meow", "the cat says meow", "bleu") == pytest.approx(1.0)
    assert similarity("dogs bark loudly", "the cat says meow", "bleu") == 0.0


def config(**eval_config):
    return TrainRequest.model_validate({"processed_dataset_id": "d", "training_config": {
        "base_model_id": "m", "eval_config": eval_config}}).training_config


def cases(n: int) -> Cases:
    return Cases([[1]] * n, [f"q{i}" for i in range(n)], [f"The cat says meow {i}." for i in range(n)], [{}] * n)


def test_the_verdict_rule():
    found = cases(4)
    right, wrong = list(found.references), ["The dog says woof."] * 4
    better, samples, lines = compare(config(), found, wrong, right)
    assert better["verdict"] == "better" and better["metric"] == "rouge_l" and better["rows"] == 4
    assert better["exact_match"] == {"base": 0.0, "tuned": 1.0, "delta": 1.0}
    assert compare(config(), found, right, wrong)[0]["verdict"] == "worse"
    assert compare(config(), found, right, right)[0]["verdict"] == "same"
    one_better = wrong[:3] + right[3:]  # exact match +0.25 over 4 rows: above the 0.02 margin
    assert compare(config(improvement_metric="exact_match"), found, wrong, one_better)[0]["verdict"] == "better"
    assert samples[0] == {"prompt": "q0", "reference": "The cat says meow 0.", "base": "The dog says woof.",
                          "tuned": "The cat says meow 0."}
    rows = [json.loads(line) for line in lines.splitlines()]
    assert len(rows) == 4 and rows[1]["scores"]["tuned"]["exact_match"] == 1.0


def test_eval_config_fields_accepted_and_refused():
    assert config().comparison_rows == 64 and config().eval_config.max_new_tokens == 128
    assert config(generation_rows=0).comparison_rows == 0
    unsloth = TrainRequest.model_validate({"processed_dataset_id": "d", "training_config": {
        "base_model_id": "m", "provider": "unsloth"}}).training_config
    assert unsloth.comparison_rows == 0  # not shown on a GPU yet
    with pytest.raises(RequestError, match="provider 'unsloth' with eval_config.generation_rows"):
        parse_request(json.dumps({"processed_dataset_id": "d", "training_config": {
            "base_model_id": "m", "provider": "unsloth", "eval_config": {"generation_rows": 8}}}))
    for ev, message in [({"require_improvement": True, "generation_rows": 0}, "require_improvement needs"),
                        ({"improvement_metric": "meteor"}, "improvement_metric"),
                        ({"generation_rows": -1}, "generation_rows"), ({"max_new_tokens": 0}, "max_new_tokens")]:
        with pytest.raises(RequestError) as err:
            parse_request(json.dumps({"processed_dataset_id": "d", "training_config": {
                "base_model_id": "m", "eval_config": ev}}))
        assert message in str(err.value), str(err.value)


def test_batched_answers_are_the_one_at_a_time_answers(local_dir, tiny_root):
    job = make_job(local_dir, sample_request(tiny_root), "batch")
    prep = job.preflight()
    model = job.load_model(prep.tokenizer)
    assert len(prep.cases.prompts) == 18  # every eval row ends with an answer
    assert answers(model, prep.tokenizer, prep.cases, 24, batch_size=8) == \
        answers(model, prep.tokenizer, prep.cases, 24, batch_size=1)


def test_the_tuned_model_beats_the_base_and_says_so(local_dir, tiny_root):
    req = sample_request(tiny_root)
    req["training_config"]["eval_config"].update(generation_rows=16, max_new_tokens=16)
    put_request(local_dir, "better", req)
    assert main.main([], env_for(local_dir, "better")) == 0
    doc = read_doc(local_dir, "better")
    found = doc["generation"]
    assert found["verdict"] == "better" and found["rows"] == 16
    assert found["exact_match"]["delta"] >= 0.3  # the base never answers right (0.44 measured)
    assert found["rouge_l"]["delta"] >= 0.5 and found["bleu"]["delta"] >= 0.3  # (0.80, 0.61)
    assert any(exact_match(s["base"], s["reference"]) == 0 and exact_match(s["tuned"], s["reference"]) == 1
               for s in doc["samples"]), doc["samples"]
    assert {"generate_base", "generate_tuned"} <= set(doc["timings"])
    folder = local_dir / EXPORT / "trained_adapters" / "better"
    rows = [json.loads(line) for line in (folder / "eval_generations.jsonl").read_text().splitlines()]
    assert len(rows) == 16 and rows[0]["tuned"] == doc["samples"][0]["tuned"]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert {"eval_generations.jsonl", "log_history.json", "training_curve.png"} <= set(manifest["files"])
    assert "promoted" not in doc
    # The training curve: every logged training step (logging_first_step, then every 5 of 144), each epoch's
    # evaluation and the final one, and the figure drawn from them
    history = json.loads((folder / "log_history.json").read_text())
    assert [e["step"] for e in history if "loss" in e] == [1, *range(5, 145, 5)]
    assert [e["step"] for e in history if "eval_loss" in e] == [*range(12, 145, 12), 144]
    assert history[-1]["eval_loss"] == pytest.approx(doc["metrics"]["eval_loss"])
    from PIL import Image

    with Image.open(folder / "training_curve.png") as png:
        assert png.format == "PNG" and png.size == (800, 400)


@pytest.mark.parametrize("require", [False, True])
def test_an_untrained_job_is_the_same_and_fails_if_improvement_is_required(require, local_dir, tiny_root):
    req = sample_request(tiny_root)
    req["training_config"]["hyperparameters"].update(learning_rate=1e-12, max_steps=1)
    req["training_config"]["eval_config"].update(generation_rows=8, max_new_tokens=8, require_improvement=require)
    job_id = f"same-{require}"
    put_request(local_dir, job_id, req)
    assert main.main([], env_for(local_dir, job_id)) == (2 if require else 0)
    doc = read_doc(local_dir, job_id)
    assert doc["generation"]["verdict"] == "same" and doc["generation"]["rouge_l"]["delta"] == 0
    folder = local_dir / EXPORT / "trained_adapters" / job_id
    assert (folder / "adapter_model.safetensors").is_file()  # uploaded either way: the user paid for it
    if require:
        assert doc["status"] == "failed" and doc["error_type"] == "permanent" and doc["promoted"] is False
        assert doc["error"].startswith("eval_config.require_improvement: the tuned model is same, not better, "
                                       "than the model it started from on rouge_l")
        assert doc["adapter_path"] == f"gs://{EXPORT}/trained_adapters/{job_id}/"
        assert not (local_dir / EXPORT / "checkpoints" / job_id).exists()


def test_a_model_the_improvement_gate_holds_back_never_reaches_the_hub(local_dir, tiny_root):
    """require_improvement with destination hfhub: a tuned model that is not better is kept in the bucket, marked
    promoted: false, and nothing is pushed to the Hub repo (its earlier contents stay as they were)."""
    req = sample_request(tiny_root)
    req["training_config"]["hyperparameters"].update(learning_rate=1e-12, max_steps=1)
    req["training_config"]["eval_config"].update(generation_rows=8, max_new_tokens=8, require_improvement=True)
    req["training_config"]["export_config"].update(destination="hfhub", hf_repo_id="me/gated", include_gguf=True,
                                                   gguf_quantization="q8_0")
    put_request(local_dir, "gated", req)
    repo = local_dir / "hub" / "me" / "gated"
    repo.mkdir(parents=True)
    (repo / "README.md").write_text("the promoted model of an earlier job")
    assert main.main([], env_for(local_dir, "gated")) == 2
    doc = read_doc(local_dir, "gated")
    assert doc["promoted"] is False and doc["generation"]["verdict"] == "same"
    assert [p.name for p in repo.iterdir()] == ["README.md"]  # the Hub repo untouched
    assert (repo / "README.md").read_text() == "the promoted model of an earlier job"
    assert doc["adapter_path"] == f"gs://{EXPORT}/trained_adapters/gated/"
    assert (local_dir / EXPORT / "trained_adapters" / "gated" / "adapter_model.safetensors").is_file()
    assert doc["gguf_path"].startswith("gs://") and doc["gguf_path"].endswith("model-q8_0.gguf")


def test_preference_rows_compare_with_the_chosen_answer_and_grpo_with_its_graders(tiny_root):
    from transformers import AutoTokenizer

    from training.generation import cases as find_cases
    from training.generation import scores

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_root / "models" / "tiny-gemma3"))
    prompt = [{"role": "user", "content": "What does the cat say?"}]
    dpo = TrainRequest.model_validate({"processed_dataset_id": "d", "training_config": {
        "base_model_id": "m", "trainer_type": "dpo"}}).training_config
    rows = [{"prompt": prompt, "chosen": [{"role": "assistant", "content": "The cat says meow."}],
             "rejected": [{"role": "assistant", "content": "The cat says woof."}]}]
    found = find_cases(dpo, rows, tokenizer, 8)
    assert found.references == ["The cat says meow."] and found.texts == ["What does the cat say?"]
    assert tokenizer.decode(found.prompts[0]).endswith("<start_of_turn>model\n")
    assert scores(dpo, found, ["The cat says meow."])[0]["exact_match"] == 1.0
    grpo = TrainRequest.model_validate({"processed_dataset_id": "d", "training_config": {
        "base_model_id": "m", "trainer_type": "grpo", "hyperparameters": {"batch_size": 4},
        "reward_config": [{"name": "has", "type": "string_check", "reference_field": "answer", "operation": "like",
                           "weight": 2.0}]}}).training_config
    found = find_cases(grpo, [{"prompt": prompt, "answer": "meow"}, {"prompt": prompt, "answer": "woof"}],
                       tokenizer, 8)
    assert found.references == ["meow", "woof"]
    assert scores(grpo, found, ["it says meow", "it says meow"]) == [{"reward": 2.0}, {"reward": 0.0}]
    verdict = compare(grpo, found, ["", ""], ["meow", "woof"])[0]
    assert verdict["metric"] == "reward" and verdict["reward"] == {"base": 0.0, "tuned": 2.0, "delta": 2.0}


def test_a_preference_curve_draws_the_margin_under_the_losses(tmp_path):
    from PIL import Image

    from training.curves import curve_png

    history = [{"step": s, "loss": 1 / s, "rewards/margins": 0.1 * s} for s in range(1, 11)] + \
        [{"step": 10, "eval_loss": 0.2, "eval_rewards/margins": 0.8}]
    (tmp_path / "dpo.png").write_bytes(curve_png(history, "dpo", "dpo job"))
    with Image.open(tmp_path / "dpo.png") as png:
        assert png.size == (800, 650)  # the losses, and the margin below them
    with Image.open(io.BytesIO(curve_png(history, "sft", "sft job"))) as png:
        assert png.size == (800, 400)
