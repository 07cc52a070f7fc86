"""Evaluation metrics under the names readers use: eval loss, perplexity = exp(eval_loss), token accuracy.

The trainer computes the eval loss and token accuracy (the prediction at t scored against the
label at t+1) with TRL's chunked cross-entropy, so full-vocabulary logits are never materialised,
not even for one batch. `token_accuracy` is the same definition on explicit arrays, for checks.

Unsloth's fused loss never materialises logits either, and its SFT trainer logs no token accuracy
then (unsloth_zoo omits it with a warning). `eval_token_accuracy` computes TRL's figure again from
label-free forward passes, one row at a time, for any trainer that reported none.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

IGNORE = -100


def token_accuracy(pred_ids: np.ndarray, labels: np.ndarray) -> tuple[int, int]:
    """(correct, counted): the prediction at position t is scored against the label at t+1."""
    pred, gold = np.asarray(pred_ids)[:, :-1], np.asarray(labels)[:, 1:]
    mask = gold != IGNORE
    return int(((pred == gold) & mask).sum()), int(mask.sum())


def eval_token_accuracy(trainer) -> float:
    """TRL's eval `mean_token_accuracy` (per eval batch, correct over counted tokens; then the mean over
    batches), from forward passes without labels: with no labels every model returns its logits, and
    one row at a time only one row's [length, vocabulary] logits exist at once."""
    import torch

    model, ratios = trainer.model, []
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for batch in trainer.get_eval_dataloader():
            labels = batch.pop("labels").cpu()  # the dataloader puts the batch on the GPU
            correct = counted = 0
            for i in range(labels.shape[0]):
                row = {k: v[i:i + 1].to(trainer.args.device) for k, v in batch.items() if torch.is_tensor(v)}
                with trainer.compute_loss_context_manager():
                    logits = model(**row, use_cache=False).logits
                found = token_accuracy(logits.argmax(-1).cpu().numpy(), labels[i:i + 1].numpy())
                correct, counted = correct + found[0], counted + found[1]
                del logits
            ratios.append(correct / counted if counted else 0.0)
    model.train(was_training)
    return float(np.mean(ratios)) if ratios else 0.0


def perplexity(loss: float) -> float:
    try:
        return math.exp(loss)
    except OverflowError:
        return float("inf")


# Reader names for what the RL trainers report (DPO/ORPO: preference reward; GRPO: the graders' reward).
RL_NAMES = {"eval_rewards/accuracies": "reward_accuracy", "eval_rewards/margins": "reward_margin",
            "eval_rewards/chosen": "reward_chosen", "eval_rewards/rejected": "reward_rejected",
            "eval_reward": "reward_mean", "eval_reward_std": "reward_std"}


def reader_metrics(raw: dict[str, Any], train: dict[str, Any] | None = None,
                   trainer_type: str = "sft") -> dict[str, Any]:
    """The names readers use (unprefixed), beside every number the trainer reported. Perplexity and
    token accuracy are SFT's; the RL trainer types add their reward statistics."""
    out: dict[str, Any] = dict(raw)
    if "eval_mean_token_accuracy" in raw:
        out["accuracy"] = raw["eval_mean_token_accuracy"]
    if "eval_loss" in raw and trainer_type == "sft":
        out["perplexity"] = perplexity(raw["eval_loss"])
    for name, reader in RL_NAMES.items():
        if name in raw:
            out[reader] = raw[name]
    for k, v in (train or {}).items():
        out[k if k.startswith("train") else f"train_{k}"] = v
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in out.items()}
