"""A stand-in for the Cloud Logging API (v2, REST), which has no emulator: test code, like the Hub stub.
It answers `POST /v2/entries:list` with the entries it holds that match the two filter terms the CLI sends
(`labels.job_id="..."` and `timestamp>="..."`), oldest first, as Cloud Logging would, and keeps each request
for the test to read. Entries are written as Cloud Run writes the job's JSON lines: the message in
jsonPayload, the severity and the `logging.googleapis.com/labels` moved to the entry."""

from __future__ import annotations

import json
import re
import threading
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class LoggingStub:
    def __init__(self):
        self.entries: list[dict] = []
        self.requests: list[dict] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_POST(self):  # noqa: N802 - http.server's name
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
                stub.requests.append({"path": self.path.split("?")[0], **body})
                if self.path.split("?")[0] != "/v2/entries:list":
                    self.send_response(404)
                    self.end_headers()
                    return
                job = re.search(r'labels\.job_id="([^"]+)"', body.get("filter", ""))
                since = re.search(r'timestamp>="([^"]+)"', body.get("filter", ""))
                entries = [e for e in stub.entries
                           if job and e["labels"].get("job_id") == job.group(1)
                           and (not since or parse(e["timestamp"]) >= parse(since.group(1)))]
                entries.sort(key=lambda e: parse(e["timestamp"]))
                data = json.dumps({"entries": entries}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def add(self, project: str, job_id: str, timestamp: str, severity: str, message: str) -> None:
        self.entries.append({
            "logName": f"projects/{project}/logs/run.googleapis.com%2Fstdout", "insertId": f"id{len(self.entries)}",
            "resource": {"type": "cloud_run_job", "labels": {"job_name": "training-job", "project_id": project}},
            "timestamp": timestamp, "severity": severity, "labels": {"job_id": job_id},
            "jsonPayload": {"message": message, "job_id": job_id, "logger": "main"}})

    def stop(self) -> None:
        self.server.shutdown()


def parse(stamp: str) -> datetime:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00"))
