"""Exports checked by the programs that load them (issue 5), on the tiny Gemma 3 trained until its
predictions are not flat: PEFT for the adapter, transformers for merged bf16 and 4-bit, llama.cpp for
every GGUF quantization, with special tokens, chat template and stop token as users meet them."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

import main
from conftest import env_for, make_job, put_request, read_doc, sample_request
from reader import export_job_problems
from runtime.libraries import cpu_threads

try:
    import llama_cpp
except ImportError:  # a developer's machine may lack it; CI must run these tests, not skip them
    if os.environ.get("CI"):
        raise
    pytest.skip("GGUF tests need llama-cpp-python: make setup-gguf installs it", allow_module_level=True)

EXPORT = "gemma-export-bucket"
FILES = "gemma-facet-files"  # the platform's public files bucket (GCS_EXPORT_FILES_BUCKET_NAME)
# Top-1 agreement with the trained model that the issue asks of each form on this fixture.
EXPECTED = {"f16": 1.0, "bf16": 1.0, "q8_0": 1.0, "q5_k_m": 0.98, "q4_k_m": 0.98, "q2_k": 0.98}
FILE_TYPES = {"f16": 1, "bf16": 32, "q8_0": 7, "q5_k_m": 17, "q4_k_m": 15, "q2_k": 10}  # llama_ftype


def trained_request(tiny_root, **export) -> dict:
    """The demo's request trained longer (20 epochs, 10 s): at 12 a 2-bit quantization still flips 1 of 90
    tokens whose top-2 logits are 1.0 apart; at 20 no quantization flips any."""
    req = sample_request(tiny_root)
    req["training_config"]["hyperparameters"]["epochs"] = 20
    req["training_config"]["export_config"] = export or {"format": "merged"}
    return req


@pytest.fixture(scope="module")
def trained(tiny_root, tmp_path_factory):
    """The demo's LoRA run, trained once, its reference continuations and its bf16 merge."""
    from transformers import set_seed

    from exporting.verification import greedy_reference, pad_id, probe_prompts, stop_ids
    from models.artifacts import complete_tokenizer_files

    root = tmp_path_factory.mktemp("export")
    shutil.copytree(tiny_root / "gemma-dataset-bucket", root / "gemma-dataset-bucket")
    job = make_job(root, trained_request(tiny_root), "ex")
    set_seed(job.cfg.hyperparameters.seed)  # as run() does, before LoRA's random init
    prep = job.preflight()
    trainer = job.build_trainer(job.load_model(prep.tokenizer), prep)
    job.train(trainer)
    ref = greedy_reference(trainer.model, probe_prompts(prep), stop_ids(trainer.model, prep.tokenizer),
                           pad_id(prep.tokenizer))
    merged = root / "merged16"
    job.save_merged(trainer.model, prep.tokenizer, merged)
    complete_tokenizer_files(merged, prep.tokenizer, job.cfg.base_model_id, None)
    return dict(job=job, prep=prep, trainer=trainer, ref=ref, merged=merged, root=root)


def test_batched_reference_is_the_unbatched_one_token_for_token(trained, tiny_root):
    """The reference the job computes (batched, KV cache, left padding) against the definition (one full
    forward pass per token, no cache): on the evaluation prompts of the trained model, and on random
    prompts from 5 to 256 tokens, across the 64-token sliding window, for the trained model and the
    untrained base, which never stops early (12 x 32 tokens)."""
    import torch
    from transformers import AutoModelForCausalLM

    from exporting.verification import greedy_reference, greedy_reference_unbatched, pad_id, probe_prompts, stop_ids

    tok, model = trained["prep"].tokenizer, trained["trainer"].model
    prompts = probe_prompts(trained["prep"])
    assert trained["ref"].sequences == greedy_reference_unbatched(model, prompts, stop_ids(model, tok)).sequences
    g = torch.Generator().manual_seed(0)
    lengths = (5, 40, 63, 64, 65, 70, 100, 129, 150, 200, 256, 17)
    random_prompts = [torch.randint(3, 500, (n,), generator=g).tolist() for n in lengths]
    base = AutoModelForCausalLM.from_pretrained(str(tiny_root / "models" / "tiny-gemma3"), dtype=torch.float32)
    assert base.config.sliding_window == 64 and "sliding_attention" in base.config.layer_types
    for m in (model, base):
        stops = stop_ids(m, tok)
        batched = greedy_reference(m, random_prompts, stops, pad_id(tok), batch_size=5)  # 3 batches, one short
        assert batched.sequences == greedy_reference_unbatched(m, random_prompts, stops).sequences
        assert batched.starts == list(lengths)
    assert batched.tokens == 12 * 32  # the base stops nowhere: every row decoded to the end


