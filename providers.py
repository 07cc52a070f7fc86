"""The providers: Hugging Face (transformers + PEFT + TRL) and Unsloth, one subclass each of
BaseTrainingJob, differing only where their libraries differ.

`PROVIDERS` maps the request's `training_config.provider` to the class.
"""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path
from typing import Any

from base import NEVER_ADAPTED, NOT_LANGUAGE, BaseTrainingJob
from models.artifacts import cast_saved
from runtime.errors import PermanentError

logger = logging.getLogger(__name__)

class HuggingFaceTrainingJob(BaseTrainingJob):
    def load_model(self, tokenizer) -> Any:
        from exporting.verification import auto_class

        model = auto_class(self.cfg.vision, self.cfg.base_model_id, self.token()).from_pretrained(
            self.cfg.base_model_id, **self.base_model_kwargs())
        if self.cfg.method == "Full":
            return model
        from peft import LoraConfig, PeftModel, get_peft_model

        # Not PEFT's prepare_model_for_kbit_training: it casts every parameter the 4- or 8-bit loader left in
        # 16 bits to fp32 (the embeddings; Gemma 4's experts and per-layer table), twice the memory the
        # pre-flight counts on a GPU (tests/test_gpu_config.py). PEFT freezes the base either way, and Gemma's
        # norms compute in fp32 whatever their weights' dtype.
        if self.parent:  # continue its adapter, its shape as it is (training/lineage.py); the dropout is this job's
            config = LoraConfig.from_pretrained(str(self.parent.folder))
            config.lora_dropout, config.inference_mode = self.cfg.hyperparameters.lora_dropout, False
            return PeftModel.from_pretrained(model, str(self.parent.folder), config=config, is_trainable=True)
        # PEFT matches the target names anywhere: on Gemma 3 4B and up, the vision tower's q/k/v_proj too,
        # which a text job never runs (Unsloth scopes its list to the language model itself). An image+text
        # job picks its towers (finetune_vision_layers / finetune_language_layers).
        towers = any(re.fullmatch(NOT_LANGUAGE, name) for name, _ in model.named_modules())
        kwargs = self.lora_kwargs()
        exclude = NOT_LANGUAGE if towers else None
        if self.cfg.vision:
            kwargs, exclude = vision_lora(kwargs, self.cfg.hyperparameters, model)
        return get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", exclude_modules=exclude, **kwargs))

    def save_merged(self, model, tokenizer, out_dir: Path) -> None:
        """`tokenizer`: an image+text job's processor, which saves its tokenizer too."""
        from exporting.verification import auto_class

        dtype = merge_dtype(self.cfg.export_config.merged_dtype)
        if self.cfg.method == "Full":
            model.to(dtype).save_pretrained(str(out_dir))
        else:
            # Merge into the base reloaded in 16-bit, never into 4-bit or fp32 training weights.
            from peft import PeftModel

            adapter = out_dir.parent / "adapter-for-merge"
            model.save_pretrained(str(adapter))
            base = auto_class(self.cfg.vision, self.cfg.base_model_id, self.token()).from_pretrained(
                self.cfg.base_model_id, dtype=dtype, token=self.token(), use_safetensors=True,
                trust_remote_code=self.cfg.trust_remote_code)
            PeftModel.from_pretrained(base, str(adapter)).merge_and_unload().save_pretrained(str(out_dir))
            shutil.rmtree(adapter, ignore_errors=True)
        tokenizer.save_pretrained(str(out_dir))


