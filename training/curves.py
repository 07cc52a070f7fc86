"""The training curve, for the export folders and W&B: `log_history.json` (every entry the trainer logged:
the training steps' loss, learning rate and gradient norm, each evaluation's metrics, the run's summary)
and `training_curve.png`, drawn with matplotlib: train and eval loss against the step, and below them the
trainer type's own signal where it logs one (GRPO: the graders' reward; DPO and ORPO: the reward margin
between chosen and rejected).

A resumed attempt's history is the whole run's: the Trainer restores it from the checkpoint.
"""

from __future__ import annotations

import io
import json
from typing import Any

# The signal drawn under the losses, per trainer type: (train key, eval key, label).
SIGNALS = {"grpo": ("reward", "eval_reward", "reward"),
           "dpo": ("rewards/margins", "eval_rewards/margins", "reward margin (chosen - rejected)"),
           "orpo": ("rewards/margins", "eval_rewards/margins", "reward margin (chosen - rejected)"),
           "simpo": ("rewards/margins", "eval_rewards/margins", "reward margin (chosen - rejected)")}


def history_json(history: list[dict[str, Any]]) -> str:
    return json.dumps(history, indent=1, default=float) + "\n"


def series(history: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one logged key, in the order logged."""
    points = [(int(e["step"]), float(e[key])) for e in history if key in e and "step" in e]
    return [s for s, _ in points], [v for _, v in points]


def curve_png(history: list[dict[str, Any]], trainer_type: str, title: str) -> bytes:
    """The figure as PNG bytes (matplotlib's Agg backend: no display)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    signal = SIGNALS.get(trainer_type)
    drawn = signal and (series(history, signal[0])[0] or series(history, signal[1])[0])
    fig = Figure(figsize=(8, 6.5 if drawn else 4), dpi=100, layout="constrained")
    axes = fig.subplots(2 if drawn else 1, 1, sharex=True, squeeze=False)[:, 0]
    loss = axes[0]
    steps, values = series(history, "loss")
    loss.plot(steps, values, label="train loss", color="tab:blue")
    steps, values = series(history, "eval_loss")
    loss.plot(steps, values, "o-", label="eval loss", color="tab:orange")
    loss.set_ylabel("loss")
    loss.set_title(title)
    loss.grid(alpha=0.3)
    loss.legend()
    if drawn:
        below = axes[1]
        for key, style, name in ((signal[0], "-", "train"), (signal[1], "o-", "eval")):
            steps, values = series(history, key)
            if steps:
                below.plot(steps, values, style, label=f"{name} {signal[2]}")
        below.set_ylabel(signal[2].split(" (")[0])
        below.grid(alpha=0.3)
        below.legend()
    axes[-1].set_xlabel("step")
    out = io.BytesIO()
    fig.savefig(out, format="png")
    return out.getvalue()
