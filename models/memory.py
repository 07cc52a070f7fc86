"""Will the training fit on the GPU? A pre-flight estimate from the model's config, so that a request
that cannot fit is refused in seconds (exit 2) instead of failing with CUDA out-of-memory after the
download and the load.

    bytes = weights + gradients + optimizer state (per method) + activations + CUDA overhead

- Full: bf16 weights (2 B/param) + bf16 gradients (2) + 8-bit AdamW state (2): 6 B/param.
- LoRA: the frozen base in bf16 (2 B/param); the adapter (about 1 % of the base) is negligible; the
  modules of modules_to_save, trained whole, 16 B/param more (Gemma's embeddings are a large share).
- QLoRA: NF4 with double quantization (about 0.52 B/param) for the decoder's linear layers; the
  embeddings stay in bf16 (Gemma's 262k-token vocabulary makes them a large share).
- Activations, with gradient checkpointing: each layer's input kept (batch x length x hidden x 2 B
  per layer), one layer recomputed at a time, and the logits (batch x length x vocab x 2 B).

The container's memory is checked too where its disk is memory (Cloud Run): the base's files in the
Hugging Face cache (2 B/param, for the whole job), the merge (the 16-bit base in RAM and the merged
files), the GGUF (the f16 conversion before a k-quant, and the quantized file), Full's local
checkpoints (bf16 weights and 8-bit AdamW state, `save_total_limit` of them), and the process itself.

Run `python -m models.memory` for the tables of Gemma 3 sizes on an L4 that docs/request.md and docs/operating.md show.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from typing import Any

from models.base_models import base_config
from runtime.errors import PermanentError
from schema import GGUF_DIRECT

logger = logging.getLogger(__name__)

GIB = 1024 ** 3
OVERHEAD = 1.5 * GIB  # CUDA context, cuBLAS workspaces, allocator fragmentation
HEADROOM = 0.95


@functools.lru_cache(maxsize=2)
def meta_model(model_id: str, token: str | None, trust_remote_code: bool, images: bool = False):
    """The model as its config describes it, on the meta device: its modules and shapes, no weights. Built
    once per job: pre-flight's module check and the memory estimate both read it."""
    return empty_model(base_config(model_id, token, trust_remote_code), trust_remote_code, images)


def empty_model(config, trust_remote_code: bool = False, images: bool = False):
    """The model a job trains: for Gemma 3n's text its language model alone (models/language_model.py), for its
    images the whole model."""
    import torch
    import transformers

    from models.language_model import causal_class, language_config

    cls = transformers.AutoModelForImageTextToText if images else causal_class(config)
    with torch.device("meta"):
        if hasattr(cls, "from_config"):  # the Auto class
            return cls.from_config(config, trust_remote_code=trust_remote_code)
        return cls._from_config(language_config(config))


def count_params(config, model=None) -> tuple[int, int]:
    """(all parameters, embedding parameters) of the model a config describes, built on the meta device."""
    model = empty_model(config) if model is None else model
    total = sum(p.numel() for p in model.parameters())
    return total, model.get_input_embeddings().weight.numel()


def sixteen_bit_params(model) -> int:
    """Parameters bitsandbytes leaves in 16 bits when it loads the model in 4 or 8: all but the weights of its
    linear layers, the output layer's excepted. The embeddings, and on Gemma 4 the per-layer embedding table
    and the MoE experts (3-D parameters, not linear layers) with them. (An image+text job's tower, which it is
    told to skip, is counted by vision_bytes.)"""
    import torch

    linear = {id(m.weight): m.weight.numel() for n, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) and not n.startswith("lm_head")}
    embeddings = model.get_input_embeddings().weight
    linear.pop(id(embeddings), None)  # a tied output layer is the embedding itself
    return sum(p.numel() for p in model.parameters()) - sum(linear.values())


def text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def saved_params(model, names: list[str] | None) -> int:
    """Parameters of the modules modules_to_save names (matched as PEFT matches them: the end of a name)."""
    params = {id(p): p.numel() for n, m in model.named_modules() if n and any(n.endswith(t) for t in names or ())
              for p in m.parameters()}
    return sum(params.values())


