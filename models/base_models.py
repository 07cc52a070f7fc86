"""What the job reads from a base model's config.json before any weight is downloaded: the config itself
(read once per job), and whether this job can train that base at all."""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from pathlib import Path

from runtime.errors import PermanentError
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
    """The base's config (config.json alone): read once per job by the checks below and by models/memory.py."""
    from transformers import AutoConfig

    with reading_base(model_id):
        return AutoConfig.from_pretrained(model_id, token=token, trust_remote_code=trust_remote_code)


@dataclass(frozen=True)
class Family:
    """A model_type the pinned transformers loads: what users call it, what it takes in, and whether this job
    trains it (where not, `refused` says why and what to choose instead)."""
    name: str
    sizes: str
    modalities: str
    refused: str = ""
    consumer_note: str = ""  # what the platform's consumers cannot load of it, for the job document's warnings


# gemma-facet/cloud-services inference/uv.lock pins transformers 4.56, from before Gemma 4.
GEMMA_4_CONSUMERS = ("the platform's inference service pins transformers 4.56, which does not know model type "
                     "'{}': this job's Gemma 4 exports load in transformers 5.5 or later (and their GGUF in "
                     "llama.cpp), not in that service until it upgrades")


TEXT_INSTEAD = "choose a Gemma 4 or Gemma 3 model (e.g. google/gemma-4-E2B-it, google/gemma-3-1b-it)"
DRAFT = "a speculative-decoding draft that only runs beside its target model; fine-tune the target instead"
ENCODER_DECODER = "an encoder-decoder model; this job trains decoders"
FAMILIES: dict[str, Family] = {
    "gemma": Family("Gemma (1.x), CodeGemma", "2B, 7B", "text"),
    "gemma2": Family("Gemma 2", "2B, 9B, 27B", "text"),
    "vaultgemma": Family("VaultGemma", "1B", "text"),
    "gemma3_text": Family("Gemma 3 text", "270M, 1B", "text"),
    "gemma3": Family("Gemma 3", "4B, 12B, 27B", "text, images"),
    "gemma4_text": Family("Gemma 4 (text-only checkpoint)", "any", "text",
                          consumer_note=GEMMA_4_CONSUMERS.format("gemma4_text")),
    "gemma4": Family("Gemma 4", "E2B, E4B, 26B-A4B, 31B", "text, images (audio on E2B, E4B)",
                     consumer_note=GEMMA_4_CONSUMERS.format("gemma4")),
    "gemma4_unified": Family("Gemma 4 unified", "12B", "text, images, audio",
                             consumer_note=GEMMA_4_CONSUMERS.format("gemma4_unified")),
    "gemma3n": Family("Gemma 3n", "E2B, E4B", "text (its language model alone: models/language_model.py), images"),
    "gemma4_assistant": Family("Gemma 4 assistant (speculative-decoding draft)", "-", "text", refused=DRAFT),
    "gemma4_unified_assistant": Family("Gemma 4 unified assistant (draft)", "-", "text", refused=DRAFT),
    "diffusion_gemma": Family("DiffusionGemma", "-", "text", refused=(
        "a text-diffusion model: it does not generate left to right, which SFT, DPO, ORPO and GRPO train")),
    "t5gemma": Family("T5Gemma", "-", "text", refused=ENCODER_DECODER),
    "t5gemma2": Family("T5Gemma 2", "-", "text, images", refused=ENCODER_DECODER),
    "paligemma": Family("PaliGemma", "-", "text, images", refused=(
        "PaliGemma's prefix-LM format differs from Gemma's chat turns that this job trains")),
    "recurrent_gemma": Family("RecurrentGemma", "-", "text", refused=(
        "its Griffin recurrent layers are not trained or exported by this job")),
    "shieldgemma2": Family("ShieldGemma 2", "-", "text, images", refused=(
        "an image-safety classifier, not a generative model to fine-tune")),
}
# What a decoder the job trains is saved as; any other architecture (EmbeddingGemma's Gemma3TextModel, a
# sequence classifier) has no language-model head to train.
GENERATIVE = ("ForCausalLM", "ForConditionalGeneration")


def family_of(config, model_id: str) -> Family:
    """The base's family from its config, or a PermanentError naming base_model_id and what to choose: a model
    type the job does not know, one it cannot fine-tune, an embedding model, Gemma 3n."""
    family = FAMILIES.get(config.model_type)
    where = f"training_config.base_model_id: {model_id!r}"
    if family is None:
        raise PermanentError(f"{where} is a '{config.model_type}' model, not a Gemma this job knows "
                             f"({', '.join(k for k, f in FAMILIES.items() if not f.refused)}); {TEXT_INSTEAD}.")
    if family.refused:
        raise PermanentError(f"{where} is {family.name}: {family.refused}. This job cannot fine-tune it; "
                             f"{TEXT_INSTEAD}.")
    architectures = getattr(config, "architectures", None) or []
    if architectures and not any(a.endswith(GENERATIVE) for a in architectures):
        raise PermanentError(f"{where} is saved as {architectures[0]} (an embedding or classification model, "
                             f"e.g. EmbeddingGemma), which has no language-model head to fine-tune; {TEXT_INSTEAD}.")
    return family