def test_a_generate_that_fails_gives_the_unbatched_reference_and_a_warning(trained, monkeypatch, caplog):
    from exporting.verification import greedy_reference, greedy_reference_unbatched, pad_id, probe_prompts, stop_ids

    tok, model = trained["prep"].tokenizer, trained["trainer"].model
    monkeypatch.setattr(model, "generate", lambda **kw: (_ for _ in ()).throw(RuntimeError("patched generate")))
    prompts, stops = probe_prompts(trained["prep"])[:4], stop_ids(model, tok)
    ref = greedy_reference(model, prompts, stops, pad_id(tok))
    assert ref.sequences == greedy_reference_unbatched(model, prompts, stops).sequences
    assert "batched reference failed (RuntimeError: patched generate)" in caplog.text


@pytest.mark.parametrize("trust", [True, False])
def test_the_merge_reloads_the_base_as_training_loaded_it(trained, trust, tmp_path, monkeypatch):
    """trust_remote_code reaches the 16-bit reload the merge goes into, as it reaches the training load."""
    from transformers import AutoModelForCausalLM

    job, seen = trained["job"], []
    real = AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        seen.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    monkeypatch.setattr(job, "cfg", job.cfg.model_copy(update={"trust_remote_code": trust}))
    assert job.base_model_kwargs()["trust_remote_code"] is trust
    job.save_merged(trained["trainer"].model, trained["prep"].tokenizer, tmp_path / "merged")
    assert [k["trust_remote_code"] for k in seen] == [trust]
    assert (tmp_path / "merged" / "model.safetensors").is_file()


def test_qlora_trains_on_the_same_4bit_form_the_q4_merge_is_saved_in(trained, monkeypatch):
    import torch

    from models.artifacts import nf4_config

    job = trained["job"]
    monkeypatch.setattr(job, "cfg", job.cfg.model_copy(update={"method": "QLoRA"}))
    q = job.base_model_kwargs()["quantization_config"]
    assert q.to_dict() == nf4_config(job.compute_dtype()).to_dict()
    assert (q.load_in_4bit, q.bnb_4bit_quant_type, q.bnb_4bit_use_double_quant) == (True, "nf4", True)
    assert q.bnb_4bit_compute_dtype == torch.float32  # this CPU's compute dtype; bf16 on an L4


@pytest.fixture(scope="module")
def gguf_f16(trained):
    from exporting.export import export_gguf

    return export_gguf(trained["merged"], trained["root"] / "gguf-f16", "f16")


def load(path, n_ctx=256):
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, verbose=False, n_threads=cpu_threads())


@pytest.mark.parametrize("quant", list(EXPECTED))
def test_each_gguf_quantization_agrees_with_the_trained_model(trained, quant):
    from exporting.export import export_gguf
    from exporting.verification import check_gguf

    t = time.perf_counter()
    path = export_gguf(trained["merged"], trained["root"] / f"gguf-{quant}", quant)
    seconds = time.perf_counter() - t
    found = check_gguf(trained["ref"], path)
    print(f"\n{quant}: top-1 agreement {found.share:.2%} over {found.decided} decided tokens ({found.near_ties} "
          f"near ties, {found.flipped_ties} flipped), {path.stat().st_size // 1024} KiB, export {seconds:.1f}s")
    assert trained["ref"].tokens >= 80 and len(trained["ref"].sequences) == 16
    # the near ties are few: the agreement speaks for nearly every token
    assert found.decided + found.near_ties == trained["ref"].tokens and found.near_ties <= 0.1 * trained["ref"].tokens
    assert found.share >= EXPECTED[quant]
    assert int(load(path).metadata["general.file_type"]) == FILE_TYPES[quant]
    shutil.rmtree(path.parent)


def test_a_merge_not_exported_is_gone_before_the_k_quant_is_made(trained, monkeypatch):
    """On a disk that is memory, the k-quant never sits beside both the merge and its f16 conversion."""
    from exporting import export
    merged = trained["root"] / "merged-copy"
    shutil.copytree(trained["merged"], merged)
    seen, real = [], export.quantize
    monkeypatch.setattr(export, "quantize", lambda src, dst, q: (seen.append(merged.exists()), real(src, dst, q))[1])
    path = export.export_gguf(merged, trained["root"] / "gguf-drop", "q4_k_m", drop_merged=True)
    assert seen == [False] and path.is_file() and not (path.parent.parent / "model-f16.tmp.gguf").exists()
    from exporting.verification import check_gguf

    assert check_gguf(trained["ref"], path).share >= EXPECTED["q4_k_m"]


