"""Test harness only: the suite's job processes forked from a server that has already imported their libraries.

The suite starts over a hundred Python processes that import torch, transformers, PEFT and TRL (the jobs it
kills, stops and resumes, the ranks, the sweep's trials, the GGUF converter an export runs, the consumers'
loads). Importing those takes about 5 CPU-seconds in each, and tearing the interpreter down another 1.5: on
two cores, about a third of the suite.

A `python main.py` (sitecustomize.py names the scripts) started with PREFORK_DIR set becomes a proxy: it hands
its argv, environment, working directory and standard streams to a server, which forks a child to run the
script. There is one server per interpreter and set of import-time environment variables, started by the
second process that needs it (the first runs from scratch) and shared by xdist's workers. The proxy forwards
the signals it is sent and ends as the child ended: the same exit code, or killed by the same signal. A proxy
killed with SIGKILL takes its child with it (the child watches a pipe only the proxy holds open).

The child runs the script from its source, with the caller's environment; only third-party libraries were
imported before the fork, never the job's own modules. A library that reads a variable as it is imported saw
the server's value, which is why servers are told apart by those variables. What the job itself sets before
it imports them it must also apply to libraries already imported (logs.setup_logging's progress bars).
tests/test_prefork.py shows the caller's view; PREFORK=0 runs every process from scratch.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time

# Imported before the fork: what every job imports, none of it the job's own code. "module:name,name" also
# takes names from a lazily-loading module (transformers, TRL), which imports their submodules.
PRELOAD = ("torch", "torch._dynamo", "torch.distributed", "torch._inductor.compile_fx", "bitsandbytes", "numpy",
           "sympy", "networkx", "safetensors", "jinja2", "pyarrow", "pandas", "huggingface_hub", "datasets",
           "accelerate", "transformers:AutoModelForCausalLM,AutoTokenizer,AutoProcessor,Trainer,TrainingArguments",
           "transformers.models.gemma3.modeling_gemma3", "peft:LoraConfig,PeftModel,get_peft_model",
           "trl:SFTConfig,SFTTrainer,DPOConfig,DPOTrainer,GRPOConfig,GRPOTrainer")
# Variables a library may read as it is imported: a child only forks from a server started with the same.
# HOME and the locale count by their effective values (unset HOME is the user's home from the password
# database; Python coerces the C locale to C.UTF-8), PATH not at all (read when a program is run).
IMPORT_TIME = ("PYTHON", "TORCH", "PYTORCH", "CUDA", "OMP_", "MKL_", "OPENBLAS", "TQDM", "BNB", "LD_", "NUMPY",
               "HF_", "HUGGINGFACE", "TRANSFORMERS", "TOKENIZERS", "DATASETS", "ACCELERATE", "PEFT", "TRL",
               "SAFETENSORS", "TMPDIR", "XDG_")
# ...except these, read when used: the proxy passes -u on (PYTHONUNBUFFERED); the others are set by the
# processes that start jobs (torch elastic for its ranks, tokenizers before a fork, torch in the tests' own
# process).
NOT_IMPORT_TIME = ("TORCHELASTIC_", "TORCH_NCCL_", "TORCHINDUCTOR_CACHE_DIR", "TOKENIZERS_PARALLELISM",
                   "PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE")
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)
IDLE_S = 180.0
HEADER = struct.Struct("!I")


def _import_time(name: str) -> bool:
    return name.startswith(IMPORT_TIME) and not name.startswith(NOT_IMPORT_TIME)


def _key(env: dict[str, str]) -> str:
    """The server for this interpreter and these variables (`env` is this process's own environment)."""
    import locale

    kept = sorted((k, v) for k, v in env.items() if _import_time(k))
    effective = [os.path.expanduser("~"), locale.setlocale(locale.LC_CTYPE)]
    return hashlib.sha1(json.dumps([sys.executable, kept, effective]).encode()).hexdigest()[:12]


def _send(sock: socket.socket, message: dict, fds: list[int] = ()) -> None:
    payload = json.dumps(message).encode()
    socket.send_fds(sock, [HEADER.pack(len(payload))], list(fds))
    sock.sendall(payload)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return data


def _recv(sock: socket.socket, maxfds: int = 0) -> tuple[dict, list[int]]:
    head, fds, _, _ = socket.recv_fds(sock, HEADER.size, maxfds)
    if not head:
        raise EOFError
    head += _recv_exact(sock, HEADER.size - len(head))
    return json.loads(_recv_exact(sock, HEADER.unpack(head)[0])), fds


# ---- the proxy: the process the caller started -----------------------------------------------------

def _connect(path: str) -> socket.socket | None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
        return sock
    except OSError:
        sock.close()
        return None


def _server(directory: str, key: str, env: dict[str, str]) -> socket.socket | None:
    """A connection to the server for these import-time variables; None the first time they are seen (a
    server costs a whole import, worth it from the second process on), and where no server can run (a
    socket path too long for AF_UNIX, a server that failed to start: its log says why)."""
    path = os.path.join(directory, f"{key}.sock")
    failed = os.path.join(directory, f"{key}.failed")
    if len(path.encode()) > 100 or os.path.exists(failed):
        return None
    sock = _connect(path)
    if sock:
        return sock
    with open(os.path.join(directory, f"{key}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one proxy starts the server; the others wait for it
        sock = _connect(path)
        if sock:
            return sock
        seen = os.path.join(directory, f"{key}.seen")
        if not os.path.exists(seen):
            with open(seen, "w") as f:  # the variables that made this key: why two servers differ
                json.dump(sorted((k, v) for k, v in env.items() if _import_time(k)), f, indent=1)
            return None
        with open(os.path.join(directory, f"{key}.log"), "ab") as log:
            server = subprocess.Popen([sys.executable, __file__, path], stdin=subprocess.DEVNULL, stdout=log,
                                      stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            sock = _connect(path)
            if sock:
                return sock
            if server.poll() is not None:
                break
            time.sleep(0.02)
        server.kill()
        open(failed, "w").close()  # this process and the next run from scratch: slower, not wrong
        return None


def proxy() -> None:
    """Runs the script in a forked child and ends as it ended; returns (the script runs here, from scratch)
    where no server is worth starting yet."""
    env = dict(os.environ)
    directory = env["PREFORK_DIR"]
    child = None
    pending: list[int] = []

    def forward(signum, _frame):
        if child:
            os.kill(child, signum)
        else:
            pending.append(signum)

    previous = {signum: signal.signal(signum, forward) for signum in FORWARDED}
    lifeline_r, lifeline_w = os.pipe()  # the child dies when this end closes: when this process dies
    for attempt in range(3):
        sock = _server(directory, _key(env), env)
        if sock is None:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            os.close(lifeline_r)
            os.close(lifeline_w)
            for signum in pending:
                os.kill(os.getpid(), signum)
            return
        try:
            unbuffered = bool(getattr(sys.stdout, "write_through", False))  # python -u, PYTHONUNBUFFERED
            _send(sock, {"argv": sys.argv, "env": env, "cwd": os.getcwd(), "unbuffered": unbuffered},
                  [0, 1, 2, lifeline_r])
            child = _recv(sock)[0]["pid"]
            break
        except (EOFError, OSError):  # the server was ending as it was reached: start another
            sock.close()
            if attempt == 2:
                raise
    os.close(lifeline_r)
    for signum in pending:
        os.kill(child, signum)
    try:
        status = _recv(sock)[0]
    except (EOFError, OSError):
        status = {"exit": 1}
        sys.stderr.write("prefork: the server ended before the child\n")
    if "signal" in status:
        if status["signal"] not in (signal.SIGKILL, signal.SIGSTOP):
            signal.signal(status["signal"], signal.SIG_DFL)
        os.kill(os.getpid(), status["signal"])
        time.sleep(1)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status.get("exit", 1))


# ---- the server and its children -------------------------------------------------------------------

def _streams(unbuffered: bool) -> None:
    import io

    def text(fd: int, errors: str, line: bool):
        raw = io.FileIO(fd, "w", closefd=False)
        return io.TextIOWrapper(raw if unbuffered else io.BufferedWriter(raw), encoding="utf-8", errors=errors,
                                line_buffering=line, write_through=unbuffered)

    sys.stdout = sys.__stdout__ = text(1, "strict", os.isatty(1))
    sys.stderr = sys.__stderr__ = text(2, "backslashreplace", True)
    sys.stdin = sys.__stdin__ = io.TextIOWrapper(io.BufferedReader(io.FileIO(0, "r", closefd=False)), encoding="utf-8")


def _run_child(request: dict, fds: list[int]) -> None:
    """In the forked child: become the process the proxy was started as, run the script, exit."""
    import atexit
    import runpy
    import threading
    import traceback

    for signum in (*FORWARDED, signal.SIGCHLD):
        signal.signal(signum, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for target, fd in zip((0, 1, 2), fds[:3]):
        os.dup2(fd, target)
        os.close(fd)
    lifeline = fds[3]

    def watch():
        os.read(lifeline, 1)  # end of file: the proxy is gone
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="prefork-lifeline", daemon=True).start()
    _streams(request["unbuffered"])
    os.environ.clear()
    os.environ.update(request["env"])
    os.chdir(request["cwd"])
    sys.argv = list(request["argv"])
    sys.path[0] = os.path.dirname(os.path.abspath(sys.argv[0]))
    code = 0
    try:
        runpy.run_path(sys.argv[0], run_name="__main__")
    except SystemExit as e:
        if e.code is None:
            code = 0
        elif isinstance(e.code, int):
            code = e.code
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except KeyboardInterrupt:
        atexit._run_exitfuncs()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    except BaseException:  # noqa: BLE001 - as the interpreter would: the traceback, then exit 1
        traceback.print_exc()
        code = 1
    threading._shutdown()  # what the interpreter does as it exits: its threads joined, then the exit functions
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code & 0xFF)


def serve(path: str) -> None:
    import gc
    import importlib
    import selectors
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for entry in PRELOAD:
            name, _, attributes = entry.partition(":")
            try:
                module = importlib.import_module(name)
                for attribute in filter(None, attributes.split(",")):
                    getattr(module, attribute)
            except (ImportError, AttributeError):  # the consumer's environment has fewer of them
                pass
    gc.freeze()  # the children's collections leave what was imported alone (and its pages shared)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    tmp = f"{path}.{os.getpid()}"
    listener.bind(tmp)
    listener.listen(64)
    os.rename(tmp, path)  # connectable only once it listens
    with open(path.removesuffix(".sock") + ".pid", "w") as f:
        f.write(str(os.getpid()))
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ)
    children: dict[int, socket.socket] = {}
    idle_since = time.monotonic()
    while True:
        for _ in selector.select(timeout=0.02):
            conn, _ = listener.accept()
            try:
                request, fds = _recv(conn, maxfds=4)
            except (EOFError, OSError):
                conn.close()
                continue
            pid = os.fork()
            if pid == 0:
                listener.close()
                for other in children.values():
                    other.close()
                selector.close()
                try:
                    _run_child(request, fds)
                finally:
                    os._exit(1)
            for fd in fds:
                os.close(fd)
            children[pid] = conn
            try:
                _send(conn, {"pid": pid})
            except OSError:
                pass
        while children:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            conn = children.pop(pid)
            message = {"signal": os.WTERMSIG(status)} if os.WIFSIGNALED(status) else {"exit": os.WEXITSTATUS(status)}
            try:
                _send(conn, message)
            except OSError:
                pass
            conn.close()
        if children:
            idle_since = time.monotonic()
        elif time.monotonic() - idle_since > IDLE_S:
            os.unlink(path)  # new proxies start another server; one that reached this one retries
            return


def join(directory: str) -> None:
    """A pytest process starts using the servers under `directory` (xdist's workers share them)."""
    _users(directory, +1)


def leave(directory: str) -> None:
    """...and stops using them: the last to leave ends the servers."""
    if _users(directory, -1) == 0:
        for name in os.listdir(directory):
            if name.endswith(".pid"):
                try:
                    with open(os.path.join(directory, name)) as f:
                        os.kill(int(f.read()), signal.SIGTERM)
                except (OSError, ValueError):
                    pass


def _users(directory: str, change: int) -> int:
    with open(os.path.join(directory, "users.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        path = os.path.join(directory, "users")
        users = 0
        if os.path.exists(path):
            with open(path) as f:
                users = int(f.read())
        with open(path, "w") as f:
            f.write(str(users + change))
        return users + change


if __name__ == "__main__":
    serve(sys.argv[1])
