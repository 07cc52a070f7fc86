"""The processed dataset: find and load its splits, check its rows, load the base model's tokenizer and
turn the rows into token ids and loss labels.

Row forms (DESIGN.md): `messages` (string or typed-part content), `text`, or `prompt` + `completion`.
Loss is on assistant tokens only unless `assistant_only_loss` is off; spans are found from the
chat template's own rendering of each prefix, so it works for any template whose prefixes render
as prefixes (Gemma's do) without `{% generation %}` markers.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from models.base_models import reading_base
from runtime.errors import PermanentError

logger = logging.getLogger(__name__)

EVAL_SPLITS = ("test", "validation", "eval")
COLUMNS = {"sft": [("messages",), ("text",), ("prompt", "completion")],
           "dpo": [("prompt", "chosen", "rejected")], "orpo": [("prompt", "chosen", "rejected")],
           "simpo": [("prompt", "chosen", "rejected")],
           "grpo": [("prompt",)]}
ROLES = ("system", "user", "assistant")


class DatasetError(PermanentError):
    """The dataset is missing, empty or does not fit the trainer type."""


def split_uris(listing: list[str], prefix_uri: str, metadata: dict[str, Any] | None = None) -> dict[str, str]:
    """`{"train": uri, "eval": uri?}` for the dataset under `prefix_uri` (gs://bucket/processed_datasets/{id}/).

    The preprocessing service's metadata document (`splits[{split_name, num_rows, path}]`) wins when
    it names splits; otherwise the bucket listing does. `path` may be a gs:// URI, a key in the same
    bucket, or a file name under the prefix.
    """
    bucket = prefix_uri[5:].split("/", 1)[0]
    found: dict[str, str] = {}
    for split in (metadata or {}).get("splits") or []:
        name, path = split.get("split_name"), str(split.get("path") or "")
        if name and path:
            found[name] = path if path.startswith("gs://") else \
                f"gs://{bucket}/{path.lstrip('/')}" if "/" in path else prefix_uri + path
    for name, uri in found.items():
        if ".." in uri[5:].split("/") or not uri[5:].split("/", 1)[0]:
            raise DatasetError(f"processed_datasets metadata: split {name!r} has path {uri!r}, which escapes its "
                               "bucket; the preprocessing service must write a gs:// URI or a key without '..'.")
    looked = "the metadata's splits" if found else f"{prefix_uri}train.parquet"
    if not found:
        found = {uri.rsplit("/", 1)[-1].removesuffix(".parquet"): uri for uri in listing if uri.endswith(".parquet")}
    if "train" not in found:
        raise DatasetError(f"no train split: looked for {looked} and found {sorted(found) or 'nothing'}"
                           f"{'' if metadata else ' (no processed_datasets metadata document either)'}; "
                           "check processed_dataset_id and that preprocessing finished.")
    splits = {"train": found["train"]}
    for name in EVAL_SPLITS:
        if name in found:
            splits["eval"] = found[name]
            break
    return splits


def read_splits(blobs, prefix: str, metadata: dict[str, Any] | None, folder: Path, keep: bool = False
                ) -> dict[str, Any]:
    """Each split under `prefix` (see split_uris) as a pyarrow table; the downloaded file is gone once read,
    unless `keep` (several processes on a machine: the others read the file the first one downloaded)."""
    import pyarrow.parquet as pq

    uris = split_uris([] if metadata and metadata.get("splits") else blobs.list(prefix), prefix, metadata)
    out = {}
    for split, uri in uris.items():
        path = blobs.download(uri, folder / uri.rsplit("/", 1)[-1])
        out[split] = pq.read_table(path)
        if not keep:
            path.unlink()  # on Cloud Run the disk is memory: keep the rows, not the file
    return out


def load_splits(blobs, prefix: str, metadata: dict[str, Any] | None, folder: Path, trainer_type: str,
                refs: tuple[str, ...] = (), keep: bool = False) -> dict[str, list[dict[str, Any]]]:
    """Each split's rows under `prefix` (see split_uris), checked for the trainer type, with the reward
    graders' reference columns `refs` kept beside the row form's columns (`keep`: see read_splits)."""
    out = {}
    for split, table in read_splits(blobs, prefix, metadata, folder, keep).items():
        form = row_form(table.column_names, trainer_type)
        check_reference_columns(table.column_names, split, refs)
        out[split] = check_rows(table.select(list(form + refs)).to_pylist(), form, split, trainer_type, refs)
    return out


def check_reference_columns(columns: list[str], split: str, refs: tuple[str, ...]) -> None:
    """Every column the reward graders read (reference_field) is in the split."""
    missing = [c for c in refs if c not in columns]
    if missing:
        raise DatasetError(f"the {split} split has columns {sorted(columns)} but reward_config reads {missing} "
                           "(reference_field); add the column or change the grader.")


def load_tokenizer(model_id: str, token: str | None, trust_remote_code: bool):
    """The base model's tokenizer; an id that cannot be read is a permanent error, not a retry."""
    from transformers import AutoTokenizer

    with reading_base(model_id):
        tok = AutoTokenizer.from_pretrained(model_id, token=token, trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def row_form(columns: list[str], trainer_type: str) -> tuple[str, ...]:
    """The first accepted column set present, or a DatasetError naming what was found and needed."""
    for needed in COLUMNS[trainer_type]:
        if all(c in columns for c in needed):
            return needed
    wanted = " or ".join("+".join(n) for n in COLUMNS[trainer_type])
    raise DatasetError(f"the dataset's columns {sorted(columns)} do not fit trainer_type '{trainer_type}': "
                       f"it needs {wanted}.")


def text_of(content: Any) -> str:
    """Content as text: a string, or the text parts of a typed-part list (images are refused)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") not in ("text", "image"):
                raise ValueError(f"content part {part!r} is not {{type: text, text}}")
            if part["type"] == "image":
                raise ValueError("an image part in a text job; set training_config.modality 'vision' to train "
                                 "on the images")
            parts.append(part.get("text") or "")
        return "".join(parts)
    raise ValueError(f"content must be a string or a list of parts, got {type(content).__name__}")


# Tool-calling conversations are not trained yet: a row with tool definitions or calls would train without them, so
# it is refused rather than quietly trained as something else.
NO_TOOLS = ("this job does not train tool-calling conversations yet, and would train the row without them; remove "
            "them in preprocessing, or train on plain user and assistant turns")


def as_messages(value: Any, default_role: str) -> list[dict[str, str]]:
    if isinstance(value, str):
        return [{"role": default_role, "content": value}]
    if any(m.get("tool_calls") for m in value):
        raise ValueError(f"tool_calls in a turn: {NO_TOOLS}")
    return [{"role": m["role"], "content": text_of(m.get("content"))} for m in value]


def check_turns(messages: list[dict[str, str]], ends_with: str, alternate: bool = True) -> None:
    """Roles in order (an optional system turn first, then user/assistant alternating), no empty
    content, and the last turn's role as given; a ValueError says what is wrong."""
    turns = messages[1:] if messages and messages[0]["role"] == "system" else messages
    for i, m in enumerate(turns):
        if m["role"] not in ROLES[1:]:
            raise ValueError(f"role '{m['role']}' at turn {i} (allowed: user, assistant; system only first)")
        expected = "user" if i % 2 == 0 else "assistant"
        if alternate and m["role"] != expected:
            raise ValueError(f"roles out of order: turn {i} is '{m['role']}', expected '{expected}'")
        if not m["content"].strip():
            raise ValueError(f"empty content at turn {i}")
    if not turns or turns[-1]["role"] != ends_with:
        raise ValueError(f"the conversation does not end with a{'n' * (ends_with[0] == 'a')} {ends_with} turn")


def to_conversation(row: dict[str, Any], form: tuple[str, ...]) -> list[dict[str, str]] | str:
    """A validated message list (or plain text for `text` rows); ValueError says what is wrong."""
    if form == ("text",):
        if not isinstance(row["text"], str) or not row["text"].strip():
            raise ValueError("empty text")
        return row["text"]
    if form == ("messages",):
        messages = as_messages(row["messages"], "user")
    else:
        messages = as_messages(row["prompt"], "user") + as_messages(row["completion"], "assistant")
    check_turns(messages, "assistant")
    return messages


def to_rl_row(row: dict[str, Any], form: tuple[str, ...], extra: tuple[str, ...] = ()) -> dict[str, Any]:
    """A GRPO row (`prompt` messages ending with a user turn, plus the reference columns) or a
    preference row (`prompt`, and `chosen`/`rejected` assistant messages), in TRL's conversational form."""
    prompt = as_messages(row["prompt"], "user")
    check_turns(prompt, "user")
    out: dict[str, Any] = {"prompt": prompt}
    for side in ("chosen", "rejected"):
        if side in form:
            answer = as_messages(row[side], "assistant")
            if not answer or any(m["role"] != "assistant" for m in answer):
                raise ValueError(f"{side} must be assistant messages (or a string)")
            check_turns(answer, "assistant", alternate=False)
            out[side] = answer
    return out | {k: row[k] for k in extra}


@dataclass
class Tokenized:
    rows: list[dict[str, list[int]]] = field(default_factory=list)
    truncated: int = 0
    dropped: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    dropped_truncated: int = 0  # of the dropped rows, those whose answer lay beyond max_length
    prompt_lengths: list[int] | None = None  # preference and GRPO rows: each kept prompt's tokens (data report)


# A train split may lose this share of its rows (answers cut off by max_length) before the job refuses it: a
# job that trains on a few of the rows it was sent must not report `completed` as if it had trained on all.
MAX_DROPPED_SHARE = 0.05


def check_dropped(out: Tokenized, max_length: int) -> None:
    """Refuse (exit 2) a train split of which more than MAX_DROPPED_SHARE of the rows have no trained token,
    saying why: answers cut off by max_length, or answers the chat template did not let the job find."""
    total = len(out.rows) + out.dropped
    if not out.dropped or out.dropped <= MAX_DROPPED_SHARE * total:
        return
    cut = out.dropped_truncated
    why = (f"{cut} lie beyond max_length {max_length} (raise hyperparameters.max_length or shorten the rows)"
           if cut else "")
    other = out.dropped - cut
    if other:
        why += ("; " if why else "") + (
            f"{other} have an empty answer under the chat template (its rendering of the assistant turns leaves "
            "nothing to train; check the rows' assistant content, or set hyperparameters.assistant_only_loss false)")
    raise DatasetError(f"{out.dropped} of {total} train rows have no token to train on ({why}); the job trains on at "
                       f"least {1 - MAX_DROPPED_SHARE:.0%} of the rows it is sent.")


# From this many rows, tokenising runs in one process per core (datasets.map(num_proc)); below it
# starting the processes costs more than it saves (benchmarks/tokenize_cpu.py measured where it pays).
PARALLEL_ROWS = 4000


def encode(conv: list[dict[str, Any]] | str, tokenizer, max_length: int, assistant_only: bool,
           render=None) -> dict[str, Any]:
    """One row's input_ids and labels (-100 where no loss), truncated to max_length. `render(messages,
    add_generation_prompt)` is the text of a conversation: the chat template, unless given (training/vision.py)."""
    if render is None:
        def render(messages, add_generation_prompt=False):
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    if isinstance(conv, str):
        text = (tokenizer.bos_token or "") + conv + (tokenizer.eos_token or "")
        spans = [(0, len(text))]
    else:
        text, last = as_answered(render, conv)
        spans = [(0, len(text))] if not assistant_only else []
        for i, m in enumerate(conv):
            if assistant_only and m["role"] == "assistant":
                spans.append((last, len(text)) if last is not None and i == len(conv) - 1 else
                             answer_span(render, conv, i, text, spans[-1][1] if spans else 0))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    labels = [t if any(s <= a < e for s, e in spans) else -100 for t, (a, _) in zip(ids, enc["offset_mapping"])]
    return {"input_ids": ids[:max_length], "labels": labels[:max_length], "truncated": len(ids) > max_length}


def as_answered(render, conv: list[dict[str, Any]]) -> tuple[str, int | None]:
    """The conversation's text as the model reads it when it gives the last answer, and where that answer starts
    if the text is not the template's whole rendering (else None). Where the generation prompt is a prefix of the
    answered history (Gemma 3, Gemma 4 E2B/E4B), that is the rendering itself. Where it is not (Gemma 4 31B,
    26B-A4B and 12B end it with an empty thought channel, `<|channel>thought\n<channel|>`, that the history never
    shows), the last answer follows the generation prompt, as it does at inference: trained after the history
    alone, the tiny 31B-like model answered the demo's prompts from a prefix it had never seen ("dove says neigh."
    for "The duck says quack.", exact match 0.0)."""
    text = render(conv)
    if not conv or conv[-1].get("role") != "assistant":
        return text, None
    prompt = render(conv[:-1], add_generation_prompt=True)
    if text.startswith(prompt):
        return text, None
    return prompt + text[answer_start(render, conv, len(conv) - 1, prompt, text):], len(prompt)


def answer_start(render, conv: list[dict[str, Any]], i: int, prompt: str, answered: str) -> int:
    """Where assistant turn `i`'s answer starts in `answered` (its history and the turn rendered): where the
    generation prompt and the answered turn part, and never inside the history."""
    return max(len(render(conv[:i])), len(os.path.commonprefix([prompt, answered])))


def answer_span(render, conv: list[dict[str, Any]], i: int, text: str, after: int) -> tuple[int, int]:
    """Where assistant turn `i`'s answer lies in `text` (the whole conversation rendered), as characters. The
    turn is rendered after its history twice, as a generation prompt and as an answer; the answer starts where
    the two part (a generation prompt need not be a prefix of the answered turn: Gemma 4's 31B, 26B and 12B
    end it with an empty thought channel the history never shows) and ends with the turn's end marker. Where
    the template renders a turn differently once later turns follow, the answer is looked for after `after`."""
    prompt, answered = render(conv[:i], add_generation_prompt=True), render(conv[: i + 1])
    start = answer_start(render, conv, i, prompt, answered)
    if text.startswith(answered):
        return start, len(answered)
    found = text.find(answered[start:], after)
    if found < 0:
        raise DatasetError(f"the chat template renders assistant turn {i} differently inside the whole conversation "
                           "than after its history alone, so its answer cannot be found; set "
                           "hyperparameters.assistant_only_loss false, or send the rows as prompt + completion.")
    return found, found + len(answered) - start


def _encode_batch(batch: dict[str, list], tokenizer, max_length: int, assistant_only: bool) -> dict[str, list]:
    encoded = [encode(json.loads(row), tokenizer, max_length, assistant_only) for row in batch["row"]]
    return {key: [e[key] for e in encoded] for key in ("input_ids", "labels", "truncated")}


def require_chat_template(tokenizer) -> None:
    """Conversations are rendered with the tokenizer's chat template; a base without one (and without Gemma's
    turn tokens, for which models/chat_templates.py gives it Gemma 3's) cannot take them."""
    if not tokenizer.chat_template:
        raise DatasetError("the rows are conversations, and the base's tokenizer has no chat template to render "
                           "them with (nor Gemma's turn tokens, for which the job has Gemma 3's); choose an "
                           "instruction-tuned base (training_config.base_model_id, e.g. google/gemma-3-1b-it), or "
                           "send plain-text rows (a 'text' column).")


def tokenize(conversations: list[list[dict[str, str]] | str], tokenizer, max_length: int,
             assistant_only: bool, workers: int | None = None) -> Tokenized:
    """input_ids and labels for every row, in order, truncated to max_length; rows left with no
    trained token are dropped and counted. Many rows are split over `workers` processes (default: one
    per core from PARALLEL_ROWS rows); each row travels as JSON, so its messages reach the template as
    they were, not widened to one Arrow schema."""
    if any(not isinstance(c, str) for c in conversations):
        require_chat_template(tokenizer)
    if workers is None:
        workers = (os.cpu_count() or 1) if len(conversations) >= PARALLEL_ROWS else 1
    if workers > 1:
        from datasets import Dataset, disable_progress_bars

        disable_progress_bars()
        table = Dataset.from_dict({"row": [json.dumps(c) for c in conversations]}).map(
            _encode_batch, batched=True, batch_size=256, num_proc=min(workers, len(conversations)),
            remove_columns=["row"], fn_kwargs={"tokenizer": tokenizer, "max_length": max_length,
                                               "assistant_only": assistant_only})
        encoded = table.to_list()
    else:
        encoded = [encode(conv, tokenizer, max_length, assistant_only) for conv in conversations]
    out = Tokenized()
    for row in encoded:
        out.truncated += row["truncated"]
        trained = sum(1 for x in row["labels"] if x != -100)
        if trained == 0:
            out.dropped += 1
            out.dropped_truncated += row["truncated"]
            continue
        out.rows.append({"input_ids": row["input_ids"], "labels": row["labels"]})
        out.tokens += len(row["input_ids"])
        out.trained_tokens += trained
    return out


def check_rows(rows: list[dict[str, Any]], form: tuple[str, ...], split: str, trainer_type: str = "sft",
               extra: tuple[str, ...] = ()) -> list:
    """Every row as a conversation (SFT) or an RL row; the first bad rows are named in one DatasetError."""
    good, bad = [], []
    for i, row in enumerate(rows):
        try:
            if row.get("tools"):
                raise ValueError(f"a tools column: {NO_TOOLS}")
            good.append(to_conversation(row, form) if trainer_type == "sft" else to_rl_row(row, form, extra))
        except (ValueError, KeyError, TypeError) as e:
            bad.append(f"row {i}: {e}")
    if bad:
        raise DatasetError(f"{len(bad)} of {len(rows)} {split} rows are not valid conversations "
                           f"({'; '.join(bad[:3])}); fix them in preprocessing.")
    if not good:
        raise DatasetError(f"the {split} split is empty; preprocess a dataset with at least one row.")
    return good


def fit_prompts(rows: list[dict[str, Any]], tokenizer, max_prompt_length: int) -> Tokenized:
    """RL rows whose rendered prompt fits max_prompt_length (the others are dropped and counted);
    TRL tokenizes them itself."""
    if rows:
        require_chat_template(tokenizer)
    out = Tokenized(prompt_lengths=[])
    for row in rows:
        text = tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
        n = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        if n > max_prompt_length:
            out.dropped += 1
            continue
        out.rows.append(row)
        out.tokens += n
        out.prompt_lengths.append(n)
    return out
