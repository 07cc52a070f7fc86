"""Did the fine-tune help? The starting model's answers and the tuned model's to the same held-out prompts,
scored against the reference answers.

- Rows: up to `eval_config.generation_rows` of the eval split. SFT: a conversation ending with an assistant
  turn; the prompt is everything before that turn and the reference is its text. DPO and ORPO: the row's
  prompt and its chosen answer. GRPO: the row's prompt, scored by the request's own graders.
- The starting model answers before training begins: the base model (a new LoRA adapter is the identity
  until trained; Full has not moved yet), or the parent adapter of a continued job. No second model is
  loaded. The tuned model answers after training, on the same prompts.
- Image+text jobs (training/vision.py builds their cases): the prompts carry their pictures, and each sample names
  them (split, row, sha256), never their bytes.
- Decoding: greedy, up to `eval_config.max_new_tokens`, ending at the chat template's stop tokens, batched
  with the KV cache (verification.greedy_reference, on the GPU where the model is).
- Metrics, each a mean over the rows in [0, 1]: exact_match (after `rewards.normalise`: case, spacing, a
  final full stop), rouge_l (F-measure, rouge-score), bleu (sacrebleu's sentence BLEU / 100); GRPO: reward
  (the graders' weighted sum, as TRL adds them).
- Verdict on `eval_config.improvement_metric` (GRPO: reward): `better` when the tuned mean exceeds the
  starting one by more than MARGIN, `worse` when it falls short by more than MARGIN, else `same`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

from schema import TrainingConfig
from training.rewards import build_reward, completion_text, normalise, similarity

logger = logging.getLogger(__name__)

MARGIN = 0.02  # two points on a [0, 1] metric: less is noise on a few dozen rows
SAMPLES = 5  # rows shown in the job document
SHOWN = 300  # characters of each text shown there


@dataclass
class Cases:
    prompts: list[list[int]]  # token ids, the chat template's generation prompt included
    texts: list[str]  # the prompts as text, for people
    references: list[str]  # the reference answers (GRPO: the first grader's reference column, for people)
    columns: list[dict[str, Any]]  # GRPO: each row's reference columns, for the graders
    files: list[list[bytes]] | None = None  # image+text: each prompt's encoded pictures (training/vision.py)
    pixels_of: Any = None  # their pixels, made when the models answer (a Gemma 3 picture is 9.6 MB of floats)
    image_token_id: int | None = None
    images: list[str] | None = None  # and which pictures they are, for people: split, row, sha256


def cases(cfg: TrainingConfig, rows: list[Any], tokenizer, limit: int) -> Cases:
    """The rows the comparison answers: those with a prompt and a reference, at most `limit`."""
    out = Cases([], [], [], [])
    keep = cfg.hyperparameters.max_length
    for row in rows:
        if len(out.prompts) == limit:
            break
        if cfg.trainer_type == "sft":
            if isinstance(row, str) or not row or row[-1].get("role") != "assistant" or len(row) < 2:
                continue  # plain text, or no final answer to compare with
            prompt, reference, columns = row[:-1], completion_text([row[-1]]), {}
        else:
            prompt = row["prompt"]
            reference = completion_text(row["chosen"]) if "chosen" in row else ""
            columns = {k: v for k, v in row.items() if k not in ("prompt", "chosen", "rejected")}
            if cfg.trainer_type == "grpo":
                graded = [g.reference_column for g in cfg.reward_config if g.reference_column]
                reference = str(row.get(graded[0], "")) if graded else ""
        text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        out.prompts.append(tokenizer(text, add_special_tokens=False)["input_ids"][-keep:])
        out.texts.append(completion_text(prompt))
        out.references.append(reference)
        out.columns.append(columns)
    return out


def answers(model, tokenizer, found: Cases, max_new_tokens: int, batch_size: int = 16) -> list[str]:
    """Greedy answers to every prompt, decoded without special tokens; the model's mode is restored."""
    from exporting.verification import greedy_reference, pad_id, stop_ids

    training = model.training
    try:
        ref = greedy_reference(model, found.prompts, stop_ids(model, tokenizer), pad_id(tokenizer),
                               max_new_tokens, batch_size,
                               [found.pixels_of(f) for f in found.files] if found.files is not None else None,
                               found.image_token_id)
    finally:
        model.train(training)
    return [tokenizer.decode(seq[start:], skip_special_tokens=True).strip()
            for seq, start in zip(ref.sequences, ref.starts)]


def exact_match(answer: str, reference: str) -> float:
    return float(normalise(answer) == normalise(reference))


def scores(cfg: TrainingConfig, found: Cases, said: list[str]) -> list[dict[str, float]]:
    """Each answer's score on every metric."""
    if cfg.trainer_type == "grpo":
        graders = [(g.weight, build_reward(g)) for g in cfg.reward_config]
        names = sorted({k for c in found.columns for k in c})
        per = [fn(said, **{k: [c.get(k) for c in found.columns] for k in names}) for _, fn in graders]
        return [{"reward": sum(w * s[i] for (w, _), s in zip(graders, per))} for i in range(len(said))]
    return [{"exact_match": exact_match(a, r), "rouge_l": similarity(a, r, "rouge_l"), "bleu": similarity(a, r, "bleu")}
            for a, r in zip(said, found.references)]


def mean(rows: list[dict[str, float]], name: str) -> float:
    return sum(r[name] for r in rows) / len(rows) if rows else 0.0


def compare(cfg: TrainingConfig, found: Cases, base: list[str], tuned: list[str]) -> tuple[dict, list, str]:
    """(the document's `generation` map, its `samples`, the lines of eval_generations.jsonl)."""
    base_scores, tuned_scores = scores(cfg, found, base), scores(cfg, found, tuned)
    names = list(tuned_scores[0]) if tuned_scores else []
    generation: dict[str, Any] = {}
    for name in names:
        b, t = mean(base_scores, name), mean(tuned_scores, name)
        generation[name] = {"base": round(b, 4), "tuned": round(t, 4), "delta": round(t - b, 4)}
    metric = "reward" if cfg.trainer_type == "grpo" else cfg.eval_config.improvement_metric
    delta = generation[metric]["delta"] if metric in generation else 0.0
    generation.update(metric=metric, rows=len(tuned), margin=MARGIN,
                      verdict="better" if delta > MARGIN else "worse" if delta < -MARGIN else "same")

    def cut(text: str) -> str:
        return text if len(text) <= SHOWN else text[:SHOWN] + "…"
    shown = found.images or [None] * len(tuned)  # an image+text prompt's pictures, named
    samples = [{"prompt": cut(p), **({"image": i} if i else {}), "reference": cut(r), "base": cut(b), "tuned": cut(t)}
               for p, i, r, b, t in list(zip(found.texts, shown, found.references, base, tuned))[:SAMPLES]]
    lines = "".join(json.dumps({"prompt": p, **({"image": i} if i else {}), "reference": r, "base": b, "tuned": t,
                                "scores": {"base": bs, "tuned": ts}}, ensure_ascii=False) + "\n"
                    for p, i, r, b, t, bs, ts in zip(found.texts, shown, found.references, base, tuned, base_scores,
                                                     tuned_scores))
    return generation, samples, lines
