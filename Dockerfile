# The training job's image: one NVIDIA L4 on Cloud Run (driver CUDA 12.2).
# torch's (and torchvision's) cu126 wheels carry their own CUDA 12.6 libraries, which run on a 12.2 driver through
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

# llama.cpp compiled once, into a wheel, in a stage of its own: its only inputs are the base and
# requirements-gguf.txt, so Docker's layer cache (and cloudbuild.yaml's --cache-from of this stage)
# reuses the wheel until the pin changes instead of compiling for about 10 minutes on every build.
# -DGGML_NATIVE=OFF: not -march=native of the build machine but x86-64-v3 (AVX2, FMA, F16C, BMI2:
# Haswell and later, every Cloud Run host); export.check_installed refuses a GGUF job on a CPU without them.
FROM base AS llama-wheel
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential cmake python3.11-dev \
 && rm -rf /var/lib/apt/lists/*
RUN python3.11 -m venv /opt/build
COPY requirements-gguf.txt scripts/fetch_llama_convert.py /tmp/
# Its converter (not in the wheel) from the same pinned sdist, fetched here too, into /opt/llama.cpp.
RUN CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF" \
    /opt/build/bin/pip wheel --no-deps -r /tmp/requirements-gguf.txt -w /wheels \
 && /opt/build/bin/pip install --no-deps /wheels/*.whl \
 && /opt/build/bin/python /tmp/fetch_llama_convert.py --dest /opt/llama.cpp

FROM base AS deps
RUN python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
COPY requirements.txt requirements-gguf.txt requirements-gpu.txt /tmp/
COPY --from=llama-wheel /wheels /wheels
COPY --from=llama-wheel /opt/llama.cpp /opt/venv/share/llama.cpp
# The CUDA 12.6 builds of the pinned torch and torchvision first (PyTorch 2.14 publishes 12.6 as its legacy CUDA
# line; PyPI's builds are CUDA 13, which a 12.2 driver cannot run), so that requirements.txt's pins are already
# met; then llama-cpp-python from the wheel built above (--only-binary: met from /wheels, never compiled here).
RUN pip install --index-url https://download.pytorch.org/whl/cu126 "$(grep '^torch==' /tmp/requirements.txt)" \
    "$(grep '^torchvision==' /tmp/requirements.txt)" \
 && pip install --only-binary llama-cpp-python --find-links /wheels \
    -r /tmp/requirements.txt -r /tmp/requirements-gguf.txt -r /tmp/requirements-gpu.txt \
 && rm -rf /wheels

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
# The named files at the top, and the packages by concern (pyproject.toml lists both)
COPY --chown=trainer *.py ./
COPY --chown=trainer runtime ./runtime
COPY --chown=trainer models ./models
COPY --chown=trainer exporting ./exporting
COPY --chown=trainer training ./training
COPY --chown=trainer job ./job
COPY --chown=trainer operating ./operating
COPY --chown=trainer examples ./examples
# Numeric, so that the runtime can check it is not root without reading /etc/passwd.
USER 1000:1000
ENTRYPOINT ["python", "main.py"]
