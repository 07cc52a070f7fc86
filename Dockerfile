# The training job's image: one NVIDIA L4 on Cloud Run (driver CUDA 12.2).
# torch's cu126 wheels carry their own CUDA 12.6 runtime, which runs on a 12.2 driver through
# CUDA minor-version compatibility; the base image only needs to be a CUDA 12.x userland.
FROM nvidia/cuda:12.6.3-runtime-ubuntu22.04 AS base
ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# Python 3.11: the version CI tests (Ubuntu 22.04 ships 3.10).
RUN apt-get update \
 && apt-get install -y --no-install-recommends software-properties-common gpg-agent \
 && add-apt-repository -y ppa:deadsnakes/ppa \
 && apt-get install -y --no-install-recommends python3.11 python3.11-venv \
 && apt-get purge -y software-properties-common gpg-agent && apt-get autoremove -y \
 && rm -rf /var/lib/apt/lists/*

FROM base AS deps
RUN python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
COPY requirements.txt requirements-gpu.txt /tmp/
# The CUDA build of the pinned torch first, so that requirements.txt's torch==X is already met.
RUN pip install --index-url https://download.pytorch.org/whl/cu126 "$(grep '^torch==' /tmp/requirements.txt)" \
 && pip install -r /tmp/requirements.txt -r /tmp/requirements-gpu.txt

FROM base
COPY --from=deps /opt/venv /opt/venv
# Model caches and the job's work folder live under a path the non-root user can write.
ENV PATH=/opt/venv/bin:$PATH HF_HOME=/work/cache/huggingface LOCAL_DIR=/work/local \
    TRITON_CACHE_DIR=/work/cache/triton WANDB_DIR=/work/cache/wandb
RUN useradd --create-home --uid 1000 trainer && mkdir -p /work/cache /work/local && chown -R trainer /work
WORKDIR /app
COPY --chown=trainer *.py ./
COPY --chown=trainer examples ./examples
# Numeric, so that the runtime can check it is not root without reading /etc/passwd.
USER 1000:1000
ENTRYPOINT ["python", "main.py"]
