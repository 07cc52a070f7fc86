"""The one workflow of a training job, top to bottom, shared by every provider.

    preflight -> load_model -> build_trainer -> train -> evaluate -> export -> finish

`preflight()` is everything that can fail cheaply (dataset, columns, rows, token counts, steps);
`python main.py --validate` stops after it. Providers (providers.py) fill in the hooks marked
below and nothing else; heavy libraries are imported inside the steps that use them.
"""

from __future__ import annotations

import logging
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from exporting.export import ExportJob, check_installed, export_artifacts
from exporting.verification import pad_id, probe_prompts
from job_manager import JobStatus, JobTracker
from models.base_models import base_config, check_base_model
from models.chat_templates import ensure_chat_template
from models.estimate import DEFAULT_PRICE_PER_HOUR, estimate, model_shape
from models.language_model import unreadable_tokens
from models.memory import check_memory, choose_batch, meta_model
from runtime.distributed import DDP, FSDP, first_on_node, strategy_for
from runtime.distributed import trainer_args as strategy_args
from runtime.errors import Cancelled, Interrupted, PermanentError
from runtime.libraries import check_attention, import_libraries, trl_classes
from runtime.progress import progress_callback
from runtime.settings import Settings
from runtime.tracking import RunLogger, TensorBoardLog, Tolerant
from schema import TrainRequest
from storage import BlobStore, ModelHub
from training.checkpoints import CheckpointStore, Guard, checkpoint_callback, checkpoint_step, ended
from training.curves import curve_png, history_json
from training.data import DatasetError, Tokenized, check_dropped, fit_prompts, load_splits, load_tokenizer, tokenize
from training.data_report import lengths_png, train_report
from training.divergence import divergence_watch, heal, trainable_snapshot
from training.evaluation import eval_token_accuracy, reader_metrics
from training.generation import answers, compare
from training.generation import cases as generation_cases
from training.lineage import Parent, fetch_parent
from training.rewards import build_reward, reference_fields
from training.vision import (
    VisionCollator,
    encode_vision,
    fit_vision_prompts,
    image_stats,
    image_token_id,
    image_token_ids,
    load_processor,
    per_image,
    pixel_values,
    vision_cases,
    vision_dataset,
    vision_probes,
)
from training.vision_rows import load_vision_splits

logger = logging.getLogger(__name__)

# What LoRA never adapts by accident: the parts of a multimodal Gemma (3 at 4B and up, 3n, 4) that are not its
# language model (towers, projectors, Gemma 4's embedders), Gemma 4's per-layer-embedding projections and its
# MoE routers. 'all-linear' would reach every one of them.
NEVER_ADAPTED = r".*\.per_layer_(input_gate|projection|model_projection)|.*\.router\..*"
NOT_LANGUAGE = r".*\.(vision_tower|audio_tower|multi_modal_projector|embed_vision|embed_audio)\..*|" + NEVER_ADAPTED


def adapted_modules(model) -> dict[str, Any]:
    """What LoRA adapts, for the job document: each adapted module's path with its layer numbers as '*', and
    how many modules that is."""
    names = [n.removeprefix("base_model.model.") for n, m in model.named_modules()
             if hasattr(m, "lora_A") and not n.endswith(".base_layer")]  # a targeted parameter's wrappers nest
    return {"modules": sorted({re.sub(r"\.\d+(?=\.)", ".*", n) for n in names}), "count": len(names)}


# What an export that ends the job early (require_improvement, a failed check) records of what it uploaded
EXPORTED = ("adapter_path", "gguf_path", "artifacts", "verification", "export_failures", "promoted")


def exported(artifacts: dict[str, Any]) -> dict[str, Any]:
    return {k: artifacts[k] for k in EXPORTED if k in artifacts}


@dataclass
class Services:
    blobs: BlobStore
    hub: ModelHub
    tracker: JobTracker
    run_logger: RunLogger
    guard: Guard | None = None
    tensorboard: TensorBoardLog | None = None
    integrations: tuple[str, ...] = ()  # report_to's comet_ml, mlflow: the Trainer's own integrations


@dataclass
class Prepared:
    tokenizer: Any
    train: Tokenized
    eval: Tokenized | None
    total_steps: int
    cases: Any = None  # generation.Cases: the eval prompts both models answer, or None
    processor: Any = None  # image+text jobs: the base's processor (training/vision.py)
    report: dict[str, Any] | None = None  # the data report (training/data_report.py)
    report_lengths: tuple[list[int], list[int]] = ([], [])  # its (prompt, answer) token counts, drawn at export
    estimate: dict[str, Any] | None = None  # time and cost of training on the GPU (models/estimate.py)


