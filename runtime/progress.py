"""Training progress, where people follow it: the Trainer callback that writes step, loss and ETA to the
job document (throttled by the tracker) and a readable line to the log.
"""

from __future__ import annotations

import logging
import math
import time

from job_manager import JobTracker

logger = logging.getLogger(__name__)


def progress_callback(tracker: JobTracker, log_every_s: float = 30.0, clock=time.monotonic):
    """Progress to the job document (throttled by the tracker) and to the log: a line at the first
    logged step, then at most every `log_every_s`, and one per evaluation, at INFO, so that a job's
    logs (Cloud Logging, `docker logs`) show how far it is and whether it learns."""
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        logged_at = -math.inf

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = logs or {}
            # Every logged step at debug level, as JSON on Cloud Run (Trainer's PrinterCallback, which
            # printed them as Python dicts, is removed).
            logger.debug("step %d/%d: %s", state.global_step, state.max_steps, describe(logs))
            tracker.progress(state.global_step, state.max_steps, state.epoch, logs.get("loss"))
            if "loss" in logs and clock() - self.logged_at >= log_every_s:
                self.logged_at = clock()
                logger.info("%s", progress_line(tracker.latest))

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            shown = {k: v for k, v in (metrics or {}).items()
                     if k != "epoch" and not k.endswith(("_runtime", "_per_second"))}
            logger.info("eval at step %d/%d (epoch %.2f): %s", state.global_step, state.max_steps,
                        state.epoch or 0.0, describe(shown))
            # The newest evaluation in the document (what a sweep's pruner reads while the job runs), and an event
            tracker.evaluated(state.global_step, state.epoch,
                              {k: v for k, v in shown.items() if isinstance(v, (int, float))})

        def on_train_end(self, args, state, control, **kwargs):
            tracker.progress(state.global_step, state.max_steps, state.epoch, None, force=True)
            logger.info("%s", progress_line(tracker.latest))

    return Progress()


def describe(values: dict) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())


def progress_line(fields: dict) -> str:
    """'step 120/144 (83%), epoch 10.00, loss 2.104, about 1m05s left' from the tracker's progress fields."""
    line = f"step {fields['step']}/{fields['total_steps']} ({fields['progress']:.0%})"
    if fields.get("epoch") is not None:
        line += f", epoch {fields['epoch']:.2f}"
    if fields.get("loss") is not None:
        line += f", loss {fields['loss']:.4g}"
    eta = fields.get("eta_seconds")
    if eta is not None and fields["step"] < fields["total_steps"]:
        minutes, seconds = divmod(round(eta), 60)
        line += f", about {minutes}m{seconds:02d}s left" if minutes else f", about {seconds}s left"
    return line
