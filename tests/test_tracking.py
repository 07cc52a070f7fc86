"""W&B never costs a run (issue 16): a key W&B rejects is refused at pre-flight, WANDB_MODE is honoured,
W&B unreachable at start or failing mid-run leaves a completed job with a warning and an offline run in the
bucket for `wandb sync`, and log_model logs the exported model as an artifact. Nothing here reaches wandb.ai:
the unreachable W&B is a closed port on 127.0.0.1."""

from __future__ import annotations

import json
import re
import time

import pytest

import main
from conftest import env_for, put_request, read_doc, run_subprocess, sample_request

EXPORT = "gemma-export-bucket"
GOOD_KEY = "local0123456789abcdefghijklmnopqrstuvwxyzAB"  # W&B's format: 40+ word characters after a prefix
SHORT_KEY = "k" * 39


def wandb_request(tiny_root, key: str | None = GOOD_KEY, log_model: str = "false", **hp) -> dict:
    req = sample_request(tiny_root)
    req["training_config"]["wandb_config"] = {"api_key": key, "project": "tests", "log_model": log_model}
    req["training_config"]["hyperparameters"].update(epochs=1, max_steps=3, logging_steps=1, **hp)
    return req


def offline_run(local_dir, job_id: str) -> dict[str, bytes]:
    """The W&B run folder the job uploaded, by its path under wandb/{job_id}/."""
    root = local_dir / EXPORT / "wandb" / job_id
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_a_key_wandb_rejects_exits_2_before_any_model(local_dir, tiny_root):
    put_request(local_dir, "wb-bad", wandb_request(tiny_root, key=SHORT_KEY))
    out, _ = run_subprocess(local_dir, "wb-bad")
    assert out.returncode == 2, out.stderr[-2000:]
    assert "MODEL_LIBS_LOADED=False" in out.stdout  # refused before torch, transformers or TRL was imported
    doc = read_doc(local_dir, "wb-bad")
    assert doc["status"] == "failed" and doc["error_type"] == "permanent"
    assert "wandb_config.api_key" in doc["error"] and "40+ characters" in doc["error"]
    assert SHORT_KEY not in doc["error"] and SHORT_KEY not in out.stdout + out.stderr


def test_wandb_mode_offline_takes_any_key_and_uploads_the_run(local_dir, tiny_root):
    put_request(local_dir, "wb-offline", wandb_request(tiny_root, key=SHORT_KEY))
    assert main.main([], env_for(local_dir, "wb-offline", WANDB_MODE="offline")) == 0
    doc = read_doc(local_dir, "wb-offline")
    assert doc["status"] == "completed" and "warnings" not in doc  # offline was asked for: nothing to warn
    assert doc["wandb_offline_path"].startswith(f"gs://{EXPORT}/wandb/wb-offline/offline-run-")
    run = offline_run(local_dir, "wb-offline")
    assert any(name.endswith(".wandb") for name in run), sorted(run)  # what `wandb sync` replays
    assert not any(SHORT_KEY.encode() in data for data in run.values())
    # the training curve, as in the export folder
    assert any("media/images/training_curve" in name and name.endswith(".png") for name in run), sorted(run)


def test_wandb_mode_disabled_runs_without_wandb(local_dir, tiny_root):
    put_request(local_dir, "wb-off", wandb_request(tiny_root))
    assert main.main([], env_for(local_dir, "wb-off", WANDB_MODE="disabled")) == 0
    doc = read_doc(local_dir, "wb-off")
    assert doc["status"] == "completed" and "wandb_offline_path" not in doc and not offline_run(local_dir, "wb-off")


