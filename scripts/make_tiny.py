"""Make the offline fixtures: a tiny Gemma-3-architecture model with a SentencePiece tokenizer,
and a small processed dataset in the preprocessing service's layout.

    python scripts/make_tiny.py --out .local            # model in .local/models/tiny-gemma3
                                                         # data in .local/gemma-dataset-bucket/processed_datasets/tiny-animals

A language model of the same shape inside Gemma 3's image+text architecture (as at 4B and up) is in
tiny-gemma3-mm, with a one-layer SigLIP tower, Gemma 3's image tokens and a processor; the image+text
dataset tiny-shapes (coloured shapes drawn with Pillow, in the preprocessing service's parquet layout,
with its processed_datasets metadata document) is what it learns: the answer is the shape's colour,
which only the image tells. Tiny Gemma 4 models of each architecture (scripts/tiny_gemma4.py) sit beside
them as tiny-gemma4, tiny-gemma4-e2b, tiny-gemma4-moe and tiny-gemma4-unified, and a tiny Gemma 3n
(scripts/tiny_gemma3n.py) as tiny-gemma3n.

Random weights, Gemma's special tokens and chat template, dimensions that are multiples of 256
(k-quants in GGUF need rows of 256). Takes a few seconds; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models.chat_templates import GEMMA3, GEMMA3_TEXT  # noqa: E402  (the repository root, for this script run alone)
from scripts.tiny_gemma3n import make_gemma3n_model  # noqa: E402
from scripts.tiny_gemma4 import make_gemma4_models  # noqa: E402

ANIMALS = {"cow": "moo", "dog": "woof", "cat": "meow", "duck": "quack", "sheep": "baa", "pig": "oink",
           "horse": "neigh", "owl": "hoot", "lion": "roar", "snake": "hiss", "bee": "buzz", "frog": "croak",
           "mouse": "squeak", "crow": "caw", "goat": "bleat", "wolf": "howl", "hen": "cluck", "dove": "coo"}
QUESTIONS = ["What does the {a} say?", "What sound does a {a} make?", "Which noise comes from the {a}?",
             "Tell me the sound of a {a}.", "How does the {a} speak?", "I hear a {a}. What sound is it?"]
SYSTEM = "You answer with the animal's sound."

# Gemma 3's chat template, as the job itself knows it (models/chat_templates.py).
CHAT_TEMPLATE = GEMMA3_TEXT


def conversations(seed: int = 0) -> list[dict]:
    rows = []
    for animal, sound in ANIMALS.items():
        for q in QUESTIONS:
            rows.append({"messages": [
                {"role": "system", "content": SYSTEM},
                {"role": "user", "content": q.format(a=animal)},
                {"role": "assistant", "content": f"The {animal} says {sound}."}]})
    random.Random(seed).shuffle(rows)
    return rows


def make_tokenizer(out: Path, corpus: list[str]) -> None:
    import sentencepiece as spm
    from transformers import GemmaTokenizer

    text = out / "corpus.txt"
    text.write_text("\n".join(corpus))
    spm.SentencePieceTrainer.train(
        input=str(text), model_prefix=str(out / "tokenizer"), vocab_size=512, model_type="bpe",
        pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>",
        unk_piece="<unk>", user_defined_symbols=["<mask>", "<start_of_turn>", "<end_of_turn>"],
        byte_fallback=True, character_coverage=1.0, split_digits=True, minloglevel=2,
        normalization_rule_name="identity", add_dummy_prefix=False, remove_extra_whitespaces=False)
    text.unlink()
    (out / "tokenizer.vocab").unlink()
    tok = GemmaTokenizer.from_pretrained(str(out), extra_special_tokens=["<start_of_turn>", "<end_of_turn>"])
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(str(out))


def text_config():
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig(
        vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, head_dim=64, query_pre_attn_scalar=64, sliding_window=64,
        layer_types=["sliding_attention", "full_attention"], max_position_embeddings=1024,
        pad_token_id=0, eos_token_id=[1, 6], bos_token_id=2, tie_word_embeddings=True)


def make_model(out: Path) -> None:
    import torch
    from transformers import Gemma3ForCausalLM

    torch.manual_seed(0)
    model = Gemma3ForCausalLM(text_config()).to(torch.bfloat16)
    model.generation_config.eos_token_id = [1, 6]
    model.save_pretrained(str(out))


def write_card(out: Path) -> None:
    """A model card with the metadata a Hub model's has: the job's cards read the base's licence from it."""
    (out / "README.md").write_text("---\nlicense: apache-2.0\nlibrary_name: transformers\n---\n\n# tiny-gemma3\n\n"
                                   "Gemma 3's architecture at a tiny size, random weights: a test fixture.\n")


# Gemma 3's image+text tokens (its tokenizer's boi/eoi/image tokens) and the template's image branch.
IMAGE_TOKENS = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
MM_CHAT_TEMPLATE = GEMMA3
IMAGE_SIZE, IMAGE_TOKENS_PER_IMAGE = 28, 4


