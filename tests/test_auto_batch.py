"""batch_size / gradient_accumulation_steps 'auto' (models/memory.py choose_batch): the largest micro-batch that the
memory model fits on the GPU, keeping the effective batch; the choice and why in the document; a request that cannot
fit even at one row is refused before anything is loaded, naming what would fit."""

from __future__ import annotations

import json

import pytest

import main
from conftest import env_for, put_request, read_doc, sample_request


def shaped(tmp_path, name: str):
    """A local folder holding the published config of a Gemma 3 size (models/memory.py gemma3_shapes)."""
    from models.memory import gemma3_shapes

    config = next(c for n, c, *_ in gemma3_shapes() if n == name)
    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config.to_dict()))
    return folder


def config_for(folder, method: str, **hp):
    from schema import TrainRequest

    return TrainRequest.model_validate({"processed_dataset_id": "d", "training_config": {
        "base_model_id": str(folder), "method": method, "hyperparameters": hp}}).training_config


def settings(gib: float | None, world: int = 1):
    from runtime.settings import Settings

    return Settings.model_validate({"job_id": "j", "gpu_memory_gib": gib, "world_size": world})


def test_the_largest_micro_batch_that_fits_keeps_the_effective_batch(tmp_path):
    from models.memory import GIB, HEADROOM, choose_batch, estimator, meta_model

    folder = shaped(tmp_path, "gemma-3-1b")
    cfg = config_for(folder, "Full", batch_size="auto", effective_batch_size=32, max_length=2048)
    choice = choose_batch(cfg, settings(22.0), None)
    micro = choice["batch_size"]
    assert micro * choice["gradient_accumulation_steps"] == 32 and 1 < micro < 32
    estimate = estimator(meta_model(str(folder), None, False), cfg, 0, 1)
    fits = [estimate(m, 2048)["total"] <= HEADROOM * 22 * GIB for m in (micro, 2 * micro)]
    assert fits == [True, False]  # the next divisor up does not fit: it is the largest
    assert choice["effective_batch_size"] == 32 and choice["gpu_gib"] == 22.0 and choice["estimate_gib"] <= 22
    assert f"; {2 * micro} did not" in choice["why"]
    # more memory, a larger micro-batch (activations dominate: 262,144 logits per token); QLoRA, less memory
    assert choose_batch(cfg, settings(74.0), None)["batch_size"] > micro
    qlora = choose_batch(config_for(folder, "QLoRA", batch_size="auto", effective_batch_size=32, max_length=2048),
                         settings(22.0), None)
    assert qlora["batch_size"] >= micro and qlora["estimate_gib"] < choice["estimate_gib"]
    # several processes: a multiple of them
    assert choose_batch(cfg, settings(22.0, world=4), None)["batch_size"] % 4 == 0


def test_without_a_gpu_size_the_whole_batch_is_one_step_and_defaults_keep_todays_batch(tmp_path):
    from models.memory import choose_batch

    folder = shaped(tmp_path, "gemma-3-270m")
    choice = choose_batch(config_for(folder, "LoRA", batch_size="auto"), settings(None), None)
    assert (choice["batch_size"], choice["gradient_accumulation_steps"], choice["effective_batch_size"]) == (8, 1, 8)
    assert "no GPU here" in choice["why"]
    cfg = config_for(folder, "LoRA", gradient_accumulation_steps="auto", batch_size=4)
    assert cfg.hyperparameters.effective_batch == 16  # 4 x today's 4


def test_an_auto_that_cannot_fit_names_what_would(tmp_path):
    from models.memory import choose_batch
    from runtime.errors import PermanentError

    folder = shaped(tmp_path, "gemma-3-4b")
    cfg = config_for(folder, "Full", batch_size="auto", max_length=8192)
    with pytest.raises(PermanentError, match=r"hyperparameters.batch_size: 'auto' found no micro-batch that fits: "
                                             r"even 1 row\(s\) of 8192 tokens need about .* GiB of the GPU's 22.0 GiB "
                                             r"with method Full; .*Use method 'LoRA' or 'QLoRA'"):
        choose_batch(cfg, settings(22.0), None)
    cfg = config_for(folder, "LoRA", batch_size="auto", max_length=32768)
    with pytest.raises(PermanentError, match=r"max_length \d+ \(of 32768\) would fit at one row per process"):
        choose_batch(cfg, settings(22.0), None)


def test_a_whole_job_with_auto_records_its_choice_and_trains_with_it(local_dir, tiny_root):
    req = sample_request(tiny_root)
    req["training_config"]["hyperparameters"].update(batch_size="auto", gradient_accumulation_steps="auto",
                                                     effective_batch_size=6, epochs=1)
    put_request(local_dir, "auto", req)
    assert main.main([], env_for(local_dir, "auto", GPU_MEMORY_GIB="22")) == 0
    doc = read_doc(local_dir, "auto")
    assert doc["status"] == "completed"
    choice = doc["batch_choice"]
    assert (choice["batch_size"], choice["gradient_accumulation_steps"], choice["effective_batch_size"]) == (6, 1, 6)
    assert choice["gpu_gib"] == 22.0 and choice["estimate_gib"] >= 1.5  # the tiny model: the overhead, about all
    assert doc["total_steps"] == 15 == doc["step"]  # 90 rows, 6 per step


def test_auto_bad_inputs_exit_2_naming_the_field(local_dir, tiny_root):
    req = sample_request(tiny_root)
    req["training_config"]["hyperparameters"].update(batch_size="auto")
    put_request(local_dir, "nofit", req)
    assert main.main([], env_for(local_dir, "nofit", GPU_MEMORY_GIB="1")) == 2  # below the 1.5 GiB overhead
    doc = read_doc(local_dir, "nofit")
    assert doc["status"] == "failed" and doc["error"].startswith("hyperparameters.batch_size: 'auto' found no")
    assert "total_steps" not in doc and "step" not in doc  # refused at pre-flight, before any step
    req["training_config"]["hyperparameters"] = {"effective_batch_size": 8}
    put_request(local_dir, "noauto", req)
    assert main.main([], env_for(local_dir, "noauto")) == 2
    assert "effective_batch_size is read only where batch_size or gradient_accumulation_steps is 'auto'" in \
        read_doc(local_dir, "noauto")["error"]
