"""What goes into an export folder besides the weights: the tokenizer files its consumers read, the
4-bit form of a merge, the contract's `custom_config.json` and our manifest with checksums.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import shutil
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

LIBRARIES = ("torch", "transformers", "peft", "trl", "datasets", "accelerate", "bitsandbytes", "unsloth",
             "llama_cpp_python")


# Keys transformers 5 writes into tokenizer_config.json that describe the machine that saved it (an absolute
# `vocab_file` path, whether it loaded from disk), not the tokenizer: a consumer elsewhere must not read them.
MACHINE_KEYS = ("vocab_file", "is_local", "local_files_only")


def complete_tokenizer_files(out: Path, tokenizer, base_model_id: str, token: str | None) -> None:
    """tokenizer_config.json as the export's consumers read it.

    - transformers 5 saves neither `tokenizer.model` nor the special-token table; llama.cpp's converter reads
      both, and without the table Gemma's <start_of_turn>/<end_of_turn> become ordinary text tokens in the
      GGUF (no stop token, a broken chat template).
    - transformers 5 writes the additional special tokens as a list under `extra_special_tokens`, which
      transformers 4.x (the inference service's 4.56, vLLM's) reads as a name -> token map and fails on
      ("'list' object has no attribute 'keys'"). Under their older name, `additional_special_tokens`, both
      read them: 5 converts the name on load (tests/test_consumers.py).
    - An image+text tokenizer's named tokens (Gemma 3's boi/eoi/image tokens) are written by transformers 5 as
      `model_specific_special_tokens`, which 4.x does not read: its Gemma3Processor then fails ("no attribute
      image_token_id"). 4.x reads them as the name -> token map `extra_special_tokens`, as Google's files have
      them, and so does 5 (tests/test_vision.py)."""
    copy_sentencepiece_model(out, base_model_id, token)
    config_file = out / "tokenizer_config.json"
    config = json.loads(config_file.read_text()) if config_file.exists() else {}
    config["added_tokens_decoder"] = {str(i): t.__getstate__() for i, t in
                                      sorted(tokenizer.added_tokens_decoder.items())}
    if isinstance(config.get("extra_special_tokens"), list):
        config["additional_special_tokens"] = config.pop("extra_special_tokens")
    if isinstance(config.get("model_specific_special_tokens"), dict):
        config["extra_special_tokens"] = config.pop("model_specific_special_tokens")
    for key in MACHINE_KEYS:
        config.pop(key, None)
    config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False))


def copy_sentencepiece_model(out: Path, base_model_id: str, token: str | None) -> None:
    """The base's SentencePiece model beside the export, where it has one: Gemma 4 ships `tokenizer.json`
    alone, which is all its consumers (and llama.cpp's Gemma 4 converter) read."""
    if (out / "tokenizer.model").exists():
        return
    local = Path(base_model_id).expanduser()
    if local.is_dir():
        if (local / "tokenizer.model").is_file():
            shutil.copyfile(local / "tokenizer.model", out / "tokenizer.model")
        else:
            logger.info("%s has no tokenizer.model (tokenizer.json only)", base_model_id)
        return
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        shutil.copyfile(hf_hub_download(base_model_id, "tokenizer.model", token=token), out / "tokenizer.model")
    except EntryNotFoundError:
        logger.info("%s has no tokenizer.model", base_model_id)


# The adapter_config.json keys PEFT 0.14.0 knows (PeftConfigMixin, PeftConfig and LoraConfig's fields in
# peft-0.14.0's wheel): the platform's inference service pins it (inference/uv.lock). PEFT 0.21 writes more
# keys; 0.14 cannot take an unknown key, drops the keys it does know along with it, and then fails with
# "Please specify `target_modules`". tests/test_consumers.py loads our adapters there.
PEFT_014_KEYS = frozenset({
    "task_type", "peft_type", "auto_mapping", "base_model_name_or_path", "revision", "inference_mode",
    "alpha_pattern", "bias", "eva_config", "exclude_modules", "fan_in_fan_out", "init_lora_weights",
    "layer_replication", "layers_pattern", "layers_to_transform", "loftq_config", "lora_alpha", "lora_bias",
    "lora_dropout", "megatron_config", "megatron_core", "modules_to_save", "r", "rank_pattern", "runtime_config",
    "target_modules", "use_dora", "use_rslora"})
METADATA_KEYS = frozenset({"peft_version"})  # says who wrote the file; nothing loads by it


def write_portable_adapter_config(folder: Path) -> dict[str, Any]:
    """adapter_config.json with only the keys PEFT 0.14.0 knows, so that the platform's inference service
    loads it as well as the PEFT the job trains with. A key dropped must be at its default (or metadata):
    one that changes what the adapter computes is an error here, not a silently different model there.
    Returns the keys dropped with their values."""
    from peft import LoraConfig

    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    defaults = LoraConfig().to_dict()
    dropped = {k: v for k, v in config.items() if k not in PEFT_014_KEYS}
    meaningful = {k: v for k, v in dropped.items() if k not in METADATA_KEYS and v != defaults.get(k)}
    if meaningful:
        raise RuntimeError(f"adapter_config.json sets {sorted(meaningful)}, which PEFT 0.14 (the inference "
                           "service's) cannot read; the adapter would load there as a different model")
    path.write_text(json.dumps({k: v for k, v in config.items() if k in PEFT_014_KEYS}, indent=2, sort_keys=True))
    return dropped


# Kept in 16 bits in an image+text model's 4-bit form: the vision tower and its projector (Gemma 3's SigLIP and
# multi_modal_projector, Gemma 4's tower and embed_vision) lose too much in NF4 (Unsloth keeps them too), and the
# output head, which bitsandbytes keeps by default (a list replaces it).
# Full module paths: transformers 5 matches these from the start of a module's name (a bare "vision_tower"
# matches nothing and the tower went 4-bit: tests/test_vision_methods.py), 4.x anywhere in it.
VISION_16BIT = ["model.vision_tower", "model.multi_modal_projector", "model.embed_vision", "lm_head"]


def nf4_config(compute_dtype, vision: bool = False, sharded: bool = False, keep: tuple[str, ...] = ()):
    """The one 4-bit form of the job: NF4 with double quantization, for QLoRA's base and the q4 merge. Sharded
    (FSDP): the packed 4-bit weights stored in the compute dtype, which FSDP can flatten and shard with the
    other parameters (stored as uint8 it cannot). `keep`: layers left in 16 bits besides (by the end of their
    names: language_model.KEEP_16BIT)."""
    from transformers import BitsAndBytesConfig

    skip = (VISION_16BIT if vision else []) + (["lm_head", *keep] if keep else [])
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype,
                              **({"bnb_4bit_quant_storage": compute_dtype} if sharded else {}),
                              **({"llm_int8_skip_modules": sorted(set(skip))} if skip else {}))


def save_4bit(merged16: Path, out: Path, vision: bool = False) -> Path:
    """The 16-bit merge saved 4-bit (NF4, double quantization) with bitsandbytes: quantized once from
    the merged weights, never merged into 4-bit weights."""
    import torch
    import transformers

    from models.base_models import base_config
    from models.language_model import KEEP_16BIT, trains_alone

    base = base_config(str(merged16), None, False)
    whole = vision or trains_alone(base)  # Gemma 3n's merge is the whole checkpoint, towers included
    config = nf4_config(torch.bfloat16, whole, keep=KEEP_16BIT.get(base.model_type, ()))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    auto = transformers.AutoModelForImageTextToText if whole else transformers.AutoModelForCausalLM
    model = auto.from_pretrained(str(merged16), quantization_config=config, device_map=device)
    model.save_pretrained(str(out))
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    portable_vision_keys(out)
    for p in merged16.iterdir():  # the tokenizer, its tables and an image processor, as the 16-bit folder has them
        if p.is_file() and (p.name.startswith(("tokenizer", "processor_config", "preprocessor_config"))
                            or p.name.endswith((".jinja", ".model"))):
            shutil.copyfile(p, out / p.name)
    return out


def portable_vision_keys(folder: Path) -> int:
    """Gemma 3's vision tower saved where transformers 4.x looks for it; the number of tensors renamed.

    transformers 5 writes the SigLIP tower as `vision_tower.encoder...`; 4.x (the inference service's 4.56)
    reads `vision_tower.vision_model.encoder...`, as Google's checkpoints have it, and on the shorter names
    silently initialises the tower at random: a merged image+text model would then see noise. 5 reads the
    longer names too (tests/test_vision.py loads both ways with the same logits). One file at a time: the
    peak is one shard, not the model."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    def portable(key: str) -> str:
        if key.startswith("vision_tower.") and not key.startswith("vision_tower.vision_model."):
            return "vision_tower.vision_model." + key.removeprefix("vision_tower.")
        return key

    renamed = 0
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            keys, metadata = list(f.keys()), f.metadata()
            if all(portable(k) == k for k in keys):
                continue
            tensors = {portable(k): f.get_tensor(k) for k in keys}
        renamed += sum(portable(k) != k for k in keys)
        save_file(tensors, str(path), metadata=metadata)
    index = folder / "model.safetensors.index.json"
    if renamed and index.is_file():
        data = json.loads(index.read_text())
        data["weight_map"] = {portable(k): v for k, v in data["weight_map"].items()}
        index.write_text(json.dumps(data, indent=2))
    return renamed


def cast_saved(folder: Path, dtype) -> bool:
    """The model saved in folder rewritten in dtype, if it is stored in another; False if it already was.
    On the CPU: after training, the GPU is the scarce memory."""
    from transformers import AutoModelForCausalLM

    config = json.loads((folder / "config.json").read_text())
    if config.get("dtype", config.get("torch_dtype")) == str(dtype).removeprefix("torch."):
        return False
    cast = folder.with_name(folder.name + "-cast")
    AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, device_map="cpu").save_pretrained(str(cast))
    for f in folder.glob("model*.safetensors*"):
        f.unlink()
    for f in cast.iterdir():
        f.replace(folder / f.name)
    cast.rmdir()
    return True


def weight_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def write_manifest(out: Path, custom: dict[str, Any], extra: dict[str, Any], name: str = "manifest.json",
                   contract: bool = True) -> None:
    """`custom_config.json` (the contract: the inference service reads it) and our manifest beside it:
    metrics, the request without secrets, verification, timings, and each file's checksum."""
    if contract:
        (out / "custom_config.json").write_text(json.dumps(custom, indent=2))
    files = {p.relative_to(out).as_posix(): {"sha256": sha256(p), "bytes": p.stat().st_size}
             for p in sorted(out.rglob("*")) if p.is_file()}
    manifest = {**custom, **extra, "files": files, "versions": library_versions()}
    (out / name).write_text(json.dumps(manifest, indent=2, default=str))


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def library_versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return found