def test_drop_cached_deletes_that_hub_models_files_only(tmp_path):
    """On Cloud Run the base's cached files are deleted once merged: the real huggingface_hub cache API
    on a cache laid out as it lays it out."""
    from exporting.export import drop_cached

    def cached(repo: str, commit: str):
        folder = tmp_path / f"models--{repo.replace('/', '--')}"
        (folder / "blobs").mkdir(parents=True)
        (folder / "refs").mkdir()
        (folder / "snapshots" / commit).mkdir(parents=True)
        (folder / "blobs" / "0a1b").write_bytes(b"w" * 1000)
        (folder / "refs" / "main").write_text(commit)
        (folder / "snapshots" / commit / "model.safetensors").symlink_to(folder / "blobs" / "0a1b")
        return folder

    base, other = cached("acme/base", "a" * 40), cached("acme/other", "b" * 40)
    assert drop_cached("acme/base", tmp_path) == 1000
    assert not base.exists() and (other / "blobs" / "0a1b").read_bytes() == b"w" * 1000
    assert drop_cached("acme/base", tmp_path) == 0  # nothing left of it
    assert drop_cached(str(other), tmp_path) == 0 and other.exists()  # a local folder is never touched


def test_special_tokens_are_control_tokens_and_tokenize_as_in_transformers(trained, gguf_f16):
    tok = trained["prep"].tokenizer
    llm = load(gguf_f16)
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    for token_id, added in tok.added_tokens_decoder.items():
        attr = llama_cpp.llama_vocab_get_attr(vocab, token_id)
        assert attr & llama_cpp.LLAMA_TOKEN_ATTR_CONTROL, added.content  # not text: the converter saw the table
    end_of_turn = tok.convert_tokens_to_ids("<end_of_turn>")
    assert llama_cpp.llama_vocab_is_eog(vocab, end_of_turn) and llama_cpp.llama_vocab_is_eog(vocab, tok.eos_token_id)
    for row in trained["prep"].eval.rows[:6]:
        text = tok.decode(row["input_ids"])  # <bos><start_of_turn>user ... <end_of_turn>
        assert "<end_of_turn>" in text
        want = tok(text, add_special_tokens=False)["input_ids"]
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == want == row["input_ids"]


def test_greedy_chat_in_llama_cpp_matches_the_trained_model_and_stops_at_end_of_turn(trained, gguf_f16):
    from exporting.verification import probe_prompts

    tok, ref = trained["prep"].tokenizer, trained["ref"]
    llm = load(gguf_f16)
    assert llm.metadata["tokenizer.chat_template"] == tok.chat_template  # the template came through
    for prompt, seq in list(zip(probe_prompts(trained["prep"]), ref.sequences))[:6]:
        text = tok.decode(prompt)
        user = text.split("<start_of_turn>user\n", 1)[1].split("<end_of_turn>", 1)[0]
        system, question = user.split("\n\n", 1)
        # as a user of llama.cpp would: messages in, the GGUF's own chat template and stop token
        reply = llm.create_chat_completion(
            messages=[{"role": "system", "content": system}, {"role": "user", "content": question}],
            temperature=0.0, top_k=1, max_tokens=32)["choices"][0]
        continuation = seq[len(prompt):]
        assert continuation[-1] == tok.convert_tokens_to_ids("<end_of_turn>")  # the trained model stops too
        assert reply["finish_reason"] == "stop"
        assert reply["message"]["content"] == tok.decode(continuation[:-1])
        assert reply["message"]["content"].startswith("The ")


def test_gguf_goes_to_the_files_bucket_and_only_there():
    """GCS_EXPORT_FILES_BUCKET_NAME (the platform's public files bucket, which the web UI downloads from)
    takes the GGUF; unset, the GGUF goes to the export bucket as before. Folders stay in the export bucket."""
    from runtime.settings import Settings

    plain, platform = Settings(job_id="j"), Settings(job_id="j", export_files_bucket="gemma-facet-files")
    assert plain.bucket_for("gguf") == plain.bucket_for("merged") == plain.export_bucket
    assert platform.bucket_for("gguf") == "gemma-facet-files"
    assert {platform.bucket_for(a) for a in ("adapter", "merged")} == {platform.export_bucket}


