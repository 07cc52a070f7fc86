"""One hop per layer: each hyperparameter of the request reaches TRL's configuration object under the
same value, for every provider and trainer type, through the one mapping in `BaseTrainingJob`; a
provider changes only what its `sft_overrides()` names (STYLE.md)."""

from __future__ import annotations

import math

import pytest

from base import Prepared
from conftest import sample_request
from providers import PROVIDERS
from runtime.libraries import trl_classes
from scripts.testbed import local_job

HP = {"learning_rate": 3e-5, "batch_size": 4, "gradient_accumulation_steps": 3, "epochs": 2, "max_steps": 7,
      "lr_scheduler_type": "cosine", "max_grad_norm": 0.5, "adam_beta1": 0.8, "adam_beta2": 0.95,
      "warmup_ratio": 0.2, "weight_decay": 0.01, "logging_steps": 5, "save_strategy": "steps", "save_steps": 9,
      "save_total_limit": 3, "seed": 7, "max_length": 256, "max_prompt_length": 96, "beta": 0.3,
      "num_generations": 2}
# request field -> TRL's name, where they differ (warmup_steps < 1 is a ratio of the total steps)
RENAMED = {"batch_size": "per_device_train_batch_size", "epochs": "num_train_epochs", "warmup_ratio": "warmup_steps"}
GRADER = {"name": "says", "type": "string_check", "reference_field": "word", "operation": "ilike"}


def trl_config(job, prep=Prepared(None, None, None, 7)):
    config_cls, _ = trl_classes(job.cfg.trainer_type)
    return config_cls(**(job.trainer_kwargs(prep) | job.sft_overrides()))


@pytest.mark.parametrize("trainer_type", ["sft", "dpo", "orpo", "grpo"])
@pytest.mark.parametrize("provider", sorted(PROVIDERS))
def test_request_values_reach_the_trl_config(provider, trainer_type, tmp_path, tiny_root):
    request = sample_request(tiny_root, provider=provider, trainer_type=trainer_type, hyperparameters=HP,
                             reward_config=[GRADER] if trainer_type == "grpo" else [])
    args = trl_config(local_job(request, tmp_path))
    checked = []
    for field, value in HP.items():
        name = RENAMED.get(field, field)
        if hasattr(args, name):
            assert getattr(args, name) == value, f"{field} -> {name}"
            checked.append(field)
    assert len(checked) >= 16, checked  # every shared field, whatever the trainer type adds
    assert args.per_device_eval_batch_size == HP["batch_size"] and args.output_dir.endswith("checkpoints")
    specific = {"sft": ("max_length",), "dpo": ("max_length", "beta"), "orpo": ("max_length", "beta"),
                "grpo": ("beta", "num_generations")}[trainer_type]
    assert all(getattr(args, name) == HP[name] for name in specific)
    if trainer_type in ("orpo", "grpo"):  # what the prompt leaves of max_length
        assert args.max_completion_length == HP["max_length"] - HP["max_prompt_length"]
    # the ratio is read as a ratio: 20 % of 40 steps warm up, not 0.2 steps
    assert args.get_warmup_steps(40) == math.ceil(40 * HP["warmup_ratio"]) == 8


@pytest.mark.parametrize("trainer_type", ["sft", "dpo", "orpo", "grpo"])
def test_providers_differ_only_in_their_overrides(trainer_type, tmp_path, tiny_root):
    jobs = {name: local_job(sample_request(tiny_root, provider=name, trainer_type=trainer_type, hyperparameters=HP,
                                           reward_config=[GRADER] if trainer_type == "grpo" else []),
                            tmp_path / name) for name in PROVIDERS}
    prep = Prepared(None, None, None, 7)
    hf, unsloth = jobs["huggingface"], jobs["unsloth"]
    # the same mapping (each job's own work folder aside); Unsloth's only difference is its 8-bit AdamW
    assert {k: v for k, v in hf.trainer_kwargs(prep).items() if k != "output_dir"} == \
           {k: v for k, v in unsloth.trainer_kwargs(prep).items() if k != "output_dir"}
    assert hf.sft_overrides() == {} and unsloth.sft_overrides() == {"optim": "adamw_8bit"}
    assert trl_config(unsloth).optim == "adamw_8bit" and trl_config(hf).optim != "adamw_8bit"
