"""DPO, ORPO and GRPO through the Hugging Face provider on the tiny Gemma 3 (CPU): the adapter
trains and the base stays frozen, the preference or reward moves the right way, and the evaluation
metrics reach the job document under their reader names."""

from __future__ import annotations

import re
import statistics
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import main
from conftest import env_for, make_job, put_request, read_doc, sample_request


def rl_request(tiny_root, trainer_type: str, dataset: str, **hp) -> dict:
    req = sample_request(tiny_root, trainer_type=trainer_type)
    req["processed_dataset_id"] = dataset
    req["training_config"]["hyperparameters"].update(max_prompt_length=64, logging_steps=1, **hp)
    return req


def run_steps(local_dir, req, job_id):
    """Drive the workflow step by step; return the job, trainer, parameters before, and step time."""
    job = make_job(local_dir, req, job_id)
    prep = job.preflight()
    model = job.load_model(prep.tokenizer)
    before = {n: p.detach().float().clone() for n, p in model.named_parameters()}
    trainer = job.build_trainer(model, prep)
    first = trainer.evaluate()
    t = time.perf_counter()
    job.train(trainer)
    step_s = (time.perf_counter() - t) / trainer.state.global_step
    return job, prep, trainer, before, first, step_s


def changed_params(trainer, before) -> set[str]:
    """Parameters that changed in training (DPO adds a frozen copy of the adapter, `.ref.`, as its reference)."""
    return {n for n, p in trainer.model.named_parameters()
            if n in before and not torch.equal(p.detach().float(), before[n])}


@pytest.mark.parametrize("trainer_type", ["dpo", "orpo", "simpo"])
def test_preference_training_prefers_chosen(trainer_type, local_dir, tiny_root, capsys):
    """DPO, ORPO and SimPO (TRL's CPO trainer with its simpo loss and no SFT term): the adapter alone trains, and
    held-out pairs are ranked better than before. SimPO loads no reference model and needs none: it starts from
    the untrained model's own ranking, which it must beat."""
    # SimPO's beta scales an average log-probability, not a sum: the paper's 2 to 2.5 (TRL's CPO default is 0.1)
    req = rl_request(tiny_root, trainer_type, "tiny-animals-pref", epochs=6 if trainer_type == "simpo" else 4,
                     beta=2.5 if trainer_type == "simpo" else 1.0)
    job, prep, trainer, before, first, step_s = run_steps(local_dir, req, trainer_type)
    changed = changed_params(trainer, before)
    assert changed and all("lora_" in n for n in changed)  # the base stayed frozen
    assert any("lora_" in n for n in before) and len(changed) == sum("lora_" in n for n in before)
    metrics = job.evaluate(trainer, prep, {})
    # the margin between chosen and rejected grows, and most held-out pairs are ranked right
    assert metrics["reward_margin"] > first["eval_rewards/margins"] + 0.03
    assert metrics["reward_accuracy"] >= 0.65
    assert metrics["eval_loss"] < first["eval_loss"]
    assert "perplexity" not in metrics  # an SFT metric; readers treat it as null here
    if trainer_type == "simpo":
        assert type(trainer).__name__ == "CPOTrainer" and trainer.args.loss_type == "simpo"
        assert trainer.args.cpo_alpha == 0.0 and getattr(trainer, "ref_model", None) is None
        assert metrics["reward_accuracy"] > first["eval_rewards/accuracies"]
    with capsys.disabled():
        print(f"\n{trainer_type}: {step_s:.3f} s/step on this CPU, accuracy {first['eval_rewards/accuracies']:.2f} -> "
              f"{metrics['reward_accuracy']:.2f}, margin {first['eval_rewards/margins']:.3f} -> "
              f"{metrics['reward_margin']:.3f}")


def test_dpo_job_writes_reward_metrics_to_the_document(local_dir, tiny_root):
    req = rl_request(tiny_root, "dpo", "tiny-animals-pref", epochs=1, max_steps=4)
    put_request(local_dir, "dpo-doc", req)
    assert main.main([], env_for(local_dir, "dpo-doc")) == 0
    m = read_doc(local_dir, "dpo-doc")["metrics"]
    assert {"reward_accuracy", "reward_margin", "reward_chosen", "reward_rejected", "eval_loss",
            "eval_runtime"} <= set(m)
    assert 0 <= m["reward_accuracy"] <= 1


def says_dataset(local_dir) -> str:
    """The prompts dataset with a constant reference column: a reward any model can learn to raise."""
    src = local_dir / "gemma-dataset-bucket" / "processed_datasets" / "tiny-animals-prompts"
    dst = src.with_name("says")
    dst.mkdir()
    for split in ("train", "test"):
        table = pq.read_table(src / f"{split}.parquet")
        pq.write_table(table.append_column("word", pa.array(["says"] * table.num_rows)), dst / f"{split}.parquet")
    return "says"


