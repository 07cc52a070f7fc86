"""The job document as its readers (the training service and the frontend) check it: DESIGN.md's
required keys with their types, the five status values only, timestamps as timestamps, and at
`completed` the four SFT metric names. Returns the problems found; an empty list means accepted."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError

STATUSES = {"queued", "preparing", "training", "completed", "failed"}
STRINGS = ("job_id", "job_name", "processed_dataset_id", "base_model_id")
TIMESTAMPS = ("created_at", "updated_at")
SFT_METRICS = ("accuracy", "perplexity", "eval_loss", "eval_runtime")


# The training job's document as cloud-services' jobs/export-job reads it before it zips or converts what the
# job exported (its schema.py JobSchema, as read there; written here from that reading): artifacts.{file,raw,hf}
# hold strings or nothing under adapter/merged/gguf, and modality is text or vision where it is set. A
# document it cannot read fails every export the user asks for.
class _ArtifactPaths(BaseModel):
    adapter: str | None = None
    merged: str | None = None
    gguf: str | None = None


class _Artifacts(BaseModel):
    file: _ArtifactPaths = Field(default_factory=_ArtifactPaths)
    raw: _ArtifactPaths = Field(default_factory=_ArtifactPaths)
    hf: _ArtifactPaths = Field(default_factory=_ArtifactPaths)


class _ExportJobView(BaseModel):
    job_id: str
    job_name: str
    user_id: str
    base_model_id: str
    modality: Literal["text", "vision"] | None = "text"
    artifacts: _Artifacts | None = Field(default_factory=_Artifacts)


def export_job_problems(doc: dict[str, Any]) -> list[str]:
    """What the export job's reading of a completed document (with the user_id the training service writes)
    refuses."""
    try:
        _ExportJobView.model_validate(doc)
    except ValidationError as e:
        return [f"export job: {'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors()]
    return []


def problems(doc: dict[str, Any] | None) -> list[str]:
    if doc is None:
        return ["no document"]
    found = [f"{k} is {type(doc.get(k)).__name__}, not a string" for k in STRINGS if not isinstance(doc.get(k), str)]
    found += [f"{k} is {type(doc.get(k)).__name__}, not a timestamp" for k in TIMESTAMPS
              if not isinstance(doc.get(k), datetime)]
    if doc.get("status") not in STATUSES:
        found.append(f"status {doc.get('status')!r} is not one of {sorted(STATUSES)}")
    if "metrics" in doc and not isinstance(doc["metrics"], dict):
        found.append("metrics is not a map")
    if doc.get("status") == "completed":
        metrics = doc.get("metrics") or {}
        found += [f"metrics.{m} missing or not a number" for m in SFT_METRICS
                  if not isinstance(metrics.get(m), (int, float))]
        if not isinstance(doc.get("adapter_path"), str):
            found.append("adapter_path is not a string")
        if "gguf_path" not in doc:
            found.append("gguf_path missing")
        if doc.get("error") is not None:
            found.append("error not cleared on success")
        found += export_job_problems({"user_id": "a user", **doc})
    if doc.get("status") == "failed" and not isinstance(doc.get("error"), str):
        found.append("failed without an error message")
    return found
