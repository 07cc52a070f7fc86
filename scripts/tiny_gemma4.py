"""Tiny Gemma 4 models for the offline fixtures (scripts/make_tiny.py calls `make_gemma4_models`): one per
architecture Gemma 4 ships, each small enough to train on a CPU in seconds, random weights:

    tiny-gemma4         31B-like: dense, keys shared with values on full-attention layers, a vision tower
    tiny-gemma4-e2b     E2B-like: per-layer embeddings, key/value sharing across layers, vision and audio towers
    tiny-gemma4-moe     26B-A4B-like: a mixture of experts beside the dense MLP, a vision tower
    tiny-gemma4-unified 12B-like (gemma4_unified): linear embedders for images and audio, no encoders

Each with towers carries Gemma 4's processor (its image processor at its smallest budget, 70 soft tokens: a
28x28 picture becomes 64 image tokens; its video processor and, for E2B, its audio feature extractor), as the
published repos do. Each carries the chat template its size ships: E2B's is TRL's copy (trl/chat_templates/gemma4.jinja); 31B,
26B-A4B and 12B end the generation prompt with an empty thought channel that the rendered history lacks,
which is the same template with that prompt (llama.cpp carries the 31B's as models/templates/
google-gemma-4-31B-it.jinja; tests/test_gemma4.py checks the two agree). The tokenizer is `tokenizer.json`
only, as Gemma 4's repos ship it, and the vocabulary is exactly the tokenizer's (llama.cpp's Gemma 4 loader
refuses an embedding larger than its token list).
"""

from __future__ import annotations

import json
from pathlib import Path

# Gemma 4's turn, thought-channel, tool and media tokens, as its tokenizer names them.
GEMMA4_TOKENS = ["<|turn>", "<turn|>", "<|channel>", "<channel|>", "<|think|>", "<|tool>", "<tool|>",
                 "<|tool_call>", "<tool_call|>", "<|tool_response>", "<tool_response|>", '<|"|>',
                 "<|image>", "<image|>", "<|image|>", "<|audio>", "<audio|>", "<|audio|>", "<|video|>"]
# The media tokens by the names Gemma 4's processor reads from its tokenizer (tokenizer_config.json's extra tokens)
MEDIA = {"image_token": "<|image|>", "boi_token": "<|image>", "eoi_token": "<image|>", "audio_token": "<|audio|>",
         "boa_token": "<|audio>", "eoa_token": "<audio|>"}
E2B_PROMPT = "{{- '<|turn>model\\n' -}}"
THOUGHT_PROMPT = "{{- '<|turn>model\\n<|channel>thought\\n<channel|>' -}}"


def templates() -> dict[str, str]:
    """{"e2b": E2B's template, "thought": 31B/26B/12B's}: TRL's copy of E2B's, and the same with the empty
    thought channel after the generation prompt."""
    from trl.chat_template_utils import gemma4_chat_template

    assert gemma4_chat_template.count(E2B_PROMPT) == 1, "TRL's Gemma 4 template changed its generation prompt"
    return {"e2b": gemma4_chat_template, "thought": gemma4_chat_template.replace(E2B_PROMPT, THOUGHT_PROMPT)}


def make_tokenizer(tokenizer_dir: Path, out: Path, template: str):
    """The tiny Gemma tokenizer with Gemma 4's special tokens and `template`, saved as tokenizer.json alone."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    tok.add_tokens(GEMMA4_TOKENS, special_tokens=True)
    tok.chat_template = template
    out.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(out))
    tok = AutoTokenizer.from_pretrained(str(out), extra_special_tokens=MEDIA)  # named, with the ids above
    tok.save_pretrained(str(out))
    (out / "tokenizer.model").unlink(missing_ok=True)
    return tok


def text_kwargs(vocab: int) -> dict:
    return dict(vocab_size=vocab, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=1, head_dim=64, global_head_dim=128, sliding_window=64,
                layer_types=["sliding_attention", "full_attention"], max_position_embeddings=1024, pad_token_id=0,
                eos_token_id=1, bos_token_id=2, tie_word_embeddings=True)


def media_ids(tok) -> dict[str, int]:
    ids = {name: tok.convert_tokens_to_ids(t) for name, t in (
        ("image_token_id", "<|image|>"), ("boi_token_id", "<|image>"), ("eoi_token_id", "<image|>"),
        ("audio_token_id", "<|audio|>"), ("boa_token_id", "<|audio>"), ("eoa_token_index", "<audio|>"),
        ("video_token_id", "<|video|>"))}
    return ids


def distinct_pictures(model) -> None:
    """Pictures of different colours made to look different to the random tower: at Gemma 4's initial scale (0.02)
    the tiny tower's features of a red and a blue square agree to a cosine of 0.92, and a language model adapted
    alone cannot tell them apart; with its patch projection drawn at 0.3 they agree to about -0.15. The image
    embedder's projection is drawn at its fan-in's scale, so that a picture weighs in the language model as its
    words do (the same reason the Gemma 3 fixture draws its projector)."""
    import torch

    with torch.no_grad():
        model.model.vision_tower.patch_embedder.input_proj.weight.normal_(0.0, 0.3)
        weight = model.model.embed_vision.embedding_projection.weight
        weight.normal_(0.0, weight.shape[1] ** -0.5)


def save_processor(tok, out: Path) -> None:
    """Gemma 4's processor beside the model: what AutoProcessor loads for an image+text job."""
    from transformers import Gemma4AudioFeatureExtractor, Gemma4ImageProcessor, Gemma4Processor, Gemma4VideoProcessor

    Gemma4Processor(feature_extractor=Gemma4AudioFeatureExtractor(), image_processor=Gemma4ImageProcessor(
        max_soft_tokens=70), tokenizer=tok, video_processor=Gemma4VideoProcessor(),
        chat_template=tok.chat_template).save_pretrained(str(out))


