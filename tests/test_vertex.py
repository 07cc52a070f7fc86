"""The Vertex AI side of issue 18 without calling the API: the CustomJob `gemma-job submit --vertex` builds is read
back by google-cloud-aiplatform's own types (unknown fields and bad enums refused); the nodes and ranks
the job reads from what Vertex sets; the strategy and its Trainer settings."""

from __future__ import annotations

import json

import pytest

from conftest import sample_request
from operating import cli
from runtime.distributed import DDP, FSDP, Nodes, Topology, strategy_for, trainer_args


def dry_run(tmp_path, capsys, req: dict, *args: str) -> tuple[int, str, str]:
    path = tmp_path / "req.json"
    path.write_text(json.dumps(req))
    code = cli.main(["submit", str(path), "--vertex", "--image", "us-docker.pkg.dev/p/r/job:1", "--dry-run", *args],
                    {"PROJECT_ID": "proj", "GCS_EXPORT_BUCKET_NAME": "exports"})
    out = capsys.readouterr()
    return code, out.out, out.err


def test_the_custom_job_for_two_nodes_of_four_l4s_is_what_the_api_accepts(tiny_root, tmp_path, capsys):
    from google.cloud import aiplatform_v1 as vertex

    code, out, _ = dry_run(tmp_path, capsys, sample_request(tiny_root), "--gpus", "4", "--nodes", "2",
                           "--job-id", "vx-1")
    assert code == 0
    job = vertex.CustomJob.from_json(out)  # the API's own message: an unknown field would raise here
    chief, workers = job.job_spec.worker_pool_specs
    assert chief.replica_count == 1 and workers.replica_count == 1
    for pool in (chief, workers):
        assert pool.machine_spec.machine_type == "g2-standard-48"
        assert pool.machine_spec.accelerator_type == vertex.AcceleratorType.NVIDIA_L4
        assert pool.machine_spec.accelerator_count == 4
        assert list(pool.container_spec.command) == ["python", "main.py"]
        env = {e.name: e.value for e in pool.container_spec.env}
        assert env == {"JOB_ID": "vx-1", "BACKEND": "gcp", "PROJECT_ID": "proj", "NPROC_PER_NODE": "4",
                       "GPU_MEMORY_GIB": "24", "GCS_EXPORT_BUCKET_NAME": "exports"}
    assert job.job_spec.scheduling.restart_job_on_worker_restart is True
    request = vertex.CreateCustomJobRequest(parent="projects/proj/locations/us-central1", custom_job=job)
    assert request.custom_job.job_spec.worker_pool_specs[0].container_spec.image_uri == "us-docker.pkg.dev/p/r/job:1"
    code, out, _ = dry_run(tmp_path, capsys, sample_request(tiny_root), "--gpus", "8", "--accelerator", "H100")
    pool, = vertex.CustomJob.from_json(out).job_spec.worker_pool_specs
    assert pool.machine_spec.machine_type == "a3-highgpu-8g"
    assert pool.machine_spec.accelerator_type == vertex.AcceleratorType.NVIDIA_H100_80GB


def test_the_builder_refuses_what_cannot_run(tiny_root, tmp_path, capsys):
    assert dry_run(tmp_path, capsys, sample_request(tiny_root), "--gpus", "3")[2] == \
        "submit: --gpus: 3 L4 per machine is not a machine shape; choose one of [1, 2, 4, 8]\n"
    unsloth = sample_request(tiny_root)
    unsloth["training_config"]["provider"] = "unsloth"
    code, _, err = dry_run(tmp_path, capsys, unsloth, "--gpus", "2")
    assert code == 2 and "Unsloth trains on one GPU" in err
    path = tmp_path / "ok.json"
    path.write_text(json.dumps(sample_request(tiny_root)))
    assert cli.main(["submit", str(path), "--vertex", "--dry-run"], {"PROJECT_ID": "p"}) == 2
    assert "--vertex needs --image" in capsys.readouterr().err
    assert cli.main(["submit", str(path), "--vertex", "--image", "i", "--dry-run"], {}) == 2
    assert "--vertex needs PROJECT_ID" in capsys.readouterr().err
    bad = sample_request(tiny_root)
    bad["training_config"]["hyperparameters"]["lora_rnk"] = 8
    code, _, err = dry_run(tmp_path, capsys, bad)
    assert code == 2 and "lora_rnk" in err


