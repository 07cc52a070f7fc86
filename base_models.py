"""What the job reads from a base model's config.json before any weight is downloaded: the config itself
(read once per job), and whether this job can train that base at all."""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path

from errors import PermanentError
from schema import gemma_3n_refused


@contextlib.contextmanager
def reading_base(model_id: str):
    """Around a read of the base (its config, its tokenizer): an id that cannot be read is a permanent error,
    not a retry: a local path that is not a folder, a Hub id that is malformed, missing or gated."""
    from huggingface_hub.errors import HFValidationError, RepositoryNotFoundError

    if model_id.startswith((".", "/", "~")) and not Path(model_id).expanduser().is_dir():
        raise PermanentError(f"training_config.base_model_id: {model_id!r} looks like a local path but is not "
                             "a directory; give an existing model folder or a Hub id such as google/gemma-3-1b-it.")
    try:
        yield
    except OSError as e:
        if isinstance(e.__cause__, (RepositoryNotFoundError, HFValidationError)):
            raise PermanentError(f"training_config.base_model_id: {model_id!r} cannot be read from the Hub "
                                 f"({type(e.__cause__).__name__}); check the id, and that the token has "
                                 "accepted the model's licence.") from None
        raise


@functools.lru_cache(maxsize=2)
def base_config(model_id: str, token: str | None, trust_remote_code: bool):
    """The base's config (config.json alone): read once per job by the checks below and by memory.py."""
    from transformers import AutoConfig

    with reading_base(model_id):
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
