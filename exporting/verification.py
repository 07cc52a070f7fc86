"""Each exported artifact loaded by the program that will serve it, and compared with the trained model
before the job calls itself completed: PEFT for the adapter, transformers for merged weights, llama.cpp
for GGUF.

The reference is the trained model's greedy continuation of a few evaluation prompts. The artifact reads
the same tokens (teacher forcing) and predicts each continuation token; its agreement is the share of
those predictions equal to the trained model's. Comparing on the model's own continuation keeps the
test where training made it confident, not on prompt tokens whose predictions are near ties that any
rounding flips. Even there a position can be a near tie: the trained model's top two logits closer than
NEAR_TIE, where another CPU's kernels (or the export's rounding) may pick the other token. Agreement is
counted on the decided positions only; the near ties are reported beside it, with how many flipped, and
never fail a job.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from runtime.errors import CheckFailed, PermanentError
from runtime.libraries import cpu_threads

logger = logging.getLogger(__name__)

# Least agreement each form explains. 16-bit forms and q8_0 only round (a near tie may flip, above all
# against a model trained in fp32 on a CPU); 4- and 5-bit forms flip more; q2_k is lossy by design. A broken
# export (wrong weights, tokenizer or template) agrees on almost nothing, far below any of these.
REQUIRED = {"adapter": 0.95, "bf16": 0.95, "fp16": 0.95, "f16": 0.95, "q8_0": 0.95,
            "q5_k_m": 0.85, "q4_k_m": 0.8, "q4": 0.8, "q2_k": 0.5}
MAX_NEW_TOKENS = 32
# A position whose trained model's top-1 logit leads the runner-up by less than this is a near tie: its argmax is
# a coin that rounding tosses (0.25: a 1.28x probability ratio). Every flip seen here was under it: fp32 training
# against its bf16, q8_0 and q2_k exports, and the export tests run on other kernels (ATen's default capability,
# MKL's compatible path, oneDNN at SSE4.1), which flipped no decided position.
NEAR_TIE = 0.25

Predict = Callable[[list[int], int], list[int]]  # (a reference sequence, its index) -> the argmax next token at
# every position; the index finds the sequence's pictures in the Reference


@dataclass
class Pictures:
    """Pictures as an image+text model reads them: the image processor's tensors (pixel_values; Gemma 4's also
    image_position_ids) and the key under which the model takes the image tokens' marks (Gemma 3:
    token_type_ids; Gemma 4: mm_token_type_ids)."""
    tensors: dict[str, Any]
    type_key: str = "token_type_ids"

    def inputs(self, ids, image_token_id: int | None, dtype=None) -> dict[str, Any]:
        """What the model reads beside `ids`: the tensors on their device (floats in `dtype`, where given) and the
        image tokens marked."""
        out = {k: v.to(ids.device, dtype) if dtype is not None and v.is_floating_point() else v.to(ids.device)
               for k, v in self.tensors.items()}
        return out | {self.type_key: (ids == image_token_id).long()}


@dataclass
class Reference:
    sequences: list[list[int]]  # prompt + the trained model's greedy continuation
    starts: list[int]  # where each continuation begins
    pixels: list[Any] | None = None  # image+text: each prompt's Pictures (or None)
    image_token_id: int | None = None
    image_files: list[list[bytes]] | None = None  # and as encoded pictures, for llama.cpp's own preprocessing
    margins: list[list[float]] | None = None  # the trained model's top-1 minus top-2 logit at each position
    # tokens the reference never generates (suppress_tokens: image tokens, unreadable_tokens), left out of every
    # model's choice where artifacts are compared with it
    never: list[int] = field(default_factory=list)

    def decided(self, i: int, position: int) -> bool:
        """Whether the trained model's prediction of sequence i's token at `position` is no near tie."""
        return self.margins is None or self.margins[i][position - 1] >= NEAR_TIE

    def images(self, i: int):
        return self.pixels[i] if self.pixels else None

    @property
    def tokens(self) -> int:
        return sum(len(s) - start for s, start in zip(self.sequences, self.starts))


def probe_prompts(prep, n: int = 16, longest: int = 256) -> list[list[int]]:
    """Token ids of up to n evaluation prompts (training rows without an eval split): for SFT rows the
    tokens before the first trained one (the first half of a row trained throughout), for RL rows the
    rendered prompt."""
    rows, tok = (prep.eval or prep.train).rows[:n], prep.tokenizer
    if rows and "input_ids" in rows[0]:
        def cut(row) -> int:
            first = next((i for i, x in enumerate(row["labels"]) if x != -100), len(row["labels"]))
            return first if first > 0 else max(1, len(row["input_ids"]) // 2)
        prompts = [r["input_ids"][:cut(r)] for r in rows]
    else:
        prompts = [tok(tok.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True),
                       add_special_tokens=False)["input_ids"] for r in rows]
    return [p[-longest:] for p in prompts]


def stop_ids(model, tokenizer) -> set[int]:
    """The tokens that end a reply: the generation config's (Gemma: <eos> and <end_of_turn>) and the tokenizer's."""
    eos = model.generation_config.eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    return set(eos) | {tokenizer.eos_token_id}


def pad_id(tokenizer) -> int:
    """The id left padding uses: the tokenizer's pad token (Gemma: <pad>, 0), else its end of sequence."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def greedy_reference(model, prompts: list[list[int]], stops: set[int], pad: int,
                     max_new_tokens: int = MAX_NEW_TOKENS, batch_size: int = 16, images: list[Any] | None = None,
                     image_token_id: int | None = None, image_files: list[list[bytes]] | None = None) -> Reference:
    """Greedy decoding of all prompts at once with the KV cache (`generate`): left padding with its
    attention mask, which transformers turns into each layer's mask (Gemma 3's sliding-window layers
    included); a row that reaches a stop token ends there. On a 12B model this is one prefill and up to
    max_new_tokens cached steps per batch, where one full forward pass per token per prompt was minutes.
    tests/test_export.py checks it against `greedy_reference_unbatched` token for token."""
    from transformers import GenerationConfig

    from models.language_model import unreadable_tokens

    model.eval()
    device = next(model.parameters()).device
    config = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=sorted(stops),
                              pad_token_id=pad, use_cache=True,
                              **({"suppress_tokens": never} if (never := unreadable_tokens(model.config)) else {}))
    if images is not None:
        return _generate_with_images(model, prompts, stops, config, device, images, image_token_id, image_files)
    try:
        sequences = _generate_batches(model, prompts, stops, pad, batch_size, config, device)
    except Exception as e:  # noqa: BLE001 - a provider's patched generate (Unsloth's, not yet run on a GPU here)
        logger.warning("batched reference failed (%s: %s): one prompt at a time instead", type(e).__name__, e)
        return greedy_reference_unbatched(model, prompts, stops, max_new_tokens, config.suppress_tokens)
    return with_margins(model, Reference(sequences, [len(p) for p in prompts], never=config.suppress_tokens or []))


