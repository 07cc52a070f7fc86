"""The providers: Hugging Face (transformers + PEFT + TRL) and Unsloth, one subclass each of
BaseTrainingJob, differing only where their libraries differ.

`PROVIDERS` maps the request's `training_config.provider` to the class.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from base import BaseTrainingJob
from errors import PermanentError

logger = logging.getLogger(__name__)


class HuggingFaceTrainingJob(BaseTrainingJob):
    def load_model(self, tokenizer) -> Any:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(self.cfg.base_model_id, **self.base_model_kwargs())
        if self.cfg.method == "Full":
            return model
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

        if self.cfg.method == "QLoRA":
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        return get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **self.lora_kwargs()))

    def save_merged(self, model, tokenizer, out_dir: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        # q4 is quantized from the bf16 merge afterwards (artifacts.save_4bit)
        dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "q4": torch.bfloat16}
        dtype = dtypes[self.cfg.export_config.merged_dtype]
        if self.cfg.export_config.merged_dtype == "fp16":
            logger.warning("merging in fp16 as asked: Gemma's activations can overflow fp16; bf16 is safer")
        if self.cfg.method == "Full":
            model.to(dtype).save_pretrained(str(out_dir))
        else:
            # Merge into the base reloaded in 16-bit, never into 4-bit or fp32 training weights.
            from peft import PeftModel

            adapter = out_dir.parent / "adapter-for-merge"
            model.save_pretrained(str(adapter))
            base = AutoModelForCausalLM.from_pretrained(self.cfg.base_model_id, dtype=dtype, token=self.token(),
                                                        use_safetensors=True)
            PeftModel.from_pretrained(base, str(adapter)).merge_and_unload().save_pretrained(str(out_dir))
            shutil.rmtree(adapter, ignore_errors=True)
        tokenizer.save_pretrained(str(out_dir))


class UnslothTrainingJob(BaseTrainingJob):
    methods = ("LoRA", "QLoRA")
    # SFT only until the RL trainers have run under Unsloth on a GPU (issue 6); the others are refused.
    trainer_types = ("sft",)

    def check_environment(self) -> None:
        import torch

        if not torch.cuda.is_available():
            raise PermanentError("training_config.provider: 'unsloth' needs an NVIDIA GPU and none is visible; "
                                 "run on a GPU machine or set provider 'huggingface'.")
        import unsloth  # noqa: F401  (must come before transformers, peft and trl)

    def load_model(self, tokenizer) -> Any:
        from unsloth import FastLanguageModel

        hp = self.cfg.hyperparameters
        model, _ = FastLanguageModel.from_pretrained(
            self.cfg.base_model_id, max_seq_length=hp.max_length, load_in_4bit=self.cfg.method == "QLoRA",
            token=self.token(), dtype=None)
        return FastLanguageModel.get_peft_model(model, use_gradient_checkpointing="unsloth",
                                                random_state=hp.seed, **self.lora_kwargs())

    def sft_overrides(self) -> dict[str, Any]:
        return {"optim": "adamw_8bit"}

    def save_merged(self, model, tokenizer, out_dir: Path) -> None:
        model.save_pretrained_merged(str(out_dir), tokenizer, save_method="merged_16bit")


PROVIDERS: dict[str, type[BaseTrainingJob]] = {"huggingface": HuggingFaceTrainingJob, "unsloth": UnslothTrainingJob}
