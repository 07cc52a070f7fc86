"""What the job reads from a base model's config.json before any weight is downloaded: the config itself
(read once per job), and whether this job can train that base at all."""

from __future__ import annotations

import functools

from errors import PermanentError
from schema import gemma_3n_refused


@functools.lru_cache(maxsize=2)
def base_config(model_id: str, token: str | None, trust_remote_code: bool):
    """The base's config (config.json alone): read once per job by the checks below and by memory.py."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model_id, token=token, trust_remote_code=trust_remote_code)


def check_base_model(model_id: str, token: str | None, trust_remote_code: bool, images: bool) -> None:
    """Refuse, from the config alone, a base this job cannot train: Gemma 3n under any name (validation refuses
    it by its Hub name; a local copy or a renamed repo is caught here), and, for images, a text-only Gemma
    (Gemma 3 270M and 1B)."""
    config = base_config(model_id, token, trust_remote_code)
    if config.model_type.startswith("gemma3n"):
        raise PermanentError(gemma_3n_refused(model_id))
    if images and getattr(config, "vision_config", None) is None:
        raise PermanentError(f"training_config.base_model_id: {model_id!r} is a text-only model "
                             f"({config.model_type}), and modality 'vision' sends it images; use an image+text "
                             "Gemma (Gemma 3 4B, 12B or 27B, e.g. google/gemma-3-4b-it), or modality 'text' "
                             "with a text dataset.")
