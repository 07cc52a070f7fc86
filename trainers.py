"""TRL and transformers glue that the workflow (base.py) uses: which TRL classes a trainer type
trains with, the callback that reports progress to the job document, and the one timed import of
the heavy libraries once a request is known to be valid. The request-to-TRL mapping itself stays
in `BaseTrainingJob.trainer_kwargs`.
"""

from __future__ import annotations

import logging

from job_manager import JobTracker

logger = logging.getLogger(__name__)


def import_libraries() -> None:
    """torch, transformers, PEFT and TRL, imported once the request is known to be valid (timed apart)."""
    import peft  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401
    import trl  # noqa: F401


def trl_classes(trainer_type: str):
    """TRL's (config, trainer) for a trainer type; ORPO lives in trl.experimental in TRL 1.x."""
    if trainer_type == "sft":
        from trl import SFTConfig, SFTTrainer
        return SFTConfig, SFTTrainer
    if trainer_type == "dpo":
        from trl import DPOConfig, DPOTrainer
        return DPOConfig, DPOTrainer
    if trainer_type == "grpo":
        from trl import GRPOConfig, GRPOTrainer
        return GRPOConfig, GRPOTrainer
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer
    return ORPOConfig, ORPOTrainer


def progress_callback(tracker: JobTracker):
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = logs or {}
            # Per-step metrics go to the job document and W&B; here at debug level, as JSON on Cloud Run
            # (Trainer's PrinterCallback, which printed them as Python dicts, is removed).
            logger.debug("step %d/%d: %s", state.global_step, state.max_steps,
                        ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in logs.items()))
            tracker.progress(state.global_step, state.max_steps, state.epoch, logs.get("loss"))

        def on_train_end(self, args, state, control, **kwargs):
            tracker.progress(state.global_step, state.max_steps, state.epoch, None, force=True)

    return Progress()
