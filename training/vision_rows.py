"""Image+text rows (modality 'vision'): read as the preprocessing service writes them, checked, and their
pictures decoded with Pillow. training/vision.py turns them into what the model reads.

The platform's rows (gemma-facet/cloud-services preprocessing, written by `datasets` `to_parquet`):
`messages` whose content parts carry `{type: "image"}` placeholders (in parquet `{type: "image", text:
null}`), and an `images` column with the row's pictures in order, each a `{bytes, path}` struct; its
preference rows (`prompt`, `chosen`, `rejected`) and prompt-only rows (`prompt` and reference columns) carry
`images` too. TRL's vision examples' forms load as well: a single `image` column, `prompt` + `completion`
rows, and an image given inside its part (`{type: "image", image: {bytes, path}}`).

- A row whose image cannot be decoded or whose placeholders and images differ in number is left out and
  counted in the job document (vision.image_stats).
- An image given by URL, a vision dataset without images, and an audio part are permanent errors.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass, field
from typing import Any

from runtime.errors import PermanentError
from training.data import DatasetError, check_reference_columns, check_turns, read_splits

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


def load_vision_splits(blobs, prefix: str, metadata: dict[str, Any] | None, folder, trainer_type: str = "sft",
                       refs: tuple[str, ...] = (), keep: bool = False) -> dict[str, VisionSplit]:
    """Each split's image+text rows (data.read_splits finds and reads them), with the GRPO graders'
    reference columns `refs`; a dataset whose train rows carry no image is refused: it is a text dataset
    sent as 'vision'."""
    out, columns = {}, {}
    for split, table in read_splits(blobs, prefix, metadata, folder, keep).items():
        form = columns[split] = vision_form(table.column_names, trainer_type)
        check_reference_columns(table.column_names, split, refs)
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
