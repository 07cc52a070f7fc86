"""The export step, shared by both providers: each artifact the request asks for, made, loaded in the
program that will load it and compared with the trained model, then uploaded (DESIGN.md's layout).

    adapter   -> PEFT on the base, as trained
    merged    -> transformers (bf16, fp16, or NF4 4-bit quantized from the bf16 merge)
    gguf      -> llama.cpp: its own converter on the 16-bit merge, then its quantizer

- f16, bf16, q8_0: written by `convert_hf_to_gguf.py` directly.
- q4_k_m, q5_k_m, q2_k: f16 first, then `llama_model_quantize` (k-quants need rows that are
  multiples of 256; Gemma's hidden sizes are).
- Verification (exporting/verification.py): each artifact predicts the trained model's greedy continuation of
  evaluation prompts; agreement below what its form explains costs that artifact alone: it is not
  uploaded, the others are once every artifact is checked, and the job then fails with exit 2 naming it.
- Each step (merge, conversion, quantization, each check, each upload) goes through `job.timed`, which
  names it in the job document as it starts and stops there on a cancel or the task deadline.
- Beside the weights (exporting/cards.py): a model card, README.md, in every folder, and an Ollama Modelfile
  beside the GGUF. Each folder is published as a mirror (GCS: upload_dir; the Hub: one commit with
  delete_patterns, the GGUF in the same folder as the adapter or merge, under one card).

The converter comes from the pinned llama-cpp-python's sdist (scripts/fetch_llama_convert.py, run by
`make setup-gguf` and the Dockerfile) into PREFIX/share/llama.cpp; the quantizer and the loader are
llama-cpp-python's compiled llama.cpp. No provider builds llama.cpp at run time.
"""

from __future__ import annotations

import json
import logging
import platform
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from exporting.cards import CardFacts, base_license, model_card, modelfile
from runtime.errors import PermanentError
from runtime.libraries import cpu_threads
from runtime.settings import Settings
from runtime.tracking import RunLogger
from schema import GGUF_DIRECT, TrainingConfig
from storage import BlobStore, ModelHub

logger = logging.getLogger(__name__)

FOLDERS = {"adapter": "trained_adapters", "merged": "merged_models", "gguf": "gguf_models"}
K_QUANTS = {"q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M", "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
            "q2_k": "LLAMA_FTYPE_MOSTLY_Q2_K"}


class ConversionFailed(PermanentError):
    """llama.cpp's converter refused the trained model (a tensor it has no name for, an architecture it lacks):
    the same model fails the same way on a retry, so the GGUF alone is lost and the job keeps the rest."""


@dataclass(frozen=True)
class ExportJob:
    """What the export step needs from the job, passed down by `BaseTrainingJob.export`."""
    job_id: str
    cfg: TrainingConfig
    request: dict[str, Any]  # the request as JSON (secrets masked), for the manifests
    settings: Settings
    workdir: Path
    token: str | None
    base_kwargs: dict[str, Any]  # how transformers loads the base: under the adapter, to verify it
    save_merged: Callable[[Any, Any, Path], None]  # the provider's merge into a 16-bit base
    blobs: BlobStore
    hub: ModelHub
    run_logger: RunLogger
    timed: Callable[..., Any]  # the job's export step: named in the document, guarded, timed (base.export_step)
    timings: dict[str, float]  # the job's timings so far (the manifests carry them)
    parent: dict[str, Any] | None = None  # the adapter this job continued (training/lineage.py), for the manifests
    extra_files: dict[str, str | bytes] | None = None  # into the adapter/merged folder: eval_generations.jsonl,
    # log_history.json, training_curve.png
    processor: Any = None  # image+text jobs: the base's processor, saved beside the tokenizer in every folder
    held_back: bool = False  # require_improvement and the tuned model is not better: the bucket, never the Hub

    @property
    def to_hub(self) -> bool:
        return self.cfg.export_config.destination == "hfhub" and not self.held_back