def nf4_bytes(total: int, embeddings: int) -> float:
    """The weights in 4 bits as bitsandbytes keeps and saves them: NF4 with double quantization for the
    linear layers (about 0.52 B/param: 0.545 measured on the tiny model, whose norms weigh more), the
    rest in bf16 (`embeddings`: the parameters that stay in 16 bits, sixteen_bit_params)."""
    return 2.0 * embeddings + 0.52 * (total - embeddings)


def int8_bytes(total: int, embeddings: int) -> float:
    """The weights with bitsandbytes' LLM.int8 linear layers: 1 B/param and a scale per row, the embeddings
    in 16 bits."""
    return 2.0 * embeddings + 1.0 * (total - embeddings)


GEMMA4_IMAGE_TOKENS = 280  # Gemma4ImageProcessor's max_soft_tokens by default
# Gemma 3n's MobileNetV5 tower per 768 x 768 picture in bf16 (benchmarks/gemma3n_tower_memory.py, results in
# benchmarks/results/gemma3n_tower_memory.json): the activations kept for the backward pass when it trains (Full),
# and the most its forward pass holds at once when it does not.
GEMMA3N_TOWER_TRAINS = 3_704_877_062
GEMMA3N_TOWER_FROZEN = 113_246_208


def vision_bytes(config, images: int, tower: int, method: str, tower_trains: bool) -> float:
    """An image+text job's extra memory (training/vision.py): the processor's fp32 pixel tensors of a batch's `images`,
    the SigLIP tower's activations (every layer's kept when the tower trains, about two layers' otherwise),
    and, with QLoRA, the tower kept in 16 bits rather than 4 (artifacts.VISION_16BIT). Each image's tokens
    in the language model (256 for Gemma 3, up to 280 for Gemma 4) are inside max_length, which the activations
    count already. Gemma 4's tower reads a picture as up to its processor's budget of patches (280 tokens at
    its default, each pooled from 3 x 3 patches of 16 x 16 pixels: 2,520 patches), padded to that budget. Gemma
    3n's convolutional tower: its measured activations per 768 x 768 picture (GEMMA3N_TOWER_*)."""
    vision = getattr(config, "vision_config", None)
    if vision is None or not images:
        return 0.0
    if getattr(vision, "model_type", None) == "gemma3n_vision":  # MobileNetV5 at 768 x 768, measured
        kept = GEMMA3N_TOWER_TRAINS if tower_trains else GEMMA3N_TOWER_FROZEN
        return images * (3 * 768 * 768 * 4 + kept) + ((2.0 - 0.52) * tower if method == "QLoRA" else 0.0)
    if getattr(vision, "image_size", None):  # Gemma 3: a fixed square
        patches = (vision.image_size // vision.patch_size) ** 2
    else:  # Gemma 4: the processor's default budget
        patches = GEMMA4_IMAGE_TOKENS * vision.pooling_kernel_size ** 2
    pixels = images * patches * 3 * vision.patch_size ** 2 * 4
    kept = vision.num_hidden_layers if tower_trains else 2
    activations = images * patches * (vision.hidden_size * 6 + vision.intermediate_size) * 2 * kept
    return pixels + activations + ((2.0 - 0.52) * tower if method == "QLoRA" else 0.0)


def estimate_bytes(total: int, embeddings: int, method: str, batch: int, length: int, config,
                   load_in_8bit: bool = False, saved: int = 0, vision: float = 0.0) -> dict[str, float]:
    """saved: parameters of modules_to_save, trained whole beside the adapter: a copy, its gradient and AdamW's
    two moments, in fp32 where the base is quantized (PEFT's k-bit preparation upcasts them), 16 B/param.
    vision: an image+text batch's extra bytes (vision_bytes)."""
    cfg = text_config(config)
    hidden, layers = cfg.hidden_size, cfg.num_hidden_layers
    inter, vocab = cfg.intermediate_size, cfg.vocab_size
    weights = {"Full": 6.0 * total, "LoRA": int8_bytes(total, embeddings) if load_in_8bit else 2.0 * total,
               "QLoRA": nf4_bytes(total, embeddings)}[method] + 16.0 * saved
    tokens = batch * length
    activations = tokens * (hidden * layers + 20 * hidden + 3 * inter) * 2 + tokens * vocab * 2 + vision
    return {"weights_and_optimizer": weights, "activations": activations, "overhead": OVERHEAD,
            "total": weights + activations + OVERHEAD}


def fit_message(estimate: dict[str, float], gpu_bytes: float, method: str, model_id: str, batch: int,
                length: int) -> str | None:
    """None if it fits; otherwise what to change."""
    if estimate["total"] <= HEADROOM * gpu_bytes:
        return None
    advice = {"Full": "use method 'LoRA' or 'QLoRA'", "LoRA": "use method 'QLoRA'",
              "QLoRA": "use a smaller model, or several GPUs (gemma-job submit --vertex --gpus N)"}[method]
    return (f"training_config.method: {method} on {model_id} needs about {estimate['total'] / GIB:.1f} GiB "
            f"(weights and optimizer {estimate['weights_and_optimizer'] / GIB:.1f}, activations for batch_size "
            f"{batch} x max_length {length} {estimate['activations'] / GIB:.1f}, overhead "
            f"{estimate['overhead'] / GIB:.1f}) but the GPU has {gpu_bytes / GIB:.1f} GiB; {advice}, or lower "
            "hyperparameters.batch_size / max_length.")


def gpu_bytes(settings) -> float | None:
    """The GPU memory a job is checked against: settings.gpu_memory_gib, else the visible GPU's, else None."""
    import torch

    return settings.gpu_memory_gib * GIB if settings.gpu_memory_gib else \
        torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else None


def choose_batch(cfg, settings, token: str | None, images_per_row: int = 0) -> dict[str, Any]:
    """batch_size / gradient_accumulation_steps 'auto': the largest micro-batch (a divisor of the effective batch,
    a multiple of the processes) whose estimate fits the GPU, and the accumulation that keeps the effective batch.
    A PermanentError where even one row per process does not fit, naming what would."""
    hp, world = cfg.hyperparameters, settings.world_size
    effective = hp.effective_batch
    sizes = [m for m in range(effective, 0, -1) if effective % m == 0 and m % world == 0]
    if not sizes:
        raise PermanentError(f"hyperparameters.effective_batch_size: {effective} examples per step cannot be split "
                             f"over {world} processes; make it a multiple of {world}.")
    gpu = gpu_bytes(settings)
    choice = {"effective_batch_size": effective, "gpu_gib": round(gpu / GIB, 1) if gpu else None}
    if gpu is None:
        return choice | {"batch_size": sizes[0], "gradient_accumulation_steps": 1,
                         "why": "no GPU here and no GPU_MEMORY_GIB: nothing to fit, the whole effective batch in "
                                "one step"}
    per_process = estimator(meta_model(cfg.base_model_id, token, cfg.trust_remote_code, cfg.vision), cfg,
                            images_per_row, world)

    def estimate(micro: int, length: int) -> dict[str, float]:
        return per_process(micro // world, length)

    for micro in sizes:
        found = estimate(micro, hp.max_length)
        if found["total"] <= HEADROOM * gpu:
            return choice | {"batch_size": micro, "gradient_accumulation_steps": effective // micro,
                             "estimate_gib": round(found["total"] / GIB, 1),
                             "why": f"the largest micro-batch dividing {effective} whose estimate fits "
                                    f"{HEADROOM:.0%} of the GPU" + ("" if micro == effective else
                                                                    f"; {sizes[sizes.index(micro) - 1]} did not")}
    low, high = 0, hp.max_length // 16  # the longest max_length (a multiple of 16) that fits one row per process
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if estimate(world, 16 * mid)["total"] <= HEADROOM * gpu else (low, mid - 1)
    shorter = f"max_length {16 * low} (of {hp.max_length}) would fit at one row per process" if low else \
        "no max_length fits at one row per process"
    advice = {"Full": "method 'LoRA' or 'QLoRA'", "LoRA": "method 'QLoRA'", "QLoRA": "a smaller model"}[cfg.method]
    raise PermanentError(
        f"hyperparameters.batch_size: 'auto' found no micro-batch that fits: even {world} row(s) of "
        f"{hp.max_length} tokens need about {estimate(world, hp.max_length)['total'] / GIB:.1f} GiB of the GPU's "
        f"{gpu / GIB:.1f} GiB with method {cfg.method}; {shorter}. Use {advice}, a shorter max_length, or more GPUs "
        "(gemma-job submit --vertex --gpus N); gradient checkpointing is already on for GPUs.")


def estimator(model, cfg, images_per_row: int, world: int):
    """(batch, length) -> one process's GPU bytes for `batch` rows of `length` tokens (sharded where Full runs on
    several processes), the model's counts taken once: the weights as they train (sixteen_bit_params: on Gemma 4 the
    MoE experts and per-layer embeddings stay in 16 bits under QLoRA), the tower's pictures, modules_to_save."""
    config, hp = model.config, cfg.hyperparameters
    total, _ = count_params(config, model)
    tower = sum(p.numel() for n, p in model.named_parameters() if "vision_tower" in n)
    unquantized, saved = sixteen_bit_params(model), saved_params(model, hp.modules_to_save)

    def estimate(batch: int, length: int) -> dict[str, float]:
        extra = vision_bytes(config, batch * images_per_row, tower, cfg.method,
                             cfg.method == "Full" or hp.finetune_vision_layers)
        found = estimate_bytes(total, unquantized, cfg.method, batch, length, config, hp.load_in_8bit, saved, extra)
        return sharded(found, world, cfg.method, total) if world > 1 and cfg.method == "Full" else found

    return estimate


def check_memory(cfg, settings, token: str | None, images_per_row: int = 0) -> bool:
    """Refuse (exit 2), before anything big is loaded, a job that cannot fit the GPU (one of
    `settings.gpu_memory_gib`, else the visible one) or the container's memory where its disk is memory
    (`settings.host_memory_gib`, else the container's limit on Cloud Run). A CPU machine given neither
    size checks nothing: system memory and disk are the limits there, and the tiny models fit.

    With several processes (settings.world_size) each takes its share of the batch. True if one GPU holds
    the whole model and its training state (DDP); False if only a sharded one fits (FSDP: weights, gradients
    and optimizer state split over the processes), which a LoRA job then uses; Full is always sharded."""
    gpu = gpu_bytes(settings)
    host = settings.host_memory_gib * GIB if settings.host_memory_gib else \
        container_limit() if settings.disk_is_memory else None
    if gpu is None and host is None:
        return True
    model = meta_model(cfg.base_model_id, token, cfg.trust_remote_code, cfg.vision)
    total, embeddings = count_params(model.config, model)
    tower = sum(p.numel() for n, p in model.named_parameters() if "vision_tower" in n)
    fits_one = True
    if gpu:
        hp, world = cfg.hyperparameters, settings.world_size
        batch = max(1, hp.batch_size // world)
        estimate = estimator(model, cfg, images_per_row, 1)(batch, hp.max_length)  # the whole model on each GPU
        fits_one = fit_message(estimate, gpu, cfg.method, cfg.base_model_id, batch, hp.max_length) is None
        if world > 1 and (cfg.method == "Full" or not fits_one):
            estimate = sharded(estimate, world, cfg.method, total)
        logger.info("GPU memory estimate %.1f GiB of %.1f GiB per process", estimate["total"] / GIB, gpu / GIB)
        message = fit_message(estimate, gpu, cfg.method, cfg.base_model_id, batch, hp.max_length)
        if message:
            raise PermanentError(message + (f" (with {world} processes, sharded)" if world > 1 else ""))
    if host:
        check_host(cfg, total, embeddings, host, cache_dropped=settings.disk_is_memory, tower=tower)
    return fits_one


def sharded(estimate: dict[str, float], world: int, method: str, total: int) -> dict[str, float]:
    """FSDP's share per process: weights, gradients and optimizer state split; activations not. Full under
    FSDP keeps AdamW's state in the weights' bf16 (8 bytes per parameter in all), where one GPU's 8-bit
    AdamW makes 6: it does not shard (distributed.trainer_args)."""
    weights = (estimate["weights_and_optimizer"] + (2.0 * total if method == "Full" else 0.0)) / world
    return {**estimate, "weights_and_optimizer": weights,
            "total": weights + estimate["activations"] + estimate["overhead"]}


# The process itself in host memory: Python, torch, CUDA's host-side libraries and context, the rows. The CPU
# demo peaks at 0.6 GiB resident (CPU torch, tiny model; /usr/bin/time -v, 2026-11-22); the CUDA libraries'
# share on an L4 is not measured yet, hence the margin.
PROCESS = 4 * GIB
GGUF_BYTES = {"f16": 2.0, "bf16": 2.0, "q8_0": 1.07, "q5_k_m": 0.72, "q4_k_m": 0.62, "q2_k": 0.42}  # per param


def host_bytes(total: int, embeddings: int, cfg, cache_dropped: bool = False, tower: int = 0) -> dict[str, float]:
    """Peak container memory of each stage where the disk is memory, and the largest ("total").
    cache_dropped: the base's cached files are deleted once merged (exporting/export.py does so on Cloud Run).
    tower: an image+text job's vision tower parameters, whose GGUF projector (mmproj, f16) sits beside the
    language model's GGUF."""
    ex, fmt = cfg.export_config, cfg.export_format
    cache = 2.0 * total
    after_merge = 0.0 if cache_dropped else cache
    stages = {"train": cache + (cfg.hyperparameters.save_total_limit * 4.0 * total if cfg.method == "Full" else 0)}
    if fmt == "merged" or ex.wants_gguf:
        # LoRA and QLoRA merge into the base reloaded in 16 bits on the CPU; Full saves from the GPU
        stages["merge"] = cache + 2.0 * total + (0 if cfg.method == "Full" else 2.0 * total)
    if ex.wants_gguf:
        k_quant = ex.gguf_quantization not in GGUF_DIRECT
        stages["gguf"] = after_merge + (2.0 * total if fmt == "merged" else 0) + (2.0 * total if k_quant else 0) + \
            GGUF_BYTES[ex.gguf_quantization] * total + (2.0 * tower if cfg.vision else 0)
    if fmt == "merged" and ex.merged_dtype == "q4":
        stages["quantize_4bit"] = after_merge + 2.0 * total + nf4_bytes(total, embeddings)
    stages = {k: v + PROCESS for k, v in stages.items()}
    return stages | {"total": max(stages.values())}


def container_limit() -> float:
    """This container's memory: its cgroup limit (v2, then v1), else the machine's (a Cloud Run instance
    is a sandbox or VM of the size the job asks for)."""
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            value = Path(path).read_text().strip()
        except OSError:
            continue
        if value != "max" and int(value) < 2 ** 60:
            return float(value)
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def check_host(cfg, total: int, embeddings: int, limit: float, cache_dropped: bool = False, tower: int = 0) -> None:
    """Refuse (exit 2) a job whose files and process cannot fit the container's memory: killed for it
    later, it could not even say why in its job document."""
    need = host_bytes(total, embeddings, cfg, cache_dropped, tower)
    logger.info("container memory estimate %.1f GiB of %.1f GiB", need["total"] / GIB, limit / GIB)
    if need["total"] <= HEADROOM * limit:
        return
    stage = max((k for k in need if k != "total"), key=need.get)
    advice = {"train": "lower hyperparameters.save_total_limit, or use method 'LoRA'",
              "merge": "export format 'adapter'",
              "gguf": "export format 'adapter' with include_gguf, or a smaller gguf_quantization",
              "quantize_4bit": "merged_dtype 'bf16'"}[stage]
    raise PermanentError(
        f"export_config: this job needs about {need['total'] / GIB:.1f} GiB of container memory at its {stage} "
        f"stage (the disk is memory here: the base's files, the {cfg.export_format} export, the process) but "
        f"the container has {limit / GIB:.1f} GiB; {advice}, or a smaller model.")


def gemma3_shapes():
    """(name, config, parameters, embedding parameters) of the Gemma 3 sizes, built from their published
    shapes. 4B and up are image+text models: their SigLIP vision tower (about 0.4B parameters) is loaded too."""
    from transformers import Gemma3Config, Gemma3TextConfig, SiglipVisionConfig

    shapes = {"gemma-3-270m": dict(hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
                                   num_attention_heads=4, num_key_value_heads=1, head_dim=256),
              "gemma-3-1b": dict(hidden_size=1152, intermediate_size=6912, num_hidden_layers=26,
                                 num_attention_heads=4, num_key_value_heads=1, head_dim=256),
              "gemma-3-4b": dict(hidden_size=2560, intermediate_size=10240, num_hidden_layers=34,
                                 num_attention_heads=8, num_key_value_heads=4, head_dim=256),
              "gemma-3-12b": dict(hidden_size=3840, intermediate_size=15360, num_hidden_layers=48,
                                  num_attention_heads=16, num_key_value_heads=8, head_dim=256)}
    for name, shape in shapes.items():
        config = Gemma3TextConfig(vocab_size=262144, **shape)
        if name not in ("gemma-3-270m", "gemma-3-1b"):
            config = Gemma3Config(text_config=config.to_dict(), vision_config=SiglipVisionConfig(
                hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                image_size=896, patch_size=14, vision_use_head=False).to_dict())
        yield (name, config, *count_params(config))


def table(gpu_gib: float = 22.0) -> list[dict[str, Any]]:
    """What fits on an L4 (22 GiB usable of 24 GB), batch 2 x 1024 tokens (the request's defaults)."""
    from schema import TrainRequest

    rows = []
    for name, config, total, emb in gemma3_shapes():
        row: dict[str, Any] = {"model": name, "params_b": round(total / 1e9, 2)}
        for method in ("Full", "LoRA", "QLoRA"):
            est = estimate_bytes(total, emb, method, 2, 1024, config)
            row[method] = f"{est['total'] / GIB:.1f} GiB {'fits' if est['total'] <= HEADROOM * gpu_gib * GIB else 'no'}"
        # Cloud Run's 32 GiB, its disk memory too: QLoRA, each export
        for export, fields in HOST_EXPORTS.items():
            cfg = TrainRequest.model_validate({"processed_dataset_id": "d", "training_config": {
                "base_model_id": name, "export_config": fields}}).training_config
            need = host_bytes(total, emb, cfg, cache_dropped=True)["total"]
            row[f"host {export}"] = f"{need / GIB:.1f} GiB {'fits' if need <= HEADROOM * 32 * GIB else 'no'}"
        rows.append(row)
    return rows


def multi_gpu_table() -> list[dict[str, Any]]:
    """Per GPU with several processes, batch 2 x 1024 tokens on each: DDP (the whole model on each GPU) for a
    LoRA or QLoRA that fits one, else FSDP (`sharded`). 22 GiB usable of an L4's 24, 74 of an 80 GB A100's
    or H100's."""
    from runtime.distributed import FSDP, strategy_for

    rows = []
    for name, config, total, emb in gemma3_shapes():
        for method in ("Full", "LoRA", "QLoRA"):
            out: dict[str, Any] = {"model": name, "method": method}
            whole = estimate_bytes(total, emb, method, 2, 1024, config)  # one GPU's share under DDP
            for gpus, gib, label in ((2, 22.0, "2 x L4"), (4, 22.0, "4 x L4"), (8, 22.0, "8 x L4"),
                                     (8, 74.0, "8 x 80 GB")):
                usable = HEADROOM * gib * GIB
                strategy = strategy_for(method, whole["total"] <= usable, gpu=True)
                need = sharded(whole, gpus, method, total)["total"] if strategy == FSDP else whole["total"]
                out[label] = f"{strategy} {need / GIB:.1f} GiB {'fits' if need <= usable else 'no'}"
            rows.append(out)
    return rows


HOST_EXPORTS = {"adapter": {}, "adapter+gguf q4_k_m": {"include_gguf": True, "gguf_quantization": "q4_k_m"},
                "merged": {"format": "merged"}}


if __name__ == "__main__":
    for r in table():
        print(r)
    for r in multi_gpu_table():
        print(r)