class BaseTrainingJob:
    methods: tuple[str, ...] = ("LoRA", "QLoRA", "Full")
    trainer_types: tuple[str, ...] = ("sft", "dpo", "orpo", "simpo", "grpo")

    def __init__(self, request: TrainRequest, settings: Settings, services: Services, workdir: Path):
        self.request, self.cfg, self.settings = request, request.training_config, settings
        self.services, self.tracker = services, services.tracker
        self.workdir = Path(workdir)
        self.hf_token = settings.hub_token(request)
        self.timings: dict[str, float] = {}
        self.checkpoints = CheckpointStore(
            services.blobs, f"gs://{settings.export_bucket}/checkpoints/{settings.job_id}/",
            keep=self.cfg.hyperparameters.save_total_limit)
        self.guard = services.guard or Guard(read_doc=self.tracker.read)
        self.parent: Parent | None = None  # the adapter this job continues (training/lineage.py), from pre-flight
        # one of several processes (runtime/distributed.py): rank 0 alone compares, exports and records
        self.place = settings.place
        self.strategy: str | None = None  # DDP or FSDP with several processes, chosen at pre-flight
        self.divergence: Any = None  # training/divergence.py's watch, made with the trainer

    # ---- provider hooks -------------------------------------------------------------------
    def check_environment(self) -> None:
        """Refuse, before anything is loaded, what this machine or provider cannot run."""

    def load_model(self, tokenizer) -> Any:
        """The model to train, with LoRA applied unless method is Full."""
        raise NotImplementedError

    def sft_overrides(self) -> dict[str, Any]:
        """Only the trainer configuration values where this provider really differs."""
        return {}

    def save_merged(self, model, tokenizer, out_dir: Path) -> None:
        """The trained weights merged into a 16-bit base, as safetensors, in out_dir."""
        raise NotImplementedError

    # ---- the workflow ----------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        prep = self.preflight()
        url = self.services.run_logger.start(self.settings.job_id, self.request.model_dump(mode="json"))
        ok = False
        try:
            self.tracker.phase("loading_model", JobStatus.PREPARING, **({"wandb_url": url} if url else {}))
            from transformers import set_seed

            set_seed(self.cfg.hyperparameters.seed)  # before LoRA's random init, not only before training
            with first_on_node(self.place):  # the node's first process downloads the base for the others
                model = self.timed("load_model", self.model_to_train, prep.tokenizer)
            trainer = self.timed("build_trainer", self.build_trainer, model, prep)
            # the model training starts from (rank 0's answers only: the others wait in the first step's sync)
            before = self.timed("generate_base", self.generate, trainer, prep) if self.place.main else None
            self.tracker.phase("training", JobStatus.TRAINING)
            train_metrics = self.timed("train", self.train, trainer)
            self.tracker.phase("evaluating")
            metrics = self.timed("evaluate", self.evaluate, trainer, prep, train_metrics)  # every rank's shard
            if not self.place.main:
                ok = True
                logger.info("rank %d done after evaluation; rank 0 exports", self.place.rank)
                return {"metrics": metrics}
            comparison = self.compare(trainer, prep, before)
            self.tracker.phase("exporting", metrics=metrics)
            artifacts = self.timed("export", self.export, trainer, prep.tokenizer, metrics, prep, comparison)
            ok = True
        finally:
            self.finish_tracking(ok)
        self.require_improvement(comparison, artifacts)
        self.export_failed(artifacts)
        self.timings["state_writes"] = round(self.tracker.write_s, 3)
        self.tracker.complete(metrics, {**artifacts, "timings": self.timings})
        self.clear_checkpoints()
        logger.info("completed: %s; timings %s", artifacts.get("adapter_path"), self.timings)
        return {"metrics": metrics, **artifacts}

    def clear_checkpoints(self) -> None:
        """The job is done: its checkpoints are only storage cost now. A leftover one is not a failure."""
        try:
            self.checkpoints.clear()
        except Exception as e:
            logger.warning("could not delete the checkpoints (%s); they can be removed by hand", e)

    def finish_tracking(self, ok: bool) -> None:
        """End the W&B run; an offline run's folder goes to the bucket for `wandb sync`, TensorBoard's event
        files beside the artifacts, and what went wrong with a tracker to the job document. Tracking never
        fails the job."""
        runs = self.services.run_logger
        folder = runs.finish(ok)
        fields: dict[str, Any] = {}
        events = self.services.tensorboard.close() if self.services.tensorboard else None
        if events is not None:
            logdir = f"gs://{self.settings.export_bucket}/tensorboard/{self.settings.job_id}/"
            try:
                self.services.blobs.upload_dir(events, f"{logdir}attempt-{self.settings.attempt}/")
                fields["tensorboard_path"] = logdir
                logger.info("TensorBoard event files uploaded: tensorboard --logdir %s", logdir)
            except Exception as e:
                runs.warn(f"the TensorBoard event files could not be uploaded ({type(e).__name__}: {e})")
        if folder is not None and folder.is_dir():
            uri = f"gs://{self.settings.export_bucket}/wandb/{self.settings.job_id}/{folder.name}/"
            try:
                self.services.blobs.upload_dir(folder, uri)
                fields["wandb_offline_path"] = uri
                logger.info("W&B offline run uploaded to %s: replay it with `wandb sync`", uri)
            except Exception as e:
                runs.warn(f"the W&B offline run could not be uploaded ({type(e).__name__}: {e})")
        if runs.warnings:
            fields["warnings"] = list(runs.warnings)
        if fields:
            self.tracker.write(fields)

    def model_to_train(self, tokenizer):
        """The provider's model (load_model), with what LoRA adapts written to the job document."""
        model = self.load_model(tokenizer)
        if self.cfg.method != "Full":
            self.tracker.write({"lora_targets": adapted_modules(model)})
        return model

    def timed(self, name: str, fn, *args):
        t = time.perf_counter()
        result = fn(*args)
        self.timings[name] = round(time.perf_counter() - t, 3)
        logger.info("%s took %.1fs", name, self.timings[name])
        return result

    def export_step(self, name: str, fn, *args):
        """One step of the export, as watched as a training step: named in the job document (`export_step`,
        with the heartbeat) as it starts, once the guard has had its say: a cancel ends the job there (what was
        uploaded stays), the task deadline ahead stops it for the next attempt, which resumes from training's
        last checkpoint and exports again."""
        reason = self.guard.check()
        if self.guard.cancelled:
            raise Cancelled(f"{reason} during the export, before its step {name}")
        if reason:
            raise Interrupted(f"{reason}: the export stopped before its step {name}; the next attempt exports "
                              "again from training's last checkpoint")
        self.tracker.write({"export_step": name})
        self.tracker.event("export_step", step=name)
        return self.timed(name, fn, *args)

    def preflight(self) -> Prepared:
        self.tracker.phase("validating", JobStatus.PREPARING)
        if self.cfg.method not in self.methods or self.cfg.trainer_type not in self.trainer_types:
            raise PermanentError(
                f"training_config: method '{self.cfg.method}' with trainer_type '{self.cfg.trainer_type}' is not "
                f"supported by provider '{self.cfg.provider}' yet (methods {list(self.methods)}, trainer types "
                f"{list(self.trainer_types)}); choose one of those.")
        if self.cfg.export_config.wants_gguf:
            check_installed()
        self.timed("check_environment", self.check_environment)  # Unsloth's import: about 35 s on a GPU
        self.check_hub_access()
        with first_on_node(self.place):  # one download per machine; the node's other processes read it
            self.parent = self.timed("fetch_parent", fetch_parent, self.cfg, self.services.blobs, self.services.hub,
                                     self.settings.export_bucket, self.workdir)
            # before the data: what the job cannot train (base_models.FAMILIES, images for a base without its
            # image path), refused from the config alone
            family = self.timed("check_base_model", check_base_model, self.cfg.base_model_id, self.token(),
                                self.cfg.trust_remote_code, self.cfg.vision, self.cfg.provider,
                                self.cfg.export_format == "merged" and self.cfg.export_config.merged_dtype == "q4",
                                self.cfg.export_config.wants_gguf,
                                self.cfg.vision and self.cfg.hyperparameters.finetune_vision_layers)
            if family.consumer_note:
                self.services.run_logger.warn(family.consumer_note)
            splits = self.timed("load_data", self.load_data)
        self.timed("import_libraries", import_libraries)
        check_attention(self.cfg.hyperparameters.use_fa2)
        processor = self.timed("load_processor", load_processor, self.cfg.base_model_id, self.token(),
                               self.cfg.trust_remote_code) if self.cfg.vision else None
        tokenizer = processor.tokenizer if processor else self.timed(
            "load_tokenizer", load_tokenizer, self.cfg.base_model_id, self.token(), self.cfg.trust_remote_code)
        template = ensure_chat_template(tokenizer, self.cfg.base_model_id, processor)
        self.check_modules()
        per_row = max((len(r["images"]) for r in splits["train"].rows), default=0) if processor else 0
        hp = self.cfg.hyperparameters
        world = self.place.world_size
        if hp.auto_batch:  # 'auto': the job chooses the micro-batch and the accumulation (models/memory.py)
            choice = self.timed("choose_batch", choose_batch, self.cfg, self.settings, self.token(), per_row)
            logger.info("batch chosen: %s", choice)
            self.tracker.write({"batch_choice": choice})
            hp = hp.model_copy(update={k: choice[k] for k in ("batch_size", "gradient_accumulation_steps")})
            self.cfg = self.cfg.model_copy(update={"hyperparameters": hp})
        if hp.batch_size % world:
            raise PermanentError(f"hyperparameters.batch_size: {hp.batch_size} is the batch of one optimizer step (before "
                                 f"gradient accumulation), split over the {world} processes; make it a multiple of "
                                 f"{world}, or run fewer processes (NPROC_PER_NODE).")
        # models/memory.py: refuse what cannot fit; with several processes, whether each needs the whole model (DDP)
        fits_one = check_memory(self.cfg, self.settings, self.token(), per_row)
        if world > 1:
            import torch

            self.strategy = strategy_for(self.cfg.method, fits_one, torch.cuda.is_available())
        sft = self.cfg.trainer_type == "sft"

        def fit(rows):
            if processor:
                return encode_vision(rows, processor, hp.max_length, hp.assistant_only_loss) if sft else \
                    fit_vision_prompts(rows, processor, hp.prompt_length)
            return tokenize(rows, tokenizer, hp.max_length, hp.assistant_only_loss) if sft else \
                fit_prompts(rows, tokenizer, hp.prompt_length)

        train = self.timed("prepare_data", fit, splits["train"])
        if not train.rows and getattr(train, "too_many", None):
            budget = f"max_length {hp.max_length}" if sft else f"max_prompt_length {hp.prompt_length}"
            raise DatasetError(f"every train row was left out: {len(train.too_many)} hold more image tokens than fit "
                               f"in {budget} ({per_image(processor)} per image), {train.dropped} have no "
                               f"trainable token within it; raise hyperparameters.{budget.split()[0]}, or send "
                               "fewer images per row.")
        if not train.rows:
            limit = f"max_length {hp.max_length}" if sft else f"max_prompt_length {hp.prompt_length}"
            raise DatasetError(f"all {train.dropped} train rows have no trainable token within {limit}; raise "
                               f"hyperparameters.{limit.split()[0]} or shorten the rows.")
        if sft:
            check_dropped(train, hp.max_length)
        evald = self.timed("prepare_eval_data", fit, splits["eval"]) if "eval" in splits else None
        images = image_stats(splits, {"train": train, **({"eval": evald} if evald else {})}) if processor else {}
        if self.cfg.eval_config.picks_best and not (evald and evald.rows):
            raise DatasetError("eval_config: early_stopping_patience and load_best_model_at_end judge checkpoints on "
                               "the eval split, and this dataset has none; add one (test, validation or eval), or "
                               "unset them.")
        found = None
        if "eval" in splits and self.cfg.comparison_rows:
            found = vision_cases(self.cfg, splits["eval"], processor, self.cfg.comparison_rows) if processor else \
                generation_cases(self.cfg, splits["eval"], tokenizer, self.cfg.comparison_rows)
        if self.cfg.eval_config.require_improvement and not (found and found.prompts):
            raise DatasetError("eval_config.require_improvement: no eval row to compare the models on (it needs an "
                               "eval split whose rows end with an answer); add one, or set require_improvement "
                               "false.")
        # GRPO trains on num_generations completions of each prompt
        samples = len(train.rows) * (hp.num_generations if self.cfg.trainer_type == "grpo" else 1)
        per_epoch = math.ceil(math.ceil(samples / hp.batch_size) / hp.gradient_accumulation_steps)
        total = hp.max_steps if hp.max_steps > 0 else math.ceil(per_epoch * hp.epochs)
        stats = {"train_rows": len(train.rows), "eval_rows": len(evald.rows) if evald else 0,
                 "train_tokens": train.tokens, "trained_tokens": train.trained_tokens,
                 "truncated_rows": train.truncated + (evald.truncated if evald else 0),
                 "dropped_rows": train.dropped + (evald.dropped if evald else 0), "total_steps": total, **images,
                 **({"chat_template": template} if template else {})}
        if stats["truncated_rows"]:
            logger.warning("%d rows truncated to max_length %d", stats["truncated_rows"], hp.max_length)
        logger.info("preflight ok: %s", stats)
        report, lengths = train_report(self.cfg, train, tokenizer, images)
        spread = {"distributed": {"world_size": world, "strategy": self.strategy,
                                  "per_device_batch_size": hp.batch_size // world}} if world > 1 else {}
        cost = self.timed("estimate", self.cost_estimate, stats)
        if self.settings.gpu_price_per_hour is not None or self.settings.execution:  # stated, or on Cloud Run
            self.tracker.price_per_hour = cost["price_per_hour_usd"]
        self.tracker.phase("validated", dataset=stats, data_report=report, total_steps=total, estimate=cost, **spread,
                           **({"init_from": self.parent.lineage} if self.parent else {}))
        return Prepared(tokenizer, train, evald if evald and evald.rows else None, total,
                        found if found and found.prompts else None, processor, report, lengths, cost)

    def cost_estimate(self, stats: dict[str, Any]) -> dict[str, Any]:
        """Training's time and cost on the GPU (models/estimate.py): advisory, so a model it cannot read costs the
        estimate alone, with a warning."""
        try:
            shape = model_shape(meta_model(self.cfg.base_model_id, self.token(), self.cfg.trust_remote_code,
                                           self.cfg.vision), self.cfg.method)
            return estimate(self.cfg, stats, shape, self.settings.gpu_price_per_hour)
        except Exception as e:  # noqa: BLE001 - any failure of an estimate is the estimate's alone
            why = f"not estimated ({type(e).__name__}: {str(e)[:200]})"
            self.services.run_logger.warn(f"estimate: {why}; training goes on")
            price = self.settings.gpu_price_per_hour
            return {"gpu": "NVIDIA L4", "seconds": None, "cost_usd": None, "why": why,
                    "price_per_hour_usd": DEFAULT_PRICE_PER_HOUR if price is None else price,
                    "price_source": "GPU_PRICE_PER_HOUR" if price is not None else "default"}

    def load_data(self) -> dict[str, list]:
        dataset_id = self.request.processed_dataset_id
        load = load_vision_splits if self.cfg.vision else load_splits
        # several processes: the files stay for the node's others to read (NodeFiles), removed with the workdir
        return load(self.services.blobs, f"gs://{self.settings.data_bucket}/processed_datasets/{dataset_id}/",
                    self.tracker.store.get_dataset(dataset_id), self.workdir / "data", self.cfg.trainer_type,
                    tuple(sorted(reference_fields(self.cfg.reward_config))), keep=self.place.distributed)

    def check_hub_access(self) -> None:
        """Before anything is trained: the token can read the base model and write the destination repo."""
        ex = self.cfg.export_config
        if not Path(self.cfg.base_model_id).expanduser().is_dir():
            self.services.hub.check_read(self.cfg.base_model_id)
        if ex.destination == "hfhub":
            self.services.hub.prepare_repo(ex.hf_repo_id, ex.hf_private)

    def token(self) -> str | None:
        return self.hf_token

    def compute_dtype(self):
        import torch

        if torch.cuda.is_available():
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32  # CPU: bf16 matmuls are emulated and slow

    def base_model_kwargs(self) -> dict[str, Any]:
        """How transformers loads the base model: to train it (Hugging Face) and under an adapter to check it."""
        from models.artifacts import nf4_config

        kwargs: dict[str, Any] = {"dtype": self.compute_dtype(), "token": self.token(), "use_safetensors": True,
                                  "trust_remote_code": self.cfg.trust_remote_code}
        if self.cfg.hyperparameters.use_fa2:  # check_attention refused it where it cannot run
            kwargs["attn_implementation"] = "flash_attention_2"
        if self.cfg.method == "QLoRA":
            from models.language_model import KEEP_16BIT

            model_type = base_config(self.cfg.base_model_id, self.token(), self.cfg.trust_remote_code).model_type
            kwargs["quantization_config"] = nf4_config(self.compute_dtype(), self.cfg.vision, self.strategy == FSDP,
                                                       KEEP_16BIT.get(model_type, ()))
        elif self.cfg.hyperparameters.load_in_8bit:
            from transformers import BitsAndBytesConfig

            kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        if self.strategy == DDP and "quantization_config" in kwargs:
            import torch

            if torch.cuda.is_available():  # each process quantizes onto its own GPU, not the first one
                kwargs["device_map"] = {"": self.place.local_rank}
        return kwargs

    def check_modules(self) -> None:
        """Pre-flight, on an empty (meta-device) copy of the model built from its config: every module the
        request names for LoRA is in the language model. PEFT refuses a target list none of whose names match
        but ignores the names that do not when others do; it matches modules_to_save by the end of a name
        ('norm' is every layer norm), so a name must end at a module boundary everywhere it matches."""
        hp = self.cfg.hyperparameters
        named = {"lora_target_modules": hp.lora_target_modules, "modules_to_save": hp.modules_to_save}
        named = {field: names for field, names in named.items() if isinstance(names, list)}
        if self.cfg.method == "Full" or not (named or hp.lora_target_parameters):
            return
        model = meta_model(self.cfg.base_model_id, self.token(), self.cfg.trust_remote_code, self.cfg.vision)
        modules = [n for n, _ in model.named_modules() if n and not re.fullmatch(NOT_LANGUAGE, n)]
        base = self.cfg.base_model_id
        params = [n for n, _ in model.named_parameters() if not re.fullmatch(NOT_LANGUAGE, n.rsplit(".", 1)[0])]
        missing = [t for t in hp.lora_target_parameters or () if not any(n.endswith("." + t) for n in params)]
        if missing:
            experts = sorted({n.split(".layers.")[-1].split(".", 1)[-1] for n, p in model.named_parameters()
                              if p.dim() == 3 and ".layers." in n})
            raise PermanentError(f"hyperparameters.lora_target_parameters: {missing} name no parameter of {base}'s "
                                 f"language model; " + (f"its expert weights are {experts}." if experts else
                                                        "it has no mixture of experts: leave the field unset."))
        for field, names in named.items():
            missing = [t for t in names if not any(n == t or n.endswith("." + t) for n in modules)]
            if missing:
                example = "q_proj, v_proj), or use 'all-linear'" if field == "lora_target_modules" else \
                    "lm_head or model.norm)"
                raise PermanentError(f"hyperparameters.{field}: {missing} name no module of {base}; name its "
                                     f"modules (e.g. {example}.")
        for t in hp.modules_to_save or ():
            partial = [n for n in modules if n.endswith(t) and not (n == t or n.endswith("." + t))]
            if partial:
                raise PermanentError(f"hyperparameters.modules_to_save: '{t}' also matches {partial[:3]} (PEFT "
                                     "matches the end of a module's name); give the name in full, e.g. "
                                     f"'{min((n for n in modules if n.endswith('.' + t)), key=len, default=t)}'.")
        merges = self.cfg.export_format in ("merged", "gguf") or self.cfg.export_config.wants_gguf
        inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
        if merges and outputs is not None and outputs.weight is inputs.weight:
            tied = [n for n, m in model.named_modules() if m is inputs or m is outputs]
            hit = [t for t in hp.modules_to_save or () if any(n == t or n.endswith("." + t) for n in tied)]
            if hit:
                raise PermanentError(f"hyperparameters.modules_to_save: {hit} in {base} is one weight shared by "
                                     f"{' and '.join(tied)} (tie_word_embeddings); PEFT trains a copy for one of "
                                     "them, which an adapter keeps but a merged or GGUF model cannot (its two "
                                     "layers stay one weight); export format 'adapter' without include_gguf, or "
                                     "leave the embeddings out.")

    def lora_kwargs(self) -> dict[str, Any]:
        hp = self.cfg.hyperparameters
        targets = hp.lora_target_modules
        return {"r": hp.lora_rank, "lora_alpha": hp.lora_alpha, "lora_dropout": hp.lora_dropout,
                "target_modules": targets if isinstance(targets, str) else list(targets), "bias": "none",
                "use_rslora": hp.use_rslora, **({"use_dora": True} if hp.use_dora else {}),
                **({"modules_to_save": list(hp.modules_to_save)} if hp.modules_to_save else {}),
                **({"target_parameters": list(hp.lora_target_parameters)} if hp.lora_target_parameters else {})}

    def trainer_kwargs(self, prep: Prepared, model=None) -> dict[str, Any]:
        """The only mapping from the request to TRL's configuration, for every trainer type (`model`: the one to
        train, whose tokens GRPO's sampling must not produce, where it has any)."""
        import torch

        hp, ev, kind = self.cfg.hyperparameters, self.cfg.eval_config, self.cfg.trainer_type
        gpu = torch.cuda.is_available()
        bf16 = gpu and torch.cuda.is_bf16_supported()
        optimizer = hp.optimizer_values(kind)
        # The request's warmup_ratio is a fraction (below 1: schema.py), and it goes to warmup_steps on
        # purpose: transformers 5 has no warmup_ratio, and reads a warmup_steps below 1 as that fraction of
        # the total steps (TrainingArguments.get_warmup_steps; tests/test_config_flow.py).
        warmup_fraction = optimizer.pop("warmup_ratio")
        evaluate_during = prep.eval is not None and ev.eval_strategy != "no"
        # GRPO samples: an image token in a completion would ask the forward pass for a picture that does not exist
        # ("Image features and image tokens do not match"); Gemma 3n's language model alone cannot read its media
        # tokens back (unreadable_tokens)
        never = [] if kind != "grpo" else image_token_ids(prep.processor) if prep.processor is not None else \
            unreadable_tokens(model.config) if model is not None else []
        # GRPO scores each prompt's num_generations completions as one group, in evaluation too: its eval
        # batch is the smallest multiple of num_generations that holds batch_size rows.
        eval_batch = -(-hp.batch_size // hp.num_generations) * hp.num_generations if kind == "grpo" \
            else hp.batch_size
        # batch_size is one optimizer step's batch before accumulation, whatever the number of processes: each
        # takes its share (pre-flight refused a batch that does not split), so steps and results match one process
        world = self.place.world_size
        per_device_eval = -(-eval_batch // world)
        while kind == "grpo" and (per_device_eval * world) % hp.num_generations:  # TRL's rule for eval groups
            per_device_eval += 1
        common = dict(
            output_dir=str(self.workdir / "checkpoints"), run_name=self.settings.job_id, seed=hp.seed,
            per_device_train_batch_size=hp.batch_size // world, per_device_eval_batch_size=per_device_eval,
            gradient_accumulation_steps=hp.gradient_accumulation_steps, num_train_epochs=hp.epochs,
            max_steps=hp.max_steps, learning_rate=hp.learning_rate, lr_scheduler_type=hp.lr_scheduler_type,
            **optimizer, warmup_steps=warmup_fraction, weight_decay=hp.weight_decay, logging_steps=hp.logging_steps,
            save_strategy=hp.save_strategy, save_steps=hp.save_steps, save_total_limit=hp.save_total_limit,
            eval_strategy=ev.eval_strategy if evaluate_during else "no", eval_steps=ev.eval_steps,
            report_to=self.services.run_logger.report_to + list(self.services.integrations),
            # On a CPU, bf16 autocast and gradient checkpointing make training 10-30x slower: off there.
            bf16=bf16, fp16=gpu and not bf16, use_cpu=not gpu, gradient_checkpointing=gpu,
            dataloader_pin_memory=gpu, disable_tqdm=True, logging_first_step=True,
            # a NaN or infinite loss is logged as it is, for the divergence watch (training/divergence.py), not
            # replaced by the mean of the earlier ones while the weights go NaN
            logging_nan_inf_filter=False,
        )
        if ev.picks_best and evaluate_during:  # the schema made saves and evaluations coincide
            metric = ev.metric_for_best_model
            common.update(metric_for_best_model=metric, load_best_model_at_end=ev.load_best_model_at_end,
                          greater_is_better=ev.greater_is_better if ev.greater_is_better is not None
                          else not metric.endswith("loss"),
                          # early stopping's count of evaluations without improvement survives a resume
                          restore_callback_states_from_checkpoint=ev.early_stopping_patience is not None)
        if gpu and self.cfg.method == "Full":
            # AdamW's state in 8 bits (bitsandbytes): 6 bytes per parameter in all with bf16 weights and
            # gradients, which is what lets a 1B Gemma fine-tune fully on an L4 (models/memory.py).
            common["optim"] = "adamw_8bit"
        if self.strategy is not None:  # several processes: DDP's or FSDP's settings (runtime/distributed.py)
            common.update(strategy_args(self.strategy, self.cfg.method, gpu))
        completion = hp.max_length - hp.prompt_length
        specific = {
            # padding_free alone: TRL refuses to truncate, and needs not, the job's rows are cut to max_length
            "sft": dict(max_length=None if hp.padding_free and not hp.packing else hp.max_length,
                        packing=hp.packing, padding_free=hp.padding_free, neftune_noise_alpha=hp.neftune_noise_alpha,
                        label_names=["labels"], batch_eval_metrics=False,
                        # image+text rows are encoded here (training/vision.py) and batched by the job's collator, which
                        # reads their image bytes: TRL neither prepares them nor drops that column
                        **(dict(dataset_kwargs={"skip_prepare_dataset": True}, remove_unused_columns=False)
                           if self.cfg.vision else {})),
            "dpo": dict(beta=hp.beta, max_length=hp.max_length, padding_free=hp.padding_free),
            "orpo": dict(beta=hp.beta, max_length=hp.max_length, max_completion_length=completion),
            # SimPO: CPO's loss with the log-probabilities averaged over each answer and no reference model;
            # cpo_alpha 0 leaves out CPO's SFT term (TRL's simpo_gamma margin, 0.5, is kept)
            "simpo": dict(beta=hp.beta, max_length=hp.max_length, max_completion_length=completion,
                          loss_type="simpo", cpo_alpha=0.0),
            "grpo": dict(beta=hp.beta, num_generations=hp.num_generations, max_completion_length=completion,
                         reward_weights=[g.weight for g in self.cfg.reward_config], log_completions=False,
                         # TRL's own defaults (dapo, token) where the request names none
                         **{n: getattr(hp, n) for n in ("loss_type", "importance_sampling_level")
                            if getattr(hp, n) is not None},
                         **({"generation_kwargs": {"suppress_tokens": never}} if never else {})),
        }[kind]
        return common | specific

    def build_trainer(self, model, prep: Prepared):
        from datasets import Dataset
        from transformers import PrinterCallback

        kind = self.cfg.trainer_type
        config_cls, trainer_cls = trl_classes(kind)
        args = config_cls(**(self.trainer_kwargs(prep, model) | self.sft_overrides()))
        hp = self.cfg.hyperparameters
        self.divergence = divergence_watch(hp.divergence_spike_factor if kind != "grpo" and hp.divergence_spike_factor
                                           else None, hp.divergence_lr_factor)
        # The training service sends compute_eval_metrics false by default (its job then still reported eval
        # loss): an eval_strategy asks for evaluation whatever it says, and the Trainer refuses an eval_strategy
        # without an eval_dataset (exit 1, and every retry the same).
        ev = self.cfg.eval_config
        with_eval = prep.eval is not None and (ev.compute_eval_metrics or ev.eval_strategy != "no")
        # image+text preference rows go to TRL as `datasets` Images, which its own vision collator processes
        table = vision_dataset if prep.processor is not None and kind != "sft" else Dataset.from_list
        kwargs: dict[str, Any] = dict(
            model=model, args=args, processing_class=prep.processor or prep.tokenizer,
            train_dataset=table(prep.train.rows), eval_dataset=table(prep.eval.rows) if with_eval else None,
            callbacks=[progress_callback(self.tracker), checkpoint_callback(
                self.checkpoints, self.guard, self.tracker, self.cfg.hyperparameters.checkpoint_minutes,
                self.cfg.hyperparameters.save_strategy, self.services.run_logger, self.place), self.divergence])
        if kind == "grpo":
            kwargs["reward_funcs"] = [build_reward(g) for g in self.cfg.reward_config]
        if prep.processor is not None and kind == "sft":
            kwargs["data_collator"] = VisionCollator(prep.processor, pad_id(prep.tokenizer))
        if ev.early_stopping_patience and args.metric_for_best_model:
            from transformers import EarlyStoppingCallback

            kwargs["callbacks"].append(EarlyStoppingCallback(ev.early_stopping_patience, ev.early_stopping_threshold))
        trainer = trainer_cls(**kwargs)
        trainer.remove_callback(PrinterCallback)
        runs = self.services.run_logger
        for callback in list(trainer.callback_handler.callbacks):
            if type(callback).__name__ in ("WandbCallback", "CometCallback", "MLflowCallback"):
                trainer.remove_callback(callback)  # tracking never costs a run (runtime/tracking.py)
                trainer.add_callback(Tolerant(callback, runs.warn))
        if self.services.tensorboard:
            try:
                trainer.add_callback(Tolerant(self.services.tensorboard.make_callback(), runs.warn))
            except Exception as e:
                runs.warn(f"TensorBoard could not start ({type(e).__name__}: {str(e)[:200]}); training goes on "
                          "without it")
        return trainer

    def train(self, trainer) -> dict[str, Any]:
        """Train from the newest complete checkpoint in the bucket, if any; stop early when the guard says."""
        with first_on_node(self.place):  # the node's first process downloads it, the others find it there
            last = self.checkpoints.restore(Path(trainer.args.output_dir)) if self.place.node_main else \
                self.checkpoints.local_newest(Path(trainer.args.output_dir))
        if last:
            step = int(last.name.rsplit("-", 1)[1])
            logger.info("resuming from checkpoint-%d", step)
            self.tracker.write({"resumed_from_step": step})
        if last and ended(last) and not self.place.distributed:
            return self.finished_training(trainer, last)
        if self.parent and not last and trainer.eval_dataset is not None:
            # Where the continued adapter starts: its parent's eval loss on this job's eval split
            start = trainer.evaluate()
            self.tracker.write({"init_eval_loss": start["eval_loss"]})
            logger.info("starting from the parent adapter at eval_loss %.4f", start["eval_loss"])
        # where a divergence finds no checkpoint saved before it, training goes back to these weights
        snapshot = trainable_snapshot(trainer.model) if not last else None
        if last:  # an earlier attempt's divergence counts: a second one fails this attempt
            self.divergence.resume((self.tracker.read() or {}).get("divergences") or [], checkpoint_step(str(last)))
        self.guard.training = True
        try:
            result = trainer.train(resume_from_checkpoint=str(last) if last else None)
            while self.divergence.tripped is not None and not self.guard.reason:
                if self.place.distributed:
                    raise PermanentError(f"hyperparameters.learning_rate: training diverged at step "
                                         f"{self.divergence.tripped.step} ({self.divergence.tripped.why}); under "
                                         "several processes the job does not roll back: lower learning_rate and "
                                         "run it again.")
                last = heal(trainer, self.divergence, self.checkpoints, snapshot, self.tracker,
                            self.services.run_logger.warn)
                result = trainer.train(resume_from_checkpoint=str(last) if last else None)
        finally:
            self.guard.training = False
        step = trainer.state.global_step
        if self.guard.cancelled:
            raise Cancelled(f"{self.guard.reason} at step {step} of {trainer.state.max_steps}; nothing exported.")
        if self.guard.reason:
            raise Interrupted(f"{self.guard.reason}: stopped at step {step} of {trainer.state.max_steps} with a "
                              f"checkpoint saved; the next attempt resumes from it.")
        self.record_best(trainer)  # training is over (a stopped attempt's best is the next one's to say)
        return dict(result.metrics)

    def finished_training(self, trainer, last: Path) -> dict[str, Any]:
        """Training had ended before an earlier attempt stopped (in its export): the weights and state of its last
        checkpoint, and no further step. Resumed there mid-epoch, the Trainer (transformers 5.17) trains one step
        past max_steps before it checks, which would change the model the request asked for. Its own loaders, as
        train(resume_from_checkpoint=...) calls them; the best checkpoint where the request exports that."""
        from transformers import TrainerState

        trainer._load_from_checkpoint(str(last))
        trainer.state = TrainerState.load_from_json(str(last / "trainer_state.json"))
        if trainer.args.load_best_model_at_end and trainer.state.best_model_checkpoint:
            trainer._load_best_model()
        logger.info("training had ended at step %d: its weights restored, no step trained", trainer.state.global_step)
        self.record_best(trainer)
        return {}

    def record_best(self, trainer) -> None:
        """best_step, best_metric and stop_reason in the document, where the request picks a best checkpoint."""
        ev, state = self.cfg.eval_config, trainer.state
        if not trainer.args.metric_for_best_model:
            return
        best = checkpoint_step(state.best_model_checkpoint)
        stopper = next((c for c in trainer.callback_handler.callbacks if type(c).__name__ == "EarlyStoppingCallback"),
                       None)
        early = stopper is not None and stopper.early_stopping_patience_counter >= ev.early_stopping_patience
        reason = (f"early stopping: {ev.metric_for_best_model} did not improve by more than "
                  f"{ev.early_stopping_threshold} for {ev.early_stopping_patience} evaluations, at step "
                  f"{state.global_step} of {state.max_steps}") if early else "completed"
        fields = {"best_step": best, "best_metric": state.best_metric, "stop_reason": reason,
                  "exported_step": best if best is not None and ev.load_best_model_at_end else state.global_step}
        logger.info("best checkpoint: %s", fields)
        self.tracker.write(fields)

    def evaluate(self, trainer, prep: Prepared, train_metrics: dict[str, Any]) -> dict[str, Any]:
        if trainer.eval_dataset is None:
            logger.warning("no eval split (test/validation/eval), or compute_eval_metrics off with eval_strategy "
                           "'no': no eval metrics")
            return reader_metrics({}, train_metrics, self.cfg.trainer_type)
        raw = trainer.evaluate()
        if self.cfg.trainer_type == "sft" and "eval_mean_token_accuracy" not in raw:
            # Unsloth's fused loss has no logits for TRL to count from: DESIGN.md's `accuracy` computed again
            raw["eval_mean_token_accuracy"] = self.timed("eval_token_accuracy", eval_token_accuracy, trainer)
        return reader_metrics(raw, train_metrics, self.cfg.trainer_type)

    def generate(self, trainer, prep: Prepared) -> list[str] | None:
        """The current model's answers to the comparison's prompts (training/generation.py); None without them. A
        failure costs the comparison (a warning), not the run."""
        if prep.cases is None:
            return None
        try:
            return answers(trainer.model, prep.tokenizer, prep.cases, self.cfg.eval_config.max_new_tokens,
                           self.cfg.hyperparameters.batch_size * 4)
        except Exception as e:  # noqa: BLE001 - an evaluation aid: never the reason a paid run is lost
            self.services.run_logger.warn(f"the answers for the base/tuned comparison could not be generated "
                                          f"({type(e).__name__}: {str(e)[:200]}); no generation metrics")
            return None

    def compare(self, trainer, prep: Prepared, before: list[str] | None) -> dict[str, Any] | None:
        """The tuned model's answers beside the starting model's, scored: the document's `generation` and
        `samples`, and eval_generations.jsonl for the export folders."""
        if before is None:
            return None
        tuned = self.timed("generate_tuned", self.generate, trainer, prep)
        if tuned is None:
            return None
        result, samples, lines = compare(self.cfg, prep.cases, before, tuned)
        logger.info("generation: %s", result)
        self.tracker.write({"generation": result, "samples": samples})
        return {"generation": result, "jsonl": lines}

    def require_improvement(self, comparison: dict[str, Any] | None, artifacts: dict[str, Any]) -> None:
        """eval_config.require_improvement: a tuned model that is not better than where it started fails the
        job (exit 2), its artifacts uploaded and marked promoted: false."""
        if not self.cfg.eval_config.require_improvement:
            return
        found = (comparison or {}).get("generation")
        if found and found["verdict"] == "better":
            artifacts["promoted"] = True
            return
        self.tracker.write({**exported(artifacts), "promoted": False})
        self.clear_checkpoints()  # the export is done and uploaded: no retry will train again
        if not found:
            raise PermanentError("eval_config.require_improvement: the models' answers could not be compared (see "
                                 "warnings); the artifacts are uploaded, marked promoted: false.")
        m = found[found["metric"]]
        raise PermanentError(
            f"eval_config.require_improvement: the tuned model is {found['verdict']}, not better, than the model "
            f"it started from on {found['metric']} (base {m['base']}, tuned {m['tuned']}, delta {m['delta']:+}; "
            f"'better' needs more than +{found['margin']}) over {found['rows']} eval rows; the artifacts are "
            f"uploaded ({artifacts.get('adapter_path')}), marked promoted: false.")

    def export_failed(self, artifacts: dict[str, Any]) -> None:
        """An artifact that failed its check costs that artifact alone: the others are uploaded and recorded, the
        failure is recorded by artifact (`export_failures`, and `verification` with `passed: false`), and the job
        fails with exit 2: nothing a retry could change, so nothing trains again (the checkpoints go)."""
        failed = artifacts.pop("export_failures", None)
        if not failed:
            return
        self.tracker.write({**exported(artifacts), "export_failures": failed})
        self.clear_checkpoints()
        uploaded = [f"{kind} {uri}" for group in artifacts["artifacts"].values() for kind, uri in group.items()]
        raise PermanentError(" ".join(failed.values()) + f" The other exports passed their checks and are uploaded: "
                             f"{', '.join(uploaded)}.")

    def curves(self, trainer) -> dict[str, str | bytes]:
        """log_history.json and training_curve.png for the export folders (training/curves.py); the figure to W&B too.
        A figure that cannot be drawn costs a warning."""
        history = list(trainer.state.log_history)
        files: dict[str, str | bytes] = {"log_history.json": history_json(history)}
        try:
            png = curve_png(history, self.cfg.trainer_type, f"{self.settings.job_id}: {self.cfg.method} "
                            f"{self.cfg.trainer_type} on {Path(self.cfg.base_model_id).name}")
        except Exception as e:  # noqa: BLE001 - a picture is never worth a paid run
            self.services.run_logger.warn(f"the training curve could not be drawn ({type(e).__name__}: {e})")
            return files
        self.services.run_logger.log_image("training_curve", png)
        return files | {"training_curve.png": png}

    def data_picture(self, prep: Prepared) -> dict[str, bytes]:
        """data_lengths.png, the data report's histograms, for the export folders beside the curve (drawn here, not
        at pre-flight, which --validate shares and which needs no plotting library); a picture that cannot be
        drawn costs a warning."""
        if prep.report is None:
            return {}
        limit = prep.report["limit"]
        try:
            return {"data_lengths.png": lengths_png(*prep.report_lengths, prep.report[limit], limit,
                                                    f"{self.settings.job_id}: token lengths of the train rows")}
        except Exception as e:  # noqa: BLE001 - a picture is never worth a paid run
            self.services.run_logger.warn(f"the data report's picture could not be drawn ({type(e).__name__}: {e})")
            return {}

    def export(self, trainer, tokenizer, metrics: dict[str, Any], prep: Prepared,
               comparison: dict[str, Any] | None = None) -> dict[str, Any]:
        """Each artifact made, verified in its consumer, then uploaded (exporting/export.py)."""
        s = self.services
        extra: dict[str, str | bytes] = {"eval_generations.jsonl": comparison["jsonl"]} if comparison else {}
        extra.update(self.curves(trainer))
        extra.update(self.data_picture(prep))
        # the improvement gate decides before anything is uploaded: a model it fails never reaches the Hub
        held_back = self.cfg.eval_config.require_improvement and \
            ((comparison or {}).get("generation") or {}).get("verdict") != "better"
        if held_back and self.cfg.export_config.destination == "hfhub":
            logger.warning("require_improvement: the tuned model is not better; its exports go to the bucket, "
                           "not to the Hub repo %s", self.cfg.export_config.hf_repo_id)
        job = ExportJob(self.settings.job_id, self.cfg, self.request.model_dump(mode="json"), self.settings,
                        self.workdir, self.token(), self.base_model_kwargs(), self.save_merged, s.blobs, s.hub,
                        s.run_logger, self.export_step, self.timings,
                        self.parent.lineage if self.parent else None, extra,
                        prep.processor, held_back)
        if prep.processor is None:
            return export_artifacts(job, trainer, tokenizer, metrics, probe_prompts(prep))
        prompts, images = vision_probes(prep)
        return export_artifacts(job, trainer, tokenizer, metrics, prompts, images,
                                [pixel_values(prep.processor, b) for b in images], image_token_id(prep.tokenizer))