def test_merged_bf16_with_q8_0_gguf_through_the_job(local_dir, tiny_root):
    req = trained_request(tiny_root, format="merged", include_gguf=True, gguf_quantization="q8_0")
    put_request(local_dir, "gg8", req)
    assert main.main([], env_for(local_dir, "gg8", GCS_EXPORT_FILES_BUCKET_NAME=FILES)) == 0
    doc = read_doc(local_dir, "gg8")
    uri = f"gs://{FILES}/gguf_models/gg8/model-q8_0.gguf"
    assert doc["gguf_path"] == doc["artifacts"]["file"]["gguf"] == uri
    assert doc["adapter_path"] == doc["artifacts"]["raw"]["merged"] == f"gs://{EXPORT}/merged_models/gg8/"
    assert export_job_problems({"user_id": "u", **doc}) == []  # cloud-services' export job reads it
    check = doc["verification"]
    assert check["merged"]["consumer"] == "transformers" and check["merged"]["form"] == "bf16"
    assert check["gguf"]["consumer"] == "llama.cpp" and check["gguf"]["form"] == "q8_0"
    assert check["merged"]["top1_agreement"] == check["gguf"]["top1_agreement"] == 1.0
    assert check["gguf"]["tokens"] >= 80
    merged = local_dir / EXPORT / "merged_models" / "gg8"
    manifest = json.loads((merged / "manifest.json").read_text())
    assert manifest["verification"] == check and "tokenizer.model" in manifest["files"]
    specials = json.loads((merged / "tokenizer_config.json").read_text())["added_tokens_decoder"]
    assert specials["6"] == {"content": "<end_of_turn>", "single_word": False, "lstrip": False, "rstrip": False,
                             "normalized": False, "special": True}
    from transformers import AutoTokenizer  # the table added for llama.cpp leaves transformers' loading as it was

    text = "<bos><start_of_turn>user\nWhat does the cow say?<end_of_turn>\n<start_of_turn>model\nThe cow says moo."
    exported, original = (AutoTokenizer.from_pretrained(str(p)) for p in (merged, tiny_root / "models" / "tiny-gemma3"))
    assert exported(text)["input_ids"] == original(text)["input_ids"]
    gguf_dir = local_dir / FILES / "gguf_models" / "gg8"
    assert sorted(p.name for p in gguf_dir.iterdir()) == ["Modelfile", "README.md", "model-q8_0.gguf",
                                                         "model-q8_0.manifest.json"]
    assert {"Modelfile", "README.md"} <= set(json.loads((gguf_dir / "model-q8_0.manifest.json").read_text())["files"])
    merged_card = (merged / "README.md").read_text()
    assert "library_name: transformers" in merged_card and "| merged | bf16 | transformers | 1.000 |" in merged_card
    assert 'AutoModelForCausalLM.from_pretrained("./model")' in merged_card and "llama-cli" not in merged_card
    gguf_card = (gguf_dir / "README.md").read_text()
    assert "library_name: gguf" in gguf_card and "| gguf | q8_0 | llama.cpp | 1.000 |" in gguf_card
    assert "llama-cli -m model-q8_0.gguf -cnv" in gguf_card and "ollama create gg8 -f Modelfile" in gguf_card
    check_modelfile(gguf_dir / "Modelfile", gguf_dir / "model-q8_0.gguf", merged)
    assert not (local_dir / EXPORT / "gguf_models").exists()
    print(f"\ntimings {doc['timings']}")
    assert not (local_dir / "work" / "gg8").exists()  # no local copy left



def check_modelfile(modelfile: Path, gguf: Path, tokenizer_dir: Path) -> None:
    """The Modelfile: FROM the GGUF beside it; a TEMPLATE that is the GGUF's own chat template in Ollama's
    form (it renders every sample conversation as the GGUF's template does, which is the one transformers
    renders from the exported tokenizer); the GGUF's end-of-turn token as a stop. Ollama's own parser is
    not on this machine: the TEMPLATE's Go syntax is not parsed here."""
    from transformers import AutoTokenizer

    from exporting.cards import SAMPLES, gguf_chat, read_turns

    lines = modelfile.read_text().splitlines()
    assert lines[1] == f"FROM ./{gguf.name}"
    text = modelfile.read_text()
    template = text.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    carried, stops = gguf_chat(gguf)
    turns = read_turns(carried)
    assert turns is not None and template == turns.go_template()
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    for messages in SAMPLES:
        assert tok.bos_token + turns.render(messages) == tok.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True)
    stop_lines = [line for line in lines if line.startswith("PARAMETER stop ")]
    # the end of the model's turn in the GGUF's template first, then the GGUF's own end-of-sequence token
    assert stop_lines == ['PARAMETER stop "<end_of_turn>"'] + [f'PARAMETER stop "{s}"' for s in stops]
    assert turns.assistant[1] == "<end_of_turn>\n" and stops == ["<eos>"]
    assert template.count("{{ end }}") == template.count("{{ if") + template.count("{{ range")  # balanced blocks


