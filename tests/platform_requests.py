"""Requests exactly as the platform's services write them, re-stated from their request models (no code
copied). Each builder returns the JSON object that `json.dumps(model.model_dump())` gives for a request
that sets only what a user typed: every other field is present with its model's default, `null` included.

Read with the search tool on 2026-12-02:
- gemma-facet/cloud-services `training/schema.py` @ 088f784260122420c36de232e011ebf6f9e73e39
  (HyperparameterConfig, EvaluationConfig, WandbConfig, ExportConfig, the seven grader models,
  TrainingConfig, TrainRequest) and `training/app.py` @ 01fea58f2ec96653311f5e9ce114d7fa8f7c3b9d
  (`POST /train` uploads `json.dumps(request.model_dump())` to the config bucket).
- gemma-fine-tuning/services `jobs/training-job/schema.py` @ 34c62cb7d400f6f341fb727fcfec67a49718c5cb
  (the predecessor's grouped form: `max_seq_length: null`, no RL fields, no reward_config).
- gemma-fine-tuning/services `training/schema.py` @ a5eea6ff7983d1f20c94271aae646666c4ce5b52
  (the predecessor's flat form: hyperparameters in `training_config`, `export` and `hf_repo_id` at top
  level, `packing: true` by default).
"""

from __future__ import annotations

import copy
from typing import Any

# cloud-services HyperparameterConfig: every field, with its default
FACET_HYPERPARAMETERS: dict[str, Any] = {
    "learning_rate": 2e-4, "batch_size": 2, "gradient_accumulation_steps": 4, "epochs": 3, "max_steps": -1,
    "packing": False, "padding_free": False, "use_fa2": False, "max_length": 1024, "lr_scheduler_type": "linear",
    "save_strategy": "epoch", "logging_steps": 10, "lora_rank": 16, "lora_alpha": 16, "lora_dropout": 0.05,
    "max_prompt_length": 512, "num_generations": 4, "max_grad_norm": 0.1, "adam_beta1": 0.9, "adam_beta2": 0.99,
    "warmup_ratio": 0.1, "beta": 0.1,
}
FACET_EVAL = {"eval_strategy": "no", "eval_steps": 50, "compute_eval_metrics": False, "batch_eval_metrics": False}
FACET_EXPORT = {"format": "adapter", "destination": "gcs", "hf_repo_id": None, "include_gguf": False,
                "gguf_quantization": None}
FACET_WANDB = {"api_key": None, "project": None, "log_model": "end"}  # api_key is required: the caller sets it

# cloud-services grader models, each with all its fields (defaults where the model has them)
FACET_GRADERS: dict[str, dict[str, Any]] = {
    "string_check": {"name": None, "type": "string_check", "reference_field": None, "operation": None},
    "text_similarity": {"name": None, "type": "text_similarity", "gemini_api_key": None, "reference_field": None,
                        "evaluation_metric": None, "embedding_model": "models/embedding-001"},
    "built_in": {"name": None, "type": "built_in", "function_name": None, "parameters": None},
}


def grader(kind: str, **fields: Any) -> dict[str, Any]:
    return {**FACET_GRADERS[kind], **fields}


def facet_request(trainer_type: str = "sft", *, base_model_id: str = "google/gemma-3-1b-it",
                  dataset: str = "ds-1", hyperparameters: dict | None = None, eval_config: dict | None = None,
                  export_config: dict | None = None, wandb_config: dict | None = None,
                  reward_config: list | None = None, **training: Any) -> dict[str, Any]:
    """cloud-services `POST /train`'s upload. `eval_config` and `wandb_config` are Optional and None by
    default there; given here, they are filled with their models' defaults like model_dump does."""
    return copy.deepcopy({
        "processed_dataset_id": dataset, "hf_token": "hf_platform_token_not_real", "job_name": "unnamed job",
        "training_config": {
            "base_model_id": base_model_id, "provider": "huggingface", "method": "QLoRA",
            "trainer_type": trainer_type, "modality": "text",
            "hyperparameters": {**FACET_HYPERPARAMETERS, **(hyperparameters or {})},
            "export_config": {**FACET_EXPORT, **(export_config or {})},
            "eval_config": None if eval_config is None else {**FACET_EVAL, **eval_config},
            "wandb_config": None if wandb_config is None else {**FACET_WANDB, **wandb_config},
            "reward_config": reward_config,
            **training,
        },
    })


