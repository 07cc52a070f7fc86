"""A tiny Gemma 3n for the offline fixtures (scripts/make_tiny.py calls `make_gemma3n_model`): the whole
checkpoint (`Gemma3nForConditionalGeneration`: the language model under `model.language_model.*`, timm's MobileNetV5
image tower, the audio tower and both embedders beside it), at a size that trains on a CPU in seconds, random
weights, with Gemma 3n's processor and chat template.

- Language model: Gemma 3n's per-layer embeddings (256 wide), AltUp (4 inputs), Laurel (rank 64) and key/value
  sharing, at the widths llama.cpp's loader requires.
- Image tower: MobileNetV5 with its every block (`mobilenetv5_300m_enc`), its channels at 1/16 (timm's
  `channel_multiplier`, through the config's `model_args`) and its fusion adapter's output at 2x2, so that a
  picture is 4 image tokens (the real one: 256, at 768x768); the processor makes 64x64 pictures.
- Tokenizer: the tiny Gemma 3's pieces with Gemma 3n's media tokens laid out as Gemma 3n's vocabulary lays them
  out: the start-of-image and start-of-audio tokens among the text tokens (which have per-layer embeddings), then
  128 tokens that the image embedder embeds (end of image, the image soft token, ...), then 128 for audio.
- Template: Gemma 3's turns with Gemma 3n's media parts (models/chat_templates.GEMMA3N: an image part is
  `<image_soft_token>`, which the processor expands).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

# Gemma 3n's media tokens by the names its processor reads from the tokenizer
MEDIA = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>",
         "boa_token": "<start_of_audio>", "eoa_token": "<end_of_audio>", "audio_token": "<audio_soft_token>"}
IMAGE_SIZE, IMAGE_TOKENS = 64, 4
# Weights drawn at 0.06 (transformers' default is 0.02): at 0.02 the tiny model's output stays almost uniform through
# the vision demo's 12 epochs (eval entropy 6.3 nats of at most 6.6; no colour named better than chance).
INIT = 0.06
TOWER = {"channel_multiplier": 0.0625, "msfa_output_resolution": 2}


def make_tokenizer(tokenizer_dir: Path, out: Path):
    from transformers import AutoTokenizer

    from models.chat_templates import GEMMA3N

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    tok.add_tokens([MEDIA["boi_token"], MEDIA["boa_token"]], special_tokens=True)
    tok.add_tokens([MEDIA["eoi_token"], MEDIA["image_token"]] + [f"<image_unused_{i}>" for i in range(126)],
                   special_tokens=True)
    tok.add_tokens([MEDIA["eoa_token"], MEDIA["audio_token"]] + [f"<audio_unused_{i}>" for i in range(126)],
                   special_tokens=True)
    tok.chat_template = GEMMA3N
    out.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(out))
    tok = AutoTokenizer.from_pretrained(str(out), extra_special_tokens=MEDIA)  # named, with the ids above
    tok.save_pretrained(str(out))
    return tok


def distinct_pictures(model, pictures) -> None:
    """Pictures of different colours made to look different to the random tower: its features share a few
    directions (about one per image token's position; two colours' pictures agree to a cosine of about 0.8 as the
    embedder is drawn, the same colour's to 0.88), which the image embedder's projection is drawn without, so that
    what differs between pictures is what the language model reads (then about 0.07 and 0.47; the Gemma 4 fixture
    does the same for its tower's reason)."""
    import torch

    with torch.no_grad():
        features = model.model.vision_tower(pixel_values=pictures, do_pooling=False).last_hidden_state
        shared = torch.linalg.svd(features.flatten(2).transpose(1, 2).flatten(0, 1), full_matrices=False)[2]
        shared = shared[:IMAGE_TOKENS]
        weight = model.model.embed_vision.embedding_projection.weight
        weight.normal_(0.0, weight.shape[1] ** -0.5)
        weight -= (weight @ shared.T) @ shared


def make_gemma3n_model(out: Path, tokenizer_dir: Path, pictures: list | None = None) -> Path:
    """The tiny whole Gemma 3n in `out`; `pictures` (PIL images, e.g. one of each colour the image set names) drawn
    apart by the tower (distinct_pictures)."""
    import torch
    from transformers import (
        Gemma3nAudioConfig,
        Gemma3nAudioFeatureExtractor,
        Gemma3nConfig,
        Gemma3nForConditionalGeneration,
        Gemma3nProcessor,
        Gemma3nTextConfig,
        Gemma3nVisionConfig,
        SiglipImageProcessor,
    )

    tok = make_tokenizer(tokenizer_dir, out)
    ids = {name: tok.convert_tokens_to_ids(token) for name, token in MEDIA.items()}
    text_vocab = ids["eoi_token"]  # the tokens with per-layer embeddings: the pieces, start of image and audio
    text = Gemma3nTextConfig(
        vocab_size=len(tok), vocab_size_per_layer_input=text_vocab, hidden_size=256, intermediate_size=512,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=1, head_dim=64, hidden_size_per_layer_input=256,
        num_kv_shared_layers=2, laurel_rank=64, altup_num_inputs=4, sliding_window=64,
        layer_types=["sliding_attention", "full_attention"] * 2, activation_sparsity_pattern=[0.0] * 4,
        max_position_embeddings=1024, pad_token_id=0, eos_token_id=[1, 6], bos_token_id=2, initializer_range=INIT)
    audio = Gemma3nAudioConfig(hidden_size=64, conf_num_hidden_layers=1, conf_num_attention_heads=2,
                               vocab_offset=ids["eoa_token"])
    vision = Gemma3nVisionConfig(vocab_offset=text_vocab, model_args=dict(TOWER))
    config = Gemma3nConfig(text_config=text.to_dict(), audio_config=audio.to_dict(), vision_config=vision.to_dict(),
                           vision_soft_tokens_per_image=IMAGE_TOKENS, boi_token_id=ids["boi_token"],
                           eoi_token_id=ids["eoi_token"], image_token_id=ids["image_token"],
                           boa_token_id=ids["boa_token"], eoa_token_id=ids["eoa_token"],
                           audio_token_id=ids["audio_token"], eos_token_id=[1, 6], pad_token_id=0, bos_token_id=2)
    torch.manual_seed(0)
    model = Gemma3nForConditionalGeneration(config)
    images = SiglipImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, do_normalize=False,
                                  resample=2)
    if pictures:
        distinct_pictures(model, images(pictures, return_tensors="pt")["pixel_values"])
    model = model.to(torch.bfloat16)
    model.generation_config.eos_token_id = [1, 6]
    model.save_pretrained(str(out))
    # the published checkpoints carry key/value projections (and the key norm) for the layers that share an
    # earlier layer's keys and values too (transformers does not build them; llama.cpp's loader wants them)
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(out / "model.safetensors"))
    for i in range(text.num_hidden_layers - text.num_kv_shared_layers, text.num_hidden_layers):
        for name in ("k_proj", "v_proj"):
            tensors[f"model.language_model.layers.{i}.self_attn.{name}.weight"] = torch.randn(
                text.num_key_value_heads * text.head_dim, text.hidden_size, dtype=torch.bfloat16) * 0.02
        tensors[f"model.language_model.layers.{i}.self_attn.k_norm.weight"] = torch.ones(text.head_dim,
                                                                                          dtype=torch.bfloat16)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    Gemma3nProcessor(feature_extractor=Gemma3nAudioFeatureExtractor(), image_processor=images, tokenizer=tok,
                     chat_template=tok.chat_template, image_seq_length=IMAGE_TOKENS).save_pretrained(str(out))
    shutil.copy(tokenizer_dir / "tokenizer.model", out / "tokenizer.model")  # as Gemma 3n's repos ship it
    # the media tokens as Google's files name them (a name -> token map), which transformers 4.x reads too
    config_file = out / "tokenizer_config.json"
    saved = json.loads(config_file.read_text())
    if "model_specific_special_tokens" in saved:
        saved["extra_special_tokens"] = saved.pop("model_specific_special_tokens")
    config_file.write_text(json.dumps(saved, indent=2))
    (out / "README.md").write_text("---\nlicense: gemma\nlibrary_name: transformers\n---\n\n# tiny-gemma3n\n\n"
                                   "Gemma 3n's architecture at a tiny size, random weights: a test fixture.\n")
    return out