def test_gemma3_image_text_architecture_trains_its_language_model_only(local_dir, tiny_root, monkeypatch):
    """Gemma 3 at 4B and up is Gemma3ForConditionalGeneration: a SigLIP vision tower beside the language
    model, whose q/k/v_proj share LoRA's target names. A text job adapts the language model alone, and
    its adapter and its GGUF (made from the merge) load and agree as for the text-only architecture."""
    from safetensors import safe_open

    req = sample_request(tiny_root, base_model_id=str(tiny_root / "models" / "tiny-gemma3-mm"))
    # 8 epochs: at 4 this fixture's model (its random draw changed with the image tokens' vocabulary) is still
    # between answers, where f16 rounding alone flips 13 % of its greedy tokens (measured: f16 86.9 %, q8_0
    # 85.9 % at 4 epochs; 100 % from 8)
    req["training_config"]["hyperparameters"]["epochs"] = 8
    req["training_config"]["export_config"] = {"format": "adapter", "include_gguf": True, "gguf_quantization": "q8_0"}
    put_request(local_dir, "mm", req)
    from exporting import export
    checkpoints_left, publish = [], export.publish

    def spy(job, folder, artifact):  # the local checkpoints are gone before anything is uploaded
        checkpoints_left.append((local_dir / "work" / "mm" / "checkpoints").exists())
        return publish(job, folder, artifact)

    monkeypatch.setattr(export, "publish", spy)
    assert main.main([], env_for(local_dir, "mm")) == 0
    assert checkpoints_left == [False, False]  # the adapter, then the GGUF
    doc = read_doc(local_dir, "mm")
    assert doc["metrics"]["accuracy"] > 0.5  # it learned (the random base scores about 0)
    adapter = local_dir / EXPORT / "trained_adapters" / "mm"
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert not [k for k in keys if "vision_tower" in k]
    # lora_A and lora_B of all seven projections in both decoder layers, and nothing else
    assert len(keys) == 2 * 7 * 2 and all(".language_model.layers." in k for k in keys)
    assert "vision_tower" in json.loads((adapter / "adapter_config.json").read_text())["exclude_modules"]
    check = doc["verification"]
    assert check["adapter"]["consumer"] == "PEFT" and check["gguf"]["consumer"] == "llama.cpp"
    assert all(c["top1_agreement"] >= c["required"] for c in check.values())

