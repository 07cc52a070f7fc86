"""Image+text rows (modality 'vision'): read as the preprocessing service writes them, checked, decoded
with Pillow, turned into token ids and loss labels with the model's processor, and batched.

The platform's rows (gemma-facet/cloud-services preprocessing, written by `datasets` `to_parquet`):
`messages` whose content parts carry `{type: "image"}` placeholders (in parquet `{type: "image", text:
null}`), and an `images` column with the row's pictures in order, each a `{bytes, path}` struct. TRL's
vision examples' forms load too: a single `image` column, `prompt` + `completion` rows, and an image given
inside its part (`{type: "image", image: {bytes, path}}`).

- A row whose image cannot be decoded, whose placeholders and images differ in number, or whose images do
  not fit in max_length (Gemma 3: 256 tokens each) is left out and counted in the job document.
- An image given by URL, a vision dataset without images, and an audio part are permanent errors.
- Labels: the assistant's text only (or every text token with assistant_only_loss off); image tokens never.
- Pixels are made per batch by the collator (a Gemma 3 image is 3 x 896 x 896 floats: 9.6 MB), from the
  encoded bytes each row keeps.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass, field
from typing import Any

from data import DatasetError, check_turns, encode, read_splits
from errors import PermanentError

logger = logging.getLogger(__name__)

FORMS = {"sft": [("messages",), ("prompt", "completion")], "dpo": [("prompt", "chosen", "rejected")],
         "grpo": [("prompt",)]}
PREFERENCE = ("prompt", "chosen", "rejected")
IMAGE_COLUMNS = ("images", "image")
URL_PREFIXES = ("http://", "https://", "gs://", "s3://", "ftp://", "data:")
SKIPPED = {"undecodable": "images_undecodable", "mismatch": "images_mismatched", "too_many": "images_too_many"}


@dataclass
class VisionSplit:
    rows: list[dict[str, Any]] = field(default_factory=list)  # {"messages": [...], "images": [bytes, ...]}
    skipped: dict[str, list[int]] = field(default_factory=lambda: {k: [] for k in SKIPPED})
    images: int = 0


class ImageUrl(ValueError):
    """An image given by address: the job fetches nothing from outside its buckets."""


def vision_form(columns: list[str], trainer_type: str = "sft") -> tuple[str, ...]:
    """The row form's columns, and the image column if there is one."""
    for needed in FORMS[trainer_type]:
        if all(c in columns for c in needed):
            return needed + tuple(c for c in IMAGE_COLUMNS if c in columns)[:1]
    wanted = " or ".join("+".join(n) for n in FORMS[trainer_type])
    raise DatasetError(f"the dataset's columns {sorted(columns)} do not fit modality 'vision' with trainer_type "
                       f"'{trainer_type}': it needs {wanted}, with the pictures in an images (or image) column.")


def preference_row(row: dict[str, Any], inline: list) -> dict[str, Any]:
    """A preference row's prompt (ending with a user turn, where its images are) and its chosen and
    rejected assistant answers, as typed parts."""
    out = {"prompt": as_vision_messages(row["prompt"], "user", inline)}
    check_turns(shown(out["prompt"]), "user")
    for side in ("chosen", "rejected"):
        answer = as_vision_messages(row[side], "assistant", inline)
        if not answer or any(m["role"] != "assistant" for m in answer):
            raise ValueError(f"{side} must be assistant messages (or a string)")
        check_turns(shown(answer), "assistant", alternate=False)
        out[side] = answer
    return out


def image_bytes(value: Any) -> bytes | None:
    """The encoded picture of an `images` entry: a {bytes, path} struct, raw bytes, or None when absent."""
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
        if data:
            return bytes(data)
        if isinstance(path, str) and path.startswith(URL_PREFIXES):
            raise ImageUrl(path)
        return None  # a path on the preprocessing machine: nothing here to read
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str) and value.startswith(URL_PREFIXES):
        raise ImageUrl(value)
    return None