def make_multimodal_model(out: Path, tokenizer_dir: Path) -> None:
    """The same language model inside Gemma 3's image+text architecture (Gemma3ForConditionalGeneration,
    what google/gemma-3-4b-it and larger are): a one-layer SigLIP tower on 28x28 images, 4 image tokens per
    image, and a Gemma3Processor saved beside it. Gemma 3 initialises its image projector to zeros, which
    would make every picture look the same to a model made from a config (TRAPS.md): it is drawn at random."""
    import json
    import shutil

    import torch
    from transformers import (
        AutoTokenizer,
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3ImageProcessorPil,
        Gemma3Processor,
        SiglipVisionConfig,
    )

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir), extra_special_tokens=IMAGE_TOKENS)
    tok.chat_template = MM_CHAT_TEMPLATE
    ids = {name: tok.convert_tokens_to_ids(token) for name, token in IMAGE_TOKENS.items()}
    torch.manual_seed(0)
    vision = SiglipVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                                image_size=IMAGE_SIZE, patch_size=14)
    text = text_config()
    text.vocab_size = 520  # the 512 pieces and the three image tokens, rounded up
    config = Gemma3Config(text_config=text.to_dict(), vision_config=vision.to_dict(),
                          mm_tokens_per_image=IMAGE_TOKENS_PER_IMAGE, boi_token_id=ids["boi_token"],
                          eoi_token_id=ids["eoi_token"], image_token_id=ids["image_token"],
                          eos_token_id=[1, 6], pad_token_id=0, bos_token_id=2)
    model = Gemma3ForConditionalGeneration(config)
    with torch.no_grad():
        weight = model.model.multi_modal_projector.mm_input_projection_weight
        weight.normal_(0.0, weight.shape[0] ** -0.5)
    model = model.to(torch.bfloat16)
    model.generation_config.eos_token_id = [1, 6]
    model.save_pretrained(str(out))
    # The tower's tensors named as in Google's checkpoints (vision_tower.vision_model.*), which transformers
    # 4.x reads; transformers 5 saves them one level shorter (artifacts.portable_vision_keys).
    from safetensors.torch import load_file, save_file

    weights = load_file(str(out / "model.safetensors"))
    save_file({k.replace("vision_tower.", "vision_tower.vision_model.", 1) if k.startswith("vision_tower.") else k: v
               for k, v in weights.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    images = Gemma3ImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, image_mean=[0.5] * 3,
                                  image_std=[0.5] * 3)
    Gemma3Processor(image_processor=images, tokenizer=tok, chat_template=MM_CHAT_TEMPLATE,
                    image_seq_length=IMAGE_TOKENS_PER_IMAGE).save_pretrained(str(out))
    shutil.copy(tokenizer_dir / "tokenizer.model", out / "tokenizer.model")  # llama.cpp's converter reads it
    # The image tokens as Google's files name them (a name -> token map), which transformers 4.x reads too
    config_file = out / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["extra_special_tokens"] = config.pop("model_specific_special_tokens")
    for key in ("vocab_file", "is_local", "local_files_only"):
        config.pop(key, None)
    config_file.write_text(json.dumps(config, indent=2))
    write_card(out)


COLOURS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220), "yellow": (230, 220, 30),
           "purple": (140, 40, 180), "white": (250, 250, 250)}
SHAPE_QUESTIONS = ["What colour is the shape?", "Which colour do you see?", "Name the colour of the shape.",
                   "What colour is it?"]


def shape_image(colour: str, rng: random.Random):
    """A 40x40 picture (the processor resizes it): a square or a disc of the colour, somewhere on grey."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (40, 40), (90, 90, 90))
    draw = ImageDraw.Draw(image)
    size = rng.randint(18, 30)
    x, y = rng.randint(0, 40 - size), rng.randint(0, 40 - size)
    (draw.rectangle if rng.random() < 0.5 else draw.ellipse)([x, y, x + size, y + size], fill=COLOURS[colour])
    return image


def shapes(seed: int = 0, per_colour: int = 12) -> list[dict]:
    """Image+text rows as the preprocessing service writes them: typed-part messages with an image
    placeholder in the user turn, and the picture in the `images` column."""
    rng = random.Random(seed)
    rows = []
    for colour in COLOURS:
        for i in range(per_colour):
            rows.append({"messages": [
                {"role": "system", "content": [{"type": "text", "text": "You name colours."}]},
                {"role": "user", "content": [{"type": "image"},
                                             {"type": "text", "text": SHAPE_QUESTIONS[i % len(SHAPE_QUESTIONS)]}]},
                {"role": "assistant", "content": [{"type": "text", "text": f"It is {colour}."}]}],
                "images": [shape_image(colour, rng)]})
    rng.shuffle(rows)
    return rows


def shape_preferences(rows: list[dict]) -> list[dict]:
    """Image+text DPO rows as the preprocessing service writes them (its preference mode): the prompt with the
    picture's placeholder, the right colour chosen, another rejected, and the picture in `images`."""
    colours = list(COLOURS)
    out = []
    for i, row in enumerate(rows):
        right = row["messages"][2]["content"][0]["text"].split()[-1].rstrip(".")
        wrong = colours[(colours.index(right) + 1 + i % 5) % len(colours)]
        out.append({"prompt": row["messages"][:2],
                    "chosen": [{"role": "assistant", "content": [{"type": "text", "text": f"It is {right}."}]}],
                    "rejected": [{"role": "assistant", "content": [{"type": "text", "text": f"It is {wrong}."}]}],
                    "images": row["images"]})
    return out


