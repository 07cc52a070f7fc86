"""DPO, ORPO and GRPO on a Gemma 4 model (the tiny E2B-like fixture: per-layer embeddings, key/value sharing):
the preference or the reward moves the right way, as on Gemma 3 (tests/test_rl.py), whose helpers these use."""

from __future__ import annotations

import pytest

from conftest import make_job
from test_rl import changed_params, rl_request, run_steps, says_dataset


@pytest.mark.slow
@pytest.mark.parametrize("trainer_type", ["dpo", "orpo"])
def test_preference_training_on_gemma_4_prefers_chosen(trainer_type, local_dir, tiny_root):
    # Gemma 4's tiny model needs a lower learning rate than Gemma 3's (at 0.005 its rewards oscillate)
    # ORPO at beta 2 (its odds-ratio term weighed up against its SFT term): at 1 the margin's rise and the ranking
    # of held-out pairs hung on the CPU (Intel Xeon: +0.08 and 0.50; AMD EPYC: above +0.1 and 0.54-0.79); at 2 on
    # the Xeon, +1.09 and 0.79
    req = rl_request(tiny_root, trainer_type, "tiny-animals-pref", epochs=6, beta=1.0 if trainer_type == "dpo" else 2.0,
                     learning_rate=0.002)
    req["training_config"]["base_model_id"] = str(tiny_root / "models" / "tiny-gemma4-e2b")
    job, prep, trainer, before, first, _ = run_steps(local_dir, req, trainer_type)
    changed = changed_params(trainer, before)
    assert changed and all("lora_" in n for n in changed)
    metrics = job.evaluate(trainer, prep, {})
    rise = metrics["reward_margin"] - first["eval_rewards/margins"]
    assert rise > 0.1 and metrics["eval_loss"] < first["eval_loss"], rise
    # held-out pairs ranked right: DPO about 0.88, ORPO 0.79 (Intel Xeon)
    assert metrics["reward_accuracy"] >= (0.65 if trainer_type == "dpo" else 0.6), metrics["reward_accuracy"]


@pytest.mark.slow
def test_grpo_on_gemma_4_raises_an_easy_reward(local_dir, tiny_root):
    req = rl_request(tiny_root, "grpo", says_dataset(local_dir), epochs=1, max_steps=60, max_length=80,
                     batch_size=8, num_generations=4, learning_rate=0.01, warmup_ratio=0.0)
    req["training_config"]["base_model_id"] = str(tiny_root / "models" / "tiny-gemma4-e2b")
    req["training_config"]["reward_config"] = [
        {"name": "says", "type": "string_check", "reference_field": "word", "operation": "ilike"}]
    req["training_config"]["eval_config"] = {"eval_strategy": "no"}
    # twice the steps of the Gemma 3 test: the tiny Gemma 4 starts further from the answer (about 0.02 -> 0.48)
    job = make_job(local_dir, req, "grpo4")
    prep = job.preflight()
    trainer = job.build_trainer(job.model_to_train(prep.tokenizer), prep)
    job.train(trainer)
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    assert len(rewards) == 60
    assert sum(rewards[-15:]) / 15 > sum(rewards[:15]) / 15 + 0.2, rewards
