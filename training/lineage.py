"""Continuing an earlier fine-tune: the adapter a new job starts from, found and checked at pre-flight.

- `training_config.init_from_job_id`: the adapter that job exported, `gs://{export bucket}/trained_adapters/{id}/`
  (DESIGN.md's layout; a job that exported a merge or a GGUF left no adapter to continue).
- `training_config.init_adapter`: a PEFT adapter on the Hub (`owner/name`), read with the request's token.

The parent must be a LoRA adapter of the request's base model (`base_model_id`, as its manifest, else its
adapter_config.json, names it), and its shape (rank, alpha, target modules, DoRA, rsLoRA, modules_to_save)
is kept: a shape field the request sets to another value is refused rather than silently overridden. Every
problem is a permanent error (exit 2) before a weight is loaded. The manifest and the job document record
the lineage: where the parent came from, its base, and the checksum of its weights.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from models.artifacts import sha256
from runtime.errors import PermanentError
from schema import TrainingConfig
from storage import BlobStore, ModelHub

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")

# The request's LoRA shape fields and the adapter_config.json keys they set.
SHAPE = {"lora_rank": "r", "lora_alpha": "lora_alpha", "use_dora": "use_dora", "use_rslora": "use_rslora",
         "lora_target_modules": "target_modules", "modules_to_save": "modules_to_save"}


@dataclass(frozen=True)
class Parent:
    folder: Path  # the adapter's files, downloaded
    config: dict[str, Any]  # its adapter_config.json
    lineage: dict[str, Any]  # for the manifest and the job document


def fetch_parent(cfg: TrainingConfig, blobs: BlobStore, hub: ModelHub, export_bucket: str,
                 workdir: Path) -> Parent | None:
    """The adapter the request continues from, downloaded and checked; None if it starts from the base."""
    if cfg.init_from_job_id is None and cfg.init_adapter is None:
        return None
    folder = Path(workdir) / "parent"
    if cfg.init_from_job_id is not None:
        field, source = "training_config.init_from_job_id", cfg.init_from_job_id
        prefix = f"gs://{export_bucket}/trained_adapters/{source}/"
        present = {uri.removeprefix(prefix) for uri in blobs.list(prefix)}
        missing = [name for name in ADAPTER_FILES if name not in present]
        if missing:
            raise PermanentError(f"{field}: job {source!r} left no adapter to continue ({', '.join(missing)} not in "
                                 f"{prefix}); name a job that exported format 'adapter', or use init_adapter.")
        blobs.download_dir(prefix, folder, [*ADAPTER_FILES, *(["manifest.json"] if "manifest.json" in present
                                                              else [])])
        lineage: dict[str, Any] = {"job_id": source, "uri": prefix}
    else:
        field, source = "training_config.init_adapter", cfg.init_adapter
        hub.download_adapter(source, folder, list(ADAPTER_FILES))
        lineage = {"hub_repo": source}
    config = json.loads((folder / "adapter_config.json").read_text())
    manifest = json.loads((folder / "manifest.json").read_text()) if (folder / "manifest.json").is_file() else {}
    if config.get("peft_type", "LORA") != "LORA":
        raise PermanentError(f"{field}: {source!r} is a {config.get('peft_type')} adapter; this job continues LoRA "
                             "adapters only.")
    base = manifest.get("base_model_id") or config.get("base_model_name_or_path")
    if base != cfg.base_model_id:
        raise PermanentError(f"{field}: {source!r} was trained on {base!r}, not on base_model_id "
                             f"{cfg.base_model_id!r}; an adapter only fits the base it was trained on: set "
                             f"base_model_id to {base!r}, or start from the base.")
    check_shape(cfg, config, field, source)
    lineage.update(base_model_id=base, adapter_sha256=sha256(folder / "adapter_model.safetensors"),
                   **({"parent": manifest["parent"]} if manifest.get("parent") else {}))
    return Parent(folder, config, lineage)


def check_shape(cfg: TrainingConfig, config: dict[str, Any], field: str, source: str) -> None:
    """A shape field the request sets (the platform's service sends rank and alpha with every request) must
    be the parent's."""
    hp = cfg.hyperparameters
    for name, key in SHAPE.items():
        if name not in hp.model_fields_set:
            continue
        ours, theirs = comparable(getattr(hp, name)), comparable(config.get(key))
        if ours != theirs:
            raise PermanentError(f"hyperparameters.{name}: {ours!r}, but the adapter {field} names ({source!r}) has "
                                 f"{theirs!r}; a continued adapter keeps its parent's shape: set {theirs!r} or "
                                 f"leave {name} unset.")


def comparable(value: Any) -> Any:
    """A shape value as both sides write it: a module list in any order, an unset list or flag as empty."""
    if isinstance(value, (list, tuple, set)):
        return sorted(value)
    return False if value is None else value
