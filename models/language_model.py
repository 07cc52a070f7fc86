"""A multimodal checkpoint whose language model trains alone: Gemma 3n. Its model class builds a MobileNet
image tower through timm, which this image cannot import (timm needs torchvision, whose builds do not import
beside this project's torch), so a text job loads the text decoder alone (`Gemma3nForCausalLM`, which
transformers reads from the whole checkpoint, `model.language_model.*`) and trains it. The platform's
inference service loads Gemma 3n whole (`AutoModelForImageTextToText`): the adapter's tensors are renamed to
the whole model's paths once the job has checked them, and a merge becomes the whole checkpoint again (the
trained language model, the base's towers and embedders, its config and processor files).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

logger = logging.getLogger(__name__)

# model_type -> the class that loads its language model alone
TEXT_ONLY = {"gemma3n": "Gemma3nForCausalLM"}
LANGUAGE = "model.language_model."
# Layers a 4-bit load must leave in 16 bits: Gemma 3n's AltUp coefficients, which its forward pass clamps in place
# while training (bitsandbytes' packed bytes cannot be: "result type Float can't be cast ... unsigned char").
KEEP_16BIT = {"gemma3n": ("correction_coefs", "prediction_coefs", "modality_router")}
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json")


def trains_alone(config) -> bool:
    return getattr(config, "model_type", None) in TEXT_ONLY


def unreadable_tokens(config) -> list[int]:
    """Tokens a model can emit but not read back: Gemma 3n's language model alone (a text job's, or its config) has
    per-layer embeddings for its first vocab_size_per_layer_input tokens only; the rest are the towers' media tokens
    (images, audio), which only the whole model embeds. Generating one would end the next forward pass ("index out
    of range"), so the job's generation suppresses them. None for any other model."""
    text = config if getattr(config, "model_type", None) == "gemma3n_text" else \
        config.get_text_config() if trains_alone(config) else None
    per_layer = getattr(text, "vocab_size_per_layer_input", None)
    return list(range(per_layer, text.vocab_size)) if per_layer and per_layer < text.vocab_size else []


def causal_class(config):
    """The class a text job loads this base (or an export of it) with."""
    import transformers

    return getattr(transformers, TEXT_ONLY[config.model_type]) if trains_alone(config) else \
        transformers.AutoModelForCausalLM


def language_config(config):
    """The config the text-only class is built from (tests and the memory estimate build it empty)."""
    return config.get_text_config() if trains_alone(config) else config


def whole_adapter_keys(folder: Path) -> int:
    """The adapter's tensors renamed from the language model's paths (model.layers.*) to the whole model's
    (model.language_model.layers.*); returns how many were renamed."""
    from safetensors.torch import load_file, save_file

    path = folder / "adapter_model.safetensors"
    tensors = load_file(str(path))
    prefix = "base_model.model.model."
    renamed = {(prefix + "language_model." + k[len(prefix):] if k.startswith(prefix) else k): v
               for k, v in tensors.items()}
    save_file(renamed, str(path), metadata={"format": "pt"})
    return sum(1 for k in tensors if k.startswith(prefix))


def base_files(base_model_id: str, token: str | None) -> Path:
    """The base's folder: a local one as it is, a Hub repo's safetensors, configs and processor files."""
    local = Path(base_model_id).expanduser()
    if local.is_dir():
        return local
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(base_model_id, token=token, allow_patterns=["*.safetensors", "*.json"]))


def whole_merged(folder: Path, base_model_id: str, token: str | None) -> None:
    """A merged language model (as Gemma3nForCausalLM saves it) made the whole checkpoint again: its tensors under
    model.language_model.*, the base's other tensors beside them (towers, embedders, and any the text class does
    not build), the base's config.json and processor files. The tied output layer is left out, as the base has
    it."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    base = base_files(base_model_id, token)
    merged = {}
    for shard in sorted(folder.glob("*.safetensors")):
        merged.update(load_file(str(shard)))
        shard.unlink()
    (folder / "model.safetensors.index.json").unlink(missing_ok=True)
    dtype = next(iter(merged.values())).dtype
    # transformers 5 may save the text class's tensors under the whole model's paths already (its conversion
    # mapping run backwards); older versions save them as the class names them (model.layers.*)
    whole = {(k if k.startswith(LANGUAGE) else LANGUAGE + k[len("model."):] if k.startswith("model.") else k): v
             for k, v in merged.items() if k != "lm_head.weight"}
    kept = 0
    for shard in sorted(base.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            for key in f.keys():
                if key not in whole:  # towers, embedders, and what the text class does not build (the
                    # key/value projections of Gemma 3n's layers that share another's, which llama.cpp reads)
                    tensor = f.get_tensor(key)
                    whole[key] = tensor.to(dtype) if tensor.is_floating_point() else tensor
                    kept += 1
    save_file(whole, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((base / "config.json").read_text())
    for key in [k for k in ("dtype", "torch_dtype") if k in config] or ["torch_dtype"]:
        config[key] = str(dtype).removeprefix("torch.")
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    for name in PROCESSOR_FILES:
        if (base / name).is_file():
            shutil.copyfile(base / name, folder / name)
    logger.info("merged language model keyed for the whole %s: %d tensors of its own, %d more of the base's",
                config.get("model_type"), len(whole) - kept, kept)
