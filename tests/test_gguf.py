"""GGUF export through llama.cpp's own converter and quantizer, checked by llama.cpp before the job
completes, at DESIGN.md's path, on the tiny Gemma 3."""

from __future__ import annotations

import pytest

import main
from conftest import env_for, put_request, read_doc, sample_request

llama_cpp = pytest.importorskip("llama_cpp", reason="GGUF tests need llama-cpp-python: make setup installs it")


def gguf_request(tiny_root, **export) -> dict:
    req = sample_request(tiny_root)
    req["training_config"]["hyperparameters"]["epochs"] = 2
    req["training_config"]["export_config"] = export
    return req


def load(path):
    return llama_cpp.Llama(model_path=str(path), n_ctx=256, verbose=False, n_threads=2)


def test_merged_with_q8_0_gguf_beside_it(local_dir, tiny_root):
    put_request(local_dir, "gg8", gguf_request(tiny_root, format="merged", include_gguf=True,
                                                 gguf_quantization="q8_0"))
    assert main.main([], env_for(local_dir, "gg8")) == 0
    doc = read_doc(local_dir, "gg8")
    uri = "gs://gemma-export-bucket/gguf_models/gg8/model-q8_0.gguf"
    assert doc["gguf_path"] == doc["artifacts"]["file"]["gguf"] == uri
    assert doc["adapter_path"] == doc["artifacts"]["raw"]["merged"] == "gs://gemma-export-bucket/merged_models/gg8/"
    assert doc["artifacts"]["file"]["gguf_next_token_agreement"] >= 0.9
    print(f"q8_0: agreement {doc['artifacts']['file']['gguf_next_token_agreement']}, "
          f"conversion {doc['timings']['gguf_convert']}s")
    path = local_dir / "gemma-export-bucket" / "gguf_models" / "gg8" / "model-q8_0.gguf"
    llm = load(path)
    assert llm.metadata["general.architecture"] == "gemma3" and llm.metadata["general.file_type"] == "7"  # Q8_0
    assert "<start_of_turn>" in llm.metadata["tokenizer.chat_template"]  # the chat template came through
    assert llm.token_eos() == 1  # <eos>
    assert (local_dir / "gemma-export-bucket" / "merged_models" / "gg8" / "model.safetensors").is_file()
    assert not (local_dir / "work" / "gg8").exists()  # no local copy left


def test_gguf_only_k_quant(local_dir, tiny_root):
    put_request(local_dir, "gg4", gguf_request(tiny_root, format="gguf", gguf_quantization="q4_k_m"))
    assert main.main([], env_for(local_dir, "gg4")) == 0
    doc = read_doc(local_dir, "gg4")
    uri = "gs://gemma-export-bucket/gguf_models/gg4/model-q4_k_m.gguf"
    assert doc["gguf_path"] == doc["adapter_path"] == uri
    assert doc["artifacts"]["file"]["gguf_next_token_agreement"] >= 0.5
    print(f"q4_k_m: agreement {doc['artifacts']['file']['gguf_next_token_agreement']}, "
          f"conversion and quantization {doc['timings']['gguf_convert']}s")
    llm = load(local_dir / "gemma-export-bucket" / "gguf_models" / "gg4" / "model-q4_k_m.gguf")
    assert llm.metadata["general.file_type"] == "15"  # MOSTLY_Q4_K_M
    assert not (local_dir / "gemma-export-bucket" / "trained_adapters" / "gg4").exists()
