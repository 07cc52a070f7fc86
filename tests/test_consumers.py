"""What the job exports loads in the platform's inference service: its pinned peft 0.14.0 and transformers
4.56.0 (`make consumer` builds that environment in .venv-consumer), with the same logits as in the job's
own libraries, and no training-only folder (TRL's `ref/`) rides along."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

import main
from conftest import ROOT, env_for, need, put_request, read_doc, sample_request

CONSUMER = ROOT / ".venv-consumer" / "bin" / "python"
EXPORT = "gemma-export-bucket"
PROMPT = "What does the cat say?"


def consumer() -> str:
    if not CONSUMER.is_file():
        need("the consumer environment is missing: run `make consumer`")
    return str(CONSUMER)


@pytest.fixture(scope="module")
def exported(tiny_root, tmp_path_factory):
    """An SFT adapter, a DPO adapter, an SFT merged model and a DoRA + rsLoRA adapter with lm_head trained whole
    (modules_to_save), each exported by a whole job."""
    import shutil

    root = tmp_path_factory.mktemp("consumers")
    shutil.copytree(tiny_root / "gemma-dataset-bucket", root / "gemma-dataset-bucket")
    jobs = {
        "sft-adapter": ("sft", "tiny-animals", {"format": "adapter"}),
        "dpo-adapter": ("dpo", "tiny-animals-pref", {"format": "adapter"}),
        "sft-merged": ("sft", "tiny-animals", {"format": "merged"}),
        "dora-adapter": ("sft", "tiny-animals", {"format": "adapter"}),  # DoRA, rsLoRA, modules_to_save
    }
    folders = {}
    for job_id, (trainer_type, dataset, export) in jobs.items():
        req = sample_request(tiny_root, trainer_type=trainer_type, export_config=export)
        req["processed_dataset_id"] = dataset
        req["training_config"]["hyperparameters"].update(epochs=1, max_steps=6 if trainer_type == "sft" else 2)
        if job_id == "dora-adapter":
            req["training_config"]["hyperparameters"].update(use_dora=True, use_rslora=True,
                                                             modules_to_save=["lm_head"])
        put_request(root, job_id, req)
        assert main.main([], env_for(root, job_id)) == 0, read_doc(root, job_id).get("error")
        doc = read_doc(root, job_id)
        kind = "trained_adapters" if export["format"] == "adapter" else "merged_models"
        folders[job_id] = root / EXPORT / kind / job_id
        assert folders[job_id].is_dir(), doc
    return folders


def consumer_loads(folders: dict[str, Path], out: Path) -> dict[str, dict]:
    """Each folder loaded in the consumer environment (tests/consumer_load.py, one process for all): by name,
    what it read there (versions, prompt ids, logits through transformers and through PEFT)."""
    args = [str(a) for name, folder in folders.items() for a in (folder, out / f"{name}.json")]
    run = subprocess.run([consumer(), str(ROOT / "tests" / "consumer_load.py"), PROMPT, *args],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return {name: json.loads((out / f"{name}.json").read_text()) for name in folders}


@pytest.fixture(scope="module")
def consumed(exported, tmp_path_factory) -> dict[str, dict]:
    """Each exported folder loaded in the consumer environment."""
    return consumer_loads(exported, tmp_path_factory.mktemp("consumed"))


def our_logits(folder, input_ids) -> torch.Tensor:
    """The folder's logits in the job's own libraries: an adapter through PEFT (transformers 5.17's own adapter
    loading gives a DoRA adapter other outputs: tests/test_lora_options.py), merged weights through transformers."""
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    auto = AutoPeftModelForCausalLM if (folder / "adapter_config.json").is_file() else AutoModelForCausalLM
    model = auto.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([input_ids])).logits[0]


@pytest.mark.parametrize("job_id", ["sft-adapter", "dpo-adapter", "sft-merged", "dora-adapter"])
def test_export_loads_in_the_inference_services_pinned_libraries(job_id, exported, consumed):
    folder = exported[job_id]
    got = consumed[job_id]
    assert (got["peft"], got["transformers"]) == ("0.14.0", "4.56.0")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    text = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}],
                                         tokenize=False, add_generation_prompt=True)
    assert tokenizer(text, add_special_tokens=False).input_ids == got["input_ids"]  # one tokenizer in both
    # the service decodes with skip_special_tokens: the turn markers must be special tokens there too
    assert PROMPT in got["decoded"] and "_of_turn>" not in got["decoded"]
    ours = our_logits(folder, got["input_ids"])
    theirs = torch.tensor(got["auto_logits"])
    assert theirs.shape == ours.shape and len(got["input_ids"]) > 5
    assert torch.allclose(theirs, ours, atol=1e-4), (theirs - ours).abs().max()
    if job_id.endswith("adapter"):
        assert got["target_modules"] == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                "down_proj"])
        assert torch.allclose(torch.tensor(got["peft_logits"]), ours, atol=1e-4)
        assert got["modules_to_save"] == (["lm_head"] if job_id == "dora-adapter" else [])


@pytest.mark.parametrize("job_id", ["sft-adapter", "dpo-adapter"])
def test_adapter_folder_holds_only_what_consumers_load(job_id, exported):
    folder = exported[job_id]
    assert not [p.name for p in folder.iterdir() if p.is_dir()]  # no ref/ (TRL's reference copy) or other
    config = json.loads((folder / "adapter_config.json").read_text())
    from models.artifacts import PEFT_014_KEYS

    assert set(config) <= PEFT_014_KEYS and config["r"] == 16 and config["peft_type"] == "LORA"
    from safetensors import safe_open

    with safe_open(folder / "adapter_model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert keys and not [k for k in keys if ".ref." in k]  # the reference adapter's weights stay out too