def decode(data: bytes):
    """A Pillow image in RGB (the processor's input); raises on bytes that are not a picture."""
    from PIL import Image

    image = Image.open(io.BytesIO(data))
    image.load()
    return image.convert("RGB")


def parts_of(content: Any, inline: list) -> list[dict[str, Any]]:
    """Content as typed parts: text, and image placeholders (an image given inside its part goes to
    `inline`, in order)."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise ValueError(f"content must be a string or a list of parts, got {type(content).__name__}")
    parts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("audio", "input_audio"):
            raise PermanentError("modality 'vision': a row carries an audio part; audio fine-tuning (Gemma 3n) is "
                                 "not built yet; remove the audio from the dataset.")
        if kind == "image_url":
            raise ImageUrl(str((part.get("image_url") or {}).get("url", part.get("image_url"))))
        if kind == "image":
            given = part.get("image") or part.get("url") or part.get("path")
            if given is not None:
                inline.append(given)
            parts.append({"type": "image"})
        elif kind == "text":
            parts.append({"type": "text", "text": part.get("text") or ""})
        else:
            raise ValueError(f"content part {part!r} is not {{type: text, text}} or {{type: image}}")
    return parts


def as_vision_messages(value: Any, default_role: str, inline: list) -> list[dict[str, Any]]:
    if isinstance(value, str):
        return [{"role": default_role, "content": [{"type": "text", "text": value}]}]
    return [{"role": m["role"], "content": parts_of(m.get("content"), inline)} for m in value]


def shown(messages: list[dict[str, Any]]) -> list[dict[str, str]]:
    """The messages as text, an image as '[image]', for data.check_turns."""
    return [{"role": m["role"], "content": "".join(p["text"] if p["type"] == "text" else "[image]"
                                                   for p in m["content"])} for m in messages]


def check_vision_rows(rows: list[dict[str, Any]], form: tuple[str, ...], split: str,
                      refs: tuple[str, ...] = ()) -> VisionSplit:
    """Each row's messages and encoded images (GRPO: its prompt, and the graders' reference columns `refs`);
    rows with an undecodable image or placeholders that do not match their images are counted and left out;
    malformed rows and image URLs are named in one error."""
    out, bad, urls = VisionSplit(), [], []
    for i, row in enumerate(rows):
        inline: list = []
        try:
            if form[:3] == PREFERENCE:
                kept = preference_row(row, inline)
                messages = kept["prompt"] + kept["chosen"] + kept["rejected"]
            elif form[0] == "prompt" and "completion" not in form:  # GRPO: a prompt the model answers
                messages = as_vision_messages(row["prompt"], "user", inline)
                check_turns(shown(messages), "user")
                kept = {"prompt": messages, **{k: row[k] for k in refs}}
            else:
                messages = as_vision_messages(row["messages"], "user", inline) if form[0] == "messages" else \
                    as_vision_messages(row["prompt"], "user", inline) + \
                    as_vision_messages(row["completion"], "assistant", inline)
                check_turns(shown(messages), "assistant")
                kept = {"messages": messages}
            given = row.get(form[-1]) if form[-1] in IMAGE_COLUMNS else None
            given = [given] if form[-1] == "image" and given is not None else list(given or []) or inline
            encoded = [image_bytes(v) for v in given]
        except ImageUrl as e:
            urls.append(f"row {i}: {str(e)[:80]}")
            continue
        except (ValueError, KeyError, TypeError) as e:
            bad.append(f"row {i}: {e}")
            continue
        placeholders = sum(p["type"] == "image" for m in messages for p in m["content"])
        if placeholders != len(encoded):
            out.skipped["mismatch"].append(i)
            continue
        try:
            for data in encoded:
                if data is None:
                    raise ValueError("no bytes")
                decode(data)
        except Exception:  # noqa: BLE001 - Pillow raises many kinds for a broken picture
            out.skipped["undecodable"].append(i)
            continue
        out.rows.append(kept | {"images": encoded})
        out.images += len(encoded)
    if urls:
        raise DatasetError(f"{len(urls)} {split} rows give an image by URL ({'; '.join(urls[:3])}); the job reads "
                           "images only from the dataset itself: have preprocessing store the pictures' bytes.")
    if bad:
        raise DatasetError(f"{len(bad)} of {len(rows)} {split} rows are not valid image+text conversations "
                           f"({'; '.join(bad[:3])}); fix them in preprocessing.")
    return out


def load_processor(model_id: str, token: str | None, trust_remote_code: bool):
    """The base's processor (tokenizer + image processor), with the image expansion this module relies on."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(model_id, token=token, trust_remote_code=trust_remote_code)
    if not hasattr(processor, "full_image_sequence") or not hasattr(processor, "image_processor"):
        raise PermanentError(f"training_config.base_model_id: {model_id!r} has a {type(processor).__name__}, not "
                             "Gemma 3's image+text processor; use a Gemma 3 model of 4B or more (e.g. "
                             "google/gemma-3-4b-it).")
    if processor.tokenizer.pad_token is None:
        processor.tokenizer.pad_token = processor.tokenizer.eos_token
    return processor