def with_margins(model, ref: Reference) -> Reference:
    """The reference with the trained model's top-1 margin at every position (one teacher-forced pass per
    sequence, as the artifacts are read), which tells its decided positions from its near ties."""
    import torch

    device = next(model.parameters()).device
    ref.margins = []
    with torch.no_grad():
        for i, seq in enumerate(ref.sequences):
            ids = torch.tensor([seq], device=device)
            extra = image_inputs(ids, ref.images(i), ref.image_token_id, model.dtype)
            logits = allowed(model(input_ids=ids, use_cache=False, **extra).logits[0].float(), ref.never)
            top = logits.topk(2, dim=-1).values
            ref.margins.append((top[:, 0] - top[:, 1]).tolist())
    return ref


def _generate_batches(model, prompts, stops, pad, batch_size, config, device) -> list[list[int]]:
    import torch

    sequences = []
    with torch.no_grad():
        for first in range(0, len(prompts), batch_size):
            batch = prompts[first:first + batch_size]
            width = max(len(p) for p in batch)
            ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in batch], device=device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device)
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
            for prompt, row in zip(batch, out[:, width:].tolist()):
                new = []
                for token in row:  # finished rows are filled with the pad id after their stop token
                    new.append(token)
                    if token in stops:
                        break
                sequences.append(list(prompt) + new)
    return sequences


def image_inputs(ids, pixels: Pictures | None, image_token_id: int | None, dtype=None) -> dict[str, Any]:
    """What an image+text model reads beside the ids (Pictures.inputs); nothing for a prompt without pictures."""
    return {} if pixels is None else pixels.inputs(ids, image_token_id, dtype)


