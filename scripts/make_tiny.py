"""Make the offline fixtures: a tiny Gemma-3-architecture model with a SentencePiece tokenizer,
and a small processed dataset in the preprocessing service's layout.

    python scripts/make_tiny.py --out .local            # model in .local/models/tiny-gemma3
                                                         # data in .local/gemma-dataset-bucket/processed_datasets/tiny-animals

A language model of the same shape inside Gemma 3's image+text architecture (as at 4B and up) is in
tiny-gemma3-mm.

Random weights, Gemma's special tokens and chat template, dimensions that are multiples of 256
(k-quants in GGUF need rows of 256). Takes a few seconds; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

ANIMALS = {"cow": "moo", "dog": "woof", "cat": "meow", "duck": "quack", "sheep": "baa", "pig": "oink",
           "horse": "neigh", "owl": "hoot", "lion": "roar", "snake": "hiss", "bee": "buzz", "frog": "croak",
           "mouse": "squeak", "crow": "caw", "goat": "bleat", "wolf": "howl", "hen": "cluck", "dove": "coo"}
QUESTIONS = ["What does the {a} say?", "What sound does a {a} make?", "Which noise comes from the {a}?",
             "Tell me the sound of a {a}.", "How does the {a} speak?", "I hear a {a}. What sound is it?"]
SYSTEM = "You answer with the animal's sound."

# Gemma 3's chat template: system text folded into the first user turn, assistant shown as 'model'.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{%- if message['content'] is string -%}{{ message['content'] | trim }}"
    "{%- else -%}{%- for item in message['content'] -%}{%- if item['type'] == 'text' -%}"
    "{{ item['text'] | trim }}{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)


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


def make_multimodal_model(out: Path, tokenizer_dir: Path) -> None:
    """The same language model inside Gemma 3's image+text architecture (Gemma3ForConditionalGeneration,
    what google/gemma-3-4b-it and larger are), with a one-layer SigLIP vision tower."""
    import shutil

    import torch
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, SiglipVisionConfig

    torch.manual_seed(0)
    vision = SiglipVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                                image_size=28, patch_size=14)
    config = Gemma3Config(text_config=text_config().to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=4,
                          eos_token_id=[1, 6], pad_token_id=0, bos_token_id=2)
    model = Gemma3ForConditionalGeneration(config).to(torch.bfloat16)
    model.generation_config.eos_token_id = [1, 6]
    model.save_pretrained(str(out))
    for f in tokenizer_dir.glob("*"):
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, out / f.name)


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
    rows = conversations()
    print(f"dataset: {make_dataset(root, 'tiny-animals', rows)}")
    print(f"dataset: {make_dataset(root, 'tiny-animals-pref', preferences(rows))}")
    print(f"dataset: {make_dataset(root, 'tiny-animals-prompts', prompts(rows))}")


if __name__ == "__main__":
    main()