def test_nodes_and_ranks_from_what_vertex_and_torchrun_set():
    spec = {"cluster": {"workerpool0": ["chief-0:2222"], "workerpool1": ["w-0:2222", "w-1:2222"]},
            "task": {"type": "workerpool1", "index": 1}, "job": {}}
    assert Nodes.from_env({"CLUSTER_SPEC": json.dumps(spec)}) == Nodes(3, 2, "chief-0", 2222)
    assert Nodes.from_env({"CLUSTER_SPEC": json.dumps({**spec, "task": {"type": "workerpool0", "index": 0}})}) \
        == Nodes(3, 0, "chief-0", 2222)
    assert Nodes.from_env({"MASTER_ADDR": "10.0.0.2", "MASTER_PORT": "1234", "WORLD_SIZE": "2", "RANK": "1"}) == \
        Nodes(2, 1, "10.0.0.2", 1234)
    assert Nodes.from_env({}) == Nodes()
    from runtime.errors import RequestError

    with pytest.raises(RequestError, match="CLUSTER_SPEC is not Vertex AI's cluster spec"):
        Nodes.from_env({"CLUSTER_SPEC": '{"cluster": {}}'})
    with pytest.raises(RequestError, match="WORLD_SIZE='two'"):
        Nodes.from_env({"MASTER_ADDR": "h", "WORLD_SIZE": "two"})
    from runtime.distributed import processes_per_node

    assert processes_per_node({"NPROC_PER_NODE": "3"}) == 3
    for bad in ("0", "two", "-1"):
        with pytest.raises(RequestError, match=f"NPROC_PER_NODE='{bad}'"):
            processes_per_node({"NPROC_PER_NODE": bad})
    # Vertex's WORLD_SIZE counts machines: outside a torchrun worker (no LOCAL_RANK) the process is alone
    assert Topology.from_env({"WORLD_SIZE": "2", "RANK": "1"}) == Topology()
    place = Topology.from_env({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"})
    assert place.distributed and not place.main and not place.node_main and place.world_size == 4


@pytest.mark.parametrize("method,fits,gpu,expected", [
    ("LoRA", True, True, DDP), ("QLoRA", True, True, DDP), ("LoRA", False, True, FSDP), ("Full", True, True, FSDP),
    ("Full", True, False, DDP)])  # the Trainer's FSDP needs CUDA: on CPUs DDP, and the document says so
def test_the_strategy_by_method_size_and_device(method, fits, gpu, expected):
    assert strategy_for(method, fits, gpu) == expected


def test_the_trainer_settings_of_each_strategy_are_the_trainers_own():
    from trl import SFTConfig

    assert trainer_args(DDP, "LoRA", False) == {"ddp_find_unused_parameters": False}
    assert SFTConfig(output_dir="/tmp/x", use_cpu=True, **trainer_args(DDP, "LoRA", False)) \
        .ddp_find_unused_parameters is False  # what the Trainer hands DDP, not its PeftModel default (True)
    fsdp = trainer_args(FSDP, "Full", True)
    assert fsdp["optim"] == "adamw_torch_fused" and fsdp["fsdp"] == "full_shard auto_wrap"
    assert fsdp["fsdp_config"]["fsdp_version"] == 2 and fsdp["fsdp_config"]["state_dict_type"] == "FULL_STATE_DICT"
    assert "optim" not in trainer_args(FSDP, "LoRA", True)


def test_the_nodes_other_processes_read_the_files_its_first_one_downloaded(tmp_path):
    """NodeFiles, the buckets as seen by a node's processes after its first: what the first downloaded is read
    where it is; what it did not download is fetched; everything else is the store's own."""
    from runtime.distributed import NodeFiles
    from storage import LocalBlobStore

    blobs = LocalBlobStore(tmp_path / "buckets")
    for name in ("train.parquet", "eval.parquet"):
        blobs.write_bytes(f"gs://data/ds/{name}", name.encode())
    first = tmp_path / "work" / "data"
    blobs.download("gs://data/ds/train.parquet", first / "train.parquet")  # the node's first process
    (first / "train.parquet").write_bytes(b"as the first process left it")
    others = NodeFiles(blobs)
    assert others.download("gs://data/ds/train.parquet", first / "train.parquet").read_bytes() == \
        b"as the first process left it"  # not downloaded again
    got = others.download_dir("gs://data/ds/", first, ["train.parquet", "eval.parquet"])
    assert [p.read_bytes() for p in got] == [b"as the first process left it", b"eval.parquet"]
    assert others.list("gs://data/ds/") == blobs.list("gs://data/ds/")


@pytest.mark.parametrize("status, recorded", [("training", True), ("failed", False)])
def test_the_launcher_records_a_killed_rank_that_rank_0_did_not_record(tmp_path, tiny_root, monkeypatch, status,
                                                                      recorded):
    """A rank killed (SIGKILL) while rank 0 is stopped before it can write: the launcher, which outlives both,
    marks the job failed and retryable, naming the rank and the signal; what rank 0 did write is kept."""
    import signal

    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    import main
    from job_manager import JobTracker, LocalJobStore
    from runtime import distributed
    from runtime.settings import Settings
    from schema import TrainRequest

    store = LocalJobStore(tmp_path)
    store.create("k", {"job_id": "k", "status": status, "error": "rank 0: SIGTERM"})
    failures = {0: ProcessFailure(0, 11, -signal.SIGTERM, str(tmp_path / "none")),
                1: ProcessFailure(1, 12, -signal.SIGKILL, str(tmp_path / "none"))}
    monkeypatch.setattr(distributed, "launch", lambda *args: (1, failures))
    request = TrainRequest.model_validate(sample_request(tiny_root))
    code = main.launch_workers(request, {"NPROC_PER_NODE": "2"}, Nodes(), Settings(job_id="k"),
                               JobTracker(store, "k"), [])
    doc = store.get("k")
    assert code == 1 and doc["status"] == "failed"
    if recorded:
        assert doc["error_type"] == "retryable" and doc["error"] == (
            "WorkersFailed: rank 0: killed by SIGTERM; rank 1: killed by SIGKILL "
            "(a retry resumes from the newest complete checkpoint)")
    else:
        assert doc["error"] == "rank 0: SIGTERM" and "error_type" not in doc
