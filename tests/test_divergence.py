"""A run that heals a divergence (training/divergence.py): a NaN loss injected at a chosen step rolls training back
to the last checkpoint saved before it (or to its start where none was), lowers the learning rate once and goes on
to a completed job; a second divergence fails the job with exit 2 naming both steps; a loss spike is judged against
the recent mean, a loss near zero is not judged by its ratio alone."""

from __future__ import annotations

import math
from collections import deque

import pytest

import main
from conftest import env_for, put_request, read_doc, sample_request

LR = 0.005


def poison_at(monkeypatch, steps_by_pass: dict[int, int]) -> dict:
    """Make the trainable weights NaN at the end of a chosen step of each pass of training (pass 1: the first
    train(), pass 2: the one after the roll-back), as an overflow would; returns what the job's trainer logged."""
    from transformers import TrainerCallback

    import base

    seen: dict = {"passes": 0}
    build = base.BaseTrainingJob.build_trainer

    class Poison(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            seen["passes"] += 1

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                seen.setdefault("losses", []).append((seen["passes"], state.global_step, logs["loss"]))

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if steps_by_pass.get(seen["passes"]) == state.global_step:
                for p in model.parameters():
                    if p.requires_grad:
                        p.data.fill_(math.nan)

    def spy(self, model, prep):
        trainer = build(self, model, prep)
        trainer.add_callback(Poison())
        seen["trainer"] = trainer
        return trainer

    monkeypatch.setattr(base.BaseTrainingJob, "build_trainer", spy)
    return seen


def request(tiny_root, **hp) -> dict:
    req = sample_request(tiny_root)
    req["training_config"]["hyperparameters"].update(
        dict(max_steps=16, logging_steps=1, save_strategy="steps", save_steps=4, lr_scheduler_type="constant",
             learning_rate=LR) | hp)
    req["training_config"]["eval_config"] = {"eval_strategy": "no", "generation_rows": 0}
    return req


def kinds(local_dir, job_id) -> list[str]:
    from test_events import events_of

    return [e["kind"] for e in events_of(local_dir, job_id)]


def test_a_nan_rolls_back_to_the_last_checkpoint_before_it_and_training_goes_on_at_half_the_rate(
        local_dir, tiny_root, monkeypatch):
    seen = poison_at(monkeypatch, {1: 9})  # weights NaN after step 9: step 10's loss is NaN
    put_request(local_dir, "heal", request(tiny_root))
    assert main.main([], env_for(local_dir, "heal")) == 0
    doc = read_doc(local_dir, "heal")
    assert doc["status"] == "completed" and doc["step"] == 16
    assert doc["divergences"] == [{"step": 10, "why": "loss nan", "clean_step": 9, "rolled_back_to": 8,
                                   "learning_rate": LR / 2}]
    events = kinds(local_dir, "heal")
    assert events.count("divergence") == 1 and events[-1] == "completed"
    assert any("training diverged at step 10 (loss nan): rolled back to step 8" in w for w in doc["warnings"])
    logged = [h for h in seen["trainer"].state.log_history if "loss" in h]
    assert [h["step"] for h in logged] == list(range(1, 17))  # steps 9 to 16 trained again after the roll-back
    assert all(math.isfinite(h["loss"]) for h in logged)
    assert {h["learning_rate"] for h in logged if h["step"] <= 8} == {LR}
    assert {h["learning_rate"] for h in logged if h["step"] > 8} == {LR / 2}
    assert doc["verification"]["adapter"]["passed"] is True


def test_before_any_checkpoint_training_goes_back_to_its_start(local_dir, tiny_root, monkeypatch):
    seen = poison_at(monkeypatch, {1: 2})
    put_request(local_dir, "start", request(tiny_root, max_steps=8))
    assert main.main([], env_for(local_dir, "start")) == 0
    doc = read_doc(local_dir, "start")
    assert doc["status"] == "completed"
    (found,) = doc["divergences"]
    assert found["step"] == 3 and found["rolled_back_to"] == 0 and found["learning_rate"] == LR / 2
    logged = [h for h in seen["trainer"].state.log_history if "loss" in h]
    assert [h["step"] for h in logged] == list(range(1, 9)) and all(math.isfinite(h["loss"]) for h in logged)
    assert logged[0]["learning_rate"] == LR / 2
    # the first step's loss again: the same starting weights put back, the same data
    first = {p: loss for p, step, loss in seen["losses"] if step == 1}
    assert first[2] == pytest.approx(first[1], rel=1e-6)


def test_a_second_divergence_fails_the_job_with_exit_2_naming_both_steps(local_dir, tiny_root, monkeypatch):
    poison_at(monkeypatch, {1: 9, 2: 13})
    put_request(local_dir, "twice", request(tiny_root))
    assert main.main([], env_for(local_dir, "twice")) == 2
    doc = read_doc(local_dir, "twice")
    assert doc["status"] == "failed" and doc["error_type"] == "permanent"
    assert doc["error"].startswith("hyperparameters.learning_rate: training diverged twice: at step 10 (loss nan), "
                                   "then, rolled back to step 8 with the learning rate lowered to 0.0025, again at "
                                   "step 14 (loss nan); lower learning_rate")
    assert [d["step"] for d in doc["divergences"]] == [10, 14]
    assert kinds(local_dir, "twice").count("divergence") == 2
    assert "adapter_path" not in doc or doc["adapter_path"] is None  # nothing exported


def test_a_spike_is_judged_against_the_recent_mean_and_a_loss_near_zero_not_by_its_ratio_alone():
    from training.divergence import judge

    recent = deque([2.0, 2.1, 1.9, 2.0, 2.0], maxlen=10)
    assert judge({"loss": 7.9}, recent, 4.0) is None  # 3.95x
    assert judge({"loss": 8.5}, recent, 4.0) == "loss 8.5 is 4.2x the mean 2 of the last 5 logged losses"
    assert judge({"loss": 8.5}, recent, None) is None  # spikes not judged
    assert judge({"loss": 8.5}, deque([2.0] * 4), 4.0) is None  # too few losses yet
    assert judge({"loss": 0.5}, deque([0.05] * 10), 4.0) is None  # 10x, but 0.45 above the mean
    assert judge({"loss": 1.0, "grad_norm": math.inf}, recent, 4.0) == "grad_norm inf"
    assert judge({"loss": math.nan}, recent, None) == "loss nan"


@pytest.mark.parametrize("field,value", [("divergence_lr_factor", 1.0), ("divergence_spike_factor", 1.0),
                                         ("divergence_spike_factor", -2)])
def test_bad_divergence_settings_exit_2_naming_the_field(field, value, local_dir, tiny_root):
    put_request(local_dir, "bad", request(tiny_root, **{field: value}))
    assert main.main([], env_for(local_dir, "bad")) == 2
    doc = read_doc(local_dir, "bad")
    assert doc["status"] == "failed" and field in doc["error"]


def test_an_earlier_attempts_divergence_counts_after_a_resume():
    """A retry resuming from a checkpoint: the document's healed divergence is the first, so the next one fails the
    job; the lowered rate comes from the checkpoint's own optimizer and schedule where it was saved after the roll-
    back, and is applied again where the checkpoint is older."""
    from training.divergence import divergence_watch

    recorded = [{"step": 10, "why": "loss nan", "clean_step": 9, "rolled_back_to": 8, "learning_rate": 0.0025}]
    after = divergence_watch(4.0, 0.5)
    after.resume(recorded, 12)
    assert [d.step for d in after.healed] == [10] and after.scale == 1.0
    before = divergence_watch(4.0, 0.5)
    before.resume(recorded, 8)
    assert before.scale == 0.5
    fresh = divergence_watch(4.0, 0.5)
    fresh.resume([], 12)
    assert fresh.healed == [] and fresh.scale == 1.0


def test_the_platforms_null_keeps_the_spike_factor_and_0_turns_it_off():
    """The training service writes an unset field as null: that keeps the default; 0 is how to judge NaN alone."""
    from schema import Hyperparameters

    assert Hyperparameters.model_validate({"divergence_spike_factor": None}).divergence_spike_factor == 4.0
    assert Hyperparameters.model_validate({"divergence_spike_factor": 0}).divergence_spike_factor == 0
