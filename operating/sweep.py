"""Hyperparameter sweeps (issue 20): Optuna, ask and tell, each trial an ordinary job.

A trial is the sweep's request with the trial's hyperparameters merged into `training_config.hyperparameters`,
queued as its own job (`{sweep_id}-{trial:03d}`, with `sweep_id`, `trial` and `sweep_params` in its document)
and run as a Cloud Run execution, or as a local process with --local, `parallel` at a time. Its result is
read from its job document: a completed job's `metrics[metric]` is told to Optuna; a failed job is told as
failed, and a cancelled one (cancelled by hand, or by the pruner) as pruned.

The study lives beside the exports, in `gs://{export bucket}/sweeps/{id}/`: `sweep.json` (the request, the
space and the settings, so that `--resume ID` needs nothing else) and Optuna's journal, one object per
append, each created only if its name is free (a generation precondition on GCS). A resumed sweep tells
what ended while it was away, takes up the trials it had started (a local trial resumes from its checkpoint;
a Cloud Run execution is still running or retrying on its own), and starts only the trials still missing.
"""

from __future__ import annotations

import copy
import json
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.storages.journal import BaseJournalBackend
from optuna.trial import TrialState

from operating.launch import (
    cloud_run_job_name,
    execution_finished,
    queue_job,
    run_cloud_job,
    settings_for,
    start_local,
    stop_local,
)
from runtime.errors import PermanentError, RequestError
from runtime.request import parse_request
from schema import Hyperparameters, normalise

# What Optuna users expect to tune, for the methods it applies to (the LoRA fields only with an adapter).
DEFAULT_SPACE: dict[str, dict[str, Any]] = {
    "learning_rate": {"low": 1e-5, "high": 1e-3, "log": True},
    "lora_rank": {"choices": [8, 16, 32, 64]},
    "lora_alpha": {"choices": [16, 32, 64, 128]},
    "lora_dropout": {"low": 0.0, "high": 0.1},
    "epochs": {"low": 1, "high": 5},
    "batch_size": {"choices": [2, 4, 8]},
}
LORA_ONLY = ("lora_rank", "lora_alpha", "lora_dropout")
MAXIMISED = ("accuracy", "reward_mean", "rouge_l", "exact_match", "bleu", "f1")


@dataclass
class SweepSpec:
    """What a sweep is, stored as sweep.json: enough to resume it from its id alone."""

    sweep_id: str
    request: dict[str, Any]
    space: dict[str, dict[str, Any]]
    trials: int
    parallel: int
    metric: str
    direction: str
    local: bool
    prune: bool = False
    seed: int | None = None
    max_retries: int = 3
    region: str | None = None
    cloud_run_job: str = "training-job"
    created_at: float = field(default_factory=time.time)


def direction_for(metric: str) -> str:
    return "maximize" if metric.removeprefix("eval_") in MAXIMISED else "minimize"


def default_space(request: dict[str, Any]) -> dict[str, dict[str, Any]]:
    method = request.get("training_config", {}).get("method", "LoRA")
    return {k: v for k, v in DEFAULT_SPACE.items() if method in ("LoRA", "QLoRA") or k not in LORA_ONLY}


def read_space(text: str) -> dict[str, dict[str, Any]]:
    try:
        space = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise RequestError(f"the space file is not YAML: {e}") from None
    if not isinstance(space, dict) or not space:
        raise RequestError("the space file must map hyperparameter names to {low, high[, log][, step]} or "
                           "{choices: [...]}, e.g. `learning_rate: {low: 1.0e-5, high: 1.0e-3, log: true}`")
    return space


def distributions(space: dict[str, Any]):
    """Optuna's distribution for each name, which must be a field of the request's hyperparameters."""
    fields = Hyperparameters.model_fields
    out = {}
    for name, spec in space.items():
        where = f"space.{name}"
        if name not in fields:
            raise RequestError(f"{where}: not a hyperparameter of the request (training_config.hyperparameters "
                               f"has {', '.join(sorted(fields))})")
        if not isinstance(spec, dict) or not spec.keys() <= {"low", "high", "log", "step", "choices"}:
            raise RequestError(f"{where}: give {{low, high[, log][, step]}} for a range or {{choices: [...]}}")
        if "choices" in spec:
            if spec.keys() != {"choices"} or not isinstance(spec["choices"], list) or not spec["choices"]:
                raise RequestError(f"{where}: choices is a non-empty list, alone")
            out[name] = CategoricalDistribution(spec["choices"])
            continue
        low, high = spec.get("low"), spec.get("high")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)) or low > high:
            raise RequestError(f"{where}: low and high are numbers with low <= high (got {low!r}, {high!r})")
        try:
            if isinstance(low, int) and isinstance(high, int) and isinstance(spec.get("step", 1), int):
                out[name] = IntDistribution(low, high, log=bool(spec.get("log")), step=spec.get("step", 1))
            else:
                out[name] = FloatDistribution(float(low), float(high), log=bool(spec.get("log")),
                                              step=spec.get("step"))
        except ValueError as e:  # log with step, or log with low <= 0
            raise RequestError(f"{where}: {e}") from None
    return out