def _generate_with_images(model, prompts, stops, config, device, images, image_token_id, image_files) -> Reference:
    """Image+text prompts one at a time (their images differ in number), with the KV cache. The image token is never
    generated: one in a continuation would ask the forward pass for a picture that is not there ("Image features
    and image tokens do not match", seen after DPO on the tiny Gemma 4)."""
    import copy

    import torch

    config = copy.deepcopy(config)
    config.suppress_tokens = [image_token_id, *(config.suppress_tokens or ())]
    sequences = []
    with torch.no_grad():
        for prompt, pixels in zip(prompts, images):
            ids = torch.tensor([list(prompt)], device=device)
            extra = image_inputs(ids, pixels, image_token_id, model.dtype)
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config,
                                 **extra)
            new = []
            for token in out[0, len(prompt):].tolist():
                new.append(token)
                if token in stops:
                    break
            sequences.append(list(prompt) + new)
    return with_margins(model, Reference(sequences, [len(p) for p in prompts], list(images), image_token_id,
                                         image_files, never=config.suppress_tokens))


def greedy_reference_unbatched(model, prompts: list[list[int]], stops: set[int],
                               max_new_tokens: int = MAX_NEW_TOKENS, never: list[int] | None = None) -> Reference:
    """The reference by definition: one full forward pass per new token per prompt, no cache, no padding.
    Kept as the yardstick the batched one is tested against. `never`: tokens not generated (as suppress_tokens)."""
    import torch

    model.eval()
    device = next(model.parameters()).device
    sequences = []
    with torch.no_grad():
        for prompt in prompts:
            ids = list(prompt)
            for _ in range(max_new_tokens):
                logits = model(input_ids=torch.tensor([ids], device=device), use_cache=False).logits[0, -1]
                ids.append(int(allowed(logits, never).argmax()))
                if ids[-1] in stops:
                    break
            sequences.append(ids)
    return with_margins(model, Reference(sequences, [len(p) for p in prompts], never=list(never or [])))


@dataclass
class Agreement:
    """How an artifact's top-1 predictions compare with the trained model's continuation: on its decided
    positions, and on its near ties apart."""
    same: int = 0
    decided: int = 0
    near_ties: int = 0
    flipped_ties: int = 0

    @property
    def share(self) -> float:
        """Agreement on the decided positions; on all of them where a quarter or fewer are decided (a model
        that barely trained), so that a reference of near ties cannot pass an export on almost nothing."""
        total = self.decided + self.near_ties
        if self.decided * 4 > total:
            return round(self.same / self.decided, 4)
        return round((self.same + self.near_ties - self.flipped_ties) / total, 4) if total else 1.0


def allowed(logits, never):
    """Logits (the last axis the vocabulary; a torch tensor or a numpy array, changed in place) with the tokens in
    `never` made impossible."""
    if never:
        logits[..., list(never)] = float("-inf")
    return logits


def agreement(ref: Reference, predict: Predict) -> Agreement:
    found = Agreement()
    for k, (seq, start) in enumerate(zip(ref.sequences, ref.starts)):
        predicted = predict(seq, k)
        for i in range(start, len(seq)):
            if ref.decided(k, i):
                found.decided += 1
                found.same += predicted[i - 1] == seq[i]
            else:
                found.near_ties += 1
                found.flipped_ties += predicted[i - 1] != seq[i]
    return found


def transformers_predict(model, ref: Reference) -> Predict:
    import torch

    model.eval()
    device = next(model.parameters()).device

    def predict(ids: list[int], i: int) -> list[int]:
        with torch.no_grad():
            tensor = torch.tensor([ids], device=device)
            extra = image_inputs(tensor, ref.images(i), ref.image_token_id, model.dtype)
            logits = model(input_ids=tensor, use_cache=False, **extra).logits[0]
            return allowed(logits, ref.never).argmax(-1).tolist()

    return predict


def llama_predict(llm, never: list[int] | None = None) -> Predict:
    import numpy as np

    def predict(ids: list[int], i: int) -> list[int]:  # token ids only: prompts with pictures go to check_gguf_images
        llm.reset()
        llm.eval(ids)
        return np.argmax(allowed(llm.scores[:len(ids)].copy(), never), axis=-1).tolist()

    return predict


