"""Image+text jobs on the model's side (modality 'vision'): the base's processor and the checks on the base,
the rows training/vision_rows.py read turned into token ids and loss labels with the processor's own image expansion,
the collator that makes each batch's pixels, and the prompts with pictures that the verification and the
base/tuned comparison show the models.

- Three processors: Gemma 3's (the template's <start_of_image> becomes a fixed 256 image tokens), Gemma 3n's (its
  <image_soft_token> becomes a fixed 256, from timm's MobileNetV5 at 768x768) and Gemma 4's (the template's <|image|>
  becomes as many tokens as the picture's size gives, up to the processor's budget: 280 by default; its tensors
  carry each patch's position, and the model reads the image tokens' marks as mm_token_type_ids). Gemma 4's counts
  come from the processor itself (`_get_num_multimodal_tokens`, from each picture's size, read from its header);
  tests/test_vision_gemma4.py checks them against the processor's own call.
- Labels: the assistant's text only (or every text token with assistant_only_loss off); image tokens never.
- A row whose images do not fit in max_length is left out and counted.
- Pixels are made per batch by the collator (a Gemma 3 image is 3 x 896 x 896 floats: 9.6 MB), from the
  encoded bytes each row keeps.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from exporting.verification import Pictures
from runtime.errors import PermanentError
from training.data import DatasetError, encode
from training.vision_rows import SKIPPED, VisionSplit, decode

logger = logging.getLogger(__name__)


def load_processor(model_id: str, token: str | None, trust_remote_code: bool):
    """The base's processor (tokenizer + image processor), with the image expansion this module relies on."""
    from transformers import AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(model_id, token=token, trust_remote_code=trust_remote_code)
    except OSError as e:  # a file the processor needs is not there (a network failure reads otherwise: retried)
        if "Can't load" not in str(e):
            raise
        raise PermanentError(f"training_config.base_model_id: {model_id!r} lacks its image processor's files "
                             f"({str(e)[:160]}); an image+text job needs the base's own image+text processor "
                             "saved with the model (as Google's repos have it): use the published repo, or save "
                             "the processor into the folder.") from None
    if not hasattr(processor, "image_processor") or not (fixed(processor) or sized(processor)):
        raise PermanentError(f"training_config.base_model_id: {model_id!r} has a {type(processor).__name__}, not "
                             "Gemma 3's, Gemma 3n's or Gemma 4's image+text processor; use a Gemma 3 model of 4B or "
                             "more (e.g. google/gemma-3-4b-it), a Gemma 3n or a Gemma 4 (e.g. google/gemma-4-E4B-it).")
    if processor.tokenizer.pad_token is None:
        processor.tokenizer.pad_token = processor.tokenizer.eos_token
    return processor


@dataclass
class Encoded:
    rows: list[dict[str, Any]] = field(default_factory=list)
    too_many: list[int] = field(default_factory=list)
    truncated: int = 0
    dropped: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    dropped_truncated: int = 0
    prompt_lengths: list[int] | None = None  # preference and GRPO rows: each kept prompt's tokens (data report)


def fixed(processor) -> bool:
    """Gemma 3's and Gemma 3n's processors: every picture the same number of tokens (full_image_sequence), in place
    of the template's mark for it (placeholder)."""
    return hasattr(processor, "full_image_sequence")


def placeholder(processor) -> str:
    """What the template writes for a picture and the processor expands: Gemma 3's <start_of_image>, Gemma 3n's
    <image_soft_token> and Gemma 4's <|image|> (each processor's own __call__ replaces that one)."""
    return processor.boi_token if type(processor).__name__ == "Gemma3Processor" else processor.image_token


def sized(processor) -> bool:
    """Gemma 4's processor: each picture as many tokens as its size gives, in place of the template's <|image|>."""
    return type(processor).__name__ == "Gemma4Processor"


def image_counts(processor, images: list[bytes]) -> list[int]:
    """How many image tokens each picture takes, in order, from its size alone (its header, not its pixels)."""
    if not images:
        return []
    if fixed(processor):
        return [processor.image_seq_length] * len(images)
    import io

    from PIL import Image

    sizes = []
    for b in images:
        with Image.open(io.BytesIO(b)) as image:
            sizes.append((image.height, image.width))
    return list(processor._get_num_multimodal_tokens(image_sizes=sizes).num_image_tokens)


def per_image(processor) -> str:
    """How many tokens a picture takes, for people: Gemma 3's fixed count, or Gemma 4's budget."""
    if fixed(processor):
        return str(processor.image_seq_length)
    return f"up to {processor.image_processor.max_soft_tokens}, by its size,"


def encode_vision(split: VisionSplit, processor, max_length: int, assistant_only: bool) -> Encoded:
    """input_ids and labels of each row with its images expanded to the model's image tokens (the
    processor's own expansion), and the encoded images beside them; rows whose image tokens do not fit in
    max_length are left out (Encoded.too_many: their indices in split.rows)."""
    tok, image_id = processor.tokenizer, image_token_id(processor.tokenizer)
    out = Encoded()
    for i, row in enumerate(split.rows):
        counts = image_counts(processor, row["images"])
        enc = encode(row["messages"], tok, max_length, assistant_only, partial(render, processor, counts=counts))
        if enc["input_ids"].count(image_id) < sum(counts):
            out.too_many.append(i)
            continue
        labels = [-100 if t == image_id else x for t, x in zip(enc["input_ids"], enc["labels"])]
        trained = sum(x != -100 for x in labels)
        out.truncated += enc["truncated"]
        if not trained:
            out.dropped += 1
            out.dropped_truncated += enc["truncated"]
            continue
        out.rows.append({"input_ids": enc["input_ids"], "labels": labels, "image_bytes": row["images"]})
        out.tokens += len(labels)
        out.trained_tokens += trained
    return out