def test_merged_4bit_and_gguf_to_the_hub(local_dir, tiny_root):
    import bitsandbytes as bnb
    from transformers import AutoConfig, AutoModelForCausalLM

    from models.memory import count_params, nf4_bytes

    req = trained_request(tiny_root, format="merged", merged_dtype="q4", include_gguf=True,
                          gguf_quantization="q4_k_m", destination="hfhub", hf_repo_id="me/tiny-animals")
    put_request(local_dir, "hub4", req)
    repo = local_dir / "hub" / "me" / "tiny-animals"
    (repo / "old-run").mkdir(parents=True)
    (repo / "old-run" / "model-q2_k.gguf").write_bytes(b"an earlier run's")  # mirrored away, as on the Hub
    assert main.main([], env_for(local_dir, "hub4")) == 0
    assert not (repo / "old-run" / "model-q2_k.gguf").exists()
    card = (repo / "README.md").read_text()  # one card for the merge and the GGUF beside it
    assert 'AutoModelForCausalLM.from_pretrained("me/tiny-animals")' in card and "ollama create hub4" in card
    assert "| merged | q4 | transformers |" in card and "| gguf | q4_k_m | llama.cpp |" in card
    assert (repo / "Modelfile").read_text().splitlines()[1] == "FROM ./model-q4_k_m.gguf"
    doc = read_doc(local_dir, "hub4")
    assert doc["adapter_path"] == doc["artifacts"]["raw"]["merged"] == "me/tiny-animals"
    assert export_job_problems({"user_id": "u", **doc}) == []
    assert doc["gguf_path"] == "me/tiny-animals/model-q4_k_m.gguf"
    assert doc["verification"]["merged"]["form"] == "q4" and doc["verification"]["merged"]["top1_agreement"] >= 0.98
    assert doc["verification"]["gguf"]["top1_agreement"] >= 0.98
    # both artifacts in one repo: the merge's contract file and manifest, the GGUF beside with its own
    assert {"model.safetensors", "custom_config.json", "manifest.json", "model-q4_k_m.gguf",
            "model-q4_k_m.manifest.json"} <= {p.name for p in repo.iterdir()}
    assert json.loads((repo / "custom_config.json").read_text())["export_format"] == "merged"
    config = json.loads((repo / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "bitsandbytes"
    assert config["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    assert config["quantization_config"]["bnb_4bit_use_double_quant"] is True  # QLoRA's own form (nf4_config)
    model = AutoModelForCausalLM.from_pretrained(str(repo))
    assert isinstance(model.model.layers[0].mlp.down_proj, bnb.nn.Linear4bit)
    # the size models/memory.py counts for the 4-bit files (its container-memory estimate), within 5 %
    total, embeddings = count_params(AutoConfig.from_pretrained(str(tiny_root / "models" / "tiny-gemma3")))
    assert (repo / "model.safetensors").stat().st_size == pytest.approx(nf4_bytes(total, embeddings), rel=0.05)
    assert (repo / "model.safetensors").stat().st_size < 0.6 * (tiny_root / "models" / "tiny-gemma3" /
                                                                 "model.safetensors").stat().st_size


def test_an_artifact_that_disagrees_fails_the_job_and_nothing_is_uploaded(local_dir, tiny_root, monkeypatch):
    """A merge that forgot the adapter (the base saved as is): the GGUF made from it is caught."""
    from providers import HuggingFaceTrainingJob

    def unmerged(self, model, tokenizer, out_dir):
        from transformers import AutoModelForCausalLM

        AutoModelForCausalLM.from_pretrained(self.cfg.base_model_id).save_pretrained(str(out_dir))
        tokenizer.save_pretrained(str(out_dir))

    monkeypatch.setattr(HuggingFaceTrainingJob, "save_merged", unmerged)
    req = trained_request(tiny_root, format="gguf", gguf_quantization="f16")
    req["training_config"]["hyperparameters"]["epochs"] = 2  # a few steps: enough to differ from the base
    put_request(local_dir, "bad", req)
    assert main.main([], env_for(local_dir, "bad")) == 2
    doc = read_doc(local_dir, "bad")
    assert doc["status"] == "failed" and doc["error_type"] == "permanent"
    assert doc["error"].startswith("export_config: the exported gguf (f16), loaded in llama.cpp, predicts the "
                                   "trained model's next token for only ")
    assert "at least 95% expected for f16" in doc["error"]
    assert not (local_dir / EXPORT / "gguf_models").exists()


def test_agreement_counts_decided_positions_and_keeps_near_ties_apart():
    """A near tie (the trained model's top two logits closer than NEAR_TIE) that flips never fails a job; a
    decided position that differs does."""
    from exporting.verification import NEAR_TIE, Reference, agreement, record
    from runtime import errors

    tie = NEAR_TIE / 2
    ref = Reference([[1, 2, 3, 4, 5, 6]], [2], margins=[[9.0, 9.0, tie, 9.0, 9.0, 0.0]])
    # the continuation 3, 4, 5, 6 is predicted at positions 1..4; position 2's margin is a near tie
    flips_tie = agreement(ref, lambda ids, k: [0, 3, 7, 5, 6, 0])
    assert (flips_tie.same, flips_tie.decided, flips_tie.near_ties, flips_tie.flipped_ties) == (3, 3, 1, 1)
    assert record("merged model", "bf16", "transformers", flips_tie, ref, 0.95)["top1_agreement"] == 1.0
    misses_decided = agreement(ref, lambda ids, k: [0, 3, 4, 8, 6, 0])
    assert misses_decided.share == round(2 / 3, 4) and misses_decided.flipped_ties == 0
    with pytest.raises(errors.PermanentError, match=r"only 66.7% of 3 decided tokens"):
        record("merged model", "bf16", "transformers", misses_decided, ref, 0.95)
    # a reference of near ties (a model that barely trained): agreement over every position, ties included
    ties = Reference([[1, 2, 3, 4, 5, 6]], [2], margins=[[9.0, tie, tie, tie, 9.0, 0.0]])
    assert agreement(ties, lambda ids, k: [0, 3, 7, 8, 6, 0]).share == 0.5