def export_artifacts(job: ExportJob, trainer, tokenizer, metrics: dict[str, Any], prompts: list[list[int]],
                     images: list[list[bytes]] | None = None, pixels: list | None = None,
                     image_token: int | None = None) -> dict[str, Any]:
    """The job document's artifact fields, once every artifact is checked and those that passed are uploaded
    (`export_failures` names the others, and why; with none passed, the first failure is raised); each local
    copy goes once it is uploaded (the container's disk is memory). `prompts`: the verification's probes, and
    for an image+text job each probe's encoded pictures `images`, their `pixels` as the processor makes them and
    `image_token`, the token a picture's embeddings take the place of."""
    import torch

    from exporting.verification import (
        MAX_NEW_TOKENS,
        greedy_reference,
        pad_id,
        picture_budget,
        stop_ids,
        verify_adapter,
        verify_gguf,
        verify_merged,
    )
    from models.artifacts import (
        complete_tokenizer_files,
        portable_vision_keys,
        save_4bit,
        write_portable_adapter_config,
    )
    from models.base_models import base_config
    from models.language_model import trains_alone, whole_adapter_keys, whole_merged

    fmt, ex = job.cfg.export_format, job.cfg.export_config
    base = base_config(job.cfg.base_model_id, job.token, job.cfg.trust_remote_code)
    alone = not job.cfg.vision and trains_alone(base)  # Gemma 3n's language model: keyed for the whole model
    root = job.workdir / "export"
    shutil.rmtree(root, ignore_errors=True)
    # Training is over: its optimizer state is only GPU memory now, wanted by the consumers' checks.
    # Accelerate holds references too; free_memory drops them, collects and empties the CUDA cache. On a
    # CPU (the tiny models of tests and demos) the collection alone was 0.3 s of a 10 s job, for nothing.
    trainer.optimizer = trainer.lr_scheduler = None
    if torch.cuda.is_available():
        trainer.accelerator.free_memory()
    # The local checkpoints are in the bucket (a retry restores from there): on a disk that is memory,
    # Full's are 4 bytes per parameter each.
    shutil.rmtree(trainer.args.output_dir, ignore_errors=True)
    ref = job.timed("verify_reference", greedy_reference, trainer.model, prompts,
                    stop_ids(trainer.model, tokenizer), pad_id(tokenizer), MAX_NEW_TOKENS, 16, pixels, image_token,
                    images)
    saver = job.processor if job.processor is not None else tokenizer  # a processor saves its tokenizer too
    verified: dict[str, dict] = {}
    failed: dict[str, str] = {}  # artifact -> why its check failed: it alone is not uploaded

    def check(artifact: str, fn, *args) -> bool:
        try:
            verified[artifact] = job.timed(f"verify_{artifact}", fn, *args)
            return True
        except PermanentError as e:
            logger.error("%s not exported: %s", artifact, e)
            verified[artifact] = {**getattr(e, "entry", {}), "passed": False, "error": str(e)[:1000]}
            failed[artifact] = str(e)
            return False

    ready: list[tuple[Path, str]] = []  # (folder, artifact), uploaded once all are checked
    gguf = mmproj = None  # the GGUF once it has passed its check, and its projector
    if fmt == "adapter":
        out = root / "adapter"
        # The trained adapter alone: DPO and GRPO give the PeftModel a second adapter, TRL's reference
        # copy, which save_pretrained would write as `ref/`, and which no consumer loads.
        trainer.model.save_pretrained(str(out), selected_adapters=[trainer.model.active_adapter])
        if job.cfg.hyperparameters.lora_target_parameters:  # PEFT 0.17+ only: its key kept (the request says so)
            job.run_logger.warn("lora_target_parameters: the adapter loads in PEFT 0.17 or later only, not in the "
                                "inference service's PEFT 0.14; its merged and GGUF exports load anywhere")
        else:
            write_portable_adapter_config(out)
        saver.save_pretrained(str(out))
        complete_tokenizer_files(out, tokenizer, job.cfg.base_model_id, job.token)
        if check("adapter", verify_adapter, out, ref, trainer.model, job.cfg.base_model_id, job.base_kwargs,
                 job.cfg.vision):
            if alone:  # checked on the language model it trained; keyed for the whole model its consumers load
                whole_adapter_keys(out)
            ready.append((out, "adapter"))
    if fmt == "merged" or ex.wants_gguf:
        merged16 = root / "merged16"
        job.timed("merge", job.save_merged, trainer.model, saver, merged16)
        if alone:
            job.timed("whole_model", whole_merged, merged16, job.cfg.base_model_id, job.token)
        portable_vision_keys(merged16)  # Gemma 3 4B and up: the tower where transformers 4.x reads it
        complete_tokenizer_files(merged16, tokenizer, job.cfg.base_model_id, job.token)
        if job.settings.disk_is_memory:  # nothing reads the base again; its cached files are memory here
            drop_cached(job.cfg.base_model_id)
        if ex.wants_gguf:
            made = None
            try:  # an image+text model's projector first: the language model's conversion may delete the merge
                mmproj = job.timed("mmproj_convert", export_mmproj, merged16, root / "gguf") \
                    if job.cfg.vision else None
                budget = picture_budget(merged16) if mmproj else None
                made = job.timed("gguf_convert", export_gguf, merged16, root / "gguf", ex.gguf_quantization,
                                 fmt != "merged")
            except ConversionFailed as e:  # llama.cpp refused this model: the GGUF alone is lost, never the training
                logger.error("gguf not exported: %s", e)
                verified["gguf"], failed["gguf"] = {"passed": False, "error": str(e)[:1000]}, str(e)
            if made is not None and check("gguf", verify_gguf, made, ref, ex.gguf_quantization, job.cfg.method,
                                          mmproj, budget):
                gguf = made
            else:
                mmproj = None
                shutil.rmtree(root / "gguf", ignore_errors=True)
        if fmt == "merged":
            out = merged16
            if ex.merged_dtype == "q4":
                out = job.timed("quantize_4bit", save_4bit, merged16, root / "merged", job.cfg.vision)
            if check("merged", verify_merged, out, ref, ex.merged_dtype, job.cfg.method, job.cfg.vision):
                ready.append((out, "merged"))
        if merged16 not in [f for f, _ in ready]:
            shutil.rmtree(merged16, ignore_errors=True)
    if failed and not ready and gguf is None:  # nothing passed: the job fails as its first artifact did
        shutil.rmtree(root, ignore_errors=True)
        raise PermanentError(" ".join(failed.values()))
    result: dict[str, Any] = {"adapter_path": None, "gguf_path": None, "artifacts": {}, "verification": verified,
                              **({"export_failures": failed} if failed else {})}
    # On the Hub one repo holds the folder and the GGUF beside it: one card for both, one commit that mirrors it.
    together = job.to_hub and bool(ready) and gguf is not None
    license_ = base_license(job.cfg.base_model_id, job.hub)
    if gguf is not None:
        (gguf.parent / "Modelfile").write_text(job.timed("modelfile", modelfile, gguf, mmproj))
        if not together:
            write_card(job, gguf.parent, {"gguf": ex.gguf_quantization}, metrics, verified, license_, gguf.name)
        write_manifest(job, gguf.parent, "gguf", metrics, verified, name=f"{gguf.stem}.manifest.json")
    for folder, artifact in ready:
        form = ex.merged_dtype if artifact == "merged" else "adapter"
        write_card(job, folder, {artifact: form, **({"gguf": ex.gguf_quantization} if together else {})}, metrics,
                   verified, license_, gguf.name if together else None)
        # Before the manifest, which lists and checksums them. Not beside a GGUF alone: its bucket is public
        # (the web UI links the file), and eval_generations.jsonl holds the user's eval rows.
        for file, data in (job.extra_files or {}).items():
            (folder / file).write_bytes(data if isinstance(data, bytes) else data.encode())
        write_manifest(job, folder, artifact, metrics, verified)
        job.run_logger.log_model(folder, f"{artifact}-{job.job_id}", "end")  # log_model: end
        if together:  # the GGUF, its manifest and its Modelfile join the folder (no name is shared)
            for path in gguf.parent.iterdir():
                shutil.move(str(path), folder / path.name)
        uri = job.timed(f"upload_{artifact}", publish, job, folder, artifact)
        result.update(adapter_path=uri, artifacts={"raw": {artifact: uri}})
    if gguf is not None:
        folder_uri = destination(job, "gguf") if together else \
            job.timed("upload_gguf", publish, job, gguf.parent, "gguf")
        uri = folder_uri + gguf.name if folder_uri.startswith("gs://") else f"{folder_uri}/{gguf.name}"
        result["gguf_path"] = uri
        result["artifacts"]["file"] = {"gguf": uri}
        if mmproj is not None:  # the projector llama.cpp needs beside it to see images (DESIGN.md's addition)
            result["artifacts"]["file"]["mmproj"] = uri.removesuffix(gguf.name) + mmproj.name
        result["adapter_path"] = result["adapter_path"] or uri
    shutil.rmtree(root, ignore_errors=True)
    return result


