"""A small local server speaking the parts of the Hugging Face Hub's HTTP API the job uses, for
huggingface_hub pointed at it with `endpoint=`/`HF_ENDPOINT`: create_repo, auth_check (read and
write), model_info, file downloads (resolve, HEAD and GET), validate-yaml, the tree listing,
preupload, the LFS batch API with its basic transfer (upload and verify) and the NDJSON commit of upload_folder: files inline (base64), LFS files
by their sha256, deleted files.

As the Hub does, preupload asks for LFS for weights (`*.safetensors`, `*.gguf`, `*.bin`, the patterns of
a new repo's .gitattributes) and for any file of 10 MiB or more; the rest are regular. huggingface_hub
sends LFS files through Xet where hf_xet is installed, which this stub does not speak: the tests that
push set HF_HUB_DISABLE_XET, so the classic LFS path is the one taken.

It keeps what it receives in memory: `hub.repos[repo_id]` is `{"private": bool, "files": {path: bytes}}`
(a new repo starts with `.gitattributes`); `hub.lfs_uploads` lists the paths committed as LFS files.
Tokens: `HubStub(token=...)` is the only one accepted; `readable` repos may be read but not written; `gated`
repos answer as the Hub does a token whose account has not accepted the licence (403, GatedRepo).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlparse

LFS_SUFFIXES = (".safetensors", ".gguf", ".bin", ".pt", ".model")
LFS_SIZE = 10 * 1024 * 1024
GITATTRIBUTES = b"".join(f"*{s} filter=lfs diff=lfs merge=lfs -text\n".encode() for s in LFS_SUFFIXES)


class HubStub:
    def __init__(self, token: str, readable: tuple[str, ...] = ()):
        self.token = token
        self.repos: dict[str, dict[str, Any]] = {r: {"private": False, "files": {}, "writable": False}
                                                 for r in readable}
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Authorization header)
        self.lfs_objects: dict[str, bytes] = {}  # sha256 -> content, uploaded through the LFS batch API
        self.lfs_uploads: list[str] = []  # paths committed as LFS files
        self.license: str | None = "gemma"  # what model_info's cardData says of every readable repo
        self.gated: set[str] = set()  # repos whose licence the token's account has not accepted: 403 GatedRepo
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
                if self.command != "HEAD":
                    self.wfile.write(data)

            def body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def authorised(self) -> bool:
                return self.headers.get("Authorization") == f"Bearer {hub.token}"

            def do_HEAD(self) -> None:  # hf_hub_download asks for a file's metadata first
                hub.requests.append(("HEAD", self.path, self.headers.get("Authorization")))
                if not self.resolve():
                    self.reply(404, {"error": f"stub: no route HEAD {self.path}"})

            def resolve(self) -> bool:
                """A file of a repo, as /{repo_id}/resolve/{revision}/{path} serves it; False if not such a path."""
                m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", urlparse(self.path).path)
                if not m:
                    return False
                repo = hub.repos.get(m[1])
                if repo is None or (repo["private"] and not self.authorised()):
                    self.reply(404, {"error": "Repository not found"}, "RepoNotFound")
                    return True
                if m[1] in hub.gated:
                    self.reply(403, {"error": "Access to this model is restricted"}, "GatedRepo")
                    return True
                data = repo["files"].get(unquote(m[3]))
                if data is None:
                    self.reply(404, {"error": "Entry not found"}, "EntryNotFound")
                    return True
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
                self.send_header("X-Repo-Commit", hashlib.sha1(m[1].encode()).hexdigest())
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                return True

            def do_GET(self) -> None:
                hub.requests.append(("GET", self.path, self.headers.get("Authorization")))
                if self.resolve():
                    return
                path = urlparse(self.path).path
                tree = re.fullmatch(r"/api/models/(.+?/.+?)/tree/([^/]+)(/.*)?", path)
                if tree:
                    repo = hub.repos.get(tree[1])
                    if repo is None or not self.authorised():
                        return self.reply(404, {"error": "Repository not found"}, "RepoNotFound")
                    under = unquote(tree[3] or "").strip("/")
                    return self.reply(200, [{"type": "file", "path": p, "size": len(b),
                                             "oid": hashlib.sha1(b).hexdigest()}
                                            for p, b in sorted(repo["files"].items()) if p.startswith(under)])
                info = re.fullmatch(r"/api/models/(.+?/.+?)(/revision/[^/]+)?", path)
                if info and "/auth-check" not in path:
                    repo = hub.repos.get(info[1])
                    if repo is None:
                        return self.reply(404, {"error": "Repository not found"}, "RepoNotFound")
                    return self.reply(200, {"id": info[1], "private": repo["private"],
                                            "cardData": {"license": hub.license} if hub.license else None})
                m = re.fullmatch(r"/api/models/(.+?/.+?)/auth-check(/write)?", self.path)
                if not m:
                    return self.reply(404, {"error": f"stub: no route GET {self.path}"})
                repo = hub.repos.get(m[1])
                if repo is None or (repo["private"] and not self.authorised()):
                    return self.reply(404, {"error": "Repository not found"}, "RepoNotFound")
                if m[1] in hub.gated:
                    return self.reply(403, {"error": "Access to this model is restricted"}, "GatedRepo")
                if m[2] and not (repo["writable"] and self.authorised()):
                    return self.reply(403, {"error": "no write access"})
                return self.reply(200, {})

            def do_PUT(self) -> None:  # an LFS object, to the href the batch API gave (no token on it)
                hub.requests.append(("PUT", self.path, self.headers.get("Authorization")))
                m = re.fullmatch(r"/lfs-upload/([0-9a-f]{64})", self.path)
                data = self.body()
                if not m or hashlib.sha256(data).hexdigest() != m[1]:
                    return self.reply(400, {"error": "stub: content does not match its oid"})
                hub.lfs_objects[m[1]] = data
                return self.reply(200, {})

            def do_POST(self) -> None:
                hub.requests.append(("POST", self.path, self.headers.get("Authorization")))
                data = self.body()
                if self.path == "/lfs-verify":
                    item = json.loads(data)
                    ok = len(hub.lfs_objects.get(item["oid"], b"")) == item["size"]
                    return self.reply(200 if ok else 404, {})
                if not self.authorised():
                    return self.reply(401, {"error": "Invalid credentials"})
                batch = re.fullmatch(r"/(.+?/.+?)\.git/info/lfs/objects/batch", self.path)
                if batch:
                    if batch[1] not in hub.repos or not hub.repos[batch[1]]["writable"]:
                        return self.reply(403, {"message": "no write access"})
                    objects = []
                    for obj in json.loads(data)["objects"]:
                        known = obj["oid"] in hub.lfs_objects
                        objects.append({"oid": obj["oid"], "size": obj["size"], **({} if known else {"actions": {
                            "upload": {"href": f"{hub.url}/lfs-upload/{obj['oid']}"},
                            "verify": {"href": f"{hub.url}/lfs-verify"}}})})
                    return self.reply(200, {"transfer": "basic", "objects": objects})
                if self.path == "/api/validate-yaml":  # upload_folder checks a README.md's metadata first
                    return self.reply(200, {"errors": [], "warnings": []})
                if self.path == "/api/repos/create":
                    payload = json.loads(data)
                    repo_id = f"{payload['organization']}/{payload['name']}" if payload.get("organization") \
                        else payload["name"]
                    if repo_id in hub.repos:
                        return self.reply(409, {"error": "You already created this model repo", "url": f"{hub.url}/{repo_id}"})
                    hub.repos[repo_id] = {"private": payload.get("visibility", "public") != "public",
                                          "files": {".gitattributes": GITATTRIBUTES}, "writable": True}
                    return self.reply(200, {"url": f"{hub.url}/{repo_id}"})
                m = re.fullmatch(r"/api/models/(.+?/.+?)/(preupload|commit)/([^/?]+)(\?.*)?", self.path)
                if not m or m[1] not in hub.repos:
                    return self.reply(404, {"error": f"stub: no route POST {self.path}"}, "RepoNotFound")
                repo = hub.repos[m[1]]
                if not repo["writable"]:
                    return self.reply(403, {"error": "no write access"})
                if m[2] == "preupload":
                    files = json.loads(data)["files"]
                    return self.reply(200, {"files": [{"path": f["path"], "uploadMode": "lfs" if (
                        f["path"].endswith(LFS_SUFFIXES) or f["size"] >= LFS_SIZE) else "regular",
                        "shouldIgnore": False} for f in files]})
                for line in data.splitlines():
                    item = json.loads(line)
                    value = item.get("value") or {}
                    if item["key"] == "file":
                        repo["files"][value["path"]] = base64.b64decode(value["content"])
                    elif item["key"] == "lfsFile":
                        if value["oid"] not in hub.lfs_objects:
                            return self.reply(400, {"error": f"stub: LFS object of {value['path']} never uploaded"})
                        repo["files"][value["path"]] = hub.lfs_objects[value["oid"]]
                        hub.lfs_uploads.append(value["path"])
                    elif item["key"] == "deletedFile":
                        repo["files"].pop(value["path"], None)
                    elif item["key"] == "deletedFolder":
                        for path in [p for p in repo["files"] if p.startswith(value["path"].rstrip("/") + "/")]:
                            del repo["files"][path]
                    elif item["key"] != "header":
                        return self.reply(400, {"error": f"stub: unsupported commit item {item['key']}"})
                oid = hashlib.sha1(data).hexdigest()
                return self.reply(200, {"commitUrl": f"{hub.url}/{m[1]}/commit/{oid}", "commitOid": oid,
                                        "pullRequestUrl": None})

        return Handler
