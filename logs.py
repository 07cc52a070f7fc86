"""Logging set-up: JSON lines that Cloud Logging understands on Cloud Run, plain lines on a terminal,
and every known secret value masked in every record (messages, arguments and tracebacks)."""

from __future__ import annotations

import json
import logging
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
    def __init__(self, job_id: str):
        super().__init__()
        self.job_id = job_id

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.exc_text or record.exc_info:
            message += "\n" + (record.exc_text or self.formatException(record.exc_info))
        return json.dumps({"severity": record.levelname, "message": message, "job_id": self.job_id,
                           "logger": record.name, "logging.googleapis.com/labels": {"job_id": self.job_id}})


REDACT = RedactingFilter()


def setup_logging(job_id: str, json_lines: bool, level: int | str = logging.INFO) -> RedactingFilter:
    handler = logging.StreamHandler(sys.stdout if json_lines else sys.stderr)
    handler.setFormatter(JsonFormatter(job_id) if json_lines else
                         logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    handler.addFilter(REDACT)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("httpx", "urllib3", "google", "filelock", "datasets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return REDACT
