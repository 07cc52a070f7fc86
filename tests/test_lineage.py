"""Continuing an earlier job's adapter (issue 22): `init_from_job_id` (the adapter a job exported to the bucket)
and `init_adapter` (an adapter on the Hub). The continued job starts where its parent ended, not at the base,
goes lower, and records where it came from; a missing or mismatched parent is refused at pre-flight."""

from __future__ import annotations

import json
import shutil

import pytest

import main
from conftest import env_for, make_job, put_request, read_doc, sample_request
from models.artifacts import sha256
from runtime.errors import RequestError
from runtime.request import parse_request

EXPORT = "gemma-export-bucket"


def continued(tiny_root, epochs: float = 1, **training) -> dict:
    req = sample_request(tiny_root, **training)
    req["training_config"]["hyperparameters"].update(epochs=epochs)
    return req


@pytest.fixture(scope="module")
def parent(tiny_root, tmp_path_factory):
    """One job's adapter, exported to the local export bucket: the parent the tests continue."""
    root = tmp_path_factory.mktemp("lineage")
    shutil.copytree(tiny_root / "gemma-dataset-bucket", root / "gemma-dataset-bucket")
    put_request(root, "parent", continued(tiny_root))
    assert main.main([], env_for(root, "parent")) == 0, read_doc(root, "parent").get("error")
    return root


def run(root, job_id: str, req: dict) -> tuple[int, dict]:
    put_request(root, job_id, req)
    return main.main([], env_for(root, job_id)), read_doc(root, job_id)


def base_eval_loss(root, tiny_root) -> float:
    """The untrained base's eval loss on the same eval split, the same way a job evaluates."""
    job = make_job(root, continued(tiny_root), "base-eval")
    prep = job.preflight()
    return job.build_trainer(job.load_model(prep.tokenizer), prep).evaluate()["eval_loss"]


def test_a_continued_job_starts_at_its_parents_eval_loss_and_goes_lower(parent, tiny_root):
    ended = read_doc(parent, "parent")["metrics"]["eval_loss"]
    rc, doc = run(parent, "child", continued(tiny_root, init_from_job_id="parent"))
    assert rc == 0, doc.get("error")
    assert doc["init_eval_loss"] == pytest.approx(ended, abs=1e-4)  # where the parent ended
    assert doc["init_eval_loss"] < 0.5 * base_eval_loss(parent, tiny_root)  # not where the base is
    assert doc["metrics"]["eval_loss"] < doc["init_eval_loss"] - 0.01  # and lower still
    weights = parent / EXPORT / "trained_adapters" / "parent" / "adapter_model.safetensors"
    lineage = {"job_id": "parent", "uri": f"gs://{EXPORT}/trained_adapters/parent/",
               "base_model_id": str(tiny_root / "models" / "tiny-gemma3"), "adapter_sha256": sha256(weights)}
    assert doc["init_from"] == lineage
    manifest = json.loads((parent / EXPORT / "trained_adapters" / "child" / "manifest.json").read_text())
    assert manifest["parent"] == lineage
    assert doc["verification"]["adapter"]["top1_agreement"] == 1.0


def test_an_adapter_from_the_hub_is_continued_the_same_way(parent, tiny_root):
    """init_adapter: the parent's folder as a Hub repo (the local backend's Hub is a folder)."""
    shutil.copytree(parent / EXPORT / "trained_adapters" / "parent", parent / "hub" / "someone" / "animals")
    rc, doc = run(parent, "from-hub", continued(tiny_root, max_steps=2, init_adapter="someone/animals"))
    assert rc == 0, doc.get("error")
    assert doc["init_eval_loss"] == pytest.approx(read_doc(parent, "parent")["metrics"]["eval_loss"], abs=1e-4)
    assert doc["init_from"]["hub_repo"] == "someone/animals"


def edited_parent(root, name: str, **config) -> str:
    """A copy of the parent's adapter under another job id, its adapter_config.json edited."""
    src, dest = (root / EXPORT / "trained_adapters" / n for n in ("parent", name))
    shutil.copytree(src, dest, dirs_exist_ok=True)
    (dest / "manifest.json").unlink()
    adapter = json.loads((dest / "adapter_config.json").read_text())
    (dest / "adapter_config.json").write_text(json.dumps({**adapter, **config}))
    return name