class UnslothTrainingJob(BaseTrainingJob):
    # LoRA and QLoRA SFT ran end to end on an H100 (benchmarks/results/gpu-check-h100.md). Full and the RL
    # trainer types stay refused until they have too: scripts/gpu_check.py tries them with this gate open.
    methods = ("LoRA", "QLoRA")
    trainer_types = ("sft",)

    def check_environment(self) -> None:
        import torch

        if self.place.distributed:  # not shown to work under several processes: refused until it is
            raise PermanentError(f"training_config.provider: Unsloth trains in one process on one GPU, and this run "
                                 f"has {self.place.world_size}; run one process (python main.py with one GPU "
                                 "visible, or NPROC_PER_NODE=1), or use provider 'huggingface'.")
        if not torch.cuda.is_available():
            raise PermanentError("training_config.provider: 'unsloth' needs an NVIDIA GPU and none is visible; "
                                 "run on a GPU machine or set provider 'huggingface'.")
        try:
            import unsloth  # noqa: F401  (must come before transformers, peft and trl)
        except ImportError as e:  # this image's library set: every retry would fail the same
            raise PermanentError(f"training_config.provider: 'unsloth' cannot be imported in this image "
                                 f"({type(e).__name__}: {e}); set provider 'huggingface'.") from e
        # Anything else (a CUDA error while Unsloth probes the GPU, a full disk while it compiles its
        # kernels) belongs to this attempt and goes up as it is: exit 1, and the retry runs.

    def load_model(self, tokenizer) -> Any:
        from unsloth import FastLanguageModel

        hp, method = self.cfg.hyperparameters, self.cfg.method
        # use_exact_model_name: train on the model the request names (and whose access was checked), not on
        # a mirror Unsloth would map it to; the adapter then names the same base that the consumers load.
        # text_only stays off for Gemma 3 4B and up: the text-only decoder's weights are named model.layers.*,
        # so its adapter would not match the image+text model (model.language_model.layers.*) consumers load.
        model, _ = FastLanguageModel.from_pretrained(
            self.cfg.base_model_id, max_seq_length=hp.max_length, dtype=None, load_in_4bit=method == "QLoRA",
            load_in_16bit=method == "LoRA", full_finetuning=method == "Full", token=self.token(),
            trust_remote_code=self.cfg.trust_remote_code, use_exact_model_name=True)
        if method == "QLoRA" and not any(type(m).__name__ == "Linear4bit" for m in model.modules()):
            # Unsloth falls back to 16 bits, with a print, where bitsandbytes is unusable: 4x the memory
            raise PermanentError("training_config.method: 'QLoRA' but Unsloth loaded the base in 16 bits "
                                 "(bitsandbytes is unusable in this image); use method 'LoRA' or provider "
                                 "'huggingface'.")
        if method == "Full":
            return model
        return FastLanguageModel.get_peft_model(model, use_gradient_checkpointing="unsloth", random_state=hp.seed,
                                                **self.lora_kwargs())

    def sft_overrides(self) -> dict[str, Any]:
        return {"optim": "adamw_8bit"}

    def save_merged(self, model, tokenizer, out_dir: Path) -> None:
        if self.cfg.method == "Full":
            model.save_pretrained(str(out_dir))
            tokenizer.save_pretrained(str(out_dir))
        else:
            # Unsloth downloads the base's 16-bit weights again and merges into them (never into 4 bits).
            # safe_serialization=None: safetensors even where Unsloth would pickle (hosts of <= 2 cores).
            model.save_pretrained_merged(str(out_dir), tokenizer, save_method="merged_16bit",
                                         safe_serialization=None)
        # Unsloth writes the dtype the base is stored in; the request's merged_dtype decides here.
        cast_saved(out_dir, merge_dtype(self.cfg.export_config.merged_dtype))


# The vision tower's linear layers, which LoRA adapts beside the language model's when finetune_vision_layers is
# on: SigLIP's (Gemma 3), and the linear inside each of Gemma 4's Gemma4ClippableLinear wrappers (PEFT adapts
# linear layers, not the wrapper, whose names are the language model's q_proj...: excluded in the tower). The
# projector (Gemma 3's multi_modal_projector, Gemma 4's embed_vision) is trained whole.
VISION_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
GEMMA4_VISION_TARGETS = ("linear",)
LANGUAGE = r".*language_model\..*"


def vision_lora(kwargs: dict[str, Any], hp, model) -> tuple[dict[str, Any], str | None]:
    """LoRA's targets and exclusions for an image+text model: the language model's layers, the vision
    tower's (finetune_vision_layers, with the projector in modules_to_save), or both."""
    if not hp.finetune_vision_layers:
        return kwargs, NOT_LANGUAGE
    gemma4 = any(type(m).__name__ == "Gemma4ClippableLinear" for m in model.modules())
    targets = kwargs["target_modules"]
    if not isinstance(targets, str):
        targets = sorted(set(targets) | set(GEMMA4_VISION_TARGETS if gemma4 else VISION_TARGETS))
    projector = "embed_vision" if gemma4 else "multi_modal_projector"
    saved = sorted(set(kwargs.get("modules_to_save") or []) | {projector})
    never = [r".*(audio_tower|embed_audio)\..*", NEVER_ADAPTED] + ([r".*vision_tower\..*_proj"] if gemma4 else []) + \
        ([] if hp.finetune_language_layers else [LANGUAGE])
    return kwargs | {"target_modules": targets, "modules_to_save": saved}, "|".join(f"({x})" for x in never)


def merge_dtype(merged_dtype: str):
    """The torch dtype of the 16-bit merge; q4 is quantized from the bf16 merge afterwards (artifacts.save_4bit)."""
    import torch

    if merged_dtype == "fp16":
        logger.warning("merging in fp16 as asked: Gemma's activations can overflow fp16; bf16 is safer")
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "q4": torch.bfloat16}[merged_dtype]


PROVIDERS: dict[str, type[BaseTrainingJob]] = {"huggingface": HuggingFaceTrainingJob, "unsloth": UnslothTrainingJob}