def write_card(job: ExportJob, folder: Path, artifacts: dict[str, str], metrics: dict[str, Any],
               verified: dict[str, dict], license_: str | None, gguf_file: str | None) -> None:
    """README.md, the model card (exporting/cards.py), for the folder's artifacts; it replaces PEFT's placeholder."""
    facts = CardFacts(job.job_id, job.request.get("job_name"), job.cfg.base_model_id,
                      job.request["processed_dataset_id"], job.cfg.provider, job.cfg.method, job.cfg.trainer_type,
                      job.cfg.hyperparameters.model_dump(mode="json"), metrics, verified, license_,
                      destination(job, next(iter(artifacts))), mmproj_name(job, verified), job.cfg.vision)
    (folder / "README.md").write_text(model_card(facts, artifacts, gguf_file))


def mmproj_name(job: ExportJob, verified: dict[str, dict]) -> str | None:
    """The projector file of an image+text job's GGUF (verification recorded it), for the cards."""
    return (verified.get("gguf") or {}).get("mmproj") if job.cfg.vision else None


def drop_cached(model_id: str, cache_dir: Path | None = None) -> float:
    """Delete a Hub model's files from the Hugging Face cache (a local folder is left alone); the bytes freed."""
    from huggingface_hub import scan_cache_dir

    if Path(model_id).expanduser().is_dir():
        return 0.0
    cache = scan_cache_dir(cache_dir)
    revisions = [rev.commit_hash for repo in cache.repos if repo.repo_type == "model" and repo.repo_id == model_id
                 for rev in repo.revisions]
    if not revisions:
        return 0.0
    strategy = cache.delete_revisions(*revisions)
    strategy.execute()
    logger.info("deleted %s from the Hugging Face cache: %.1f GiB freed", model_id,
                strategy.expected_freed_size / 2**30)
    return float(strategy.expected_freed_size)


