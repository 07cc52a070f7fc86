"""Early stopping and the best checkpoint (issue 19): training stops when the chosen eval metric stops
improving, the best checkpoint is exported, and it is kept in the bucket and restored beside the newest so
that a preempted and resumed job still exports it."""

from __future__ import annotations

import json

import pytest

import main
from conftest import env_for, put_request, read_doc, sample_request
from runtime.errors import RequestError
from runtime.request import parse_request
from storage import LocalBlobStore
from training import checkpoints

EXPORT = "gemma-export-bucket"


def best_request(tiny_root, batch_size: int = 8) -> dict:
    """Evaluated and saved each epoch (12 steps), of 12 epochs. `greater_is_better` on the eval loss makes the
    first evaluation the best and every later one "no improvement", since the loss only falls on this task:
    a best checkpoint that is not the last, known in advance. Patience 2 stops it after epoch 3 (step 36)."""
    req = sample_request(tiny_root)
    req["training_config"]["hyperparameters"].update(save_total_limit=1, batch_size=batch_size)
    req["training_config"]["eval_config"].update(early_stopping_patience=2, greater_is_better=True,
                                                 load_best_model_at_end=True, generation_rows=0)
    return req


def check_best(local_dir, job_id: str, epoch: int = 12) -> dict:
    """Stopped after epoch 3 of 12, the first epoch's checkpoint exported (`epoch`: steps per epoch)."""
    doc = read_doc(local_dir, job_id)
    assert doc["status"] == "completed", doc.get("error")
    assert doc["step"] == 3 * epoch and doc["total_steps"] == 12 * epoch  # stopped before its last epoch
    assert doc["stop_reason"] == ("early stopping: eval_loss did not improve by more than 0.0 for 2 evaluations, "
                                  f"at step {3 * epoch} of {12 * epoch}")
    assert doc["best_step"] == doc["exported_step"] == epoch
    history = json.loads((local_dir / EXPORT / "trained_adapters" / job_id / "log_history.json").read_text())
    evals = {e["step"]: e["eval_loss"] for e in history if "eval_loss" in e and e is not history[-1]}
    assert sorted(evals) == [epoch, 2 * epoch, 3 * epoch] and evals[epoch] > evals[2 * epoch] > evals[3 * epoch]
    # the exported model is the best checkpoint's: its eval loss is the first epoch's, not the third's
    assert doc["metrics"]["eval_loss"] == pytest.approx(evals[epoch], rel=1e-5) == \
        pytest.approx(doc["best_metric"])
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
    kept = checkpoints.CheckpointStore(LocalBlobStore(local_dir),
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


def test_kill_9_between_the_best_step_and_the_stop_still_exports_the_best(local_dir, tiny_root):
    """The job as its own process, killed with SIGKILL once epoch 2's checkpoint (step 90) is in the bucket:
    before early stopping at step 135 (45 steps an epoch at batch size 2), after the best, step 45. The rerun
    resumes from step 90 with checkpoint-45 restored beside it and exports step 45's model."""
    from test_reliability import RESUMED, Job, wait_for_checkpoint

    put_request(local_dir, "best-kill", best_request(tiny_root, batch_size=2))
    job = Job(local_dir, "best-kill", 0)
    wait_for_checkpoint(local_dir, "best-kill", job, timeout=120)  # checkpoint-45
    wait_for_checkpoint(local_dir, "best-kill", job, timeout=120)  # checkpoint-90
    assert job.proc.poll() is None, "the job ended before it could be killed"
    job.proc.kill()
    job.wait()
    store = checkpoints.CheckpointStore(LocalBlobStore(local_dir),
                                        f"gs://{EXPORT}/checkpoints/best-kill/")
    assert store.complete() == [45, 90]
    final = Job(local_dir, "best-kill", 1)
    assert final.wait(timeout=300) == 0, final.output[-3000:]
    assert RESUMED.search(final.output)[1] == "90"
    check_best(local_dir, "best-kill", epoch=45)