def image_token_id(tokenizer) -> int:
    """The token each of a picture's embeddings takes the place of (Gemma 3: <image_soft_token>)."""
    return tokenizer.convert_tokens_to_ids(tokenizer.image_token)


def image_token_ids(processor) -> list[int]:
    """The tokens that stand for pictures (start, soft and end of image), which no answer may hold."""
    tok = processor.tokenizer
    return sorted({tok.convert_tokens_to_ids(t) for t in (tok.boi_token, tok.image_token, tok.eoi_token)})


def render(processor, messages: list[dict[str, Any]], add_generation_prompt: bool = False,
           counts: list[int] | tuple[int, ...] = ()) -> str:
    """A conversation as the model reads it: the chat template, each image expanded to its tokens as the processor
    expands it (Gemma 4: the i-th picture to counts[i] tokens, image_counts)."""
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    if fixed(processor):
        return text.replace(placeholder(processor), processor.full_image_sequence)
    parts = text.split(processor.image_token)
    if len(parts) - 1 > len(counts):
        raise DatasetError(f"a conversation renders {len(parts) - 1} pictures and has {len(counts)}: each "
                           "{'type': 'image'} part needs its image in the row's images, in order.")
    return parts[0] + "".join(f"{processor.boi_token}{processor.image_token * n}{processor.eoi_token}{part}"
                              for n, part in zip(counts, parts[1:]))


def fit_vision_prompts(split: VisionSplit, processor, max_prompt_length: int) -> Encoded:
    """Preference rows whose prompt, images expanded, fits max_prompt_length (TRL tokenizes them itself,
    and makes the pixels); the others are left out (Encoded.too_many where their image tokens alone do
    not fit, else dropped)."""
    tok = processor.tokenizer
    out = Encoded(prompt_lengths=[])
    for i, row in enumerate(split.rows):
        counts = image_counts(processor, row["images"])
        n = len(tok(render(processor, row["prompt"], True, counts), add_special_tokens=False)["input_ids"])
        if n > max_prompt_length:
            if sum(counts) >= max_prompt_length:
                out.too_many.append(i)
            else:
                out.dropped += 1
            continue
        out.rows.append(row)
        out.tokens += n
        out.prompt_lengths.append(n)
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
    from exporting.verification import probe_prompts

    processor, rows = prep.processor, (prep.eval or prep.train).rows[:n]
    if rows and "prompt" in rows[0]:
        tok = processor.tokenizer
        prompts = [tok(render(processor, r["prompt"], True, image_counts(processor, r["images"])),
                       add_special_tokens=False)["input_ids"] for r in rows]
    else:
        prompts = probe_prompts(prep, n, longest=1 << 30)  # never cut: an image's tokens go whole or not at all
    return prompts, probe_images(processor, rows, prompts)


def vision_cases(cfg, split: VisionSplit, processor, limit: int, name: str = "eval"):
    """The base/tuned comparison's cases of an image+text job (training/generation.py): each eval row's prompt with its
    pictures, its reference answer (SFT: the last assistant turn; DPO: the chosen answer), and which pictures
    they are, by split, row and sha256, for the samples."""
    import hashlib

    from training.generation import Cases
    from training.rewards import completion_text

    tok = processor.tokenizer
    out = Cases([], [], [], [], [], partial(pixel_values, processor), image_token_id(tok), [])
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
        ids = tok(render(processor, prompt, True, image_counts(processor, row["images"])),
                  add_special_tokens=False)["input_ids"]
        if len(ids) > cfg.hyperparameters.max_length:
            continue
        out.prompts.append(ids)
        out.texts.append(completion_text(prompt))
        out.references.append(reference)
        out.columns.append(columns)
        out.files.append(row["images"])
        out.images.append(f"{name} row {i}: " + ", ".join(hashlib.sha256(b).hexdigest()[:12] for b in row["images"])
                          if row["images"] else f"{name} row {i}: no image")
    return out


def pixel_values(processor, images: list[bytes]) -> Pictures | None:
    """The image processor's tensors for encoded images, in order (those the model reads: Gemma 4's patch
    positions beside the pixels); None for none."""
    if not images:
        return None
    out = processor.image_processor(images=[decode(b) for b in images], return_tensors="pt")
    names = processor.model_input_names
    return Pictures({k: v for k, v in out.items() if k in names},
                    "mm_token_type_ids" if "mm_token_type_ids" in names else "token_type_ids")


@dataclass
class VisionCollator:
    """A batch of encoded rows: right-padded ids, labels and attention mask, the image tokens marked (Gemma 3's
    token_type_ids, Gemma 4's mm_token_type_ids: an image's tokens attend to each other both ways), and the
    pixels of every image in the batch, in order."""
    processor: Any
    pad_id: int

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        image_id = image_token_id(self.processor.tokenizer)
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.tensor([r["input_ids"] + [self.pad_id] * (width - len(r["input_ids"])) for r in rows])
        batch = {"input_ids": ids,
                 "attention_mask": torch.tensor([[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"]))
                                                 for r in rows]),
                 "labels": torch.tensor([r["labels"] + [-100] * (width - len(r["labels"])) for r in rows])}
        pictures = pixel_values(self.processor, [b for r in rows for b in r["image_bytes"]])
        if pictures is not None:
            batch |= pictures.inputs(ids, image_id)
        return batch


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
    import itertools

    image_id = image_token_id(processor.tokenizer)
    held = []
    for row, prompt in zip(rows, prompts):
        images = row.get("image_bytes", row.get("images"))
        room = prompt.count(image_id)
        held.append(images[:sum(1 for n in itertools.accumulate(image_counts(processor, images)) if n <= room)])
    return held