def load_llama(gguf: Path, n_ctx: int):
    import llama_cpp

    # logits_all: llama-cpp-python fills `scores` for every position only then
    return llama_cpp.Llama(model_path=str(gguf), n_ctx=n_ctx, logits_all=True, verbose=False,
                           n_threads=cpu_threads())


def check_gguf(ref: Reference, gguf: Path) -> Agreement:
    llm = load_llama(gguf, max(len(s) for s in ref.sequences) + 8)
    try:
        return agreement(ref, llama_predict(llm, ref.never))
    finally:
        llm.close()


def check_transformers(ref: Reference, load: Callable[[str], Any], weight_bytes: int) -> Agreement:
    """Agreement of a transformers/PEFT model built by load(device), on the GPU when it has room."""
    import gc

    import torch

    model = load(pick_device(weight_bytes))
    try:
        return agreement(ref, transformers_predict(model, ref))
    finally:
        del model
        if torch.cuda.is_available():  # the GPU memory back before the next check; on a CPU refcounts suffice
            gc.collect()
            torch.cuda.empty_cache()


def pick_device(weight_bytes: int) -> str:
    """The GPU when the weights fit beside what training left there (a 12B merge does not on an L4),
    else the CPU, which the merge itself already needed room on."""
    import torch

    if torch.cuda.is_available() and torch.cuda.mem_get_info()[0] > 1.2 * weight_bytes + 2**30:
        return "cuda"
    return "cpu"


def record(artifact: str, form: str, consumer: str, agreed: Agreement, ref: Reference, required: float) -> dict:
    """The verification entry for the manifest and the job document; a permanent error below `required` on the
    decided positions (a near tie never fails a job)."""
    found = agreed.share
    entry = {"consumer": consumer, "form": form, "top1_agreement": found, "tokens": agreed.decided,
             "prompts": len(ref.sequences), "required": required, "near_ties": agreed.near_ties,
             "near_ties_flipped": agreed.flipped_ties, "near_tie_margin": NEAR_TIE, "passed": found >= required}
    logger.info("verified %s (%s) in %s: top-1 agreement %.2f%% over %d decided tokens (at least %.0f%% required); "
                "%d near ties (margin < %.2f), %d flipped", artifact, form, consumer, 100 * found, agreed.decided,
                100 * required, agreed.near_ties, NEAR_TIE, agreed.flipped_ties)
    if found < required:
        raise CheckFailed(
            f"export_config: the exported {artifact} ({form}), loaded in {consumer}, predicts the trained model's "
            f"next token for only {found:.1%} of {agreed.decided} decided tokens on {len(ref.sequences)} evaluation "
            f"prompts (at least {required:.0%} expected for {form}); it was not uploaded. "
            + ("Choose a larger gguf_quantization (q8_0 or f16)." if form in ("q5_k_m", "q4_k_m", "q2_k") else
               "Choose merged_dtype 'bf16'." if form in ("q4", "fp16") else
               "A 16-bit or 8-bit form should not disagree: report this with the job id."), entry)
    return entry


# ---- each artifact in the program that will load it -------------------------------------------------
def required(form: str, method: str) -> float:
    """The least agreement an artifact of this form must reach."""
    # QLoRA trained on a 4-bit base; its merge is into the 16-bit base, which rounds differently
    return min(REQUIRED[form], REQUIRED["q4"]) if method == "QLoRA" else REQUIRED[form]


def auto_class(vision: bool, path: str | Path | None = None, token: str | None = None):
    """The transformers class an artifact loads with: the image+text one for image+text jobs, as the
    platform's inference service loads them; for a text job on a base whose language model trains alone
    (models/language_model.py: Gemma 3n, read from `path`'s config), its text-only class."""
    import transformers

    if vision:
        return transformers.AutoModelForImageTextToText
    if path is not None:
        from models.base_models import base_config
        from models.language_model import causal_class

        return causal_class(base_config(str(path), token, False))
    return transformers.AutoModelForCausalLM


