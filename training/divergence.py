"""A run that heals a divergence.

`DivergenceWatch` reads each logged training loss (and gradient norm). A NaN or infinite value, or a loss
`spike_factor` times the mean of the last SPIKE_WINDOW logged losses and at least SPIKE_MARGIN above it, is a
divergence: training stops at once, without saving that step. `heal` then picks the last checkpoint saved at or
before the last healthy log (a checkpoint saved later may hold the diverged weights, and is deleted locally and in
the bucket), or the weights training started from where none was saved yet, lowers the learning rate once by
`lr_factor`, and training goes on from there. A second divergence fails the job (PermanentError: exit 2) naming
both steps. Each one is an event and a line of the document's `divergences`.

The Trainer's own `logging_nan_inf_filter` would hide a NaN loss behind the mean of the earlier ones while the
weights went NaN; the job turns it off (base.trainer_kwargs) so that the watch sees it.
"""

from __future__ import annotations

import logging
import math
import shutil
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from runtime.errors import PermanentError
from training.checkpoints import checkpoint_step

logger = logging.getLogger(__name__)

SPIKE_WINDOW = 10  # logged losses whose mean a spike is judged against
SPIKE_MIN = 5  # logged losses before any spike is judged (the first steps' loss moves fast)
SPIKE_MARGIN = 1.0  # and a spike is at least this far above the mean: a loss near 0 is not judged by its ratio alone
SNAPSHOT_MAX_BYTES = 512 << 20  # trainable weights kept in host memory to roll back to the start (LoRA: MBs)


@dataclass
class Divergence:
    step: int  # the step whose log showed it
    why: str
    clean_step: int  # the last step logged healthy before it
    rolled_back_to: int | None = None  # the checkpoint's step training went on from (0: the start)
    learning_rate: float | None = None  # the peak learning rate from then on


def judge(logs: dict[str, Any], recent: deque, spike_factor: float | None) -> str | None:
    """Why a training log shows a divergence, or None."""
    for key in ("loss", "grad_norm"):
        value = logs.get(key)
        if isinstance(value, (int, float)) and not math.isfinite(value):
            return f"{key} {value}"
    loss = logs.get("loss")
    if spike_factor is None or not isinstance(loss, (int, float)) or len(recent) < SPIKE_MIN:
        return None
    mean = sum(recent) / len(recent)
    if mean > 0 and loss > spike_factor * mean and loss - mean >= SPIKE_MARGIN:
        return f"loss {loss:.4g} is {loss / mean:.1f}x the mean {mean:.4g} of the last {len(recent)} logged losses"
    return None


