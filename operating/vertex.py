"""Vertex AI custom training jobs for requests that outgrow one L4 (issue 18): the same image, request,
Firestore document and GCS layout on g2 (1-8 x L4), a2 (A100) or a3 (H100) machines, one or more nodes.

    gemma-job submit REQUEST.json --vertex --image IMAGE --gpus 4 [--accelerator L4|A100|A100_80GB|H100]
        [--nodes 2] [--job-id ID] [--region us-central1] [--dry-run]

`gemma-job submit --vertex` validates the request with the job's schema, stores it in the config bucket and
creates the job document `queued` (as for Cloud Run; not with --dry-run), then creates the CustomJob with
google-cloud-aiplatform (`JobServiceClient.create_custom_job`), or prints its JSON with --dry-run. Each node
runs `python main.py`, which starts one worker per GPU itself (runtime/distributed.py): NPROC_PER_NODE is the GPU
count, and Vertex's CLUSTER_SPEC gives the nodes. The container gets BACKEND=gcp and the buckets.
"""

from __future__ import annotations

import sys

# Accelerator -> (Vertex's enum name, machine type for 1, 2, 4, 8 GPUs, GiB per GPU).
MACHINES = {
    "L4": ("NVIDIA_L4", {1: "g2-standard-12", 2: "g2-standard-24", 4: "g2-standard-48", 8: "g2-standard-96"}, 24),
    "A100": ("NVIDIA_TESLA_A100", {1: "a2-highgpu-1g", 2: "a2-highgpu-2g", 4: "a2-highgpu-4g",
                                   8: "a2-highgpu-8g"}, 40),
    "A100_80GB": ("NVIDIA_A100_80GB", {1: "a2-ultragpu-1g", 2: "a2-ultragpu-2g", 4: "a2-ultragpu-4g",
                                       8: "a2-ultragpu-8g"}, 80),
    "H100": ("NVIDIA_H100_80GB", {1: "a3-highgpu-1g", 2: "a3-highgpu-2g", 4: "a3-highgpu-4g", 8: "a3-highgpu-8g"}, 80),
}
# What the container reads from the environment (main.py's ENV), passed through from this one when set.
PASSED = ("GCS_CONFIG_BUCKET_NAME", "GCS_DATA_BUCKET_NAME", "GCS_EXPORT_BUCKET_NAME", "GCS_EXPORT_FILES_BUCKET_NAME",
          "FIRESTORE_DB", "WANDB_MODE", "HF_ENDPOINT")


def build(request_job_id: str, project: str, image: str, accelerator: str, gpus: int, nodes: int,
          env: dict[str, str], timeout_s: int, display_name: str):
    """The CustomJob, from google-cloud-aiplatform's own types (which refuse unknown fields and bad enums)."""
    from google.cloud import aiplatform_v1 as aip

    kind, machines, gib = MACHINES[accelerator]
    if gpus not in machines:
        raise ValueError(f"--gpus: {gpus} {accelerator} per machine is not a machine shape; choose one of "
                         f"{sorted(machines)}")
    container = aip.ContainerSpec(
        image_uri=image, command=["python", "main.py"],
        env=[aip.EnvVar(name=k, value=v) for k, v in {
            "JOB_ID": request_job_id, "BACKEND": "gcp", "PROJECT_ID": project, "NPROC_PER_NODE": str(gpus),
            "GPU_MEMORY_GIB": str(gib), **env}.items()])
    pool = dict(machine_spec=aip.MachineSpec(machine_type=machines[gpus], accelerator_type=aip.AcceleratorType[kind],
                                             accelerator_count=gpus),
                container_spec=container, disk_spec=aip.DiskSpec(boot_disk_type="pd-ssd", boot_disk_size_gb=500))
    pools = [aip.WorkerPoolSpec(replica_count=1, **pool)]  # the chief: node 0
    if nodes > 1:
        pools.append(aip.WorkerPoolSpec(replica_count=nodes - 1, **pool))
    return aip.CustomJob(display_name=display_name, job_spec=aip.CustomJobSpec(
        worker_pool_specs=pools,
        # a restarted worker restarts the job, which resumes from its newest checkpoint in the bucket
        scheduling=aip.Scheduling(timeout=f"{timeout_s}s", restart_job_on_worker_restart=True)))


def submit(args, env, text: str, request, job_id: str) -> int:
    """`gemma-job submit --vertex`: 0 created (or printed with --dry-run), 2 bad input."""
    from runtime.errors import PermanentError

    if request.training_config.provider == "unsloth" and args.gpus * args.nodes > 1:
        print("submit: training_config.provider: Unsloth trains on one GPU; use --gpus 1 --nodes 1, or provider "
              "'huggingface'", file=sys.stderr)
        return 2
    project = env.get("PROJECT_ID")
    if not project:
        print("submit: --vertex needs PROJECT_ID (the project of the buckets, Firestore and Vertex AI)",
              file=sys.stderr)
        return 2
    try:
        if args.nodes < 1:
            raise ValueError("--nodes is at least 1")
        custom = build(job_id, project, args.image, args.accelerator, args.gpus, args.nodes,
                       {k: env[k] for k in PASSED if env.get(k)}, int(args.timeout_hours * 3600),
                       f"{request.job_name or job_id} ({job_id})"[:128])
    except ValueError as e:
        print(f"submit: {e}", file=sys.stderr)
        return 2
    from google.cloud import aiplatform_v1 as aip

    if args.dry_run:
        print(aip.CustomJob.to_json(custom))
        return 0
    from job.services import make_blobs, open_store
    from operating.launch import queue_job, settings_for

    try:
        settings = settings_for(job_id, {**env, "BACKEND": "gcp"})
    except PermanentError as e:
        print(f"submit: {e}", file=sys.stderr)
        return 2
    store = open_store(settings)
    if not queue_job(settings, store, make_blobs(settings), text, request):
        print(f"submit: job {job_id} exists already; a job id names one job: choose another --job-id",
              file=sys.stderr)
        return 2
    region = args.region or env.get("CLOUD_RUN_REGION") or "us-central1"
    client = aip.JobServiceClient(client_options={"api_endpoint": f"{region}-aiplatform.googleapis.com"})
    created = client.create_custom_job(parent=f"projects/{project}/locations/{region}", custom_job=custom)
    store.merge(job_id, {"vertex_custom_job": created.name})
    print(f"job {job_id} queued and started on Vertex AI ({created.name}); follow it with `gemma-job watch "
          f"{job_id}`")
    return 0
