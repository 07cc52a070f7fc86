"""A tiny Gemma 3n for the offline fixtures (scripts/make_tiny.py calls `make_gemma3n_model`): the whole
checkpoint's layout (`model.language_model.*`, the audio tower and both embedders beside it, Gemma 3n's
config with its three sub-configs) at a size that trains on a CPU in seconds, random weights. Its MobileNet
image tower is built through timm, which cannot be imported here, so the fixture has none of that tower's
tensors (a real checkpoint has them; the job copies whatever the base has into a merge). The language model
has Gemma 3n's per-layer embeddings (256 wide), AltUp (4 inputs), Laurel (rank 64) and key/value sharing,
at the widths llama.cpp's loader requires; its tokenizer and template are the tiny Gemma 3's (Gemma 3n
uses Gemma 3's turn format).
"""

from __future__ import annotations

import shutil
from pathlib import Path


def make_gemma3n_model(out: Path, tokenizer_dir: Path) -> Path:
    import torch
    from safetensors.torch import save_file
    from transformers import (
        AutoTokenizer,
        Gemma3nAudioConfig,
        Gemma3nAudioEncoder,
        Gemma3nConfig,
        Gemma3nForCausalLM,
        Gemma3nTextConfig,
        Gemma3nVisionConfig,
    )
    from transformers.models.gemma3n.modeling_gemma3n import Gemma3nMultimodalEmbedder

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    text = Gemma3nTextConfig(
        vocab_size=len(tok), vocab_size_per_layer_input=len(tok), hidden_size=256, intermediate_size=512,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=1, head_dim=64, hidden_size_per_layer_input=256,
        num_kv_shared_layers=2, laurel_rank=64, altup_num_inputs=4, sliding_window=64,
        layer_types=["sliding_attention", "full_attention"] * 2, activation_sparsity_pattern=[0.0] * 4,
        max_position_embeddings=1024, pad_token_id=0, eos_token_id=[1, 6], bos_token_id=2)
    audio = Gemma3nAudioConfig(hidden_size=64, conf_num_hidden_layers=1, conf_num_attention_heads=2,
                               vocab_offset=len(tok) + 128)
    vision = Gemma3nVisionConfig(hidden_size=64, vocab_offset=len(tok))
    config = Gemma3nConfig(text_config=text.to_dict(), audio_config=audio.to_dict(), vision_config=vision.to_dict(),
                           eos_token_id=[1, 6], pad_token_id=0, bos_token_id=2)
    config.architectures = ["Gemma3nForConditionalGeneration"]
    torch.manual_seed(0)
    language = Gemma3nForCausalLM(text)
    parts = {"model.language_model.": language.model, "model.audio_tower.": Gemma3nAudioEncoder(audio),
             "model.embed_audio.": Gemma3nMultimodalEmbedder(audio, text),
             "model.embed_vision.": Gemma3nMultimodalEmbedder(vision, text)}
    tensors = {prefix + k: v.to(torch.bfloat16).contiguous() for prefix, module in parts.items()
               for k, v in module.state_dict().items()}
    # the published checkpoints carry key/value projections (and the key norm) for the layers that share an
    # earlier layer's keys and values too (transformers does not build them; llama.cpp's loader wants them)
    for i in range(text.num_hidden_layers - text.num_kv_shared_layers, text.num_hidden_layers):
        for name in ("k_proj", "v_proj"):
            tensors[f"model.language_model.layers.{i}.self_attn.{name}.weight"] = torch.randn(
                text.num_key_value_heads * text.head_dim, text.hidden_size, dtype=torch.bfloat16) * 0.02
        tensors[f"model.language_model.layers.{i}.self_attn.k_norm.weight"] = torch.ones(text.head_dim,
                                                                                          dtype=torch.bfloat16)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(str(out))
    language.generation_config.eos_token_id = [1, 6]
    language.generation_config.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    shutil.copy(tokenizer_dir / "tokenizer.model", out / "tokenizer.model")  # as Gemma 3n's repos ship it
    (out / "README.md").write_text("---\nlicense: gemma\nlibrary_name: transformers\n---\n\n# tiny-gemma3n\n\n"
                                   "Gemma 3n's architecture at a tiny size, random weights: a test fixture.\n")
    return out