def divergence_watch(spike_factor: float | None, lr_factor: float):
    from transformers import TrainerCallback

    class DivergenceWatch(TrainerCallback):
        def __init__(self):
            self.spike_factor, self.lr_factor = spike_factor, lr_factor
            self.recent: deque = deque(maxlen=SPIKE_WINDOW)
            self.clean_step = 0
            self.tripped: Divergence | None = None
            self.healed: list[Divergence] = []
            self.scale = 1.0  # applied to the learning rate at each (re)start of training

        def resume(self, recorded: list[dict[str, Any]], step: int) -> None:
            """An earlier attempt's healed divergence (the document's `divergences`), where this attempt resumes
            from the checkpoint at `step`: it counts as the first, and where no checkpoint was saved after its roll-
            back (whose optimizer and schedule would carry the lowered rate), the rate is lowered again here."""
            healed = [Divergence(**d) for d in recorded if d.get("rolled_back_to") is not None]
            if healed:
                self.healed = healed[:1]
                self.scale = self.lr_factor if step <= healed[0].rolled_back_to else 1.0

        def on_train_begin(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
            self.tripped, self.clean_step = None, state.global_step
            self.recent.clear()
            if self.scale == 1.0:
                return
            # after the checkpoint's optimizer and scheduler states are loaded: the schedule's peak, and the
            # rate of the step it resumes at, both scaled
            scheduler = getattr(lr_scheduler, "scheduler", lr_scheduler)  # Accelerate's wrapper, or the schedule
            if scheduler is not None and hasattr(scheduler, "base_lrs"):
                scheduler.base_lrs = [lr * self.scale for lr in scheduler.base_lrs]
                if getattr(scheduler, "_last_lr", None):  # what the first step's log reads
                    scheduler._last_lr = [lr * self.scale for lr in scheduler._last_lr]
            for group in (optimizer.param_groups if optimizer is not None else []):
                group["lr"] *= self.scale
                if "initial_lr" in group:
                    group["initial_lr"] *= self.scale

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs or "loss" not in logs or self.tripped is not None:
                return control  # an evaluation's or the end's summary
            why = judge(logs, self.recent, self.spike_factor)
            if why is None:
                self.recent.append(float(logs["loss"]))
                self.clean_step = state.global_step
                return control
            self.tripped = Divergence(state.global_step, why, self.clean_step)
            logger.error("training diverged at step %d: %s", state.global_step, why)
            # stop now, and never save or evaluate the diverged weights
            control.should_training_stop, control.should_save, control.should_evaluate = True, False, False
            return control

    return DivergenceWatch()


def trainable_snapshot(model) -> dict[str, Any] | None:
    """The trainable weights as training starts, in host memory, to roll back to where no checkpoint is saved yet;
    None where they are too large to copy (Full on a large model: a divergence before the first checkpoint then
    fails the job)."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if sum(p.numel() * p.element_size() for _, p in params) > SNAPSHOT_MAX_BYTES:
        return None
    return {n: p.detach().to("cpu", copy=True) for n, p in params}


def restore_snapshot(model, snapshot: dict[str, Any]) -> None:
    import torch

    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in snapshot:
                param.copy_(snapshot[name].to(param.device))


def good_checkpoint(output_dir: Path, store, clean_step: int) -> Path | None:
    """The newest checkpoint saved at or before clean_step, locally or (restored from) the bucket; every later one,
    which may hold diverged weights, deleted in both."""
    local = {checkpoint_step(str(p)): p for p in output_dir.glob("checkpoint-*") if checkpoint_step(str(p))}
    for step, folder in local.items():
        if step > clean_step:
            shutil.rmtree(folder, ignore_errors=True)
    store.drop_after(clean_step)
    held = [step for step in local if step <= clean_step and (local[step] / "trainer_state.json").is_file()]
    if held:
        return local[max(held)]
    remote = [step for step in store.complete() if step <= clean_step]
    return store.download(remote[-1], output_dir) if remote else None


def heal(trainer, watch, store, snapshot: dict[str, Any] | None, tracker, warn) -> Path | None:
    """After training stopped on a divergence: the checkpoint to go on from (None: the start, its weights put back),
    with the learning rate lowered once; a PermanentError where this is the second divergence, or where there is
    nowhere to roll back to."""
    found = watch.tripped
    tracker.event("divergence", step=found.step, why=found.why, clean_step=found.clean_step)
    if watch.healed:
        first = watch.healed[0]
        tracker.write({"divergences": [asdict(d) for d in [*watch.healed, found]]})
        raise PermanentError(
            f"hyperparameters.learning_rate: training diverged twice: at step {first.step} ({first.why}), then, "
            f"rolled back to step {first.rolled_back_to} with the learning rate lowered to {first.learning_rate:.3g}, "
            f"again at step {found.step} ({found.why}); lower learning_rate (or raise warmup_ratio, or set "
            "max_grad_norm) and run it again.")
    good = good_checkpoint(Path(trainer.args.output_dir), store, found.clean_step)
    if good is None:
        if snapshot is None:
            raise PermanentError(
                f"hyperparameters.learning_rate: training diverged at step {found.step} ({found.why}) before its "
                "first checkpoint, and its weights are too large to keep a copy of the start; lower learning_rate "
                "or checkpoint sooner (save_strategy 'steps' with a small save_steps), and run it again.")
        restore_snapshot(trainer.model, snapshot)
    watch.scale *= watch.lr_factor
    found.rolled_back_to = checkpoint_step(str(good)) if good is not None else 0
    found.learning_rate = trainer.args.learning_rate * watch.scale
    watch.healed.append(found)
    trainer.optimizer = trainer.lr_scheduler = None  # made again, then loaded from the checkpoint
    tracker.write({"divergences": [asdict(d) for d in watch.healed]})
    warn(f"training diverged at step {found.step} ({found.why}): rolled back to step {found.rolled_back_to} and "
         f"goes on with the learning rate lowered to {found.learning_rate:.3g}")
    return good
