# The training job's image: one NVIDIA L4 on Cloud Run (driver CUDA 12.2).
# torch's cu126 wheels carry their own CUDA 12.6 libraries, which run on a 12.2 driver through
# CUDA minor-version compatibility. The base stays at 12.2 because nvidia/cuda images declare
# NVIDIA_REQUIRE_CUDA=cuda>=<their version>, and the NVIDIA container runtime refuses to start a
# 12.6 image on a 12.2 driver; "base" (cudart only) because torch brings the rest.
FROM nvidia/cuda:12.2.2-base-ubuntu22.04 AS base
ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# Python 3.11: the version CI tests (Ubuntu 22.04 ships 3.10).
RUN apt-get update \
 && apt-get install -y --no-install-recommends software-properties-common gpg-agent \
 && add-apt-repository -y ppa:deadsnakes/ppa \
 && apt-get install -y --no-install-recommends python3.11 python3.11-venv libgomp1 \
 && apt-get purge -y software-properties-common gpg-agent && apt-get autoremove -y \
 && rm -rf /var/lib/apt/lists/*

FROM base AS deps
# Compilers only in this stage: llama-cpp-python builds llama.cpp from source.
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential cmake python3.11-dev \
 && rm -rf /var/lib/apt/lists/*
RUN python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
COPY requirements.txt requirements-gpu.txt /tmp/
COPY scripts/fetch_llama_convert.py /tmp/
# The CUDA build of the pinned torch first, so that requirements.txt's torch==X is already met.
# llama.cpp for any x86-64 CPU (not -march=native of the build machine); GGUF work runs on the CPU.
# Its converter comes from the same pinned sdist, into /opt/venv/share/llama.cpp.
RUN pip install --index-url https://download.pytorch.org/whl/cu126 "$(grep '^torch==' /tmp/requirements.txt)" \
 && CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF" \
    pip install -r /tmp/requirements.txt -r /tmp/requirements-gpu.txt \
 && python /tmp/fetch_llama_convert.py --dest /opt/venv/share/llama.cpp

FROM base
COPY --from=deps /opt/venv /opt/venv
# Model caches and the job's work folder live under a path the non-root user can write.
ENV PATH=/opt/venv/bin:$PATH HF_HOME=/work/cache/huggingface LOCAL_DIR=/work/local \
    TRITON_CACHE_DIR=/work/cache/triton WANDB_DIR=/work/cache/wandb
# Unsloth without torch.compile: the configuration the GPU check verified end to end. Compiled, its first
# step took 90-144 s and the next about 11 s each on an H100 (tiny model; benchmarks/results/gpu-check-h100.md),
# against 0.7 s uncompiled. UNSLOTH_COMPILE_DISABLE=0 at execution turns compiling back on.
ENV UNSLOTH_COMPILE_DISABLE=1
RUN useradd --create-home --uid 1000 trainer && mkdir -p /work/cache /work/local && chown -R trainer /work
WORKDIR /app
COPY --chown=trainer *.py ./
COPY --chown=trainer examples ./examples
# Numeric, so that the runtime can check it is not root without reading /etc/passwd.
USER 1000:1000
ENTRYPOINT ["python", "main.py"]
