"""The suite's harness (tests/prefork): a `python main.py` forked from a server that has imported the libraries
behaves, to the process that started it, as the fresh interpreter it replaces: argv, environment, working
directory, streams, exit code, threads joined, signals in both directions, and death by SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest

from conftest import THREADS, harness_env

SCRIPT = '''
import json, os, signal, sys, time
state = {"pid": os.getpid(), "argv": sys.argv, "cwd": os.getcwd(), "torch_before": "torch" in sys.modules,
         "answer": os.environ.get("ANSWER"), "main": __name__}
print(json.dumps(state), flush=True)
print("to stderr", file=sys.stderr)
mode = sys.argv[1]
if mode == "exit":
    sys.exit(int(sys.argv[2]))
if mode == "raise":
    raise ValueError("as a fresh interpreter reports it")
if mode == "self-kill":
    os.kill(os.getpid(), signal.SIGKILL)
if mode == "thread":
    import threading
    threading.Thread(target=lambda: (time.sleep(0.5), open(sys.argv[2], "w").write("joined"))).start()
    sys.exit(0)
if mode == "term":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(7))
open(sys.argv[2], "w").write(str(os.getpid()))
time.sleep(60)
'''


# Read as libraries are imported (a PYTHON... variable): these tests' own server, apart from the suite's
KIND = {"PYTHONPREFORKTEST": uuid.uuid4().hex}


def start(tmp_path: Path, *args: str, **env: str) -> subprocess.Popen:
    (tmp_path / "main.py").write_text(SCRIPT)
    return subprocess.Popen([sys.executable, "main.py", *args], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={"PATH": os.environ["PATH"], **THREADS, "ANSWER": "42", **KIND, **harness_env(),
                                 **env})


def state(proc: subprocess.Popen) -> dict:
    return json.loads(proc.stdout.readline())


@pytest.fixture(scope="module", autouse=True)
def first_two(tmp_path_factory) -> list[tuple[dict, subprocess.Popen]]:
    """The first two processes of their kind: the first runs from scratch, the second starts the server."""
    if "PREFORK_DIR" not in os.environ:
        pytest.skip("PREFORK=0: the harness is off")
    runs = []
    for _ in range(2):
        proc = start(tmp_path_factory.mktemp("first"), "exit", "0")
        runs.append((state(proc), proc))
        proc.communicate(timeout=120)
    return runs


def test_the_first_process_of_its_kind_runs_from_scratch_the_next_forks(first_two):
    (first, p1), (second, p2) = first_two
    assert first["pid"] == p1.pid and not first["torch_before"] and p1.returncode == 0
    assert second["pid"] != p2.pid and second["torch_before"] and p2.returncode == 0


def wait_for(path: Path) -> int:
    deadline = time.monotonic() + 60
    while not (path.exists() and path.read_text()):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    return int(path.read_text())


def test_argv_environment_cwd_streams_and_exit_code_come_through(tmp_path):
    proc = start(tmp_path, "exit", "3")
    seen = state(proc)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 3 and err == "to stderr\n" and out == ""
    assert seen["argv"] == ["main.py", "exit", "3"] and seen["cwd"] == str(tmp_path) and seen["answer"] == "42"
    assert seen["main"] == "__main__"
    assert seen["pid"] != proc.pid and seen["torch_before"]  # forked, with torch already imported


def test_an_uncaught_exception_is_exit_1_with_its_traceback(tmp_path):
    proc = start(tmp_path, "raise")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1 and "ValueError: as a fresh interpreter reports it" in err


def test_the_jobs_threads_are_joined_before_it_exits(tmp_path):
    proc = start(tmp_path, "thread", str(tmp_path / "joined"))
    assert state(proc)["pid"] != proc.pid  # forked
    proc.communicate(timeout=60)
    assert proc.returncode == 0 and (tmp_path / "joined").read_text() == "joined"


def test_a_signal_sent_to_the_process_reaches_the_job(tmp_path):
    proc = start(tmp_path, "term", str(tmp_path / "pid"))
    wait_for(tmp_path / "pid")
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    assert proc.returncode == 7  # the job's own handler ran


def test_a_job_killed_by_a_signal_is_seen_killed_by_it(tmp_path):
    proc = start(tmp_path, "self-kill")
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL


def test_kill_9_of_the_process_kills_the_job(tmp_path):
    proc = start(tmp_path, "sleep", str(tmp_path / "pid"))
    job = psutil.Process(wait_for(tmp_path / "pid"))
    assert job.pid != proc.pid
    proc.kill()
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    job.wait(timeout=10)  # gone with it, not left running
    assert not job.is_running()


def test_prefork_skip_starts_the_process_from_scratch(tmp_path):
    proc = start(tmp_path, "exit", "0", PREFORK_SKIP="1")
    seen = state(proc)
    proc.communicate(timeout=60)
    assert seen["pid"] == proc.pid and not seen["torch_before"]


def test_where_no_server_can_run_the_process_runs_from_scratch(tmp_path, monkeypatch):
    """A socket path too long for AF_UNIX, or a server that fails to start (its interpreter exits at once
    here): the process runs as if the harness were off, and no later one waits for that server again."""
    import prefork.prefork as harness

    deep = tmp_path / ("d" * 120)
    deep.mkdir()
    for _ in range(2):
        proc = start(tmp_path, "exit", "0", PREFORK_DIR=str(deep))
        seen = state(proc)
        proc.communicate(timeout=60)
        assert seen["pid"] == proc.pid and proc.returncode == 0
    assert list(deep.iterdir()) == []  # no server tried
    monkeypatch.setattr(sys, "executable", "/bin/false")
    env = {"PYTHONPREFORKTEST": "failing"}
    assert harness._server(str(tmp_path), "k", env) is None  # the first of its kind: from scratch anyway
    assert harness._server(str(tmp_path), "k", env) is None  # the server exits at once
    assert (tmp_path / "k.failed").exists()
    started = time.monotonic()
    assert harness._server(str(tmp_path), "k", env) is None and time.monotonic() - started < 0.1
