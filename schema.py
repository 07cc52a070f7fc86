"""The training request: pydantic models, every default, every validation rule. No I/O.

All three generations of the request (the flat README form, the grouped form the
training service sends, and the newer form with RL fields) load into one
`TrainRequest`; `normalise` turns the flat form into the grouped one. The job reads
requests through `request.parse_request`, whose errors name the field, the value and the fix.

    python main.py --schema     # prints the JSON Schema of TrainRequest
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    WrapValidator,
    field_validator,
    model_validator,
)

# A path component that cannot escape its prefix: no slash, no leading dot.
SAFE_ID = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$"
HF_REPO_ID = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$"


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @model_validator(mode="before")
    @classmethod
    def _unset_blanks(cls, data: Any) -> Any:
        """`null`, and `""` for a field that is not required, mean "not set": the training service writes
        its request with `json.dumps(model.model_dump())`, so every option it leaves unset arrives as
        `null` (and the web UI's `hf_repo_id` as `""`). Dropping them lets this model's default apply."""
        if not isinstance(data, dict):
            return data

        def unset(key: str, value: Any) -> bool:
            field = cls.model_fields.get(key)
            return value is None or (value == "" and field is not None and not field.is_required())
        return {k: v for k, v in data.items() if not unset(k, v)}


def _count_or_auto(value: Any, handler) -> Any:
    """One message for a field taking a count or 'auto', not one per branch of the union."""
    try:
        return handler(value)
    except ValidationError:
        raise ValueError("an integer from 1 to 1024, or 'auto'") from None


CountOrAuto = Annotated[Annotated[int, Field(ge=1, le=1024)] | Literal["auto"], WrapValidator(_count_or_auto)]


class Hyperparameters(StrictModel):
    learning_rate: float = Field(2e-4, gt=0, le=1e-2, description="Peak learning rate.")
    batch_size: CountOrAuto = Field(
        2, description="Train and eval batch of one step before gradient accumulation (split over the processes); "
        "'auto': the largest that the memory model fits on the GPU, keeping the effective batch (effective_batch_size).")
    gradient_accumulation_steps: CountOrAuto = Field(
        4, description="Batches whose gradients are summed before each optimizer step: the effective batch is "
        "batch_size times this; 'auto': as for batch_size (either 'auto' lets the job choose both).")
    effective_batch_size: int | None = Field(
        None, ge=1, le=4096, description="With batch_size or gradient_accumulation_steps 'auto': the examples of one "
        "optimizer step, kept while the job chooses the two; default: batch_size x gradient_accumulation_steps with "
        "today's defaults (2 and 4) in place of 'auto' (8 with both 'auto'). Refused without an 'auto'.")
    epochs: float = Field(3, gt=0, le=100, description="Training epochs (ignored when max_steps > 0).")
    max_steps: int = Field(-1, ge=-1, description="Stop after this many optimizer steps; -1: off.")
    packing: bool = Field(False, description="SFT: pack several rows into one sequence; rows never attend "
                          "across each other (position ids mark where each row starts).")
    padding_free: bool = Field(False, description="SFT, DPO: concatenate a batch without padding; rows never "
                               "attend across each other.")
    use_fa2: bool = Field(False, description="Attention with FlashAttention 2 (provider huggingface, an NVIDIA GPU "
                          "and the flash-attn package); refused where it cannot run.")
    max_length: int = Field(1024, ge=16, le=131072, validation_alias=AliasChoices("max_length", "max_seq_length"),
                            description="Maximum tokens per row; longer rows are truncated.")
    lr_scheduler_type: Literal["linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
                               "constant_with_warmup", "inverse_sqrt"] = Field(
        "linear", description="How the learning rate falls from its peak after warmup (transformers' schedulers).")
    save_strategy: Literal["no", "steps", "epoch"] = Field(
        "epoch", description="When to checkpoint besides every checkpoint_minutes, at the end of training, on "
        "SIGTERM and before the task timeout (those always happen).")
    save_steps: int = Field(100, ge=1, description="Steps between checkpoints with save_strategy=steps.")
    checkpoint_minutes: float = Field(10.0, gt=0, description="Also checkpoint when this long has passed since "
                                      "the last one: the most training a preemption can lose.")
    save_total_limit: int = Field(2, ge=1, description="Checkpoints kept, locally and in the bucket.")
    logging_steps: int = Field(10, ge=1, description="Optimizer steps between the loss lines of the log, the "
                               "tracker and the job document's loss.")
    lora_rank: int = Field(16, ge=1, le=1024, description="LoRA's rank r: the adapter's width (methods LoRA, "
                           "QLoRA).")
    lora_alpha: int = Field(16, ge=1, le=4096, description="LoRA's alpha: the adapter's output is scaled by "
                            "alpha / r (alpha / sqrt(r) with use_rslora).")
    lora_dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapter's input while training.")
    use_dora: bool = Field(False, description="DoRA (PEFT's weight-decomposed LoRA): methods LoRA and QLoRA, "
                           "provider huggingface.")
    use_rslora: bool = Field(False, description="rsLoRA: the adapter scaled by lora_alpha / sqrt(lora_rank), not "
                             "lora_alpha / lora_rank: methods LoRA and QLoRA.")
    lora_target_modules: list[str] | Literal["all-linear"] = Field(
        default_factory=lambda: list(LORA_TARGETS), description="The layers LoRA adapts, by name (every linear "
        "layer of a Gemma decoder block by default), or 'all-linear'; a vision tower is left out either way.")
    lora_target_parameters: list[str] | None = Field(
        None, description="Parameters (not layers) LoRA adapts as well, through PEFT's target_parameters, by the end "
        "of their names: a mixture of experts' expert weights, e.g. ['experts.gate_up_proj', 'experts.down_proj'] "
        "on Gemma 4 26B-A4B; methods LoRA and QLoRA, provider huggingface. Its adapter loads in PEFT 0.17 or later "
        "only (not in the inference service's 0.14); merged and GGUF exports load as any other.")
    modules_to_save: list[str] | None = Field(
        None, description="Modules trained whole (not through LoRA) and saved with the adapter, by name as PEFT "
        "matches it (the end of a module's name), e.g. ['lm_head'] or ['model.norm']: methods LoRA and QLoRA. A "
        "tied embedding (Gemma's embed_tokens and lm_head) is for adapter exports only.")
    finetune_vision_layers: bool = Field(
        False, description="modality 'vision', methods LoRA and QLoRA: LoRA on the vision tower's layers too, and the "
        "image projector trained whole (Unsloth's name).")
    finetune_language_layers: bool = Field(
        True, description="modality 'vision', methods LoRA and QLoRA: LoRA on the language model (Unsloth's name); "
        "one of the two must be true.")
    load_in_8bit: bool = Field(False, description="Method LoRA on the base loaded in 8 bits (bitsandbytes LLM.int8): "
                               "about half the 16-bit weights' memory; provider huggingface.")
    neftune_noise_alpha: float | None = Field(None, gt=0, le=100, description="NEFTune: noise of this strength "
                                              "on the input embeddings while training (5 in the paper); SFT only.")
    divergence_spike_factor: float = Field(
        4.0, ge=0, description="A logged training loss this many times the mean of the last 10 (and at least 1 "
        "above it) is a divergence, as a NaN or infinite loss or gradient norm always is: training rolls back to "
        "the last checkpoint saved before it, lowers the learning rate once by divergence_lr_factor and goes on; a "
        "second divergence fails the job (exit 2). 0: only NaN and infinity count (null, as the platform sends an "
        "unset field, keeps the default); else at least 1.5. GRPO's loss, which sits near 0 and may be negative, "
        "is never judged by its ratio.")
    divergence_lr_factor: float = Field(0.5, gt=0, lt=1, description="What the learning rate is multiplied by, once, "
                                        "when training rolls back from a divergence.")
    # Read by some trainer types only (the platform's training service sends them with every request):
    # None means "this trainer type's default" (RL_DEFAULTS / TRL_DEFAULTS below), never a value for all.
    max_prompt_length: int | None = Field(None, ge=1, description="GRPO, DPO, ORPO: tokens kept of each prompt "
                                          "(default min(512, max_length / 2)); an SFT job does not read it.")
    num_generations: int = Field(4, ge=2, description="GRPO: completions per prompt; other trainer types do not "
                                 "read it.")
    max_grad_norm: float | None = Field(None, gt=0, description="Gradient clipping; default 0.1 for GRPO, "
                                        "TRL's 1.0 for the others.")
    adam_beta1: float | None = Field(None, ge=0, lt=1, description="Default 0.9 for every trainer type.")
    adam_beta2: float | None = Field(None, ge=0, lt=1, description="Default 0.99 for GRPO, TRL's 0.999 for "
                                     "the others.")
    warmup_ratio: float | None = Field(None, ge=0, lt=1, description="Fraction of steps spent warming up; "
                                       "default 0.1 for GRPO, TRL's 0 for the others.")
    beta: float = Field(0.1, ge=0, description="KL / preference strength (GRPO, DPO, ORPO); SFT does not read it.")
    loss_type: Literal["grpo", "dr_grpo", "dapo", "bnpo"] | None = Field(
        None, description="GRPO only: how its token losses are averaged, as the pinned TRL names them: 'grpo' (over "
        "each completion's length, then over completions), 'dr_grpo' (over a constant, the completion budget: "
        "max_length less the prompt's; Dr. GRPO), 'dapo' (over the accumulated batch's tokens: DAPO), 'bnpo' (over "
        "the local batch's tokens); default TRL's, 'dapo'. TRL's cispo, sapo, luspo and vespo are not shown with "
        "this job and are refused.")
    importance_sampling_level: Literal["token", "sequence"] | None = Field(
        None, description="GRPO only: the policy ratio per token (TRL's default, 'token') or one per completion, "
        "its tokens' log-ratios averaged ('sequence': GSPO).")
    weight_decay: float = Field(0.0, ge=0, le=1, description="AdamW's decoupled weight decay.")
    assistant_only_loss: bool = Field(True, description="Train on assistant tokens only; false: all tokens.")
    seed: int = Field(42, ge=0, description="Seeds Python's, NumPy's and torch's generators before the adapter "
                      "is made and the data shuffled: the same request trains the same model.")

    @field_validator("lora_target_modules", "modules_to_save", "lora_target_parameters")
    @classmethod
    def _module_names(cls, v: list[str] | str | None, info: ValidationInfo) -> list[str] | str | None:
        if v is None or isinstance(v, str):
            return v
        if not v:
            raise ValueError("name at least one module (e.g. [\"q_proj\", \"v_proj\"]), or 'all-linear'"
                             if info.field_name == "lora_target_modules" else "name at least one parameter (e.g. "
                             "[\"experts.gate_up_proj\"]), or leave lora_target_parameters unset"
                             if info.field_name == "lora_target_parameters" else "name at least one module (e.g. "
                             "[\"lm_head\"]), or leave modules_to_save unset")
        bad = [name for name in v if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.]*", name)]
        if bad:
            raise ValueError(f"{bad} are not module names (letters, digits, '_' and '.', as in 'q_proj' or "
                             "'self_attn.q_proj')")
        if len(set(v)) != len(v):
            raise ValueError("a module is named twice")
        return v

    def optimizer_values(self, trainer_type: str) -> dict[str, float]:
        """max_grad_norm, adam_beta1/2 and warmup_ratio as the request sets them, else the trainer type's
        defaults: the platform's own job applies 0.1 / 0.9 / 0.99 / 0.1 to GRPO alone."""
        defaults = RL_DEFAULTS if trainer_type == "grpo" else TRL_DEFAULTS
        return {name: default if getattr(self, name) is None else getattr(self, name)
                for name, default in defaults.items()}

    @property
    def auto_batch(self) -> bool:
        return "auto" in (self.batch_size, self.gradient_accumulation_steps)

    @property
    def effective_batch(self) -> int:
        """The examples of one optimizer step: batch_size x gradient_accumulation_steps, or what 'auto' keeps."""
        if self.effective_batch_size is not None:
            return self.effective_batch_size
        return (2 if self.batch_size == "auto" else self.batch_size) * \
            (4 if self.gradient_accumulation_steps == "auto" else self.gradient_accumulation_steps)

    @field_validator("divergence_spike_factor")
    @classmethod
    def _spike_factor(cls, v: float) -> float:
        if 0 < v < 1.5:
            raise ValueError("a factor below 1.5 would call ordinary noise a divergence: set at least 1.5, or 0 to "
                             "judge only NaN and infinite losses")
        return v

    @model_validator(mode="after")
    def _effective_batch_with_auto(self) -> Hyperparameters:
        if self.effective_batch_size is not None and not self.auto_batch:
            raise ValueError("effective_batch_size is read only where batch_size or gradient_accumulation_steps is "
                             "'auto' (the job then chooses the two); set one of them to 'auto', or remove "
                             "effective_batch_size.")
        return self

    @property
    def prompt_length(self) -> int:
        """The prompt budget of GRPO, DPO and ORPO: max_prompt_length, else min(512, max_length / 2)."""
        return self.max_prompt_length if self.max_prompt_length is not None else min(512, self.max_length // 2)


# Every linear layer of a Gemma decoder block: lora_target_modules' default, for both providers.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# The eval metrics each trainer type reports, the choices of metric_for_best_model (without "eval_").
BEST_METRICS = {"sft": ("loss", "mean_token_accuracy", "entropy"),
                "dpo": ("loss", "rewards/margins", "rewards/accuracies", "rewards/chosen"),
                "orpo": ("loss", "rewards/margins", "rewards/accuracies", "rewards/chosen"),
                "simpo": ("loss", "rewards/margins", "rewards/accuracies", "rewards/chosen"),
                "grpo": ("loss", "reward")}

# The defaults of the optimizer fields: GRPO's are the platform's (form 3), the others' are TRL's.
RL_DEFAULTS = {"max_grad_norm": 0.1, "adam_beta1": 0.9, "adam_beta2": 0.99, "warmup_ratio": 0.1}
TRL_DEFAULTS = {"max_grad_norm": 1.0, "adam_beta1": 0.9, "adam_beta2": 0.999, "warmup_ratio": 0.0}


class EvalConfig(StrictModel):
    eval_strategy: Literal["no", "steps", "epoch"] = Field(
        "no", description="When to evaluate during training; a final evaluation runs whenever an eval split exists.")
    eval_steps: int = Field(50, ge=1, description="Steps between evaluations with eval_strategy=steps.")
    compute_eval_metrics: bool = Field(True, description="Compute eval loss, perplexity and token accuracy at the "
                                       "end; an eval_strategy other than 'no' evaluates whatever this says.")
    batch_eval_metrics: bool = Field(False, description="Accepted for the training service's form; a no-op "
                                     "alias: the job's metrics (loss, perplexity, token accuracy) are always "
                                     "accumulated over the eval set batch by batch, which is what it asks for.")
    generation_rows: int | None = Field(None, ge=0, le=1024, description="Eval rows the starting model and the "
                                        "tuned model both answer, scored against the reference (training/generation.py); 0: "
                                        "off. Unset: 64, and 0 with provider unsloth (not shown on a GPU yet).")
    max_new_tokens: int = Field(128, ge=1, le=2048, description="The longest answer generated for that "
                                "comparison, in tokens.")
    improvement_metric: Literal["exact_match", "rouge_l", "bleu"] = Field(
        "rouge_l", description="The metric the verdict (better, same, worse) is taken on; GRPO's is always its "
        "graders' reward.")
    require_improvement: bool = Field(False, description="Fail the job (exit 2) unless the verdict is 'better'; "
                                      "the artifacts are still uploaded, marked promoted: false.")

    early_stopping_patience: int | None = Field(None, ge=1, description="Stop training after this many "
                                                "evaluations without improvement of metric_for_best_model.")
    early_stopping_threshold: float = Field(0.0, ge=0, description="The least change that counts as an "
                                            "improvement for early stopping.")
    metric_for_best_model: str = Field("eval_loss", description="The eval metric that decides the best checkpoint "
                                       "and early stopping: eval_loss, or a metric the trainer type reports.")
    greater_is_better: bool | None = Field(None, description="Unset: false for a loss, true otherwise.")
    load_best_model_at_end: bool = Field(False, description="Export the best checkpoint (by metric_for_best_model), "
                                         "not the last; it is kept in the bucket until the export.")

    @property
    def picks_best(self) -> bool:
        return self.load_best_model_at_end or self.early_stopping_patience is not None

    @model_validator(mode="after")
    def _check(self) -> EvalConfig:
        if self.require_improvement and self.generation_rows == 0:
            raise ValueError("require_improvement needs the comparison it is judged on: set generation_rows "
                             "above 0, or require_improvement false.")
        return self


GgufQuant = Literal["none", "f16", "bf16", "q8_0", "q4_k_m", "q5_k_m", "q2_k"]
# What llama.cpp's converter writes directly; the k-quants are quantized from an f16 conversion (exporting/export.py).
GGUF_DIRECT = ("f16", "bf16", "q8_0")


class ExportConfig(StrictModel):
    format: Literal["adapter", "merged", "gguf"] = Field(
        "adapter", description="adapter: PEFT weights; merged (or full): merged 16-bit model; gguf: GGUF only.")
    destination: Literal["gcs", "hfhub"] = Field("gcs", description="gcs: the export bucket (the GGUF to the files "
                                                 "bucket); hfhub: the Hugging Face repo hf_repo_id.")
    hf_repo_id: str | None = Field(None, pattern=HF_REPO_ID, description="owner/name, needed for destination hfhub.")
    hf_private: bool = Field(True, description="Destination hfhub: create the repo private.")
    include_gguf: bool = Field(False, description="Also export a GGUF (gguf_quantization) beside the adapter or "
                               "merged model.")
    gguf_quantization: GgufQuant = Field("none", description="none (or unset): q8_0 when a GGUF is exported.")
    merged_dtype: Literal["bf16", "fp16", "q4"] = Field(
        "bf16", description="merged weights: bf16; fp16 (Gemma's activations can overflow it); q4, the bf16 merge "
                            "saved 4-bit (NF4) with bitsandbytes, which its loader then needs.")

    @field_validator("format", mode="before")
    @classmethod
    def _full_is_merged(cls, v: Any) -> Any:
        return "merged" if v == "full" else v

    @field_validator("destination", mode="before")
    @classmethod
    def _hub_aliases(cls, v: Any) -> Any:
        return "hfhub" if v in ("hf_hub", "huggingface", "hub") else v

    @model_validator(mode="after")
    def _check(self) -> ExportConfig:
        if self.destination == "hfhub" and not self.hf_repo_id:
            raise ValueError("destination 'hfhub' needs hf_repo_id ('owner/name'); set it or use destination 'gcs'.")
        return self

    @model_validator(mode="before")
    @classmethod
    def _gguf_default(cls, data: Any) -> Any:
        """A GGUF export with no quantization (absent, null or "none") is q8_0, in every form of the request."""
        if isinstance(data, dict) and (data.get("include_gguf") or data.get("format") == "gguf") \
                and data.get("gguf_quantization") in (None, "none"):
            return {**data, "gguf_quantization": "q8_0"}
        return data

    @property
    def wants_gguf(self) -> bool:
        return self.format == "gguf" or self.include_gguf


class WandbConfig(StrictModel):
    api_key: SecretStr | None = Field(None, description="The W&B key for this job (else WANDB_API_KEY); removed "
                                      "from the request object once the job is over.")
    project: str = Field("gemma-fine-tuning", min_length=1, max_length=128, description="The W&B project of the run.")
    log_model: Literal["false", "checkpoint", "end"] = Field(
        "false", description="Upload to W&B as artifacts: each checkpoint, or the exported folder at the end.")

    @field_validator("log_model", mode="before")
    @classmethod
    def _bool_to_str(cls, v: Any) -> Any:
        return str(v).lower() if isinstance(v, bool) else v


class BuiltInParameters(StrictModel):
    think_tag: str = Field("think", min_length=1, description="The reasoning tag built-in graders look for.")
    answer_tag: str = Field("answer", min_length=1, description="The answer tag built-in graders look for.")


JUDGES = "The judges' (score_model, label_model, ruler), which are refused: accepted as the training service sends it."
GraderType = Literal["string_check", "text_similarity", "built_in", "score_model", "label_model", "ruler", "python"]


class Grader(StrictModel):
    name: str = Field(min_length=1, description="The grader's name: its reward's name in the metrics.")
    type: GraderType = Field(description="string_check, text_similarity and built_in run here; the judges "
                             "(score_model, label_model, ruler) and python are refused.")
    weight: float = Field(1.0, description="The reward's weight in GRPO's weighted sum of the graders.")
    reference_field: str | None = Field(None, description="The dataset column the completion is compared with "
                                        "(built-in accuracy graders: 'answer' when unset).")
    operation: Literal["eq", "ne", "like", "ilike"] | None = Field(
        None, description="string_check: equal, not equal, contains, contains ignoring case (reward 1 or 0).")
    evaluation_metric: Literal["fuzzy_match", "bleu", "gleu", "meteor", "cosine", "rouge_1", "rouge_2", "rouge_3",
                               "rouge_4", "rouge_5", "rouge_l"] | None = Field(
        None, description="text_similarity: the score in [0, 1] against reference_field; meteor and cosine are "
        "refused.")
    embedding_model: str | None = Field(None, description="Read only by evaluation_metric 'cosine', which is "
                                        "refused; the training service sends its default with every grader.")
    gemini_api_key: SecretStr | None = Field(None, description="Judges and 'cosine' only, which are refused: "
                                             "null or unset.")
    function_name: Literal["format_reward", "count_xml", "expression_accuracy", "numerical_accuracy"] | None = Field(
        None, description="built_in: which of the built-in graders.")
    parameters: BuiltInParameters = Field(default_factory=BuiltInParameters, description="built_in: the tags they "
                                          "read.")
    model: str | None = Field(None, description=JUDGES)
    prompt: str | None = Field(None, description=JUDGES)
    range: list[float] | None = Field(None, description=JUDGES)
    labels: list[str] | None = Field(None, description=JUDGES)
    passing_labels: list[str] | None = Field(None, description=JUDGES)
    rules: list[str] | None = Field(None, description=JUDGES)
    source: str | None = Field(None, description="python graders' code, which is refused: never run.")

    @model_validator(mode="after")
    def _check(self) -> Grader:
        if self.type == "python":
            raise ValueError(f"grader '{self.name}': type 'python' would run code from the request, which this job "
                             "never does; use a string_check, text_similarity or built_in grader.")
        if self.type in ("score_model", "label_model", "ruler"):
            raise ValueError(f"grader '{self.name}': type '{self.type}' calls an outside model (an LLM judge), which "
                             "this job cannot reach or vouch for during training; use a string_check, "
                             "text_similarity or built_in grader.")
        if self.gemini_api_key is not None:
            raise ValueError(f"grader '{self.name}': gemini_api_key is set, but this job calls no Gemini model "
                             "(judges and the 'cosine' metric are refused); remove the key or set it to null.")
        if self.evaluation_metric in ("meteor", "cosine"):
            raise ValueError(f"grader '{self.name}': evaluation_metric '{self.evaluation_metric}' needs a model or "
                             "corpus downloaded at run time; use fuzzy_match, bleu, gleu, rouge_1..rouge_5 or rouge_l.")
        needed = {"string_check": ("reference_field", "operation"), "text_similarity": ("reference_field",
                  "evaluation_metric"), "built_in": ("function_name",)}.get(self.type, ())
        missing = [f for f in needed if getattr(self, f) is None]
        if missing:
            raise ValueError(f"grader '{self.name}' of type {self.type} needs {', '.join(missing)}.")
        return self

    @property
    def reference_column(self) -> str | None:
        """The dataset column this grader compares completions with: reference_field, which the built-in
        accuracy graders default to 'answer'; none for the format graders, which read the completion alone."""
        if self.type == "built_in" and self.function_name in ("format_reward", "count_xml"):
            return None
        return self.reference_field or "answer"


def gemma_3n_refused(model_id: str) -> str:
    """Why a Gemma 3n job (E2B, E4B) with the Unsloth provider is refused where the Hugging Face provider trains it
    (text: models/language_model.py; images: training/vision.py). Said by name at validation, and from
    config.json at pre-flight for a base whose name does not say it."""
    return (f"training_config.provider: 'unsloth' with {model_id!r} (Gemma 3n): Unsloth's Gemma 3n path "
            "(FastModel) has not been shown for this job on a GPU; use provider 'huggingface', which trains Gemma "
            "3n's text and images, or choose Gemma 4 (e.g. google/gemma-4-E2B-it, as small) with Unsloth.")


GEMMA_3N = re.compile(r"gemma-?3n", re.IGNORECASE)


def model_name(base_model_id: str) -> str:
    """The model's own name in a Hub id or a local path (the repo, the folder), which the name checks read: not
    its owner, nor the folders above a local copy."""
    return base_model_id.rstrip("/").rsplit("/", 1)[-1]
# Gemma variants the job cannot fine-tune, refused by name before anything is read (base_models.FAMILIES
# says why, from config.json, for a copy whose name does not say it).
NOT_TRAINABLE = re.compile(r"-assistant$|(diffusion|t5|pali|recurrent|shield|embedding)-?gemma", re.IGNORECASE)


class TrainingConfig(StrictModel):
    base_model_id: str = Field(min_length=1, description="Hub id (google/gemma-3-1b-it) or a local directory.")
    provider: Literal["huggingface", "unsloth"] = Field("huggingface", description="huggingface: transformers, PEFT "
                                                        "and TRL; unsloth: Unsloth's kernels (an NVIDIA GPU).")
    method: Literal["QLoRA", "LoRA", "Full"] = Field("QLoRA", description="QLoRA: LoRA on a 4-bit base; LoRA: on a "
                                                    "16-bit base; Full: every weight trained.")
    trainer_type: Literal["sft", "dpo", "grpo", "orpo", "simpo"] = Field(
        "sft", description="sft: supervised; dpo, orpo, simpo: preference pairs (simpo: SimPO, reference-free, "
        "through TRL's CPO trainer); grpo: rewards from reward_config.")
    modality: Literal["text", "vision"] = Field("text", description="vision: image+text rows on an image+text base.")
    peft_method: Literal["lora", "adalora"] = Field("lora", description="The adapter: LoRA (with use_dora / "
                                                    "use_rslora for its variants); 'adalora' is refused, with why.")
    trust_remote_code: bool = Field(False, description="Run model code from the Hub; off unless asked.")
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters, description="How it trains.")
    eval_config: EvalConfig = Field(default_factory=EvalConfig, description="How it is evaluated and judged.")
    export_config: ExportConfig = Field(default_factory=ExportConfig, description="What is exported, and where.")
    wandb_config: WandbConfig | None = Field(None, description="The W&B run, where report_to names wandb.")
    report_to: list[Literal["wandb", "tensorboard", "comet_ml", "mlflow"]] | None = Field(
        None, description="Trackers: wandb (with wandb_config, or its defaults), tensorboard (event files "
        "uploaded to the export bucket's tensorboard/{job_id}/), comet_ml and mlflow (where their packages are "
        "installed; this image has neither). Unset: wandb if wandb_config is set, else none.")
    reward_config: list[Grader] = Field(default_factory=list, description="GRPO's graders; null or [] otherwise.")
    init_from_job_id: str | None = Field(None, pattern=SAFE_ID, description="Continue training the adapter this "
                                         "job exported (trained_adapters/{id}/ in the export bucket): methods LoRA "
                                         "and QLoRA on the same base_model_id; its LoRA shape is kept.")
    init_adapter: str | None = Field(None, pattern=HF_REPO_ID, description="Continue training a LoRA adapter "
                                     "from the Hub ('owner/name'), as init_from_job_id does.")

    @field_validator("base_model_id")
    @classmethod
    def _trainable_family(cls, v: str) -> str:
        if NOT_TRAINABLE.search(model_name(v)):
            raise ValueError(f"{v!r} is a Gemma variant this job cannot fine-tune (a speculative-decoding draft, "
                             "DiffusionGemma, T5Gemma, PaliGemma, RecurrentGemma, ShieldGemma or an embedding "
                             "model); choose a Gemma 4 or Gemma 3 model (e.g. google/gemma-4-E2B-it, "
                             "google/gemma-3-1b-it).")
        return v

    @field_validator("method", mode="before")
    @classmethod
    def _method_case(cls, v: Any) -> Any:
        return {"qlora": "QLoRA", "lora": "LoRA", "full": "Full"}.get(v.lower(), v) if isinstance(v, str) else v

    @model_validator(mode="after")
    def _check(self) -> TrainingConfig:
        if self.peft_method == "adalora":
            # Measured on the pinned versions (transformers 5.17, TRL 1.14, PEFT 0.21): see docs/request.md.
            raise ValueError("peft_method 'adalora': AdaLoRA reallocates its ranks only when the training loop "
                             "calls PEFT's update_and_allocate after every step, which neither transformers' "
                             "Trainer nor TRL does, and its allocator's state is not in a checkpoint, so a "
                             "resumed attempt would allocate from nothing; it would train as a fixed-rank "
                             "adapter under AdaLoRA's name. Use peft_method 'lora' (use_rslora for rank-stable "
                             "scaling, use_dora for DoRA).")
        hp = self.hyperparameters
        if self.provider == "unsloth" and (hp.use_fa2 or hp.packing or hp.padding_free):
            name = next(n for n in ("use_fa2", "packing", "padding_free") if getattr(hp, n))
            raise ValueError(f"provider 'unsloth' with `{name}: true`: Unsloth chooses its own attention kernels, "
                             "and that they keep packed rows apart has not been shown for this job; set "
                             f"`{name}: false`, or provider 'huggingface'.")
        if hp.packing and self.trainer_type != "sft":
            raise ValueError(f"packing is an SFT option; trainer_type '{self.trainer_type}' does not pack rows: set "
                             "`packing: false`.")
        if hp.padding_free and self.trainer_type not in ("sft", "dpo"):
            raise ValueError(f"padding_free is an SFT and DPO option, not '{self.trainer_type}': set "
                             "`padding_free: false`.")
        if self.trainer_type == "grpo":
            if not self.reward_config:
                raise ValueError("trainer_type 'grpo' needs reward_config (a list of graders) to score completions.")
            batch = hp.effective_batch
            if batch % hp.num_generations:
                raise ValueError(f"trainer_type 'grpo': batch_size x gradient_accumulation_steps ({batch}) must be "
                                 f"divisible by num_generations ({hp.num_generations}), because each prompt's "
                                 "completions are scored as one group; change batch_size or num_generations.")
        if self.trainer_type != "sft" and hp.max_prompt_length is not None and hp.max_prompt_length >= hp.max_length:
            raise ValueError(f"trainer_type '{self.trainer_type}': max_prompt_length ({hp.max_prompt_length}) must be "
                             f"below max_length ({hp.max_length}), or no completion fits; lower max_prompt_length, "
                             "raise max_length, or leave max_prompt_length unset (min(512, max_length / 2)).")
        adapter_options = [n for n in ("use_dora", "use_rslora", "modules_to_save", "lora_target_parameters")
                           if getattr(hp, n)] + \
            (["lora_target_modules"] if "lora_target_modules" in hp.model_fields_set else [])
        if self.method == "Full" and adapter_options:
            raise ValueError(f"{', '.join(adapter_options)}: LoRA options, and method 'Full' trains every weight "
                             "without an adapter; remove them or use method 'LoRA' or 'QLoRA'.")
        if hp.load_in_8bit and self.method != "LoRA":
            raise ValueError(f"load_in_8bit is for method 'LoRA' (an adapter on an 8-bit base), not '{self.method}'"
                             f"{': QLoRA loads the base in 4 bits already' if self.method == 'QLoRA' else ''}; set "
                             "`load_in_8bit: false`, or method 'LoRA'.")
        if self.provider == "unsloth" and hp.load_in_8bit:
            raise ValueError("provider 'unsloth' with `load_in_8bit: true`: not shown for this job on a GPU yet; use "
                             "method 'QLoRA', or provider 'huggingface'.")
        if self.provider == "unsloth" and hp.lora_target_modules == "all-linear":
            raise ValueError("provider 'unsloth' with lora_target_modules 'all-linear': Unsloth takes module names; "
                             "list them (its default is every linear layer of a decoder block).")
        both = sorted(set(hp.modules_to_save or ()) & set(() if isinstance(hp.lora_target_modules, str)
                                                           else hp.lora_target_modules))
        if both:
            raise ValueError(f"hyperparameters: {both} in both lora_target_modules and modules_to_save; a module "
                             "is adapted by LoRA or trained whole, not both: remove it from one list.")
        if self.provider == "unsloth" and hp.modules_to_save:
            raise ValueError("provider 'unsloth' with modules_to_save: not shown for this job on a GPU yet (Unsloth "
                             "trains saved embeddings its own way); remove it, or use provider 'huggingface'.")
        if self.provider == "unsloth" and hp.lora_target_parameters:
            raise ValueError("provider 'unsloth' with lora_target_parameters: Unsloth takes layer names only; remove "
                             "it, or use provider 'huggingface'.")
        if self.provider == "unsloth" and hp.use_dora:
            raise ValueError("provider 'unsloth' with `use_dora: true`: Unsloth passes DoRA to PEFT unoptimized, and "
                             "that has not been shown for this job on a GPU; set `use_dora: false`, or provider "
                             "'huggingface'.")
        if hp.neftune_noise_alpha is not None and self.trainer_type != "sft":
            raise ValueError(f"neftune_noise_alpha is an SFT option (TRL's SFT trainer adds the noise), not "
                             f"'{self.trainer_type}': remove it or set trainer_type 'sft'.")
        grpo_only = [n for n in ("loss_type", "importance_sampling_level") if getattr(hp, n) is not None]
        if grpo_only and self.trainer_type != "grpo":
            raise ValueError(f"{grpo_only[0]} is a GRPO option (how TRL's GRPO loss is formed), not "
                             f"'{self.trainer_type}': remove it or set trainer_type 'grpo'.")
        if self.reward_config and self.trainer_type != "grpo":
            raise ValueError(f"reward_config is used only with trainer_type 'grpo', not '{self.trainer_type}'; "
                             "remove it or set trainer_type 'grpo'.")
        return self

    @model_validator(mode="after")
    def _check_trackers(self) -> TrainingConfig:
        if self.report_to is not None and len(set(self.report_to)) != len(self.report_to):
            raise ValueError("report_to names a tracker twice; name each once.")
        if self.report_to is not None and self.wandb_config is not None and "wandb" not in self.report_to:
            raise ValueError(f"wandb_config is set but report_to {self.report_to} leaves out 'wandb'; add 'wandb' "
                             "to report_to, or remove wandb_config.")
        return self

    @model_validator(mode="after")
    def _check_parent(self) -> TrainingConfig:
        parent = "init_from_job_id" if self.init_from_job_id else "init_adapter" if self.init_adapter else None
        if self.init_from_job_id and self.init_adapter:
            raise ValueError("init_from_job_id and init_adapter are both set; a job continues one adapter: keep one.")
        if parent and self.method == "Full":
            raise ValueError(f"{parent}: method 'Full' trains the base's own weights and continues no adapter; use "
                             "method 'LoRA' or 'QLoRA', or remove it.")
        if parent and self.provider == "unsloth":
            raise ValueError(f"provider 'unsloth' with {parent}: continuing an adapter with Unsloth has not been "
                             "shown for this job on a GPU yet; use provider 'huggingface'.")
        return self

    @model_validator(mode="after")
    def _check_evaluation(self) -> TrainingConfig:
        hp = self.hyperparameters
        ev = self.eval_config
        if self.provider == "unsloth" and (ev.generation_rows or ev.require_improvement):
            raise ValueError("provider 'unsloth' with eval_config.generation_rows or require_improvement: generating "
                             "with an Unsloth model before and after training has not been shown for this job on a "
                             "GPU yet; leave them unset, or use provider 'huggingface'.")
        if ev.picks_best:
            name = "early_stopping_patience" if ev.early_stopping_patience else "load_best_model_at_end"
            if ev.eval_strategy == "no":
                raise ValueError(f"eval_config.{name} needs evaluations during training: set eval_strategy 'epoch' "
                                 "or 'steps'.")
            if hp.save_strategy != ev.eval_strategy:
                raise ValueError(f"eval_config.{name}: the best checkpoint must be saved when it is evaluated, so "
                                 f"hyperparameters.save_strategy ('{hp.save_strategy}') must equal "
                                 f"eval_config.eval_strategy ('{ev.eval_strategy}'); set them alike.")
            if ev.eval_strategy == "steps" and hp.save_steps % ev.eval_steps:
                raise ValueError(f"eval_config.{name}: save_steps ({hp.save_steps}) must be a multiple of eval_steps "
                                 f"({ev.eval_steps}), so that every save follows an evaluation.")
            metric = ev.metric_for_best_model.removeprefix("eval_")
            known = BEST_METRICS[self.trainer_type]
            if metric not in known:
                raise ValueError(f"eval_config.metric_for_best_model '{ev.metric_for_best_model}' is not an eval "
                                 f"metric trainer_type '{self.trainer_type}' reports; use one of "
                                 f"{['eval_' + m for m in known]}.")
        return self

    @model_validator(mode="after")
    def _check_gemma_3n(self) -> TrainingConfig:
        """Gemma 3n by its name: its text and images train with the Hugging Face provider; Unsloth's path does not."""
        if GEMMA_3N.search(model_name(self.base_model_id)) and self.provider == "unsloth":
            raise ValueError(gemma_3n_refused(self.base_model_id))
        return self

    @model_validator(mode="after")
    def _check_vision(self) -> TrainingConfig:
        """Image+text training (training/vision.py) is built for SFT, DPO and GRPO through the Hugging Face provider (every
        export form, GGUF with its mmproj projector); the rest is refused with what to do, never trained as
        something else."""
        hp = self.hyperparameters
        towers = [n for n in ("finetune_vision_layers", "finetune_language_layers") if n in hp.model_fields_set]
        if self.modality == "text":
            if towers:
                raise ValueError(f"hyperparameters.{towers[0]} is for modality 'vision' (which layers of an "
                                 "image+text model LoRA adapts); remove it, or set modality 'vision'.")
            return self
        if self.provider == "unsloth":
            raise ValueError("modality 'vision' with provider 'unsloth': Unsloth's FastVisionModel has not been shown "
                             "for this job on a GPU yet; use provider 'huggingface'.")
        if self.trainer_type in ("orpo", "simpo"):
            raise ValueError(f"modality 'vision' with trainer_type '{self.trainer_type}': TRL's "
                             f"{'ORPO' if self.trainer_type == 'orpo' else 'CPO (SimPO)'} trainer takes no images; use "
                             "'dpo' for preference rows with pictures, or a text dataset.")
        if hp.packing or hp.padding_free:
            name = "packing" if hp.packing else "padding_free"
            raise ValueError(f"modality 'vision' with `{name}: true`: rows carrying images are not packed or "
                             f"concatenated (each image's tokens attend to each other); set `{name}: false`.")
        if self.method == "Full" and towers:
            raise ValueError(f"hyperparameters.{towers[0]}: method 'Full' trains every layer, the vision tower "
                             "included; remove it, or use method 'LoRA' or 'QLoRA'.")
        if not (hp.finetune_vision_layers or hp.finetune_language_layers):
            raise ValueError("hyperparameters: finetune_vision_layers and finetune_language_layers are both false, "
                             "so LoRA would adapt nothing; set one of them true.")
        return self

    @property
    def vision(self) -> bool:
        return self.modality == "vision"

    @property
    def comparison_rows(self) -> int:
        """Eval rows both models answer (training/generation.py): generation_rows, else 64 (Unsloth: 0, not shown
        yet)."""
        rows = self.eval_config.generation_rows
        return rows if rows is not None else 0 if self.provider == "unsloth" else 64

    @property
    def trackers(self) -> list[str]:
        """The trackers the job reports to: report_to, else W&B where wandb_config is set (the older forms)."""
        if self.report_to is not None:
            return list(self.report_to)
        return ["wandb"] if self.wandb_config is not None else []

    @property
    def export_format(self) -> Literal["adapter", "merged", "gguf"]:
        """Full fine-tuning has no adapter: its 'adapter' export is the full model."""
        fmt = self.export_config.format
        return "merged" if fmt == "adapter" and self.method == "Full" else fmt


LOOPBACK = ("localhost", "127.0.0.1", "::1")


class Notify(StrictModel):
    url: str = Field(description="Where the job POSTs its end (completed, failed, cancelled) as signed JSON "
                     "(runtime/notify.py): https, or http to this machine alone (localhost, 127.0.0.1, ::1).")
    secret: SecretStr = Field(min_length=16, description="Keys the body's HMAC-SHA256 signature (at least 16 "
                              "characters); removed from the request object once the job is over.")

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        parts = urlsplit(v)
        if parts.hostname and (parts.scheme == "https" or parts.scheme == "http" and parts.hostname in LOOPBACK):
            return v
        raise ValueError(f"{v!r} is not an https URL (http is taken for localhost alone, as the body carries the "
                         "job's results): use e.g. https://example.com/hooks/gemma")


class TrainRequest(StrictModel):
    processed_dataset_id: str = Field(pattern=SAFE_ID, description="Folder under processed_datasets/.")
    job_name: str | None = Field(None, max_length=200, description="A name for people: the job document's "
                                 "job_name, unless the training service set one.")
    hf_token: SecretStr | None = Field(None, description="The Hugging Face token for this job (else HF_TOKEN): to "
                                       "read the base and push to hf_repo_id; removed from the request object once "
                                       "the job is over.")
    training_config: TrainingConfig = Field(description="What to train and how.")
    notify: Notify | None = Field(None, description="A webhook the job calls, signed, when it ends for good; a "
                                  "failure to deliver is a warning, never the job's failure.")

    @model_validator(mode="before")
    @classmethod
    def _normalise(cls, data: Any) -> Any:
        return normalise(data) if isinstance(data, dict) else data

    def secrets(self) -> list[str]:
        """Secret values in the request, for log redaction."""
        wb = self.training_config.wandb_config
        found = [self.hf_token, wb.api_key if wb else None, self.notify.secret if self.notify else None,
                 *(g.gemini_api_key for g in self.training_config.reward_config)]
        return [s.get_secret_value() for s in found if s is not None and s.get_secret_value()]


# Flat (README) form: fields of training_config that belong to a group in the grouped form.
_FLAT_EVAL = {"eval_strategy", "eval_steps", "compute_eval_metrics", "batch_eval_metrics"}
# Its one `quantization` field says what the format makes: a merged model's dtype (none, fp16, q4) or a GGUF's
# quantization, Unsloth's names among them (not_quantized: the model's own 16 bits; fast_quantized: q8_0;
# quantized: q4_k_m, as Unsloth's GGUF export reads them).
_FLAT_MERGED = {"none": "bf16", "fp16": "fp16", "q4": "q4"}
_FLAT_GGUF = {"not_quantized": "bf16", "fast_quantized": "q8_0", "quantized": "q4_k_m"}


def _flat_export(ex: dict[str, Any]) -> dict[str, Any]:
    """The flat form's export_config in the grouped form's fields."""
    ex, quant = dict(ex), ex.get("quantization")
    ex.pop("quantization", None)
    fmt = ex.get("format", "adapter")
    if quant is None or (fmt == "adapter" and quant == "none"):
        return ex  # nothing to quantize: the form's default, sent with every request
    if fmt == "gguf":
        return {**ex, "gguf_quantization": _FLAT_GGUF.get(quant, quant)}
    if fmt in ("merged", "full") and quant in _FLAT_MERGED:
        return {**ex, "merged_dtype": _FLAT_MERGED[quant]}
    allowed = "none, fp16 or q4" if fmt in ("merged", "full") else "none"
    raise ValueError(f"export_config.quantization '{quant}' does not apply to format '{fmt}', which takes {allowed}; "
                     "a GGUF quantization needs format 'gguf'.")


def normalise(data: dict[str, Any]) -> dict[str, Any]:
    """Turn the flat README form into the grouped form; grouped input passes through."""
    data = dict(data)
    tc = dict(data.get("training_config") or {})
    hp_names = set(Hyperparameters.model_fields) | {"max_seq_length"}
    hp = dict(tc.pop("hyperparameters", {}) or {})
    ev = dict(tc.pop("eval_config", {}) or {})
    for key in list(tc):
        if key in hp_names:
            hp[key] = tc.pop(key)
        elif key in _FLAT_EVAL:
            ev[key] = tc.pop(key)
        elif key == "evaluation_metrics":
            metrics = tc.pop(key)
            ev["compute_eval_metrics"] = bool(metrics)
    if "export_config" in data:  # flat form: export_config at top level
        ex = _flat_export(dict(data.pop("export_config") or {}))
        tc["export_config"] = {**ex, **dict(tc.get("export_config") or {})}
    # The flat form of the training service also sends `modality` at top level, beside (or instead of)
    # training_config's ("Duplicate field with TrainingConfig" in its schema.py).
    top = data.pop("modality", None)
    if top is not None:
        if tc.get("modality") not in (None, top):
            raise ValueError(f"modality '{top}' (top level) and training_config.modality '{tc['modality']}' differ; "
                             "send one value in both places, or only training_config.modality.")
        tc["modality"] = top
    # The predecessor's service (gemma-fine-tuning/services training/schema.py): the destination as
    # `export`, and `hf_repo_id` and `wandb_config`, at top level.
    moved = {"destination": data.pop("export", None), "hf_repo_id": data.pop("hf_repo_id", None)}
    if any(v is not None for v in moved.values()):
        tc["export_config"] = {**{k: v for k, v in moved.items() if v is not None},
                               **dict(tc.get("export_config") or {})}
    if data.get("wandb_config") is not None:
        tc.setdefault("wandb_config", data["wandb_config"])
    data.pop("wandb_config", None)
    if hp:
        tc["hyperparameters"] = hp
    if ev:
        tc["eval_config"] = ev
    if tc:
        data["training_config"] = tc
    return data