# ---- manifests and uploads --------------------------------------------------------------------------
def write_manifest(job: ExportJob, out: Path, artifact: str, metrics: dict[str, Any],
                   verified: dict[str, dict], name: str = "manifest.json") -> None:
    from models.artifacts import write_manifest as write

    ex = job.cfg.export_config
    custom = {"job_id": job.job_id, "base_model_id": job.cfg.base_model_id,
              "provider": job.cfg.provider, "export_format": artifact, "hf_repo_id": ex.hf_repo_id}
    write(out, custom, {"metrics": metrics, "request": job.request, "verification": verified,
                        "timings": job.timings, **({"parent": job.parent} if job.parent else {})},
          name=name, contract=name == "manifest.json")


def destination(job: ExportJob, artifact: str) -> str:
    """Where an artifact's folder is published: the Hub repo, or its bucket folder (DESIGN.md's layout); a model
    the improvement gate held back goes to the bucket whatever the destination (it is not promoted)."""
    ex = job.cfg.export_config
    if job.to_hub:
        return ex.hf_repo_id
    return f"gs://{job.settings.bucket_for(artifact)}/{FOLDERS[artifact]}/{job.job_id}/"


def publish(job: ExportJob, folder: Path, artifact: str) -> str:
    """Upload one artifact folder, mirrored (what an earlier attempt left there and this one lacks goes),
    then delete the local copy."""
    ex = job.cfg.export_config
    uri = destination(job, artifact)
    if job.to_hub:
        job.hub.push_folder(folder, ex.hf_repo_id, "", ex.hf_private)
    else:
        job.blobs.upload_dir(folder, uri)
    logger.info("uploaded %s to %s", artifact, uri)
    shutil.rmtree(folder, ignore_errors=True)
    return uri


# ---- GGUF: llama.cpp's converter and quantizer --------------------------------------------------------
def converter() -> Path:
    return Path(sys.prefix) / "share" / "llama.cpp" / "convert_hf_to_gguf.py"


# What the build enables with -DGGML_NATIVE=OFF (x86-64-v3, ggml's default set): llama.cpp dies with
# SIGILL, not an error, on a CPU without one of them.
LLAMA_CPU_FLAGS = ("avx2", "fma", "f16c", "bmi2")
SETUP_GGUF = ("run `make setup-gguf` (it compiles llama.cpp once, about 6 min) or use the job's image, "
              "or export 'adapter' or 'merged'")