def verify_adapter(folder: Path, ref: Reference, trained, base_model_id: str, base_kwargs: dict[str, Any],
                   vision: bool = False) -> dict:
    """The adapter in PEFT, on the base loaded as it was for training (base_kwargs)."""
    def load(device: str):
        from peft import PeftModel

        base = auto_class(vision, base_model_id, base_kwargs.get("token")).from_pretrained(
            base_model_id, device_map=device, **base_kwargs)
        return PeftModel.from_pretrained(base, str(folder))

    size = sum(p.numel() * p.element_size() for p in trained.parameters())
    found = check_transformers(ref, load, size)
    return record("adapter", "adapter", "PEFT", found, ref, REQUIRED["adapter"])


def verify_merged(folder: Path, ref: Reference, form: str, method: str, vision: bool = False) -> dict:
    """The merged model in transformers, as saved (form: the request's merged_dtype)."""
    from models.artifacts import weight_bytes

    if form == "q4" and not vision:
        # Gemma 3n's 4-bit checkpoint is the whole model's, and reads only as that: its text class takes the packed
        # 4-bit tensors' shapes for the weights' ("size mismatch")
        from models.base_models import base_config
        from models.language_model import trains_alone

        vision = trains_alone(base_config(str(folder), None, False))

    def load(device: str):
        return auto_class(vision, folder).from_pretrained(str(folder), device_map=device)

    found = check_transformers(ref, load, weight_bytes(folder))
    return record("merged model", form, "transformers", found, ref, required(form, method))


def verify_gguf(gguf: Path, ref: Reference, form: str, method: str, mmproj: Path | None = None,
                budget: dict[str, int] | None = None) -> dict:
    """The GGUF file in llama.cpp (form: its quantization); an image+text model's with its mmproj file, the
    prompts' pictures read by llama.cpp's own multimodal library (mtmd) from their encoded bytes (budget: a
    Gemma 4 processor's, picture_budget)."""
    if mmproj is None:
        return record("gguf", form, "llama.cpp", in_child(check_gguf, ref, gguf), ref, required(form, method))
    entry = record("gguf", form, "llama.cpp + mtmd (mmproj)", in_child(check_gguf_images, ref, gguf, mmproj, budget),
                   ref, required(form, method))
    return entry | {"mmproj": mmproj.name, "images": sum(map(len, ref.image_files or []))} | \
        ({"image_max_tokens": budget["max_soft_tokens"]} if budget else {})