@pytest.mark.parametrize("case,message", [
    ("missing", "training_config.init_from_job_id: job 'nosuchjob' left no adapter to continue"),
    ("other-base", "was trained on 'google/gemma-3-1b-it', not on base_model_id"),
    ("rank", "hyperparameters.lora_rank: 8, but the adapter training_config.init_from_job_id names"),
    ("not-lora", "is a IA3 adapter; this job continues LoRA adapters only"),
    ("hub", "training_config.init_adapter: 'someone/nothing' has no adapter_config.json"),
])
def test_a_missing_or_mismatched_parent_is_refused_at_preflight(case, message, parent, tiny_root):
    req = continued(tiny_root)
    tc = req["training_config"]
    if case == "missing":
        tc["init_from_job_id"] = "nosuchjob"
    elif case == "other-base":
        tc["init_from_job_id"] = edited_parent(parent, "other-base", base_model_name_or_path="google/gemma-3-1b-it")
    elif case == "rank":
        tc["init_from_job_id"] = "parent"
        tc["hyperparameters"]["lora_rank"] = 8
    elif case == "not-lora":
        tc["init_from_job_id"] = edited_parent(parent, "ia3", peft_type="IA3")
    else:
        tc["init_adapter"] = "someone/nothing"
    rc, doc = run(parent, f"refused-{case}", req)
    assert rc == 2
    assert doc["error_type"] == "permanent" and message in doc["error"], doc["error"]
    assert doc["phase"] == "validating" and "init_eval_loss" not in doc


def request_with(**tc) -> str:
    return json.dumps({"processed_dataset_id": "d", "training_config": {"base_model_id": "m", **tc}})


def test_continuation_fields_accepted_and_refused():
    assert parse_request(request_with(init_from_job_id="job-1")).training_config.init_from_job_id == "job-1"
    assert parse_request(request_with(init_adapter="me/adapter", method="LoRA")).training_config.init_adapter \
        == "me/adapter"
    for tc, message in [
        ({"init_from_job_id": "a", "init_adapter": "me/b"}, "a job continues one adapter"),
        ({"init_from_job_id": "a", "method": "Full"}, "init_from_job_id: method 'Full'"),
        ({"init_adapter": "me/b", "provider": "unsloth"}, "provider 'unsloth' with init_adapter"),
        ({"init_from_job_id": "../other"}, "init_from_job_id"),
        ({"init_adapter": "no-owner"}, "init_adapter"),
    ]:
        with pytest.raises(RequestError) as err:
            parse_request(request_with(**tc))
        assert message in str(err.value), str(err.value)


def test_the_hub_client_downloads_an_adapter_and_names_what_is_missing(parent, tmp_path):
    """HfModelHub.download_adapter through huggingface_hub against the Hub stub: the files arrive whole, with
    the token; a repo without the files, or none at all, is a permanent error naming the field."""
    from hub_stub import HubStub
    from runtime.errors import PermanentError
    from storage import HfModelHub

    folder = parent / EXPORT / "trained_adapters" / "parent"
    names = ["adapter_config.json", "adapter_model.safetensors"]
    with HubStub("hf_stub_token") as hub:
        hub.repos["someone/animals"] = {"private": True, "writable": False,
                                        "files": {n: (folder / n).read_bytes() for n in names}}
        hub.repos["someone/empty"] = {"private": False, "writable": False, "files": {}}
        client = HfModelHub("hf_stub_token", hub.url)
        client.download_adapter("someone/animals", tmp_path / "got", names)
        assert all((tmp_path / "got" / n).read_bytes() == (folder / n).read_bytes() for n in names)
        assert all(auth == "Bearer hf_stub_token" for _, path, auth in hub.requests if "/resolve/" in path)
        with pytest.raises(PermanentError, match="training_config.init_adapter: 'someone/empty' has no "
                                                 "adapter_config.json at its root"):
            client.download_adapter("someone/empty", tmp_path / "empty", names)
        with pytest.raises(PermanentError, match="training_config.init_adapter: 'someone/animals' was not found"):
            HfModelHub(None, hub.url).download_adapter("someone/animals", tmp_path / "anon", names)


def test_dpo_on_a_continued_adapter_keeps_the_parent_as_its_reference(parent, tiny_root):
    """SFT then DPO: TRL copies a pretrained adapter as the frozen reference ("ref"), so the reference is
    the parent, not the base."""
    import torch
    from safetensors.torch import load_file

    req = continued(tiny_root, trainer_type="dpo", init_from_job_id="parent")
    req["processed_dataset_id"] = "tiny-animals-pref"
    job = make_job(parent, req, "dpo-child")
    prep = job.preflight()
    trainer = job.build_trainer(job.load_model(prep.tokenizer), prep)
    assert set(trainer.model.peft_config) == {"default", "ref"}
    saved = load_file(str(parent / EXPORT / "trained_adapters" / "parent" / "adapter_model.safetensors"))
    params = dict(trainer.model.named_parameters())
    for name, weight in saved.items():  # base_model.model....lora_A.weight -> ...lora_A.ref.weight
        ref = name.replace(".weight", ".ref.weight")
        assert torch.equal(params[ref].detach().float(), weight.float()), ref
        assert not params[ref].requires_grad