def test_grpo_raises_an_easy_reward(local_dir, tiny_root, capfd):
    req = rl_request(tiny_root, "grpo", says_dataset(local_dir), epochs=1, max_steps=30, max_length=80,
                     batch_size=8, num_generations=4, learning_rate=0.01, warmup_ratio=0.0)
    req["training_config"]["reward_config"] = [
        {"name": "says", "type": "string_check", "reference_field": "word", "operation": "ilike"}]
    req["training_config"]["eval_config"] = {"eval_strategy": "no"}
    put_request(local_dir, "grpo", req)
    t = time.perf_counter()
    assert main.main([], {**env_for(local_dir, "grpo"), "LOG_LEVEL": "DEBUG"}) == 0
    took = time.perf_counter() - t
    logs = capfd.readouterr().err  # the job's log lines: one per step at DEBUG
    rewards = {int(s): float(r) for s, r in re.findall(r"step (\d+)/30: .*?\breward=([0-9.e-]+)", logs)}
    assert len(rewards) == 30
    early = statistics.mean(rewards[s] for s in range(1, 11))
    late = statistics.mean(rewards[s] for s in range(21, 31))
    assert late > early + 0.2, (early, late)
    doc = read_doc(local_dir, "grpo")
    m = doc["metrics"]
    assert {"reward_mean", "reward_std", "eval_rewards/says/mean"} <= set(m) and 0 <= m["reward_mean"] <= 1
    assert doc["status"] == "completed" and doc["step"] == 30
    found = doc["generation"]  # the eval prompts answered before and after, scored by the request's grader
    assert found["metric"] == "reward" and found["reward"]["tuned"] > found["reward"]["base"], found
    adapter = local_dir / "gemma-export-bucket" / "trained_adapters" / "grpo"
    assert (adapter / "adapter_model.safetensors").is_file()
    assert not [p.name for p in adapter.iterdir() if p.is_dir()]  # no ref/: TRL's reference copy stays out
    with capfd.disabled():
        print(f"\ngrpo: reward {early:.2f} (steps 1-10) -> {late:.2f} (steps 21-30); whole job {took:.1f}s")


@pytest.mark.slow
@pytest.mark.parametrize("loss_type,level", [("grpo", "sequence"), ("dr_grpo", "token"), ("bnpo", "sequence")])
def test_each_grpo_loss_raises_the_easy_reward(loss_type, level, local_dir, tiny_root):
    """GRPO's loss variants as TRL names them, each with the policy ratio per token or per completion (GSPO),
    reach TRL's config as asked and raise the same easy reward as the default (dapo, token: the test above)."""
    req = rl_request(tiny_root, "grpo", says_dataset(local_dir), epochs=1, max_steps=30, max_length=80,
                     batch_size=8, num_generations=4, learning_rate=0.01, warmup_ratio=0.0, loss_type=loss_type,
                     importance_sampling_level=level)
    req["training_config"]["reward_config"] = [
        {"name": "says", "type": "string_check", "reference_field": "word", "operation": "ilike"}]
    req["training_config"]["eval_config"] = {"eval_strategy": "no"}
    job = make_job(local_dir, req, f"grpo-{loss_type}")
    prep = job.preflight()
    trainer = job.build_trainer(job.model_to_train(prep.tokenizer), prep)
    assert (trainer.args.loss_type, trainer.args.importance_sampling_level) == (loss_type, level)
    job.train(trainer)
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    assert len(rewards) == 30
    early, late = statistics.mean(rewards[:10]), statistics.mean(rewards[20:])
    assert late > early + 0.2, (early, late)


def test_grpo_loss_options_are_refused_elsewhere_and_trl_defaults_kept(tiny_root):
    """loss_type and importance_sampling_level are GRPO's: named for another trainer type, or a loss TRL has that
    this job has not shown, the request is refused naming the field; unnamed, TRL's defaults (dapo, token) hold."""
    from pydantic import ValidationError

    from schema import TrainRequest

    for trainer_type in ("sft", "dpo", "orpo"):
        req = rl_request(tiny_root, trainer_type, "tiny-animals-pref", loss_type="dapo")
        with pytest.raises(ValidationError, match=f"loss_type is a GRPO option .* not '{trainer_type}'"):
            TrainRequest.model_validate(req)
    req = rl_request(tiny_root, "dpo", "tiny-animals-pref", importance_sampling_level="sequence")
    with pytest.raises(ValidationError, match="importance_sampling_level is a GRPO option"):
        TrainRequest.model_validate(req)
    req = rl_request(tiny_root, "grpo", "tiny-animals-prompts", loss_type="cispo")
    req["training_config"]["reward_config"] = [{"name": "n", "type": "string_check", "reference_field": "answer",
                                                "operation": "ilike"}]
    with pytest.raises(ValidationError, match="loss_type"):
        TrainRequest.model_validate(req)
    req["training_config"]["hyperparameters"].pop("loss_type")
    hp = TrainRequest.model_validate(req).training_config.hyperparameters
    assert hp.loss_type is None and hp.importance_sampling_level is None


def test_grpo_needs_the_graders_reference_column(local_dir, tiny_root):
    req = rl_request(tiny_root, "grpo", "tiny-animals-prompts", batch_size=8, num_generations=4)
    req["training_config"]["reward_config"] = [
        {"name": "x", "type": "string_check", "reference_field": "solution", "operation": "eq"}]
    put_request(local_dir, "grpo-cols", req)
    assert main.main([], env_for(local_dir, "grpo-cols")) == 2
    err = read_doc(local_dir, "grpo-cols")["error"]
    assert "reward_config reads ['solution']" in err and "'answer'" in err and "'prompt'" in err
