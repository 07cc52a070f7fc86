"""A small local server speaking the parts of the Hugging Face Hub's HTTP API the job uses, for
huggingface_hub pointed at it with `endpoint=`/`HF_ENDPOINT`: create_repo, auth_check (read and
write), validate-yaml, preupload and the NDJSON commit of upload_folder (every file sent inline, base64).

It keeps what it receives in memory: `hub.repos[repo_id]` is `{"private": bool, "files": {path: bytes}}`.
Tokens: `HubStub(token=...)` is the only one accepted; `readable` repos may be read but not written.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class HubStub:
    def __init__(self, token: str, readable: tuple[str, ...] = ()):
        self.token = token
        self.repos: dict[str, dict[str, Any]] = {r: {"private": False, "files": {}, "writable": False}
                                                 for r in readable}
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Authorization header)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> HubStub:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def reply(self, status: int, body: Any = None, error_code: str | None = None) -> None:
                data = json.dumps(body if body is not None else {}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                if error_code:
                    self.send_header("X-Error-Code", error_code)
                    self.send_header("X-Error-Message", error_code)
                self.end_headers()
                self.wfile.write(data)

            def body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def authorised(self) -> bool:
                return self.headers.get("Authorization") == f"Bearer {hub.token}"

            def do_GET(self) -> None:
                hub.requests.append(("GET", self.path, self.headers.get("Authorization")))
                m = re.fullmatch(r"/api/models/(.+?/.+?)/auth-check(/write)?", self.path)
                if not m:
                    return self.reply(404, {"error": f"stub: no route GET {self.path}"})
                repo = hub.repos.get(m[1])
                if repo is None or (repo["private"] and not self.authorised()):
                    return self.reply(404, {"error": "Repository not found"}, "RepoNotFound")
                if m[2] and not (repo["writable"] and self.authorised()):
                    return self.reply(403, {"error": "no write access"})
                return self.reply(200, {})

            def do_POST(self) -> None:
                hub.requests.append(("POST", self.path, self.headers.get("Authorization")))
                data = self.body()
                if not self.authorised():
                    return self.reply(401, {"error": "Invalid credentials"})
                if self.path == "/api/validate-yaml":  # upload_folder checks a README.md's metadata first
                    return self.reply(200, {"errors": [], "warnings": []})
                if self.path == "/api/repos/create":
                    payload = json.loads(data)
                    repo_id = f"{payload['organization']}/{payload['name']}" if payload.get("organization") \
                        else payload["name"]
                    if repo_id in hub.repos:
                        return self.reply(409, {"error": "You already created this model repo", "url": f"{hub.url}/{repo_id}"})
                    hub.repos[repo_id] = {"private": payload.get("visibility", "public") != "public",
                                          "files": {}, "writable": True}
                    return self.reply(200, {"url": f"{hub.url}/{repo_id}"})
                m = re.fullmatch(r"/api/models/(.+?/.+?)/(preupload|commit)/([^/?]+)(\?.*)?", self.path)
                if not m or m[1] not in hub.repos:
                    return self.reply(404, {"error": f"stub: no route POST {self.path}"}, "RepoNotFound")
                repo = hub.repos[m[1]]
                if not repo["writable"]:
                    return self.reply(403, {"error": "no write access"})
                if m[2] == "preupload":
                    files = json.loads(data)["files"]
                    return self.reply(200, {"files": [{"path": f["path"], "uploadMode": "regular",
                                                       "shouldIgnore": False} for f in files]})
                for line in data.splitlines():
                    item = json.loads(line)
                    if item["key"] == "file":
                        repo["files"][item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                    elif item["key"] != "header":
                        return self.reply(400, {"error": f"stub: unsupported commit item {item['key']}"})
                oid = hashlib.sha1(data).hexdigest()
                return self.reply(200, {"commitUrl": f"{hub.url}/{m[1]}/commit/{oid}", "commitOid": oid,
                                        "pullRequestUrl": None})

        return Handler
