"""The libraries a job trains with: torch, transformers, PEFT and TRL imported once the request is
known to be valid (timed apart), whether FlashAttention 2 can run here, and which TRL classes each
trainer type trains with. The request-to-TRL mapping itself is `BaseTrainingJob.trainer_kwargs`.
"""

from __future__ import annotations

from runtime.errors import PermanentError
from runtime.logs import route_transformers_logs


def import_libraries() -> None:
    """torch, transformers, PEFT and TRL, imported once the request is known to be valid (timed apart)."""
    import peft  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401
    import trl  # noqa: F401

    route_transformers_logs()


def cpu_threads() -> int:
    """Threads for the CPU work done outside torch (llama.cpp's quantiser and the GGUF verification): as many
    as torch trains with (OMP_NUM_THREADS where it is set, else one per core), so that a job told to keep to
    one thread does, and llama.cpp's spinning threads never outnumber the cores the job was given."""
    import torch

    return torch.get_num_threads()


def check_attention(use_fa2: bool) -> None:
    """use_fa2 is refused (exit 2) where FlashAttention 2 cannot run: no NVIDIA GPU, or no flash-attn."""
    if not use_fa2:
        return
    import importlib.util

    import torch

    if not torch.cuda.is_available():
        raise PermanentError("hyperparameters.use_fa2: FlashAttention 2 needs an NVIDIA GPU and none is visible; "
                             "set `use_fa2: false` (packing and padding_free keep rows apart without it: tests/test_packing.py).")
    if importlib.util.find_spec("flash_attn") is None:
        raise PermanentError("hyperparameters.use_fa2: the flash-attn package is not installed in this image; "
                             "set `use_fa2: false` (packing and padding_free keep rows apart without it: tests/test_packing.py).")


def trl_classes(trainer_type: str):
    """TRL's (config, trainer) for a trainer type; ORPO and CPO (SimPO's) live in trl.experimental in TRL 1.x."""
    if trainer_type == "sft":
        from trl import SFTConfig, SFTTrainer
        return SFTConfig, SFTTrainer
    if trainer_type == "dpo":
        from trl import DPOConfig, DPOTrainer
        return DPOConfig, DPOTrainer
    if trainer_type == "grpo":
        from trl import GRPOConfig, GRPOTrainer
        return GRPOConfig, GRPOTrainer
    if trainer_type == "simpo":
        from trl.experimental.cpo import CPOConfig, CPOTrainer
        return CPOConfig, CPOTrainer
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer
    return ORPOConfig, ORPOTrainer