def shape_prompts(rows: list[dict]) -> list[dict]:
    """Image+text GRPO rows as the preprocessing service writes them (its prompt-only mode): the prompt with
    the picture's placeholder, the colour as the reference column `answer`, the picture in `images`."""
    return [{"prompt": row["messages"][:2], "answer": row["messages"][2]["content"][0]["text"].split()[-1].rstrip("."),
             "images": row["images"]} for row in rows]


def make_vision_dataset(root: Path, dataset_id: str, rows: list[dict]) -> Path:
    """The splits written as the preprocessing service writes them (datasets' to_parquet: each image a
    {bytes, path} struct, an image part's text null), and its processed_datasets metadata document."""
    import json

    from datasets import Dataset

    n_test = len(rows) // 6
    folder = root / "gemma-dataset-bucket" / "processed_datasets" / dataset_id
    folder.mkdir(parents=True, exist_ok=True)
    splits = []
    for split, part in (("train", rows[n_test:]), ("test", rows[:n_test])):
        Dataset.from_list(part).to_parquet(str(folder / f"{split}.parquet"))
        splits.append({"split_name": split, "num_rows": len(part),
                       "path": f"gs://gemma-dataset-bucket/processed_datasets/{dataset_id}/{split}.parquet"})
    meta = root / "firestore" / "processed_datasets" / f"{dataset_id}.json"
    meta.parent.mkdir(parents=True, exist_ok=True)
    mode = "preference" if "chosen" in rows[0] else "prompt_only" if "answer" in rows[0] else "language_modeling"
    meta.write_text(json.dumps({"processed_dataset_id": dataset_id, "dataset_name": dataset_id,
                                "processing_mode": mode, "modality": "vision", "splits": splits}))
    return folder


def preferences(rows: list[dict]) -> list[dict]:
    """DPO/ORPO rows: the right sound chosen, another animal's sound rejected."""
    sounds = list(ANIMALS.values())
    out = []
    for i, row in enumerate(rows):
        prompt, answer = row["messages"][:2], row["messages"][2]["content"]
        animal, sound = answer.split()[1], answer.split()[-1].rstrip(".")
        wrong = sounds[(sounds.index(sound) + 1 + i % 5) % len(sounds)]
        out.append({"prompt": prompt, "chosen": [{"role": "assistant", "content": answer}],
                    "rejected": [{"role": "assistant", "content": f"The {animal} says {wrong}."}]})
    return out


def prompts(rows: list[dict]) -> list[dict]:
    """GRPO rows: the prompt, and the sound as the reference column `answer`."""
    return [{"prompt": row["messages"][:2], "answer": row["messages"][2]["content"].split()[-1].rstrip(".")}
            for row in rows]


def make_dataset(root: Path, dataset_id: str, rows: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    n_test = len(rows) // 6
    folder = root / "gemma-dataset-bucket" / "processed_datasets" / dataset_id
    folder.mkdir(parents=True, exist_ok=True)
    for split, part in (("train", rows[n_test:]), ("test", rows[:n_test])):
        pq.write_table(pa.Table.from_pylist(part), folder / f"{split}.parquet")
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".local", help="LOCAL_DIR root")
    args = parser.parse_args()
    root = Path(args.out)
    model_dir = root / "models" / "tiny-gemma3"
    model_dir.mkdir(parents=True, exist_ok=True)
    corpus = ["user", "model"] + [m["content"] for row in conversations() for m in row["messages"]] * 4
    make_tokenizer(model_dir, corpus)
    make_model(model_dir)
    write_card(model_dir)
    print(f"model:   {model_dir}")
    make_multimodal_model(root / "models" / "tiny-gemma3-mm", model_dir)
    print(f"model:   {root / 'models' / 'tiny-gemma3-mm'}")
    for path in make_gemma4_models(root / "models", model_dir):
        print(f"model:   {path}")
    pictures = [shape_image(colour, random.Random(i)) for i in range(4) for colour in COLOURS]
    print(f"model:   {make_gemma3n_model(root / 'models' / 'tiny-gemma3n', model_dir, pictures)}")
    rows = conversations()
    print(f"dataset: {make_dataset(root, 'tiny-animals', rows)}")
    print(f"dataset: {make_dataset(root, 'tiny-animals-pref', preferences(rows))}")
    print(f"dataset: {make_dataset(root, 'tiny-animals-prompts', prompts(rows))}")
    print(f"dataset: {make_vision_dataset(root, 'tiny-shapes', shapes())}")
    print(f"dataset: {make_vision_dataset(root, 'tiny-shapes-pref', shape_preferences(shapes()))}")
    print(f"dataset: {make_vision_dataset(root, 'tiny-shapes-prompts', shape_prompts(shapes()))}")


if __name__ == "__main__":
    main()