def check_installed(cpuinfo: Path = Path("/proc/cpuinfo")) -> None:
    """A permanent error, at pre-flight, if the converter or llama.cpp is missing from this install, or
    this CPU lacks what the build needs."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        raise PermanentError(f"export_config: GGUF export needs llama-cpp-python, which this installation lacks; "
                             f"{SETUP_GGUF}.") from None
    if not converter().is_file():
        raise PermanentError(f"export_config: GGUF export needs llama.cpp's converter at {converter()}; "
                             f"{SETUP_GGUF}.")
    if platform.machine() in ("x86_64", "AMD64") and cpuinfo.is_file():
        flags = next((line.split(":", 1)[1].split() for line in cpuinfo.read_text().splitlines()
                      if line.startswith("flags")), [])
        missing = [f for f in LLAMA_CPU_FLAGS if f not in flags]
        if flags and missing:
            raise PermanentError(f"export_config: GGUF export runs llama.cpp built for x86-64-v3, and this CPU "
                                 f"lacks {', '.join(missing)}; run the job on a newer machine (every Cloud Run "
                                 f"host has them), or export 'adapter' or 'merged'.")


def converter_config(merged_dir: Path) -> None:
    """config.json as the pinned converter reads it. Its Gemma 4 12B (gemma4_unified) path asks for the text
    config's `moe_intermediate_size`, which the 12B's published config carries as null and transformers drops
    when it saves the merge (the model class has no such field): put back as published."""
    path = merged_dir / "config.json"
    config = json.loads(path.read_text())
    text = config.get("text_config")
    if config.get("model_type") == "gemma4_unified" and isinstance(text, dict) and "moe_intermediate_size" not in text:
        text["moe_intermediate_size"] = None
        path.write_text(json.dumps(config, indent=2))


def convert(merged_dir: Path, out: Path, outtype: str, mmproj: bool = False) -> Path:
    converter_config(merged_dir)
    cmd = [sys.executable, str(converter()), str(merged_dir), "--outtype", outtype, "--outfile", str(out)] + \
        (["--mmproj"] if mmproj else [])
    run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode < 0:  # killed (the host's memory): not this model's fault, a retry may fit
        raise RuntimeError(f"convert_hf_to_gguf.py was killed by signal {-run.returncode}: {run.stderr[-1000:]}")
    if run.returncode != 0:
        last = [line for line in run.stderr.strip().splitlines() if line.strip()][-1:] or ["(no output)"]
        raise ConversionFailed(f"export_config: llama.cpp's converter (convert_hf_to_gguf.py{' --mmproj' * mmproj}) "
                               f"could not convert the trained model, so no GGUF was uploaded: {last[0][:300]}. "
                               "The other artifacts are kept; export 'adapter' or 'merged' without include_gguf to "
                               f"skip it. Converter output: {run.stderr[-1500:]}")
    return out


def quantize(src: Path, dst: Path, quant: str) -> Path:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, K_QUANTS[quant])
    params.nthread = cpu_threads()
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize to {quant} returned {rc}")
    return dst


def export_mmproj(merged_dir: Path, out_dir: Path) -> Path:
    """An image+text model's vision tower and projector as llama.cpp's mmproj file (the pinned converter's
    --mmproj), in f16 whatever the language model's quantization, as llama.cpp's own releases ship them."""
    out_dir.mkdir(parents=True, exist_ok=True)
    return convert(merged_dir, out_dir / "mmproj-f16.gguf", "f16", mmproj=True)


def export_gguf(merged_dir: Path, out_dir: Path, quant: str, drop_merged: bool = False) -> Path:
    """model-{quant}.gguf in out_dir, from a merged 16-bit model folder (deleted once converted if
    drop_merged: on a disk that is memory, the k-quant then never sits beside the merge and the f16)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"model-{quant}.gguf"
    converted = convert(merged_dir, target if quant in GGUF_DIRECT else out_dir.parent / "model-f16.tmp.gguf",
                        quant if quant in GGUF_DIRECT else "f16")
    if drop_merged:
        shutil.rmtree(merged_dir, ignore_errors=True)
    if quant in GGUF_DIRECT:
        return converted
    f16 = converted
    try:
        return quantize(f16, target, quant)
    finally:
        f16.unlink(missing_ok=True)  # never two full copies on a disk that is memory