def check_image_model(model_id: str, token: str | None, trust_remote_code: bool) -> None:
    """Images need an image+text base: Gemma 3 270M and 1B are text-only. Read from the config alone."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_id, token=token, trust_remote_code=trust_remote_code)
    if config.model_type == "gemma3n":
        raise PermanentError(f"training_config.base_model_id: {model_id!r} is Gemma 3n, whose image+text training "
                             "has not been shown for this job yet (its processor and towers differ from Gemma "
                             "3's); use Gemma 3 4B or larger for images, or modality 'text'.")
    if getattr(config, "vision_config", None) is None:
        raise PermanentError(f"training_config.base_model_id: {model_id!r} is a text-only model "
                             f"({config.model_type}), and modality 'vision' sends it images; use an image+text "
                             "Gemma (Gemma 3 4B, 12B or 27B, e.g. google/gemma-3-4b-it), or modality 'text' "
                             "with a text dataset.")


@dataclass
class Encoded:
    rows: list[dict[str, Any]] = field(default_factory=list)
    too_many: list[int] = field(default_factory=list)
    truncated: int = 0
    dropped: int = 0
    tokens: int = 0
    trained_tokens: int = 0


def encode_vision(split: VisionSplit, processor, max_length: int, assistant_only: bool) -> Encoded:
    """input_ids and labels of each row with its images expanded to the model's image tokens (the
    processor's own expansion), and the encoded images beside them; rows whose image tokens do not fit in
    max_length are left out (Encoded.too_many: their indices in split.rows)."""
    tok = processor.tokenizer
    image_id = tok.convert_tokens_to_ids(tok.image_token)
    per_image = processor.image_seq_length

    def render(messages, add_generation_prompt=False):
        text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        return text.replace(processor.boi_token, processor.full_image_sequence)

    out = Encoded()
    for i, row in enumerate(split.rows):
        enc = encode(row["messages"], tok, max_length, assistant_only, render)
        if enc["input_ids"].count(image_id) < per_image * len(row["images"]):
            out.too_many.append(i)
            continue
        labels = [-100 if t == image_id else x for t, x in zip(enc["input_ids"], enc["labels"])]
        trained = sum(x != -100 for x in labels)
        out.truncated += enc["truncated"]
        if not trained:
            out.dropped += 1
            continue
        out.rows.append({"input_ids": enc["input_ids"], "labels": labels, "image_bytes": row["images"]})
        out.tokens += len(labels)
        out.trained_tokens += trained
    return out


def image_token_ids(processor) -> list[int]:
    """The tokens that stand for pictures (Gemma 3: start, soft and end of image), which no answer may hold."""
    tok = processor.tokenizer
    return sorted({tok.convert_tokens_to_ids(t) for t in (tok.boi_token, tok.image_token, tok.eoi_token)})


def render_prompt(processor, messages: list[dict[str, Any]]) -> str:
    """A prompt as the model reads it: the chat template, the generation prompt, each image expanded to
    its tokens."""
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return text.replace(processor.boi_token, processor.full_image_sequence)


def fit_vision_prompts(split: VisionSplit, processor, max_prompt_length: int) -> Encoded:
    """Preference rows whose prompt, images expanded, fits max_prompt_length (TRL tokenizes them itself,
    and makes the pixels); the others are left out (Encoded.too_many where their image tokens alone do
    not fit, else dropped)."""
    tok = processor.tokenizer
    out = Encoded()
    for i, row in enumerate(split.rows):
        n = len(tok(render_prompt(processor, row["prompt"]), add_special_tokens=False)["input_ids"])
        if n > max_prompt_length:
            if processor.image_seq_length * len(row["images"]) >= max_prompt_length:
                out.too_many.append(i)
            else:
                out.dropped += 1
            continue
        out.rows.append(row)
        out.tokens += n
    return out


def vision_dataset(rows: list[dict[str, Any]]):
    """Preference rows as TRL's vision trainers read them: `images` a column of `datasets` Images, which
    TRL's collator hands to the processor (decoded to RGB there)."""
    from datasets import Dataset, Image, List

    table = Dataset.from_list([row | {"images": [{"bytes": b, "path": None} for b in row["images"]]}
                               for row in rows])
    return table.cast_column("images", List(Image()))