def save(model, tok, out: Path, name: str) -> None:
    import torch

    model = model.to(torch.bfloat16)
    stop = [tok.eos_token_id, tok.convert_tokens_to_ids("<turn|>")]
    model.generation_config.eos_token_id = stop
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(str(out))
    (out / "README.md").write_text(f"---\nlicense: apache-2.0\nlibrary_name: transformers\n---\n\n# {name}\n\n"
                                   "Gemma 4's architecture at a tiny size, random weights: a test fixture.\n")


def make_gemma4_models(models: Path, tokenizer_dir: Path) -> list[Path]:
    import torch
    from transformers import (
        Gemma4AudioConfig,
        Gemma4Config,
        Gemma4ForConditionalGeneration,
        Gemma4TextConfig,
        Gemma4UnifiedConfig,
        Gemma4UnifiedForConditionalGeneration,
        Gemma4VisionConfig,
    )

    shipped = templates()
    vision = Gemma4VisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                                num_key_value_heads=2, head_dim=32).to_dict()
    # the first subsampling conv keeps Gemma 4's 128 channels: transformers sizes the input projection as
    # channels[0] // 4 * channels[1], which is the flattened (mel bins / 4) * channels[1] only when channels[0]
    # equals the 128 mel bins; llama.cpp's audio graph (and audio itself) needs the two to agree
    audio = Gemma4AudioConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=2, output_proj_dims=64,
                              subsampling_conv_channels=[128, 8]).to_dict()
    kinds = {
        "tiny-gemma4": ("thought", dict(attention_k_eq_v=True, num_global_key_value_heads=1,
                                        hidden_size_per_layer_input=0), dict(vision_config=vision)),
        "tiny-gemma4-e2b": ("e2b", dict(num_hidden_layers=4, layer_types=["sliding_attention", "full_attention"] * 2,
                                        hidden_size_per_layer_input=32, num_kv_shared_layers=2,
                                        use_double_wide_mlp=True),
                            dict(vision_config=vision, audio_config=audio)),
        # 32 experts: bitsandbytes' CPU 4-bit kernel packs a linear layer's rows in blocks of 32, and the router's
        # rows are the experts (the 26B-A4B has 128)
        "tiny-gemma4-moe": ("thought", dict(enable_moe_block=True, num_experts=32, top_k_experts=2,
                                            moe_intermediate_size=64, hidden_size_per_layer_input=0),
                            dict(vision_config=vision)),
    }
    made = []
    for name, (template, text, towers) in kinds.items():
        out = models / name
        tok = make_tokenizer(tokenizer_dir, out, shipped[template])
        torch.manual_seed(0)
        config = Gemma4TextConfig(**(text_kwargs(len(tok)) | {"vocab_size_per_layer_input": len(tok)} | text))
        model = Gemma4ForConditionalGeneration(Gemma4Config(text_config=config.to_dict(), **towers, **media_ids(tok)))
        distinct_pictures(model)
        save(model, tok, out, name)
        save_processor(tok, out)
        made.append(out)
    out = models / "tiny-gemma4-unified"
    tok = make_tokenizer(tokenizer_dir, out, shipped["thought"])
    torch.manual_seed(0)
    text = text_kwargs(len(tok))
    # the 12B's linear embedders for image patches and audio frames, at the tiny model's width
    towers = dict(vision_config={"mm_embed_dim": 64, "mm_posemb_size": 64, "output_proj_dims": 256},
                  audio_config={"audio_embed_dim": 64})
    config = Gemma4UnifiedConfig(text_config=text, **towers, **media_ids(tok))
    save(Gemma4UnifiedForConditionalGeneration(config), tok, out, "tiny-gemma4-unified")
    # the 12B's published config carries the text config's moe_intermediate_size as null; transformers drops it
    published = json.loads((out / "config.json").read_text())
    published["text_config"]["moe_intermediate_size"] = None
    (out / "config.json").write_text(json.dumps(published, indent=2))
    made.append(out)
    return made