def test_wandb_unreachable_at_start_trains_offline_with_a_warning(local_dir, tiny_root, monkeypatch):
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens there
    put_request(local_dir, "wb-down", wandb_request(tiny_root))
    t = time.perf_counter()
    assert main.main([], env_for(local_dir, "wb-down", WANDB_INIT_TIMEOUT="5")) == 0
    took = time.perf_counter() - t
    doc = read_doc(local_dir, "wb-down")
    assert doc["status"] == "completed" and doc["step"] == 3
    assert len(doc["warnings"]) == 1 and "W&B could not start online" in doc["warnings"][0]
    from job_manager import LocalJobStore  # each warning is an event too, as it happens (tests/test_events.py)

    assert [e["message"] for e in LocalJobStore(local_dir).events("wb-down") if e["kind"] == "warning"] == \
        doc["warnings"]
    assert doc["wandb_offline_path"].startswith(f"gs://{EXPORT}/wandb/wb-down/")
    assert any(name.endswith(".wandb") for name in offline_run(local_dir, "wb-down"))
    print(f"\nW&B unreachable: whole job {took:.1f} s")


def test_wandb_failing_mid_run_does_not_fail_the_job(local_dir, tiny_root, monkeypatch):
    import wandb

    calls = []

    def broken_log(*args, **kwargs):
        calls.append(args)
        raise ConnectionError("W&B went away mid-run")

    # on the class: wandb.init rebinds the module's `wandb.log` to the new run's method
    monkeypatch.setattr(wandb.Run, "log", broken_log)
    put_request(local_dir, "wb-mid", wandb_request(tiny_root))
    assert main.main([], env_for(local_dir, "wb-mid", WANDB_MODE="offline")) == 0
    doc = read_doc(local_dir, "wb-mid")
    # the callback's first log failed and turned it off; the training curve's figure failed too
    assert doc["status"] == "completed" and doc["step"] == 3 and len(calls) == 2
    assert any("WandbCallback failed in on_log (ConnectionError" in w for w in doc["warnings"]), doc["warnings"]
    assert any(w.startswith("W&B could not log the figure training_curve (ConnectionError") for w in doc["warnings"])


@pytest.mark.parametrize("log_model", ["end", "false"])
def test_log_model_end_logs_the_exported_adapter(log_model, local_dir, tiny_root, capfd):
    job = f"wb-model-{log_model}"
    put_request(local_dir, job, wandb_request(tiny_root, log_model=log_model))
    assert main.main([], env_for(local_dir, job, WANDB_MODE="offline")) == 0
    logged = re.findall(r"INFO runtime.tracking: (logged .* to W&B as artifact .*)", capfd.readouterr().err)
    run = offline_run(local_dir, job)
    in_run = any(b"adapter_model.safetensors" in data for name, data in run.items() if name.endswith(".wandb"))
    if log_model == "end":
        assert logged == [f"logged adapter to W&B as artifact adapter-{job}"] and in_run
    else:
        assert logged == [] and not in_run


# ---- report_to: TensorBoard, and the trackers this image lacks (issue 22) -------------------------------

def events(logdir):
    """Every scalar in the TensorBoard event files under logdir, read with TensorBoard's own reader: {tag:
    [(step, value)]} per run folder."""
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    mux = EventMultiplexer().AddRunsFromDirectory(str(logdir))
    mux.Reload()
    return {run: {tag: [(e.step, e.value) for e in mux.Scalars(run, tag)] for tag in tags["scalars"]}
            for run, tags in mux.Runs().items()}


def test_tensorboard_event_files_are_uploaded_and_readable(local_dir, tiny_root):
    req = sample_request(tiny_root, report_to=["tensorboard"])
    req["training_config"]["hyperparameters"].update(epochs=2, logging_steps=4)
    put_request(local_dir, "tb", req)
    assert main.main([], env_for(local_dir, "tb")) == 0
    doc = read_doc(local_dir, "tb")
    assert doc["tensorboard_path"] == f"gs://{EXPORT}/tensorboard/tb/"
    assert "warnings" not in doc and "wandb_url" not in doc  # no W&B: report_to names TensorBoard alone
    runs = events(local_dir / EXPORT / "tensorboard" / "tb")
    assert list(runs) == ["attempt-0"]
    scalars = runs["attempt-0"]
    losses = scalars["train/loss"]
    assert [step for step, _ in losses] == [1, 4, 8, 12, 16, 20, 24]  # logging_first_step, then every 4
    assert losses[-1][1] < losses[0][1]
    evals = scalars["eval/loss"]  # each epoch's, then the final evaluation's, which the document holds
    assert [step for step, _ in evals] == [12, 24, 24]
    assert evals[-1][1] == pytest.approx(doc["metrics"]["eval_loss"], rel=1e-6)


