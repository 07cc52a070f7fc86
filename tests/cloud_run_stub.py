"""A stand-in for the Cloud Run Admin API (v2, REST), which has no emulator: test code, like the Hub stub.
It answers RunJob (`POST /v2/{job}:run`) with the long-running operation Cloud Run returns, its metadata
the new Execution, GetExecution (`GET /v2/{execution}`: `completionTime` once it has ended) and
CancelExecution (`POST /v2/{execution}:cancel`), and keeps every request it was sent for the test to read. A
job it does not know answers 404 NOT_FOUND, as Cloud Run does. Given `launch` (the container's command for
the overridden env: a process), it runs each execution as Cloud Run would run the container."""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class CloudRunStub:
    def __init__(self, jobs: set[str], launch=None):
        self.jobs, self.calls, self.launch = jobs, [], launch  # calls: (method, path, body)
        self.executions: dict[str, object] = {}  # name -> the process running it (None: never ends by itself)
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def reply(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):  # noqa: N802 - http.server's name
                path = self.path.split("?")[0]
                stub.calls.append(("GET", path, None))
                name = path.removeprefix("/v2/")
                if name not in stub.executions:
                    return self.reply(404, {"error": {"code": 404, "message": f"{name} not found",
                                                      "status": "NOT_FOUND"}})
                process = stub.executions[name]
                ended = process is not None and process.poll() is not None
                self.reply(200, {"name": name, **({"completionTime": "2026-12-04T00:00:00Z"} if ended else {})})

            def do_POST(self):  # noqa: N802 - http.server's name
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                stub.calls.append(("POST", self.path.split("?")[0], body))  # the client adds $alt=json
                run = re.fullmatch(r"/v2/(projects/[^/]+/locations/([^/]+)/jobs/([^/:]+)):run", self.path.split("?")[0])
                cancel = re.fullmatch(r"/v2/(projects/.+/executions/[^/:]+):cancel", self.path.split("?")[0])
                if run and run.group(3) in stub.jobs:
                    execution = f"{run.group(1)}/executions/{run.group(3)}-{len(stub.calls):05d}"
                    env = {e["name"]: e.get("value", "") for o in body.get("overrides", {}).get(
                        "containerOverrides", []) for e in o.get("env", [])}
                    stub.executions[execution] = stub.launch(env) if stub.launch else None
                    return self.reply(200, {
                        "name": f"projects/p/locations/{run.group(2)}/operations/op-{len(stub.calls)}", "done": False,
                        "metadata": {"@type": "type.googleapis.com/google.cloud.run.v2.Execution", "name": execution,
                                     "job": run.group(3)}})
                if cancel:
                    return self.reply(200, {"name": "projects/p/locations/r/operations/cancel", "done": False,
                                            "metadata": {"@type": "type.googleapis.com/google.cloud.run.v2.Execution",
                                                         "name": cancel.group(1)}})
                self.reply(404, {"error": {"code": 404, "message": f"Resource '{self.path}' was not found",
                                           "status": "NOT_FOUND"}})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