def trial_request(request: dict[str, Any], params: dict[str, Any], sweep_id: str, number: int) -> dict[str, Any]:
    """The request with the trial's hyperparameters, in the grouped form whatever form it came in: in the
    training service's flat form the hyperparameters sit in training_config itself, where a value merged into
    a `hyperparameters` group beside them would be overridden by the request's own (schema.normalise)."""
    out = normalise(copy.deepcopy(request))
    tc = out.setdefault("training_config", {})
    tc["hyperparameters"] = {**(tc.get("hyperparameters") or {}), **params}
    out["job_name"] = f"{request.get('job_name') or 'sweep'} (sweep {sweep_id}, trial {number})"
    return out


def check_space(request: dict[str, Any], dists) -> None:
    """Each end of each range, and each choice, in the request: the schema accepts it, or the sweep is
    refused before a trial runs (an epoch count the schema refuses is better said now than six times)."""
    for name, dist in dists.items():
        values = getattr(dist, "choices", None) or (dist.low, dist.high)
        for value in values:
            try:
                parse_request(json.dumps(trial_request(request, {name: value}, "check", 0)))
            except PermanentError as e:
                raise RequestError(f"space.{name}={value!r} makes a request the job refuses: {e}") from None


class BlobJournal(BaseJournalBackend):
    """Optuna's journal in a bucket: each append one new object `{prefix}{n:08d}.json`, created only if the
    name is free, so that two commands on one sweep never lose each other's records; objects already read are
    kept (they never change)."""

    def __init__(self, blobs, prefix: str):
        self.blobs, self.prefix = blobs, prefix.rstrip("/") + "/"
        self.chunks: dict[str, list[dict[str, Any]]] = {}
        self.writer = uuid.uuid4().hex

    def _names(self) -> list[str]:
        return sorted(u for u in self.blobs.list(self.prefix) if u.endswith(".json"))

    def read_logs(self, log_number_from: int) -> list[dict[str, Any]]:
        logs: list[dict[str, Any]] = []
        for uri in self._names():
            if uri not in self.chunks:
                self.chunks[uri] = json.loads(self.blobs.read_bytes(uri))["logs"]
            logs.extend(self.chunks[uri])
        return logs[log_number_from:]

    def append_logs(self, logs: list[dict[str, Any]]) -> None:
        data = json.dumps({"writer": self.writer, "at": time.time(), "logs": logs}).encode()
        for _ in range(100):
            uri = f"{self.prefix}{len(self._names()):08d}.json"
            # False: the name was taken, by another writer, or by this write itself when a retry followed a
            # lost answer (then the object holds these very bytes)
            if self.blobs.write_new(uri, data) or self.blobs.read_bytes(uri) == data:
                return
        raise RuntimeError(f"could not append to the sweep journal {self.prefix}: 100 names taken in turn")


@dataclass
class Running:
    number: int
    job_id: str
    trial: optuna.trial.Trial | None = None  # to report evaluations to the pruner
    process: subprocess.Popen | None = None
    execution: str | None = None
    attempt: int = 0
    reported: int = -1  # the last step whose eval was reported to the pruner


