"""Logging set-up: JSON lines that Cloud Logging understands on Cloud Run, plain lines on a terminal,
and every known secret value masked in every record (messages, arguments and tracebacks)."""

from __future__ import annotations

import importlib
import json
import logging
import os
import sys

MASK = "**********"


class RedactingFilter(logging.Filter):
    def __init__(self) -> None:
        super().__init__()
        self.secrets: set[str] = set()

    def add(self, *values: str | None) -> None:
        self.secrets.update(v for v in values if v and len(v) >= 4)

    def redact(self, text: str) -> str:
        for s in self.secrets:
            text = text.replace(s, MASK)
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        if self.secrets:
            record.msg, record.args = self.redact(record.getMessage()), None
            if record.exc_info:
                record.exc_text = self.redact(logging.Formatter().formatException(record.exc_info))
                record.exc_info = None
        return True


class JsonFormatter(logging.Formatter):
    def __init__(self, job_id: str, rank: int | None = None):
        super().__init__()
        self.job_id, self.rank = job_id, rank

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.exc_text or record.exc_info:
            message += "\n" + (record.exc_text or self.formatException(record.exc_info))
        ranked = {"rank": self.rank} if self.rank is not None else {}
        return json.dumps({"severity": record.levelname, "message": message, "job_id": self.job_id, **ranked,
                           "logger": record.name, "logging.googleapis.com/labels": {"job_id": self.job_id}})


REDACT = RedactingFilter()


def setup_logging(job_id: str, json_lines: bool, level: int | str = logging.INFO,
                  rank: int | None = None) -> RedactingFilter:
    """One handler for every record: the job's own, the libraries' and Python warnings. With json_lines
    (Cloud Run) progress bars are off too: each redraw would be a line of its own, and not JSON. rank: the
    worker's, with several processes, on every line."""
    if json_lines:
        # read as huggingface_hub and datasets are imported (later, lazily, and in the processes the job starts)
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
        # and turned off in those already imported, which read that switch once (transformers copies hub's)
        if "huggingface_hub" in sys.modules:  # its submodule imported by name: the package's lazy attributes lack it
            importlib.import_module("huggingface_hub.utils").disable_progress_bars()
        if "datasets" in sys.modules:
            sys.modules["datasets"].disable_progress_bars()
        if "transformers" in sys.modules:
            sys.modules["transformers"].utils.logging.disable_progress_bar()
    logging.captureWarnings(True)  # PEFT's and torch's warnings.warn, as records (JSON on Cloud Run)
    handler = logging.StreamHandler(sys.stdout if json_lines else sys.stderr)
    where = "" if rank is None else f"[rank {rank}] "
    handler.setFormatter(JsonFormatter(job_id, rank) if json_lines else
                         logging.Formatter(f"%(asctime)s {where}%(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    handler.addFilter(REDACT)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("httpx", "urllib3", "google", "filelock", "datasets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return REDACT


def route_transformers_logs() -> None:
    """transformers prints its warnings with a handler of its own ('[transformers] ...' on stderr): through
    the job's handler instead, so that they are JSON on Cloud Run and masked like every other record."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_default_handler()
    hf_logging.enable_propagation()
