"""The data report made at pre-flight, before a GPU is paid for: what the train split looks like to the model, in
the job document (`data_report`), printed by `main.py --validate`, and drawn as `data_lengths.png` beside the
training curve in the export folders.

- The token lengths of prompts and answers (percentiles, mean, largest) as the model reads them. An SFT row's
  answer is its trained tokens and its prompt what precedes its first one; a preference or GRPO row's prompt is its
  rendered prompt (TRL tokenizes the completions itself, so none are counted). Rows are counted as kept, after
  `max_length`: the share cut there (`truncated_share`) says how many reached it.
- The rows left out, by reason (no trainable token within max_length, images that cannot be decoded or do not
  match, image tokens that never fit), from the counts pre-flight makes.
- The first kept row as text, its trained spans between ⟦ and ⟧ (a run of one token, an image's, collapsed to
  `token×n`), so that what is trained can be read before anything is.
"""

from __future__ import annotations

import io
from typing import Any

PERCENTILES = (50, 90, 99)
TRAINED_OPEN, TRAINED_CLOSE = "⟦", "⟧"
RUN = 4  # a run of at least this many copies of one token is written token×n


def spread(values: list[int]) -> dict[str, float] | None:
    """Percentiles, mean and largest of token counts (numpy's linear percentiles); None for none."""
    if not values:
        return None
    import numpy as np

    found = {f"p{p}": float(np.percentile(values, p)) for p in PERCENTILES}
    return found | {"mean": round(float(np.mean(values)), 1), "max": int(max(values))}


def lengths(rows: list[dict[str, Any]], prompt_lengths: list[int] | None) -> tuple[list[int], list[int]]:
    """(prompt, answer) token counts of each kept row: an SFT row from its labels; the others' prompts as
    pre-flight counted them, with no answer."""
    if prompt_lengths is not None:
        return list(prompt_lengths), []
    prompts, answers = [], []
    for row in rows:
        trained = [i for i, label in enumerate(row["labels"]) if label != -100]
        prompts.append(trained[0] if trained else len(row["labels"]))
        answers.append(len(trained))
    return prompts, answers


def marked(row: dict[str, Any], tokenizer, limit: int = 2000) -> str:
    """A kept SFT row as text with its trained spans marked; runs of one token collapsed; cut at `limit`."""
    ids, labels = row["input_ids"], row["labels"]
    parts, i = [], 0
    while i < len(ids):
        trained = labels[i] != -100
        j = i
        while j < len(ids) and (labels[j] != -100) == trained:
            j += 1
        text = collapse(ids[i:j], tokenizer)
        parts.append(f"{TRAINED_OPEN}{text}{TRAINED_CLOSE}" if trained else text)
        i = j
    text = "".join(parts)
    return text if len(text) <= limit else text[:limit] + f"… ({len(text) - limit} more characters)"


def collapse(ids: list[int], tokenizer) -> str:
    out, i = [], 0
    while i < len(ids):
        j = i
        while j < len(ids) and ids[j] == ids[i]:
            j += 1
        if j - i >= RUN:
            out.append(f"{tokenizer.decode([ids[i]])}×{j - i}")
        else:
            out.append(tokenizer.decode(ids[i:j]))
        i = j
    return "".join(out)


def data_report(split, tokenizer, limit: int, left_out: dict[str, int], prompt_lengths: list[int] | None = None,
                limit_name: str = "max_length") -> tuple[dict[str, Any], tuple[list[int], list[int]]]:
    """The report of a prepared train split (training/data.Tokenized or training/vision.Encoded) and the lengths it
    was made from (for the picture). `limit`: the budget rows were cut or left out at (`limit_name`: max_length
    for SFT, max_prompt_length for the others); `left_out`: rows left out by reason, from pre-flight's counts."""
    prompts, answers = lengths(split.rows, prompt_lengths)
    seen = len(split.rows) + sum(left_out.values())
    cut = split.truncated - split.dropped_truncated
    report: dict[str, Any] = {
        "rows": len(split.rows), "limit": limit_name, limit_name: limit,
        "prompt_tokens": spread(prompts), "answer_tokens": spread(answers),
        "truncated_rows": cut,  # kept rows cut at max_length (those left out are counted in left_out)
        "truncated_share": round(cut / seen, 4) if seen else 0.0,
        "left_out": {k: v for k, v in left_out.items() if v},
    }
    if prompt_lengths is None and split.rows:
        report["first_row"] = marked(split.rows[0], tokenizer)
    return report, (prompts, answers)


def lengths_png(prompts: list[int], answers: list[int], limit: int, limit_name: str, title: str) -> bytes:
    """Histograms of the prompt and answer token counts, the limit marked (matplotlib's Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4), dpi=100, layout="constrained")
    ax = fig.subplots()
    bins = max(10, min(60, len(prompts) // 2 or 10))
    ax.hist(prompts, bins=bins, alpha=0.6, label="prompt tokens", color="tab:blue")
    if answers:
        ax.hist(answers, bins=bins, alpha=0.6, label="answer tokens (trained)", color="tab:orange")
    ax.axvline(limit, color="tab:red", linestyle="--", label=f"{limit_name} {limit}")
    ax.set_xlabel("tokens per row")
    ax.set_ylabel("rows")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    out = io.BytesIO()
    fig.savefig(out, format="png")
    return out.getvalue()


def train_report(cfg, train, tokenizer, images: dict[str, Any]) -> tuple[dict[str, Any], tuple[list[int], list[int]]]:
    """The report of a job's prepared train split (`images`: pre-flight's image counts), and the (prompt, answer)
    lengths the export draws (lengths_png)."""
    hp, sft = cfg.hyperparameters, cfg.trainer_type == "sft"
    reason = "no_trained_token_within_max_length" if sft else "prompt_beyond_max_prompt_length"
    left_out = {reason: train.dropped} | {k.removeprefix("rows_"): v for k, v in images.items()
                                          if k.startswith("rows_") and not k.endswith("_first")}
    limit, name = (hp.max_length, "max_length") if sft else (hp.prompt_length, "max_prompt_length")
    return data_report(train, tokenizer, limit, left_out, train.prompt_lengths, name)


def as_text(report: dict[str, Any]) -> str:
    """The report for people (main.py --validate)."""
    limit = report["limit"]
    lines = [f"train rows kept: {report['rows']} ({limit} {report[limit]}; cut at max_length: "
             f"{report['truncated_rows']}, {report['truncated_share']:.1%})"]
    for name in ("prompt_tokens", "answer_tokens"):
        if report.get(name):
            s = report[name]
            lines.append(f"{name.replace('_', ' ')}: " + ", ".join(f"{k} {v:g}" for k, v in s.items()))
    for reason, n in report["left_out"].items():
        lines.append(f"left out ({reason.replace('_', ' ')}): {n}")
    if "first_row" in report:
        lines.append(f"first row, trained spans between {TRAINED_OPEN} and {TRAINED_CLOSE}:\n{report['first_row']}")
    return "\n".join(lines)