def vision_probes(prep, n: int = 16) -> tuple[list[list[int]], list[list[bytes]]]:
    """The verification's probes of an image+text job: up to n eval rows' prompts (training rows without an
    eval split) as token ids, images expanded and never cut, and the pictures each holds."""
    from verification import probe_prompts

    processor, rows = prep.processor, (prep.eval or prep.train).rows[:n]
    if rows and "prompt" in rows[0]:
        tok = processor.tokenizer
        prompts = [tok(render_prompt(processor, r["prompt"]), add_special_tokens=False)["input_ids"] for r in rows]
    else:
        prompts = probe_prompts(prep, n, longest=1 << 30)  # never cut: an image's tokens go whole or not at all
    return prompts, probe_images(processor, rows, prompts)


def vision_cases(cfg, split: VisionSplit, processor, limit: int, name: str = "eval"):
    """The base/tuned comparison's cases of an image+text job (generation.py): each eval row's prompt with its
    pictures, its reference answer (SFT: the last assistant turn; DPO: the chosen answer), and which pictures
    they are, by split, row and sha256, for the samples."""
    import hashlib

    from generation import Cases
    from rewards import completion_text

    tok = processor.tokenizer
    out = Cases([], [], [], [], [], tok.convert_tokens_to_ids(tok.image_token), [])
    for i, row in enumerate(split.rows):
        if len(out.prompts) == limit:
            break
        columns: dict[str, Any] = {}
        if "chosen" in row:
            prompt, reference = row["prompt"], completion_text(row["chosen"])
        elif "prompt" in row:  # GRPO: the graders' columns, the first one shown as the reference
            prompt = row["prompt"]
            columns = {k: v for k, v in row.items() if k not in ("prompt", "images")}
            graded = [g.reference_column for g in cfg.reward_config if g.reference_column]
            reference = str(row.get(graded[0], "")) if graded else ""
        elif len(row["messages"]) >= 2 and row["messages"][-1]["role"] == "assistant":
            prompt, reference = row["messages"][:-1], completion_text(row["messages"][-1:])
        else:
            continue
        ids = tok(render_prompt(processor, prompt), add_special_tokens=False)["input_ids"]
        if len(ids) > cfg.hyperparameters.max_length:
            continue
        out.prompts.append(ids)
        out.texts.append(completion_text(prompt))
        out.references.append(reference)
        out.columns.append(columns)
        out.pixels.append(pixel_values(processor, row["images"]))
        out.images.append(f"{name} row {i}: " + ", ".join(hashlib.sha256(b).hexdigest()[:12] for b in row["images"])
                          if row["images"] else f"{name} row {i}: no image")
    return out