class Sweep:
    def __init__(self, spec: SweepSpec, env, out=print, interval: float = 10.0, sleep=time.sleep):
        from job.services import make_blobs, open_store

        self.spec, self.env, self.out, self.interval, self.sleep = spec, env, out, interval, sleep
        self.settings = settings_for(spec.sweep_id, env)
        self.store, self.blobs = open_store(self.settings), make_blobs(self.settings)
        self.dists = distributions(spec.space)
        self.root = f"gs://{self.settings.export_bucket}/sweeps/{spec.sweep_id}/"
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        storage = optuna.storages.JournalStorage(BlobJournal(self.blobs, self.root + "journal/"))
        pruner = optuna.pruners.MedianPruner(n_startup_trials=2) if spec.prune else optuna.pruners.NopPruner()
        self.study = optuna.create_study(study_name=spec.sweep_id, storage=storage, direction=spec.direction,
                                         pruner=pruner, load_if_exists=True)
        # The sampler's state is not in the journal: a resumed sweep seeded as at its start would draw its
        # first trials' values again, so the seed moves on by the trials already drawn.
        seed = None if spec.seed is None else spec.seed + len(self.study.trials)
        self.study.sampler = optuna.samplers.TPESampler(seed=seed)
        self.running: dict[int, Running] = {}

    # --- the sweep's own record -------------------------------------------------------------------------
    @staticmethod
    def record(sweep_id: str, env):
        """The buckets and the URI of sweep.json (a sweep id is checked as a job id is)."""
        from job.services import make_blobs

        settings = settings_for(sweep_id, env)
        return make_blobs(settings), f"gs://{settings.export_bucket}/sweeps/{sweep_id}/sweep.json"

    @staticmethod
    def create(spec: SweepSpec, env) -> None:
        blobs, uri = Sweep.record(spec.sweep_id, env)
        if not blobs.write_new(uri, json.dumps(asdict(spec), indent=1).encode()):
            raise RequestError(f"sweep {spec.sweep_id} exists already ({uri}): continue it with --resume "
                               f"{spec.sweep_id}, or choose another --sweep-id")

    @staticmethod
    def load(sweep_id: str, env) -> SweepSpec:
        from storage import MissingObject

        blobs, uri = Sweep.record(sweep_id, env)
        try:
            return SweepSpec(**json.loads(blobs.read_bytes(uri)))
        except MissingObject:
            raise RequestError(f"no sweep {sweep_id}: {uri} not found") from None

    # --- trials -----------------------------------------------------------------------------------------
    def job_id(self, number: int) -> str:
        return f"{self.spec.sweep_id}-{number:03d}"

    def launch(self, trial, attempt: int = 0) -> None:
        """Queue the trial's job (once) and start it; a trial already queued is only started."""
        number, params = trial.number, trial.params
        job_id = self.job_id(number)
        settings = settings_for(job_id, self.env)
        text = json.dumps(trial_request(self.spec.request, params, self.spec.sweep_id, number), indent=1)
        queue_job(settings, self.store, self.blobs, text, parse_request(text),
                  {"sweep_id": self.spec.sweep_id, "trial": number, "sweep_params": params})
        run = self.running.setdefault(number, Running(number, job_id, trial))
        run.attempt = attempt
        if self.spec.local:
            run.process = start_local(settings, self.env, attempt=attempt)
        else:
            name = cloud_run_job_name(settings.project_id, self.spec.region, self.spec.cloud_run_job, self.env)
            run.execution = run_cloud_job(name, job_id, self.env)
            self.store.merge(job_id, {"cloud_run_execution": run.execution})
        self.out(f"trial {number} ({job_id}) started{f', attempt {attempt}' if attempt else ''}: "
                 f"{format_params(params)}")

    def adopt(self, frozen) -> None:
        """A trial this sweep started before it stopped: told if its job has ended, else taken up."""
        trial = optuna.trial.Trial(self.study, frozen._trial_id)  # Optuna's way back to a running trial
        job_id = self.job_id(trial.number)
        doc = self.store.get(job_id)
        if doc is None or (not self.spec.local and doc.get("status") == "queued"
                           and not doc.get("cloud_run_execution")):  # asked or queued, never started: start it
            return self.launch(trial)
        run = Running(trial.number, job_id, trial, execution=doc.get("cloud_run_execution"),
                      attempt=doc.get("attempt", 0))
        self.running[trial.number] = run
        if self.spec.local and not self.finished(run, doc):
            # its process stopped with the command that ran it (SIGTERM: a checkpoint saved): resumed from it
            self.launch(trial, attempt=run.attempt + 1)
        else:
            self.out(f"trial {trial.number} ({job_id}) taken up: {doc.get('status')}")

    def finished(self, run: Running, doc: dict[str, Any] | None) -> bool:
        """Whether the trial's job has ended for good (no retry to come)."""
        if doc is None:
            return False
        if doc.get("status") == "completed" or doc.get("cancelled"):
            return True
        if doc.get("status") != "failed":
            return False
        if doc.get("error_type") == "permanent":
            return True
        if self.spec.local:  # a retryable failure: this command retries it, as Cloud Run would
            return run.attempt >= self.spec.max_retries
        return bool(run.execution) and execution_finished(run.execution, self.env)

    def tell(self, run: Running, doc: dict[str, Any]) -> None:
        if doc.get("status") == "completed":
            value = (doc.get("metrics") or {}).get(self.spec.metric)
            if not isinstance(value, (int, float)):
                self.study.tell(run.number, state=TrialState.FAIL)
                raise RequestError(f"metric {self.spec.metric!r} is not among trial {run.number}'s metrics "
                                   f"({', '.join(sorted(doc.get('metrics') or {}))}); choose one of those with "
                                   f"--metric (resume with --resume {self.spec.sweep_id})")
            self.study.tell(run.number, float(value))
            self.out(f"trial {run.number} ({run.job_id}) completed: {self.spec.metric} {value:.6g}")
        elif doc.get("cancelled"):
            self.study.tell(run.number, state=TrialState.PRUNED)
            self.out(f"trial {run.number} ({run.job_id}) pruned: {doc.get('error')}")
        else:
            self.study.tell(run.number, state=TrialState.FAIL)
            self.out(f"trial {run.number} ({run.job_id}) failed ({doc.get('error_type')}): {doc.get('error')}")
        self.running.pop(run.number, None)

    def report(self, run: Running, doc: dict[str, Any]) -> None:
        """The trial's newest evaluation to the pruner; a trial it prunes is cancelled (its job stops at the
        next step and ends `failed`, `cancelled`: told as pruned)."""
        last = doc.get("last_eval") or {}
        key = self.spec.metric if self.spec.metric.startswith("eval_") else f"eval_{self.spec.metric}"
        step = last.get("step")
        if not self.spec.prune or step is None or step <= run.reported or not isinstance(last.get(key), (int, float)):
            return
        run.reported = step
        run.trial.report(float(last[key]), step)
        if run.trial.should_prune() and not doc.get("cancel_requested"):
            self.store.merge(run.job_id, {"cancel_requested": True})
            self.out(f"trial {run.number} ({run.job_id}) pruned at step {step}: {key} {last[key]:.6g}")

    def poll(self) -> None:
        for run in list(self.running.values()):
            alive = run.process is not None and run.process.poll() is None  # read before its document
            doc = self.store.get(run.job_id)
            if alive:
                if doc:
                    self.report(run, doc)
                continue
            if self.finished(run, doc):
                self.tell(run, doc)
            elif run.process is not None:  # the process ended without a final state: retried from its checkpoint
                if run.attempt >= self.spec.max_retries:
                    self.store.merge(run.job_id, {"status": "failed", "error_type": "retryable", "error":
                                                  f"the job's process ended {run.attempt + 1} times without a result"})
                    self.tell(run, self.store.get(run.job_id))
                else:
                    self.launch(run.trial, attempt=run.attempt + 1)
            elif doc:
                self.report(run, doc)

    def run(self) -> int:
        try:
            for frozen in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING)):
                self.adopt(frozen)
            while True:
                while len(self.running) < self.spec.parallel and len(self.study.trials) < self.spec.trials:
                    self.launch(self.study.ask(self.dists))
                if not self.running:
                    break
                self.sleep(self.interval)
                self.poll()
        except (KeyboardInterrupt, SystemExit):  # Ctrl-C, or SIGTERM (the CLI makes it SystemExit)
            self.interrupted()
            return 130
        except BaseException:
            self.interrupted()
            raise
        return self.finish()

    def interrupted(self) -> None:
        local = [r.process for r in self.running.values() if r.process is not None]
        stop_local(local)
        self.out(f"sweep {self.spec.sweep_id} stopped with {len(self.running)} trials running"
                 f"{' (each saved a checkpoint)' if local else ' (their Cloud Run executions go on)'}; continue it "
                 f"with `gemma-job sweep --resume {self.spec.sweep_id}`")

    # --- the end ----------------------------------------------------------------------------------------
    def table(self) -> list[dict[str, Any]]:
        rows = []
        for t in self.study.trials:
            rows.append({"trial": t.number, "job_id": self.job_id(t.number), "state": t.state.name.lower(),
                         self.spec.metric: t.value, "params": t.params})
        return rows

    def finish(self) -> int:
        rows = self.table()
        self.out(render_table(rows, self.spec.metric))
        summary: dict[str, Any] = {"sweep_id": self.spec.sweep_id, "metric": self.spec.metric,
                                   "direction": self.spec.direction, "trials": rows}
        if not self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            self.blobs.write_bytes(self.root + "results.json", json.dumps(summary, indent=1, default=str).encode())
            self.out(f"sweep {self.spec.sweep_id}: no trial completed")
            return 1
        best = self.study.best_trial
        best_request = trial_request(self.spec.request, best.params, self.spec.sweep_id, best.number)
        summary["best"] = {"trial": best.number, "job_id": self.job_id(best.number), "value": best.value,
                           "params": best.params}
        self.blobs.write_bytes(self.root + "best_request.json", json.dumps(best_request, indent=1).encode())
        self.blobs.write_bytes(self.root + "results.json", json.dumps(summary, indent=1, default=str).encode())
        self.best_request = best_request
        self.out(f"best: trial {best.number} ({self.job_id(best.number)}), {self.spec.metric} {best.value:.6g}: "
                 f"{format_params(best.params)}")
        return 0

    def promote(self) -> list[str]:
        """The best trial's exported folders copied under sweeps/{id}/best/{adapter,merged,gguf}/."""
        import tempfile

        from exporting.export import FOLDERS

        best_job = self.job_id(self.study.best_trial.number)
        copied = []
        for what, folder in FOLDERS.items():
            prefix = f"gs://{self.settings.bucket_for(what)}/{folder}/{best_job}/"
            names = [u[len(prefix):] for u in self.blobs.list(prefix)]
            if not names:
                continue
            with tempfile.TemporaryDirectory() as tmp:
                self.blobs.download_dir(prefix, Path(tmp), names)
                copied += self.blobs.upload_dir(Path(tmp), f"{self.root}best/{what}/")
        return copied