# gemma-fine-tuning/services jobs/training-job HyperparameterConfig (the predecessor's grouped form)
PREDECESSOR_HYPERPARAMETERS: dict[str, Any] = {
    "learning_rate": 2e-4, "batch_size": 2, "gradient_accumulation_steps": 4, "epochs": 3, "max_steps": -1,
    "packing": False, "use_fa2": False, "max_seq_length": None, "lr_scheduler_type": "linear",
    "save_strategy": "epoch", "logging_steps": 10, "lora_rank": 16, "lora_alpha": 16, "lora_dropout": 0.05,
}
PREDECESSOR_EXPORT = {"format": "adapter", "destination": "gcs", "hf_repo_id": None, "include_gguf": False,
                      "gguf_quantization": None}


def predecessor_grouped(*, base_model_id: str = "google/gemma-3-1b-it", dataset: str = "ds-1",
                        hyperparameters: dict | None = None, eval_config: dict | None = None,
                        export_config: dict | None = None, **training: Any) -> dict[str, Any]:
    return copy.deepcopy({
        "processed_dataset_id": dataset, "hf_token": "hf_platform_token_not_real", "job_name": "unnamed job",
        "training_config": {
            "base_model_id": base_model_id, "provider": "huggingface", "method": "QLoRA", "trainer_type": "sft",
            "modality": "text",
            "hyperparameters": {**PREDECESSOR_HYPERPARAMETERS, **(hyperparameters or {})},
            "export_config": {**PREDECESSOR_EXPORT, **(export_config or {})},
            "eval_config": None if eval_config is None else {**FACET_EVAL, **eval_config},
            "wandb_config": None,
            **training,
        },
    })


def predecessor_flat(*, base_model_id: str = "google/gemma-3-1b-it", dataset: str = "ds-1",
                     **training: Any) -> dict[str, Any]:
    """gemma-fine-tuning/services training/schema.py @ a5eea6ff: lora_* and max_seq_length are required but
    nullable (a user who leaves them out of the form sends null); packing defaults to true."""
    return copy.deepcopy({
        "processed_dataset_id": dataset, "hf_token": None,
        "training_config": {
            "method": "LoRA", "base_model_id": base_model_id, "lora_rank": 16, "lora_alpha": 16,
            "lora_dropout": 0.05, "learning_rate": 2e-4, "batch_size": 4, "epochs": 3, "max_steps": -1,
            "max_seq_length": None, "packing": True, "gradient_accumulation_steps": 4, "use_fa2": False,
            "provider": "huggingface", **training,
        },
        "export": "gcs", "hf_repo_id": None, "wandb_config": None,
    })


def facet_flat(*, base_model_id: str = "google/gemma-3-1b-it", dataset: str = "ds-1", modality: str = "text",
               export_config: dict | None = None, **training: Any) -> dict[str, Any]:
    """gemma-facet/cloud-services training/schema.py, its flat generation: the hyperparameters directly in
    training_config, export_config at top level with one `quantization`, and `modality` twice (training_config's
    and a top-level duplicate), all serialised with their defaults."""
    return copy.deepcopy({
        "processed_dataset_id": dataset, "hf_token": "hf_platform_token_not_real", "job_name": "unnamed job",
        "training_config": {
            "method": "LoRA", "base_model_id": base_model_id, "lora_rank": 16, "lora_alpha": 16, "lora_dropout": 0.05,
            "learning_rate": 2e-4, "batch_size": 4, "gradient_accumulation_steps": 4, "epochs": 3, "max_steps": -1,
            "packing": False, "use_fa2": False, "provider": "huggingface", "modality": modality,
            "max_seq_length": None, "lr_scheduler_type": "linear", "save_strategy": "epoch", "logging_steps": 10,
            "eval_strategy": "no", "eval_steps": 50, "compute_eval_metrics": False, "batch_eval_metrics": False,
            **training,
        },
        "export_config": {"format": "adapter", "quantization": "none", "destination": "gcs", "hf_repo_id": None,
                          **(export_config or {})},
        "modality": modality, "wandb_config": None,
    })