def pixel_values(processor, images: list[bytes]):
    """The processor's pixel tensor for encoded images, in order; None for none."""
    if not images:
        return None
    return processor.image_processor(images=[decode(b) for b in images], return_tensors="pt")["pixel_values"]


@dataclass
class VisionCollator:
    """A batch of encoded rows: right-padded ids, labels and attention mask, token_type_ids marking the
    image tokens (Gemma 3 attends over an image's tokens both ways), and the pixels of every image in the
    batch, in order."""
    processor: Any
    pad_id: int

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        tok = self.processor.tokenizer
        image_id = tok.convert_tokens_to_ids(tok.image_token)
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.tensor([r["input_ids"] + [self.pad_id] * (width - len(r["input_ids"])) for r in rows])
        batch = {"input_ids": ids,
                 "attention_mask": torch.tensor([[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"]))
                                                 for r in rows]),
                 "labels": torch.tensor([r["labels"] + [-100] * (width - len(r["labels"])) for r in rows]),
                 "token_type_ids": (ids == image_id).long()}
        pixels = pixel_values(self.processor, [b for r in rows for b in r["image_bytes"]])
        if pixels is not None:
            batch["pixel_values"] = pixels
        return batch


def load_vision_splits(blobs, prefix: str, metadata: dict[str, Any] | None, folder, trainer_type: str = "sft",
                       refs: tuple[str, ...] = ()) -> dict[str, VisionSplit]:
    """Each split's image+text rows (data.read_splits finds and reads them), with the GRPO graders'
    reference columns `refs`; a dataset whose train rows carry no image is refused: it is a text dataset
    sent as 'vision'."""
    out, columns = {}, {}
    for split, table in read_splits(blobs, prefix, metadata, folder).items():
        form = columns[split] = vision_form(table.column_names, trainer_type)
        missing = [c for c in refs if c not in table.column_names]
        if missing:
            raise DatasetError(f"the {split} split has columns {sorted(table.column_names)} but reward_config "
                               f"reads {missing} (reference_field); add the column or change the grader.")
        out[split] = check_vision_rows(table.select(list(form + refs)).to_pylist(), form, split, refs)
    train = out["train"]
    if not train.images:
        found = "no image in any row" if columns["train"][-1] in IMAGE_COLUMNS else "no images column"
        raise DatasetError(f"training_config.modality is 'vision' but the train split has {found} "
                           f"({sum(map(len, train.skipped.values()))} rows left out for their images); preprocess "
                           "the dataset with an image field, or set modality 'text'.")
    for split, part in out.items():
        if not part.rows:
            raise DatasetError(f"every {split} row was left out for its images (by reason, row indices: "
                               f"{ {k: v[:5] for k, v in part.skipped.items() if v} }); fix the images in "
                               "preprocessing.")
    return out


def image_stats(splits: dict[str, VisionSplit], encoded: dict[str, Encoded]) -> dict[str, Any]:
    """The job document's image counts: images kept, and rows left out by reason (each with its first
    rows, split and index, so that they can be found)."""
    stats: dict[str, Any] = {"images": sum(s.images for s in splits.values())}
    for reason, name in SKIPPED.items():
        rows = [f"{split}:{i}" for split, s in splits.items() for i in s.skipped[reason]] if reason != "too_many" \
            else [f"{split}:{i}" for split, e in encoded.items() for i in e.too_many]
        stats[f"rows_{name}"] = len(rows)
        if rows:
            stats[f"rows_{name}_first"] = rows[:10]
            logger.warning("%d rows left out (%s), first %s", len(rows), name, rows[:10])
    return stats


def probe_images(processor, rows: list[dict[str, Any]], prompts: list[list[int]]) -> list[list[bytes]]:
    """For each verification prompt (the first tokens of rows, in order), the encoded images whose tokens
    it holds."""
    tok = processor.tokenizer
    image_id = tok.convert_tokens_to_ids(tok.image_token)
    return [row.get("image_bytes", row.get("images"))[:prompt.count(image_id) // processor.image_seq_length]
            for row, prompt in zip(rows, prompts)]
