#!/usr/bin/env bash
# Builds .gpu-site/ here: the packages scripts/gpu_check.py needs that the lent GPU machine's image
# lacks (it has torch, transformers, accelerate, numpy, pyarrow, pandas...; not trl, Unsloth, Pillow (for the vision jobs),
# bitsandbytes, datasets or pydantic), for its Python 3.12 on x86-64 Linux. They are unpacked, not
# installed, trimmed and zipped to fit in what one device call carries (64 MiB): Unsloth's Studio web
# app and bitsandbytes' kernels for CUDA other than 13.x (the device's torch is a cu130 build) are
# left out.
#
#     bash scripts/gpu_site.sh                  # writes .gpu-site/site.zip
#     # then, on the device (carry .gpu-site), from the repository root:
#     python3 -m zipfile -e .gpu-site/site.zip /tmp/site && export PYTHONPATH=/tmp/site
#     python3 scripts/gpu_check.py --out $OUT/gpu-check.json
#
# Pins: the project's (requirements*.txt) for what it pins; for the rest, the versions pip resolved
# for them on 2026-11-22. xformers is left out: its wheels are built for one torch, and Unsloth runs
# without it (SDPA). llama-cpp-python is left out: its source is larger than a call carries, so the
# GPU check skips GGUF there (GGUF is made and checked on the CPU, and tested in CI).
set -euo pipefail
cd "$(dirname "$0")/.."

pin() { grep -h "^$1==" requirements.txt requirements-gpu.txt; }
PINNED="trl bitsandbytes datasets pydantic peft unsloth unsloth_zoo pillow"
OTHERS="pydantic_core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5 dill==0.4.1
multiprocess==0.70.19 hf_transfer==0.1.9 diffusers==0.42.1 importlib_metadata==10.2.0 structlog==26.1.0
nest-asyncio==1.6.0 tyro==1.0.17 docstring_parser==0.18.0 typeguard==4.6.0 msgspec==0.22.0
cut-cross-entropy==25.1.1 torchao==0.18.0"

wheels=$(mktemp -d)
trap 'rm -rf "$wheels"' EXIT
# shellcheck disable=SC2046
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$wheels" \
    $(for p in $PINNED; do pin "$p"; done) $OTHERS

site="$wheels/site"
mkdir "$site"
for w in "$wheels"/*.whl; do
    python3 -m zipfile -e "$w" "$site"
done
rm -rf "$site/studio"
find "$site/bitsandbytes" -name 'libbitsandbytes_*.so' ! -name '*cuda13*' -delete
rm -rf .gpu-site && mkdir .gpu-site
(cd "$site" && python3 -m zipfile -c "$OLDPWD/.gpu-site/site.zip" .)
du -sh .gpu-site/site.zip
