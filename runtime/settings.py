"""The job's settings: its environment (read by main.py alone, the only reader of os.environ) validated
into one frozen object that is passed down with the request, with errors that name the variable.
Defaults live here.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator

from runtime.distributed import Topology
from runtime.errors import RequestError
from schema import SAFE_ID, StrictModel, TrainRequest


class Settings(StrictModel):
    """The job's environment, read by main.py alone and validated here."""
    job_id: str = Field(pattern=SAFE_ID)
    backend: Literal["gcp", "local"] = "local"
    local_dir: str = "./.local"
    work_dir: str | None = Field(None, description="Where the job's own files go (WORK_DIR): a machine's disk; "
                                 "default LOCAL_DIR/work.")
    project_id: str | None = None
    firestore_db: str = "(default)"
    config_bucket: str = "gemma-train-config"
    config_uri: str | None = Field(None, pattern=r"^gs://[^/]+/.+$")
    data_bucket: str = "gemma-dataset-bucket"
    export_bucket: str = "gemma-export-bucket"
    export_files_bucket: str | None = Field(None, description="The platform's public files bucket: the GGUF goes "
                                            "here, where the web UI downloads it (default: export_bucket).")
    hf_token: SecretStr | None = None
    hf_endpoint: str | None = None
    wandb_api_key: SecretStr | None = None
    wandb_mode: Literal["online", "offline", "disabled"] | None = Field(
        None, description="WANDB_MODE: online, offline (no network; the run's folder is uploaded for `wandb "
        "sync`) or disabled; default online with a key, offline without.")
    wandb_init_timeout_s: float = Field(20.0, gt=0, le=300, description="WANDB_INIT_TIMEOUT: how long W&B may "
                                        "take to start online before the run continues offline.")
    attempt: int = Field(0, ge=0)
    max_retries: int | None = Field(None, ge=0, description="The Cloud Run job's --max-retries (MAX_RETRIES): the "
                                    "attempt numbered so is the last, so its failure, retryable or not, ends the job.")
    task_timeout_s: float | None = Field(None, gt=0, description="The Cloud Run task timeout (TASK_TIMEOUT_SECONDS).")
    gpu_memory_gib: float | None = Field(None, gt=0, description="Check the memory estimate against this GPU "
                                         "size instead of the visible GPU's (GPU_MEMORY_GIB).")
    gpu_price_per_hour: float | None = Field(None, ge=0, description="GPU_PRICE_PER_HOUR: the US dollars an hour of "
                                             "the job's machine costs, for the estimate and the elapsed cost (default "
                                             "models/estimate.py's Cloud Run L4 list price; on Cloud Run only, for "
                                             "the elapsed cost).")
    deadline_reserve_s: float = Field(60.0, ge=0, description="Stop this long before the task timeout, plus "
                                      "the time of one step and one checkpoint.")
    give_up_s: float = Field(300.0, gt=0, description="STORE_GIVE_UP_SECONDS: how long an outage of the bucket or "
                             "the job document is retried through before the attempt fails, retryably (the next "
                             "resumes from the newest complete checkpoint).")
    host_memory_gib: float | None = Field(None, gt=0, description="Check the job's files and process against "
                                          "this much container memory (HOST_MEMORY_GIB).")
    disk_is_memory: bool = Field(False, description="The container's disk is its memory (Cloud Run): its "
                                 "limit bounds the job's files as well as its process.")
    world_size: int = Field(1, ge=1, description="Processes in the run (WORLD_SIZE, set by torchrun in each worker).")
    rank: int = Field(0, ge=0, description="This process's rank (RANK in a torchrun worker): 0 writes and exports.")
    local_rank: int = Field(0, ge=0, description="Its rank on this machine (LOCAL_RANK): 0 downloads for the node.")
    task_count: int = Field(1, ge=1, description="Tasks of the Cloud Run execution (CLOUD_RUN_TASK_COUNT).")
    execution: str | None = Field(None, max_length=200, description="The Cloud Run execution running this attempt "
                                  "(CLOUD_RUN_EXECUTION), recorded in the job document.")

    @field_validator("task_count")
    @classmethod
    def _one_task(cls, v: int) -> int:
        if v > 1:  # Cloud Run's parallel tasks are independent: they cannot train one model together
            raise ValueError(f"the execution has {v} tasks, and each would run this same job, racing on its "
                             "document, its checkpoints and its exports; execute the job with `--tasks 1` (one "
                             "job per execution: start another execution with its own JOB_ID for another job)")
        return v

    @property
    def last_attempt(self) -> bool:
        """No retry follows this attempt, whatever it ends with (unknown without max_retries)."""
        return self.max_retries is not None and self.attempt >= self.max_retries

    def bucket_for(self, artifact: str) -> str:
        """The bucket an artifact goes to: a single file the UI opens as a public URL (the GGUF) goes to the
        files bucket, a folder a service loads to the export bucket."""
        return (self.export_files_bucket or self.export_bucket) if artifact == "gguf" else self.export_bucket

    def hub_token(self, request: TrainRequest) -> str | None:
        """The Hugging Face token: the request's hf_token, else HF_TOKEN (decided here alone)."""
        token = request.hf_token or self.hf_token
        return token.get_secret_value() if token else None

    def wandb_key(self, request: TrainRequest) -> tuple[str | None, str]:
        """The W&B key and the name a message gives it: wandb_config.api_key, else WANDB_API_KEY."""
        wb = request.training_config.wandb_config
        if wb and wb.api_key:
            return wb.api_key.get_secret_value(), "wandb_config.api_key"
        return (self.wandb_api_key.get_secret_value() if self.wandb_api_key else None), "WANDB_API_KEY"

    @property
    def place(self) -> Topology:
        """This process's place among the run's processes (runtime/distributed.py), from WORLD_SIZE, RANK and
        LOCAL_RANK."""
        return Topology(self.world_size, self.rank, self.local_rank)

    @property
    def workdir(self) -> Path:
        """The job's own folder for downloads, checkpoints and exports, removed when the attempt ends: under
        WORK_DIR (a machine's own disk, one per node of several), else LOCAL_DIR/work."""
        return Path(self.work_dir or Path(self.local_dir) / "work") / self.job_id

    @property
    def request_uri(self) -> str:
        return self.config_uri or f"gs://{self.config_bucket}/{self.job_id}.json"


def check_job_id(job_id: str) -> str:
    if not re.fullmatch(SAFE_ID, job_id or ""):
        raise RequestError(f"JOB_ID {job_id!r} is not valid: use letters, digits, '.', '_' or '-' "
                           "(no slashes, not starting with '.'), at most 200 characters.")
    return job_id


def parse_settings(values: dict[str, Any], names: dict[str, str]) -> Settings:
    """Settings from the environment's values; `names` maps each field to its variable, which the errors
    name with the value given (never a secret's) and what is allowed."""
    try:
        return Settings(**values)
    except ValidationError as e:
        problems = []
        for p in e.errors():
            field = str(p["loc"][0]) if p["loc"] else "environment"
            shown = "" if field in ("hf_token", "wandb_api_key") else f"={p.get('input')!r}"
            problems.append(f"{names.get(field, field)}{shown}: {p['msg'].removeprefix('Value error, ')}")
        raise RequestError("; ".join(problems) + "; correct the variable, or unset it for its default.") from None