def check_base_model(model_id: str, token: str | None, trust_remote_code: bool, images: bool,
                     provider: str = "huggingface", merged_q4: bool = False, gguf: bool = False,
                     vision_layers: bool = False) -> Family:
    """Refuse, from the config alone (before any weight is downloaded), a base this job cannot train (family_of),
    and, for images, a text-only Gemma (Gemma 3 270M and 1B), one whose image path the job has not shown (Gemma 4
    12B's linear embedder), Gemma 3n where timm, which builds its image tower, or Gemma 4 where torchvision, which
    its processor needs, cannot be imported, or Gemma 4's or Gemma 3n's images in a GGUF, or LoRA on Gemma 3n's
    convolutional tower (`vision_layers`); Gemma 3n with Unsloth."""
    config = base_config(model_id, token, trust_remote_code)
    family = family_of(config, model_id)
    if config.model_type == "gemma3n" and provider == "unsloth":
        raise PermanentError(gemma_3n_refused(model_id))
    if config.model_type == "gemma3n" and (images or merged_q4):  # both load the whole model, its image tower too
        need_timm(model_id, "training_config.modality: 'vision'" if images else "export_config.merged_dtype: 'q4'")
    if not images:
        return family
    if getattr(config, "vision_config", None) is None:
        raise PermanentError(f"training_config.base_model_id: {model_id!r} is a text-only model "
                             f"({config.model_type}), and modality 'vision' sends it images; use an image+text "
                             "Gemma (Gemma 3 4B, 12B or 27B, e.g. google/gemma-3-4b-it), or modality 'text' "
                             "with a text dataset.")
    if config.model_type == "gemma4_unified":
        raise PermanentError(f"training_config.modality: 'vision' with {model_id!r} (Gemma 4 12B, gemma4_unified): "
                             "its linear image embedder has not been shown with this job; train it on text (modality "
                             "'text'), or images on another Gemma 4 (e.g. google/gemma-4-E4B-it) or a Gemma 3.")
    if config.model_type.startswith("gemma4"):
        try:
            import torchvision  # noqa: F401  (Gemma 4's processor builds its video processor, which needs it)
        except Exception as e:  # noqa: BLE001 - a torchvision built for another torch fails with RuntimeError
            raise PermanentError(f"training_config.modality: 'vision' with {model_id!r} (Gemma 4): its processor needs "
                                 f"torchvision, which cannot be imported here ({type(e).__name__}: {str(e)[:120]}); "
                                 "install the torchvision that requirements.txt pins (the job's image has it), or "
                                 "train Gemma 4 on text (modality 'text').") from None
    if vision_layers and config.model_type == "gemma3n":
        raise PermanentError(f"hyperparameters.finetune_vision_layers with {model_id!r} (Gemma 3n): its image tower "
                             "(MobileNetV5) is convolutional, and this job's LoRA adapts the linear layers of Gemma 3's "
                             "and Gemma 4's transformer towers; set finetune_vision_layers false (the language model "
                             "learns to read the tower's pictures), or choose Gemma 4 or Gemma 3 to adapt the tower.")
    if gguf and config.model_type == "gemma3n":
        raise PermanentError(f"export_config.include_gguf: a GGUF of {model_id!r} (Gemma 3n) trained on images: the "
                             "pinned llama.cpp's converter cannot write Gemma 3n's projector file (mmproj): it has no "
                             "name for the audio tower's subsampling norms (audio_tower.subsample_conv_projection."
                             "conv_0.norm), so the GGUF could not see pictures; export 'adapter' or 'merged', or train "
                             "Gemma 3n on text, or Gemma 4 or Gemma 3 on images, for a GGUF.")
    return family


def need_timm(model_id: str, why: str) -> None:
    """Gemma 3n's whole model builds its MobileNetV5 image tower through timm: a PermanentError naming the field and
    the library where timm cannot be imported (the job's image has it)."""
    try:
        import timm  # noqa: F401
    except Exception as e:  # noqa: BLE001 - timm built against another torchvision fails with RuntimeError
        raise PermanentError(f"{why} with {model_id!r} (Gemma 3n): its image tower is built by timm, "
                             f"which cannot be imported here ({type(e).__name__}: {str(e)[:120]}); install the timm "
                             "that requirements.txt pins (the job's image has it), or train Gemma 3n on text "
                             "(modality 'text', merged_dtype 'bf16').") from None
