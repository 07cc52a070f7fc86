"""GGUF export, shared by both providers: llama.cpp's own converter on the merged 16-bit model, then
llama.cpp's quantizer, then a check in llama.cpp itself before the job calls itself completed.

- f16, bf16, q8_0: written by `convert_hf_to_gguf.py` directly.
- q4_k_m, q5_k_m, q2_k: f16 first, then `llama_model_quantize` (k-quants need rows that are
  multiples of 256; Gemma's hidden sizes are).
- Verification (verification.py): the GGUF loaded in llama.cpp predicts the trained model's greedy
  continuation of evaluation prompts; agreement below what the quantization explains fails the job.

The converter comes from the pinned llama-cpp-python's sdist (scripts/fetch_llama_convert.py, run by
`make setup` and the Dockerfile); the quantizer and the loader are llama-cpp-python's compiled llama.cpp.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

from errors import PermanentError

logger = logging.getLogger(__name__)

DIRECT = {"f16": "f16", "bf16": "bf16", "q8_0": "q8_0"}
K_QUANTS = {"q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M", "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
            "q2_k": "LLAMA_FTYPE_MOSTLY_Q2_K"}


def converter() -> Path:
    return Path(os.environ.get("LLAMA_CONVERT_DIR", Path(sys.prefix) / "share" / "llama.cpp")) / \
        "convert_hf_to_gguf.py"


def check_installed() -> None:
    """A permanent error, at pre-flight, if the converter or llama.cpp is missing from this install."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        raise PermanentError("export_config: GGUF export needs llama-cpp-python, which this installation lacks; "
                             "run `make setup` (or use the job's image), or export 'adapter' or 'merged'.") from None
    if not converter().is_file():
        raise PermanentError(f"export_config: GGUF export needs llama.cpp's converter at {converter()}; run "
                             "`python scripts/fetch_llama_convert.py`, or export 'adapter' or 'merged'.")


def convert(merged_dir: Path, out: Path, outtype: str) -> Path:
    cmd = [sys.executable, str(converter()), str(merged_dir), "--outtype", outtype, "--outfile", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode != 0:
        raise RuntimeError(f"convert_hf_to_gguf.py failed ({run.returncode}): {run.stderr[-2000:]}")
    return out


def quantize(src: Path, dst: Path, quant: str) -> Path:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, K_QUANTS[quant])
    params.nthread = os.cpu_count() or 1
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize to {quant} returned {rc}")
    return dst


def export_gguf(merged_dir: Path, out_dir: Path, quant: str) -> Path:
    """model-{quant}.gguf in out_dir, from a merged 16-bit model folder."""
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"model-{quant}.gguf"
    if quant in DIRECT:
        return convert(merged_dir, target, DIRECT[quant])
    f16 = convert(merged_dir, out_dir.parent / "model-f16.tmp.gguf", "f16")
    try:
        return quantize(f16, target, quant)
    finally:
        f16.unlink(missing_ok=True)  # never two full copies on a disk that is memory

