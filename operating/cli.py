"""The command line (issue 20), installed as `gemma-job` (pyproject.toml): run one job here, or run and follow
jobs without the upstream training service.

    gemma-job run [--config REQUEST.json] [--validate] [--schema]   # one job in this process, as main.py
    gemma-job submit REQUEST.json [--job-id ID]          # validate, store the request, create the
                                                         # document `queued`, start the Cloud Run job
    gemma-job submit REQUEST.json --local [--job-id ID]  # the same, the job run here instead
    gemma-job submit REQUEST.json --estimate             # pre-flight only: data report, training time and cost
    gemma-job status JOB_ID [--json]                     # one readable block, or the document as JSON
    gemma-job cancel JOB_ID                              # cancel_requested: the job stops at its next step
    gemma-job watch JOB_ID [--interval S]                # follow it until it ends (a bar on a terminal)
    gemma-job list [--limit N]                           # recent jobs: status, step, eval loss
    gemma-job download JOB_ID [--what adapter|merged|gguf] [--to DIR]   # an export folder, fetched
    gemma-job submit REQUEST.json --vertex --image IMAGE --gpus N [--nodes M] [--dry-run]   # Vertex AI
    gemma-job logs JOB_ID [--follow] [--local]           # its log lines: Cloud Logging, or the local file
    gemma-job events JOB_ID [--follow] [--json]          # its events (operating/events.py), in order
    gemma-job sweep REQUEST.json [--space SPACE.yaml] --trials N --parallel P [--local]   # Optuna (operating/sweep.py)
    gemma-job sweep --resume SWEEP_ID                    # continue a stopped sweep
    gemma-job reference                                  # the request's reference page, from its models

The same environment as main.py chooses the backend (BACKEND, LOCAL_DIR, PROJECT_ID, the bucket names):
on `local` the buckets and the document store are folders; on `gcp` they are GCS and Firestore. Without
--local, submit starts the Cloud Run job (`--cloud-run-job`, default training-job, in `--region`, default
CLOUD_RUN_REGION or us-central1, of PROJECT_ID) with one override, env JOB_ID, as the training service does
(google-cloud-run's `JobsClient.run_job`; CLOUD_RUN_ENDPOINT points it elsewhere, as the tests do).
Exit codes: 0 done, 1 the job failed or is not there, 2 bad input (a request that does not validate, a
job id that exists).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from job.services import make_blobs, open_store
from operating.launch import (
    cancel_execution,
    cloud_run_job_name,
    log_path,
    queue_job,
    run_cloud_job,
    settings_for,
    start_local,
    tee_output,
)
from runtime.errors import PermanentError
from runtime.request import parse_request


def submit(args, env) -> int:
    text = Path(args.request).read_text()
    try:
        request = parse_request(text)
    except PermanentError as e:
        print(f"{args.request}: {e}", file=sys.stderr)
        return 2
    job_id = args.job_id or f"job-{uuid.uuid4().hex[:12]}"
    if args.estimate:  # pre-flight alone (main.py --validate): the data report and the time and cost; nothing stored
        import main as job

        return job.main(["--config", args.request, "--validate"], {**env, "JOB_ID": job_id})
    if args.vertex:  # several GPUs on Vertex AI (operating/vertex.py)
        from operating import vertex
        if not args.image:
            print("submit: --vertex needs --image (the job's image in Artifact Registry)", file=sys.stderr)
            return 2
        return vertex.submit(args, env, text, request, job_id)
    settings = settings_for(job_id, env)
    if not args.local and (settings.backend != "gcp" or not settings.project_id):
        print("submit: starting the Cloud Run job needs BACKEND=gcp and PROJECT_ID (the job reads its request "
              "from the project's config bucket and writes its Firestore document); set them, or run the job "
              "here with --local", file=sys.stderr)
        return 2
    store, blobs = open_store(settings), make_blobs(settings)
    if not queue_job(settings, store, blobs, text, request):
        print(f"submit: job {job_id} exists already; a job id names one job: choose another --job-id",
              file=sys.stderr)
        return 2
    if not args.local:
        return start_cloud_run(args, env, settings, job_id, store)
    print(f"job {job_id} queued; follow it with `gemma-job status {job_id}` (its log: {log_path(settings)})",
          flush=True)
    code = tee_output(start_local(settings, env, tee=True), settings)
    print(describe(store.get(job_id) or {}))
    return 0 if code == 0 else 1


def start_cloud_run(args, env, settings, job_id: str, store) -> int:
    """Run the Cloud Run job once with JOB_ID overridden, as the training service does; the execution's name
    goes to the document (`cloud_run_execution`), so that cancel can stop it before training starts. A refusal
    by Cloud Run leaves the job queued, and says so: a retried submit with the same id is refused, so the
    document is marked failed with the reason."""
    from google.api_core import exceptions

    name = cloud_run_job_name(settings.project_id, args.region, args.cloud_run_job, env)
    try:
        execution = run_cloud_job(name, job_id, env)
    except exceptions.GoogleAPICallError as e:
        store.merge(job_id, {"status": "failed", "error_type": "permanent",
                             "error": f"the Cloud Run job {name} could not be started: {e.message}"})
        print(f"submit: Cloud Run refused to run {name} ({type(e).__name__}: {e.message}); the job is marked "
              "failed", file=sys.stderr)
        return 2 if isinstance(e, exceptions.ClientError) else 1
    if execution:
        store.merge(job_id, {"cloud_run_execution": execution})
    print(f"job {job_id} queued and started on Cloud Run ({execution or name}); follow it with "
          f"`gemma-job watch {job_id}`")
    return 0


def describe(doc: dict[str, Any]) -> str:
    """The document as a person reads it."""
    lines = [f"job {doc.get('job_id')}: {doc.get('status')} ({doc.get('phase', '-')})"]
    if doc.get("total_steps"):
        eta = f", about {doc['eta_seconds']:.0f}s left" if doc.get("eta_seconds") else ""
        loss = f", loss {doc['loss']:.4g}" if isinstance(doc.get("loss"), (int, float)) else ""
        lines.append(f"  step {doc.get('step', 0)}/{doc['total_steps']}{loss}{eta}")
    metrics = doc.get("metrics") or {}
    shown = {k: metrics[k] for k in ("eval_loss", "perplexity", "accuracy", "reward_mean") if k in metrics}
    if shown:
        lines.append("  metrics: " + ", ".join(f"{k} {v:.4g}" for k, v in shown.items() if v is not None))
    if doc.get("generation"):
        g = doc["generation"]
        lines.append(f"  against the base: {g['verdict']} on {g['metric']} ({g[g['metric']]['base']} -> "
                     f"{g[g['metric']]['tuned']})")
    for key in ("adapter_path", "gguf_path", "tensorboard_path"):
        if doc.get(key):
            lines.append(f"  {key}: {doc[key]}")
    if doc.get("error"):
        lines.append(f"  error ({doc.get('error_type')}): {doc['error']}")
    return "\n".join(lines)


def status(args, env) -> int:
    doc = open_store(settings_for(args.job_id, env)).get(args.job_id)
    if doc is None:
        print(f"status: no job {args.job_id}", file=sys.stderr)
        return 1
    print(json.dumps(doc, indent=2, default=str) if args.json else describe(doc))
    return 1 if doc.get("status") == "failed" else 0


def cancel(args, env) -> int:
    store = open_store(settings_for(args.job_id, env))
    doc = store.get(args.job_id)
    if doc is None:
        print(f"cancel: no job {args.job_id}", file=sys.stderr)
        return 1
    if doc.get("status") in ("completed", "failed"):
        print(f"cancel: job {args.job_id} is {doc['status']} already; nothing to cancel", file=sys.stderr)
        return 1
    store.merge(args.job_id, {"cancel_requested": True})
    execution = doc.get("cloud_run_execution")
    if doc.get("status") == "queued" and execution:
        # Not started yet: its Cloud Run execution is cancelled, so that no GPU is taken for a job nobody wants;
        # the job never runs, so the document is ended here, as the job would have ended it.
        cancel_execution(execution, env)
        store.merge(args.job_id, {"status": "failed", "cancelled": True, "error_type": "cancelled",
                                  "error": f"cancelled before it started: Cloud Run execution {execution} cancelled"})
        print(f"job {args.job_id}: cancelled before it started (Cloud Run execution {execution} cancelled)")
        return 0
    print(f"job {args.job_id}: cancel requested; it stops at its next step (status failed, cancelled true)")
    return 0


def watch(args, env, clock=time.monotonic, sleep=time.sleep) -> int:
    """Poll the document until the job ends: a progress bar on a terminal, else a line per change. Ends with
    the summary; exit 0 completed or cancelled, 1 failed or gone, 2 when --timeout passes first."""
    store = open_store(settings_for(args.job_id, env))
    started, seen, bar = clock(), None, None
    while True:
        doc = store.get(args.job_id)
        if doc is None:  # a job just started creates its document at its first step
            if clock() - started < args.wait_start:
                sleep(args.interval)
                continue
            print(f"watch: no job {args.job_id} after {args.wait_start:.0f}s", file=sys.stderr)
            return 1
        state = (doc.get("status"), doc.get("phase"), doc.get("step"))
        if sys.stdout.isatty() and doc.get("total_steps"):
            if bar is None:
                from tqdm import tqdm

                # the job's own ETA and loss, not tqdm's rate: the bar moves when the document does (every 5 s)
                bar = tqdm(total=doc["total_steps"], desc=args.job_id, unit="step",
                           bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]")
            bar.n = doc.get("step") or 0
            bar.set_postfix_str(bar_text(doc), refresh=True)
        elif state != seen:
            print(describe(doc).splitlines()[0] + (f", step {doc.get('step')}/{doc.get('total_steps')}"
                                                   if doc.get("total_steps") else ""), flush=True)
        seen = state
        if doc.get("status") in ("completed", "failed"):
            if bar is not None:
                bar.close()
            print(describe(doc))
            if doc.get("cancelled"):
                print("cancelled on request: nothing exported, not retried")
                return 0
            return 0 if doc["status"] == "completed" else 1
        if args.timeout and clock() - started > args.timeout:
            print(f"watch: still {doc.get('status')} after {args.timeout:.0f}s", file=sys.stderr)
            return 2
        sleep(args.interval)


def bar_text(doc: dict[str, Any]) -> str:
    """'training, loss 2.104, about 1m05s left': what the bar says beside the steps."""
    parts = [str(doc.get("phase") or doc.get("status"))]
    if isinstance(doc.get("loss"), (int, float)):
        parts.append(f"loss {doc['loss']:.4g}")
    eta = doc.get("eta_seconds")
    if isinstance(eta, (int, float)) and doc.get("phase") == "training":
        minutes, seconds = divmod(round(eta), 60)
        parts.append(f"about {minutes}m{seconds:02d}s left" if minutes else f"about {seconds}s left")
    return ", ".join(parts)


def recent(args, env) -> int:
    for doc in open_store(settings_for("cli", env)).recent(args.limit):
        loss = (doc.get("metrics") or {}).get("eval_loss")
        print(f"{doc.get('job_id', '?'):<32} {doc.get('status', '?'):<10} step {doc.get('step', 0)}/"
              f"{doc.get('total_steps', '?'):<6} eval_loss {'-' if loss is None else f'{loss:.4g}'}  "
              f"{doc.get('updated_at', '')}")
    return 0


def download(args, env) -> int:
    from exporting.export import FOLDERS

    settings = settings_for(args.job_id, env)
    blobs = make_blobs(settings)
    prefix = f"gs://{settings.bucket_for(args.what)}/{FOLDERS[args.what]}/{args.job_id}/"
    names = [uri[len(prefix):] for uri in blobs.list(prefix)]
    if not names:
        print(f"download: nothing at {prefix}: job {args.job_id} exported no {args.what} (see `gemma-job status "
              f"{args.job_id}`)", file=sys.stderr)
        return 1
    dest = Path(args.to or f"{args.job_id}-{args.what}")
    blobs.download_dir(prefix, dest, names)
    print(f"{len(names)} files from {prefix} in {dest}")
    return 0


def logs(args, env, sleep=time.sleep) -> int:
    """The job's log: Cloud Logging's entries carrying its job_id label (the job writes it on every line),
    oldest first; or, with --local (or BACKEND=local), LOCAL_DIR/logs/JOB_ID.log. --follow goes on until the
    job has ended and its last lines are read."""
    settings = settings_for(args.job_id, env)
    store = open_store(settings)
    if args.local or settings.backend == "local":
        return local_logs(args, settings, store, sleep)
    from google.cloud import logging as cloud_logging

    doc = store.get(args.job_id) or {}
    since = as_datetime(doc.get("created_at")) or datetime.now(timezone.utc) - timedelta(days=30)
    options: dict[str, Any] = {}
    if env.get("CLOUD_LOGGING_ENDPOINT"):  # a stand-in (the tests'), over REST without credentials
        from google.auth.credentials import AnonymousCredentials

        options = {"credentials": AnonymousCredentials(), "_use_grpc": False,
                   "client_options": {"api_endpoint": env["CLOUD_LOGGING_ENDPOINT"]}}
    client = cloud_logging.Client(project=settings.project_id, **options)
    seen: set[str] = set()
    while True:
        ended = (store.get(args.job_id) or {}).get("status") in ("completed", "failed")  # before the read
        # the timestamp bound always: without one the client reads the last 24 hours only
        query = f'labels.job_id="{args.job_id}" AND timestamp>="{since.isoformat()}"'
        for entry in client.list_entries(filter_=query, order_by=cloud_logging.ASCENDING, page_size=1000):
            if entry.insert_id in seen:
                continue
            seen.add(entry.insert_id)
            since = max(since, entry.timestamp)
            payload = entry.payload
            message = payload.get("message", payload) if isinstance(payload, dict) else payload
            print(f"{entry.timestamp:%Y-%m-%d %H:%M:%S} {entry.severity or 'DEFAULT':<8} {message}", flush=True)
        if not args.follow or ended:
            return 0
        sleep(args.interval)


def local_logs(args, settings, store, sleep) -> int:
    path = log_path(settings)
    if not path.is_file() and not args.follow:
        print(f"logs: no log for job {args.job_id} at {path} (a local job started by gemma-job writes one)",
              file=sys.stderr)
        return 1
    offset = 0
    while True:
        ended = (store.get(args.job_id) or {}).get("status") in ("completed", "failed")
        if path.is_file():
            with path.open("rb") as f:
                f.seek(offset)
                chunk = f.read()
            offset += len(chunk)
            sys.stdout.write(chunk.decode(errors="replace"))
            sys.stdout.flush()
        if not args.follow or ended:
            return 0
        sleep(args.interval)


def as_datetime(value) -> datetime | None:
    if isinstance(value, datetime):
        return value
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value)
        except ValueError:
            return None
    return None


def main(argv: list[str] | None = None, env=None) -> int:
    """`gemma-job`, the installed command (pyproject.toml): `run` is one job in this process (main.py's own
    options), the rest run and follow jobs without the training service."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["run"]:  # main.py's own parser, options and exit codes, unchanged
        import main as job

        return job.main(argv[1:], env)
    parser = argparse.ArgumentParser(prog="gemma-job", description="Fine-tune Gemma: run one job here (`run`), or "
                                     "run and follow jobs without the training service.")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("run", help="run one job in this process: gemma-job run [--config FILE] [--validate] "
                        "[--schema] (what `python main.py` takes)", add_help=False)
    commands.add_parser("reference", help="print the request's reference page (docs/request-reference.md), "
                        "generated from its models")
    p = commands.add_parser("submit", help="validate a request, queue it and start it on Cloud Run (or --local)")
    p.add_argument("request", help="the request JSON file")
    p.add_argument("--local", action="store_true", help="run the job in a subprocess here")
    p.add_argument("--job-id", help="the job's id (default: a new one)")
    p.add_argument("--estimate", action="store_true", help="print the pre-flight's data report and the training time "
                   "and cost on the GPU (models/estimate.py), and stop: nothing is queued or started")
    p.add_argument("--region", help="the Cloud Run job's or Vertex AI's region (default CLOUD_RUN_REGION, else "
                   "us-central1)")
    p.add_argument("--cloud-run-job", default="training-job", help="the Cloud Run job's name")
    p.add_argument("--vertex", action="store_true", help="run it as a Vertex AI custom job on several GPUs")
    p.add_argument("--image", help="with --vertex: the job's image")
    p.add_argument("--accelerator", choices=("A100", "A100_80GB", "H100", "L4"), default="L4",
                   help="with --vertex: the GPU")
    p.add_argument("--gpus", type=int, default=2, help="with --vertex: GPUs per machine (1, 2, 4 or 8)")
    p.add_argument("--nodes", type=int, default=1, help="with --vertex: machines")
    p.add_argument("--timeout-hours", type=float, default=24.0, help="with --vertex: the job's time limit")
    p.add_argument("--dry-run", action="store_true", help="with --vertex: print the CustomJob; store nothing")
    p = commands.add_parser("status", help="a job's state")
    p.add_argument("job_id")
    p.add_argument("--json", action="store_true", help="the whole document as JSON")
    p = commands.add_parser("cancel", help="ask a running job to stop")
    p.add_argument("job_id")
    p = commands.add_parser("watch", help="follow a job until it ends")
    p.add_argument("job_id")
    p.add_argument("--interval", type=float, default=5.0, help="seconds between reads of the document")
    p.add_argument("--timeout", type=float, help="give up after this many seconds (exit 2)")
    p.add_argument("--wait-start", type=float, default=60.0, help="how long a job may take to create its "
                   "document")
    p = commands.add_parser("list", help="recent jobs, newest first")
    p.add_argument("--limit", type=int, default=20)
    p = commands.add_parser("download", help="fetch a job's exported folder")
    p.add_argument("job_id")
    p.add_argument("--what", choices=("adapter", "merged", "gguf"), default="adapter")
    p.add_argument("--to", help="the folder to write (default JOB_ID-WHAT)")
    p = commands.add_parser("logs", help="a job's log lines (Cloud Logging, or the local log file)")
    p.add_argument("job_id")
    p.add_argument("--follow", "-f", action="store_true", help="go on until the job ends")
    p.add_argument("--local", action="store_true", help="the local log file (LOCAL_DIR/logs/JOB_ID.log)")
    p.add_argument("--interval", type=float, default=5.0, help="seconds between reads with --follow")
    p = commands.add_parser("events", help="a job's events in order (training_jobs/JOB_ID/events)")
    p.add_argument("job_id")
    p.add_argument("--follow", "-f", action="store_true", help="go on until an event ends the job")
    p.add_argument("--json", action="store_true", help="each event as a line of JSON")
    p.add_argument("--interval", type=float, default=5.0, help="seconds between reads with --follow")
    p.add_argument("--timeout", type=float, help="with --follow: give up after this many seconds (exit 2)")
    p.add_argument("--wait-start", type=float, default=60.0, help="with --follow: how long a job may take to "
                   "write its first event")
    p = commands.add_parser("sweep", help="a hyperparameter sweep: Optuna, each trial a job",
                            epilog="SPACE.yaml maps a hyperparameter to {low: L, high: H[, log: true][, step: S]} or "
                            "{choices: [...]}; without --space: learning_rate, LoRA rank/alpha/dropout, epochs and "
                            "batch_size. The study is kept in gs://EXPORT_BUCKET/sweeps/SWEEP_ID/.")
    p.add_argument("request", nargs="?", help="the request JSON file (not with --resume)")
    p.add_argument("--space", help="the search space (YAML)")
    p.add_argument("--trials", type=int, default=10, help="how many trials in all")
    p.add_argument("--parallel", type=int, default=2, help="how many trials at a time")
    p.add_argument("--metric", default="eval_loss", help="a key of the job document's metrics (default eval_loss)")
    p.add_argument("--direction", choices=("minimize", "maximize"), help="default: from the metric's name")
    p.add_argument("--local", action="store_true", help="run the trials here, as processes")
    p.add_argument("--prune", action="store_true", help="stop trials whose evaluations trail the median "
                   "(Optuna's MedianPruner; the job is cancelled, the trial told as pruned)")
    p.add_argument("--seed", type=int, help="the sampler's seed")
    p.add_argument("--sweep-id", help="the sweep's id (default: a new one)")
    p.add_argument("--resume", metavar="SWEEP_ID", help="continue a sweep that was stopped")
    p.add_argument("--best-out", help="where to write the best request (default SWEEP_ID-best.json)")
    p.add_argument("--promote", action="store_true", help="copy the best trial's exports to sweeps/ID/best/")
    p.add_argument("--interval", type=float, default=10.0, help="seconds between reads of the trials' documents")
    p.add_argument("--region", help="the Cloud Run job's region")
    p.add_argument("--cloud-run-job", default="training-job", help="the Cloud Run job's name")
    args = parser.parse_args(argv)
    env = dict(os.environ if env is None else env)
    if args.command == "reference":
        from operating.reference import render

        print(render(), end="")
        return 0
    try:
        if args.command == "sweep":
            from operating.sweep import start

            return start(args, env)
        if args.command == "events":
            from operating.events import show

            return show(open_store(settings_for(args.job_id, env)), args)
        return {"submit": submit, "status": status, "cancel": cancel, "list": recent, "watch": watch,
                "download": download, "logs": logs}[args.command](args, env)
    except PermanentError as e:  # an invalid JOB_ID or environment
        print(f"{args.command}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
