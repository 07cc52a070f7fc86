"""Early stopping and the best checkpoint (issue 19): training stops when the chosen eval metric stops
improving, the best checkpoint is exported, and it is kept in the bucket and restored beside the newest so
that a preempted and resumed job still exports it."""

from __future__ import annotations

import json

import pytest

import checkpoints
import main
from conftest import env_for, put_request, read_doc, sample_request
from errors import RequestError
from request import parse_request

EXPORT = "gemma-export-bucket"


def best_request(tiny_root) -> dict:
    """Evaluated and saved each epoch (12 steps), of 12 epochs. `greater_is_better` on the eval loss makes the
    first evaluation the best and every later one "no improvement", since the loss only falls on this task:
    a best checkpoint that is not the last, known in advance. Patience 2 stops it after epoch 3 (step 36)."""
    req = sample_request(tiny_root)
    req["training_config"]["hyperparameters"].update(save_total_limit=1)
    req["training_config"]["eval_config"].update(early_stopping_patience=2, greater_is_better=True,
                                                 load_best_model_at_end=True, generation_rows=0)
    return req


def check_best(local_dir, job_id: str) -> dict:
    doc = read_doc(local_dir, job_id)
    assert doc["status"] == "completed", doc.get("error")
    assert doc["step"] == 36 and doc["total_steps"] == 144  # stopped before its last epoch
    assert doc["stop_reason"] == ("early stopping: eval_loss did not improve by more than 0.0 for 2 evaluations, "
                                  "at step 36 of 144")
    assert doc["best_step"] == doc["exported_step"] == 12
    history = json.loads((local_dir / EXPORT / "trained_adapters" / job_id / "log_history.json").read_text())
    evals = {e["step"]: e["eval_loss"] for e in history if "eval_loss" in e and e is not history[-1]}
    assert sorted(evals) == [12, 24, 36] and evals[12] > evals[24] > evals[36]
    # the exported model is the best checkpoint's: its eval loss is step 12's, not step 36's
    assert doc["metrics"]["eval_loss"] == pytest.approx(evals[12], rel=1e-5) == pytest.approx(doc["best_metric"])
    return doc


def test_early_stopping_stops_and_the_best_checkpoint_is_exported(local_dir, tiny_root):
    put_request(local_dir, "best", best_request(tiny_root))
    assert main.main([], env_for(local_dir, "best")) == 0
    check_best(local_dir, "best")


def test_a_preempted_job_still_exports_its_best_checkpoint(local_dir, tiny_root, monkeypatch):
    """Stopped at step 30 (after the best, step 12; before early stopping, step 36) as a SIGTERM stops it,
    with save_total_limit 1: the bucket keeps checkpoint-12 beside checkpoint-30, the next attempt restores
    both, stops at step 36 and exports step 12's model."""
    put_request(local_dir, "best-pre", best_request(tiny_root))
    check = checkpoints.Guard.check

    def preempted_at_30(self, needed_s=0.0):
        self.steps = getattr(self, "steps", 0) + 1
        if self.steps == 30:
            self.reason = "SIGTERM (the task is being stopped)"
        return check(self, needed_s)
    with monkeypatch.context() as m:
        m.setattr(checkpoints.Guard, "check", preempted_at_30)
        assert main.main([], env_for(local_dir, "best-pre")) == 1
    kept = checkpoints.CheckpointStore(__import__("storage").LocalBlobStore(local_dir),
                                       f"gs://{EXPORT}/checkpoints/best-pre/").complete()
    assert kept == [12, 30]  # the newest, and the best, though save_total_limit is 1
    assert main.main([], env_for(local_dir, "best-pre", CLOUD_RUN_TASK_ATTEMPT="1")) == 0
    doc = check_best(local_dir, "best-pre")
    assert doc["resumed_from_step"] == 30


@pytest.mark.parametrize("tc,message", [
    ({"eval_config": {"early_stopping_patience": 2}}, "early_stopping_patience needs evaluations during training"),
    ({"eval_config": {"load_best_model_at_end": True, "eval_strategy": "steps"}},
     "save_strategy ('epoch') must equal eval_config.eval_strategy ('steps')"),
    ({"eval_config": {"load_best_model_at_end": True, "eval_strategy": "steps", "eval_steps": 30},
      "hyperparameters": {"save_strategy": "steps", "save_steps": 100}}, "must be a multiple of eval_steps (30)"),
    ({"eval_config": {"early_stopping_patience": 1, "eval_strategy": "epoch", "metric_for_best_model": "reward"}},
     "is not an eval metric trainer_type 'sft' reports"),
    ({"eval_config": {"early_stopping_patience": 0, "eval_strategy": "epoch"}}, "early_stopping_patience"),
])
def test_best_checkpoint_options_refused_naming_the_field(tc, message):
    with pytest.raises(RequestError) as err:
        parse_request(json.dumps({"processed_dataset_id": "d", "training_config": {"base_model_id": "m", **tc}}))
    assert message in str(err.value), str(err.value)


def test_best_checkpoint_options_accepted():
    ev = {"early_stopping_patience": 3, "early_stopping_threshold": 0.01, "eval_strategy": "steps",
          "eval_steps": 50, "metric_for_best_model": "eval_mean_token_accuracy", "load_best_model_at_end": True}
    parsed = parse_request(json.dumps({"processed_dataset_id": "d", "training_config": {
        "base_model_id": "m", "eval_config": ev, "hyperparameters": {"save_strategy": "steps", "save_steps": 100}}}))
    assert parsed.training_config.eval_config.early_stopping_patience == 3
    dpo = parse_request(json.dumps({"processed_dataset_id": "d", "training_config": {
        "base_model_id": "m", "trainer_type": "dpo",
        "eval_config": {"load_best_model_at_end": True, "eval_strategy": "epoch",
                        "metric_for_best_model": "rewards/margins"}}}))
    assert dpo.training_config.eval_config.metric_for_best_model == "rewards/margins"
