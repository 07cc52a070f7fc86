"""The image's contracts that a build here cannot show (no Docker engine): hadolint checks the
Dockerfile's form in `make lint`; these check what it must contain for an L4 on Cloud Run."""

from __future__ import annotations

import re

import pytest
import yaml

from conftest import ROOT

DOCKERFILE = (ROOT / "Dockerfile").read_text()


def test_base_image_starts_on_the_l4_driver():
    # nvidia/cuda images require cuda>=<their version>: above the driver's 12.2 the container never starts
    bases = re.findall(r"^FROM nvidia/cuda:(\d+)\.(\d+)\.\d+-\w+-ubuntu", DOCKERFILE, re.M)
    assert bases and all((int(major), int(minor)) <= (12, 2) and major == "12" for major, minor in bases)


def test_image_installs_the_tested_pins_with_cuda_torch_and_portable_llama_cpp():
    pins = dict(line.split("==") for line in (ROOT / "requirements.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    assert re.search(r"--index-url https://download.pytorch.org/whl/cu12\d+ .*grep '\^torch=='", DOCKERFILE)
    # torchvision from the same CUDA 12 index, in the same command (PyPI's would bring a CUDA 13 torch)
    assert re.search(r"whl/cu12\d+ .*grep '\^torch==' [^\n]*\\\n\s+\"\$\(grep '\^torchvision=='", DOCKERFILE)
    assert "torch" in pins and "llama-cpp-python" not in pins  # an extra: make demo never compiles it
    assert "-r /tmp/requirements.txt -r /tmp/requirements-gguf.txt -r /tmp/requirements-gpu.txt" in DOCKERFILE
    assert re.search(r"^USER 1000:1000$", DOCKERFILE, re.M) and "PYTHONUNBUFFERED=1" in DOCKERFILE
    assert re.search(r'^ENTRYPOINT \["python", "main.py"\]$', DOCKERFILE, re.M)


def stages() -> dict[str, str]:
    """The Dockerfile's stages by name: the text from each FROM to the next."""
    parts = re.split(r"^(?=FROM )", DOCKERFILE, flags=re.M)
    return {(re.match(r"FROM \S+(?: AS (\S+))?", p).group(1) or "final"): p for p in parts if p.startswith("FROM")}


def test_llama_cpp_is_compiled_once_in_a_stage_of_its_own_and_installed_from_its_wheel():
    wheel, deps = stages()["llama-wheel"], stages()["deps"]
    # the stage's only inputs: the base, requirements-gguf.txt and the converter fetcher (the layer cache key)
    assert re.findall(r"^COPY (.*) /tmp/$", wheel, re.M) == ["requirements-gguf.txt scripts/fetch_llama_convert.py"]
    assert "-DGGML_NATIVE=OFF" in wheel and "pip wheel --no-deps -r /tmp/requirements-gguf.txt -w /wheels" in wheel
    assert "fetch_llama_convert.py --dest /opt/llama.cpp" in wheel
    assert "COPY --from=llama-wheel /wheels /wheels" in deps
    assert "COPY --from=llama-wheel /opt/llama.cpp /opt/venv/share/llama.cpp" in deps
    assert "--only-binary llama-cpp-python --find-links /wheels" in deps  # compiling there would fail: no cmake
    assert "build-essential" not in deps and "cmake" not in deps
    build = yaml.safe_load((ROOT / "cloudbuild.yaml").read_text())
    steps = {s["id"]: s for s in build["steps"]}
    cached = next(i for i in build["images"] if i.endswith("/llama-wheel:latest"))
    assert cached in steps["pull-llama-wheel"]["args"][-1]
    assert steps["llama-wheel"]["args"][:3] == ["build", "--target", "llama-wheel"]
    for step in ("llama-wheel", "build"):
        args = steps[step]["args"]
        assert args[args.index("--cache-from") + 1] == cached
    assert list(steps).index("llama-wheel") < list(steps).index("build")


def test_cloud_run_job_has_an_l4_its_timeout_retries_and_secrets():
    build = yaml.safe_load((ROOT / "cloudbuild.yaml").read_text())
    sub = build["substitutions"]
    deploy = next(s for s in build["steps"] if s["id"] == "deploy")["args"][-1]
    assert "--gpu 1 --gpu-type nvidia-l4" in deploy and "--memory 32Gi" in deploy
    # the job reads the same timeout, to checkpoint and exit before Cloud Run kills it
    assert "--task-timeout ${_TASK_TIMEOUT_SECONDS}s" in deploy
    assert "TASK_TIMEOUT_SECONDS=${_TASK_TIMEOUT_SECONDS}" in deploy
    assert int(sub["_MAX_RETRIES"]) >= 1 and int(sub["_TASK_TIMEOUT_SECONDS"]) > 0
    assert "--set-secrets HF_TOKEN=hf-token:latest,WANDB_API_KEY=wandb-api-key:latest" in deploy


@pytest.mark.parametrize("name", [".gcloudignore", ".dockerignore"])
def test_build_context_keeps_tests_and_local_files_out_but_the_converter_fetcher_in(name):
    lines = (ROOT / name).read_text().splitlines()
    assert {"tests/", ".venv/", ".venv-consumer/", ".local/", ".gpu-site/", ".git"} <= set(lines)
    assert "!scripts/fetch_llama_convert.py" in lines  # the Dockerfile copies it


def test_the_gpu_check_runs_unsloth_as_the_image_does():
    """UNSLOTH_COMPILE_DISABLE=1 is what scripts/gpu_check.py verified on a GPU; the check reads it from
    the Dockerfile, so the two cannot drift apart."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    assert re.search(r"^ENV UNSLOTH_COMPILE_DISABLE=1$", DOCKERFILE, re.M)
    assert gpu_check.image_env("UNSLOTH_COMPILE_DISABLE") == "1"


def test_the_image_copies_every_module_the_project_declares():
    """pyproject.toml's modules and packages (the installable project) are what the image copies: a package added
    to one and not the other fails here, not at the job's first import on Cloud Run."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "COPY --chown=trainer *.py ./" in DOCKERFILE
    assert sorted(project["py-modules"]) == sorted(p.stem for p in ROOT.glob("*.py"))
    copied = re.findall(r"^COPY --chown=trainer (\w+) \./(\w+)$", DOCKERFILE, re.M)
    assert sorted(src for src, dst in copied if src == dst and src != "examples") == sorted(project["packages"])
    assert sorted(project["packages"]) == sorted(p.parent.name for p in ROOT.glob("*/__init__.py"))