def test_a_failing_tensorboard_writer_costs_a_warning_not_the_job(local_dir, tiny_root, monkeypatch):
    from torch.utils.tensorboard import SummaryWriter

    def broken(self, *args, **kwargs):
        raise OSError("No space left on device")
    monkeypatch.setattr(SummaryWriter, "add_scalar", broken)
    req = sample_request(tiny_root, report_to=["tensorboard"])
    req["training_config"]["hyperparameters"].update(epochs=1, max_steps=3)
    put_request(local_dir, "tb-broken", req)
    assert main.main([], env_for(local_dir, "tb-broken")) == 0
    doc = read_doc(local_dir, "tb-broken")
    assert doc["status"] == "completed"
    assert any(w.startswith("TensorBoardCallback failed in on_log (OSError: No space left on device)")
               for w in doc["warnings"]), doc["warnings"]


@pytest.mark.parametrize("tracker", ["comet_ml", "mlflow"])
def test_a_tracker_this_image_lacks_is_refused_with_the_install_line(tracker, local_dir, tiny_root):
    req = sample_request(tiny_root, report_to=["tensorboard", tracker])
    put_request(local_dir, f"no-{tracker}", req)
    out, _ = run_subprocess(local_dir, f"no-{tracker}")
    assert out.returncode == 2
    assert "MODEL_LIBS_LOADED=False" in out.stdout
    doc = read_doc(local_dir, f"no-{tracker}")
    assert doc["error"] == (f"training_config.report_to: '{tracker}' needs the {tracker} package, which this "
                            f"image does not have; add `{tracker}` to requirements.txt and rebuild the image (pip "
                            f"install {tracker}), or remove '{tracker}' from report_to.")


def test_report_to_wandb_without_wandb_config_uses_its_defaults(local_dir, tiny_root):
    from job.services import make_services
    from runtime.request import parse_request
    from scripts.testbed import local_job

    req = sample_request(tiny_root, report_to=["wandb"])
    parsed = parse_request(json.dumps(req))
    assert parsed.training_config.trackers == ["wandb"]
    job = local_job(req, local_dir, "wb-default")
    services = make_services(job.settings, parsed, job.tracker, job.services.blobs)
    assert type(services.run_logger).__name__ == "WandbRunLogger"
    assert services.run_logger.project == "gemma-fine-tuning" and services.tensorboard is None


@pytest.mark.parametrize("tc,message", [
    ({"report_to": ["tensorboard", "tensorboard"]}, "report_to names a tracker twice"),
    ({"report_to": ["tensorboard"], "wandb_config": {"project": "p"}}, "leaves out 'wandb'"),
    ({"report_to": ["neptune"]}, "report_to.0: Input should be 'wandb', 'tensorboard', 'comet_ml' or 'mlflow'"),
])
def test_report_to_refused_naming_the_field(tc, message):
    from runtime.errors import RequestError
    from runtime.request import parse_request

    with pytest.raises(RequestError) as err:
        parse_request(json.dumps({"processed_dataset_id": "d", "training_config": {"base_model_id": "m", **tc}}))
    assert message in str(err.value), str(err.value)


@pytest.mark.parametrize("tc,trackers", [
    ({}, []), ({"wandb_config": {"project": "p"}}, ["wandb"]), ({"report_to": []}, []),
    ({"report_to": ["tensorboard", "wandb"], "wandb_config": {"project": "p"}}, ["tensorboard", "wandb"]),
])
def test_report_to_accepted(tc, trackers):
    from runtime.request import parse_request

    parsed = parse_request(json.dumps({"processed_dataset_id": "d", "training_config": {"base_model_id": "m", **tc}}))
    assert parsed.training_config.trackers == trackers