def format_params(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def render_table(rows: list[dict[str, Any]], metric: str) -> str:
    lines = [f"{'trial':>5}  {'job':<28} {'state':<9} {metric:>12}  params"]
    for r in rows:
        value = "-" if r[metric] is None else f"{r[metric]:.6g}"
        lines.append(f"{r['trial']:>5}  {r['job_id']:<28} {r['state']:<9} {value:>12}  {format_params(r['params'])}")
    return "\n".join(lines)


def start(args, env, out=print) -> int:
    """`gemma-job sweep`: a new sweep from a request and a space, or --resume ID."""
    if args.resume:
        spec = Sweep.load(args.resume, env)
    else:
        if not args.request:
            raise RequestError("sweep: give the request file (or --resume SWEEP_ID)")
        text = Path(args.request).read_text()
        parse_request(text)  # the request itself first: its errors name its fields
        request = json.loads(text)
        space = read_space(Path(args.space).read_text()) if args.space else default_space(request)
        check_space(request, distributions(space))
        if args.trials < 1 or args.parallel < 1:
            raise RequestError("--trials and --parallel are at least 1")
        settings = settings_for("sweep", env)
        if not args.local and (settings.backend != "gcp" or not settings.project_id):
            raise RequestError("sweep: running trials on Cloud Run needs BACKEND=gcp and PROJECT_ID; set them, or "
                               "run the trials here with --local")
        spec = SweepSpec(sweep_id=args.sweep_id or f"sweep-{uuid.uuid4().hex[:8]}", request=request, space=space,
                         trials=args.trials, parallel=args.parallel, metric=args.metric,
                         direction=args.direction or direction_for(args.metric), local=args.local,
                         prune=args.prune, seed=args.seed, region=args.region, cloud_run_job=args.cloud_run_job)
        Sweep.create(spec, env)
        out(f"sweep {spec.sweep_id}: {spec.trials} trials, {spec.parallel} at a time, {spec.direction} "
            f"{spec.metric}; space {', '.join(spec.space)}")
    sweep = Sweep(spec, env, out=out, interval=args.interval)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stopped like Ctrl-C: the trials told to stop too
    code = sweep.run()
    if code == 0:
        best_out = Path(args.best_out or f"{spec.sweep_id}-best.json")
        best_out.write_text(json.dumps(sweep.best_request, indent=1) + "\n")
        out(f"the best request: {best_out} (and {sweep.root}best_request.json)")
        if args.promote:
            copied = sweep.promote()
            out(f"promoted: {len(copied)} files under {sweep.root}best/")
    return code