def in_child(check: Callable[..., Agreement], ref: Reference, gguf: Path, *args) -> Agreement:
    """A llama.cpp check in a process of its own (spawned: nothing of this one's threads or locks): llama.cpp
    aborts the whole process on a file it cannot use (GGML_ASSERT), and that costs this artifact's check, not the
    job and its training (a CheckFailed, which exporting/export.py records for this artifact alone)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        try:
            return pool.submit(check, ref, gguf, *args).result()
        except BrokenProcessPool:
            raise CheckFailed(f"export_config: llama.cpp stopped its process while reading the exported "
                              f"{gguf.name}{' with ' + Path(args[0]).name if args else ''} (an abort: a file it "
                              "cannot use; the log holds its message); the GGUF was not uploaded, the other "
                              "artifacts are kept.") from None


def picture_budget(folder: Path) -> dict[str, int] | None:
    """A saved Gemma 4 processor's picture budget: its image processor scales each picture, keeping its shape,
    to the most patches that fit max_soft_tokens after pooling (patch_size, pooling_kernel_size); None for the
    processors with a fixed count (Gemma 3's 256 tokens, Gemma 3n's)."""
    import json

    path = folder / "processor_config.json"
    found = (json.loads(path.read_text()).get("image_processor") or {}) if path.is_file() else {}
    keys = ("max_soft_tokens", "patch_size", "pooling_kernel_size")
    return {k: int(found[k]) for k in keys} if all(k in found for k in keys) else None


def fit_picture(data: bytes, budget: dict[str, int]) -> bytes:
    """The picture at the size Gemma 4's processor gives it (transformers' own sizing), as PNG. llama.cpp's mtmd
    sizes a picture otherwise: to between 70 and 1120 tokens, rounding a small picture's sides up where
    transformers rounds them down (its --image-min-tokens/--image-max-tokens move the bounds, not the
    rounding). Given the picture at transformers' size and the budget as its most tokens, it reads the same
    patches, so the check measures the weights and the projector rather than two resizing rules."""
    import io

    from PIL import Image
    from transformers.models.gemma4.image_processing_gemma4 import get_aspect_ratio_preserving_size

    picture = Image.open(io.BytesIO(data)).convert("RGB")
    pool = budget["pooling_kernel_size"]
    height, width = get_aspect_ratio_preserving_size(picture.height, picture.width, budget["patch_size"],
                                                     budget["max_soft_tokens"] * pool ** 2, pool)
    out = io.BytesIO()
    picture.resize((width, height), Image.Resampling.BICUBIC).save(out, "PNG")
    return out.getvalue()


def check_gguf_images(ref: Reference, gguf: Path, mmproj: Path, budget: dict[str, int] | None = None) -> Agreement:
    """Agreement of the language-model GGUF fed, in place of each run of image tokens, the embeddings that
    llama.cpp's mtmd makes from the picture with the mmproj file: the prompt's own tokens around them, so
    that positions line up with the trained model's."""
    import ctypes

    import llama_cpp
    import llama_cpp.mtmd_cpp as mtmd
    import numpy as np

    llm = load_llama(gguf, max(len(s) for s in ref.sequences) + 8)
    params = mtmd.mtmd_context_params_default()
    params.use_gpu, params.print_timings, params.n_threads = False, False, cpu_threads()
    if budget:  # no scaling of its own: each picture comes at transformers' size (fit_picture)
        params.image_min_tokens, params.image_max_tokens = 1, budget["max_soft_tokens"]
    ctx = mtmd.mtmd_init_from_file(str(mmproj).encode(), llm._model.model, params)
    if not ctx:
        llm.close()
        raise PermanentError(f"export_config: llama.cpp's mtmd cannot load the exported {mmproj.name}")
    marker = mtmd.mtmd_default_marker()

    def image_chunk(data: bytes, chunks):
        bitmap = mtmd.mtmd_helper_bitmap_init_from_buf(ctx, (ctypes.c_uint8 * len(data)).from_buffer_copy(data),
                                                       len(data), False)
        text = mtmd.mtmd_input_text()
        text.text, text.text_len, text.add_special, text.parse_special = marker, len(marker), False, True
        if mtmd.mtmd_tokenize(ctx, chunks, ctypes.byref(text), (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap), 1) != 0:
            raise RuntimeError("mtmd could not read an image")
        mtmd.mtmd_bitmap_free(bitmap)
        found = [mtmd.mtmd_input_chunks_get(chunks, i) for i in range(mtmd.mtmd_input_chunks_size(chunks))]
        return next(c for c in found if mtmd.mtmd_input_chunk_get_type(c) == mtmd.MTMD_INPUT_CHUNK_TYPE_IMAGE)

    def predict(ids: list[int], k: int) -> list[int]:
        llm.reset()
        llm._ctx.kv_cache_clear()
        pending, files = [], list(ref.image_files[k])
        i = 0
        while i < len(ids):
            if ids[i] != ref.image_token_id:
                pending.append(ids[i])
                i += 1
                continue
            if pending:
                llm.eval(pending)
                pending = []
            chunks = mtmd.mtmd_input_chunks_init()
            try:
                picture = files.pop(0)
                chunk = image_chunk(fit_picture(picture, budget) if budget else picture, chunks)
                n = mtmd.mtmd_input_chunk_get_n_tokens(chunk)
                past = llama_cpp.llama_pos(0)
                if mtmd.mtmd_helper_eval_chunk_single(ctx, llm._ctx.ctx, chunk, llama_cpp.llama_pos(llm.n_tokens),
                                                      llama_cpp.llama_seq_id(0), llm.n_batch, False,
                                                      ctypes.byref(past)) != 0:
                    raise RuntimeError("mtmd could not evaluate an image")
            finally:
                mtmd.mtmd_input_chunks_free(chunks)
            llm.input_ids[llm.n_tokens:past.value] = ids[i:i + n]
            llm.n_tokens, i = past.value, i + n
        llm.eval(pending)
        return np.argmax(allowed(llm.scores[:len(ids)].copy(), ref.never), axis=-1).tolist()

    try:
        return agreement(ref, predict)
    finally:
        mtmd.mtmd_free(ctx)
        llm.close()
