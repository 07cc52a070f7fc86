"""More than one process (issue 18): the same job under PyTorch's launcher, one process per GPU, on one
machine or several (Vertex AI's worker pools).

`python main.py` with more than one visible GPU (or NPROC_PER_NODE set) checks the request once, then
starts `torch.distributed.run`'s launcher itself (`launch`) with one worker per GPU, and turns the workers'
exit codes into the job's (a permanent error on any rank is exit 2, which plain torchrun would report as
1). `torchrun --nproc_per_node N main.py` works too. In a worker:

- rank 0 alone writes the job document, talks to the trackers, uploads, exports and scrubs the request;
  every rank trains and evaluates (the Trainer's DDP or FSDP), and the others stop after evaluation;
- stop decisions (SIGTERM, the deadline, cancel) are agreed by every rank at the same step (`agree`);
- what a node downloads (the dataset, the checkpoint to resume from) is downloaded by its first process
  while the others wait (`first_on_node`), then read by all.

On Vertex AI the nodes come from CLUSTER_SPEC (or MASTER_ADDR, MASTER_PORT, WORLD_SIZE and RANK as
Vertex sets them for PyTorch containers): WORLD_SIZE and RANK there count machines, not processes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime.errors import RequestError

logger = logging.getLogger(__name__)

DDP, FSDP = "ddp", "fsdp"


@dataclass(frozen=True)
class Topology:
    """This process's place in the run, from the variables torchrun sets (one process: the defaults)."""

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0

    @classmethod
    def from_env(cls, env) -> Topology:
        if "LOCAL_RANK" not in env:  # not a launcher's worker: one process, whatever WORLD_SIZE says (Vertex's)
            return cls()
        names = ("WORLD_SIZE", "RANK", "LOCAL_RANK")
        try:
            values = [int(env.get(name, default)) for name, default in zip(names, (1, 0, 0))]
        except ValueError:
            raise RequestError(f"{', '.join(f'{n}={env.get(n)!r}' for n in names if n in env)}: torchrun sets these "
                               "to integers; unset them, or start the job with torchrun or python main.py") from None
        place = cls(*values)
        if not 0 <= place.rank < place.world_size:
            raise RequestError(f"RANK={place.rank} is not below WORLD_SIZE={place.world_size}: torchrun sets both; "
                               "unset them, or start the job with torchrun or python main.py")
        return place

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def node_main(self) -> bool:
        return self.local_rank == 0


@dataclass(frozen=True)
class Nodes:
    """The machines of a run and this one's place among them, for the launcher."""

    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "localhost"
    master_port: int = 29500

    @classmethod
    def from_env(cls, env) -> Nodes:
        """Vertex AI's CLUSTER_SPEC (workerpool0 is the chief, the other pools' replicas follow in order), else
        MASTER_ADDR/MASTER_PORT with WORLD_SIZE and RANK counting machines, as Vertex sets them; else one."""
        spec = env.get("CLUSTER_SPEC")
        if spec:
            try:
                cluster = json.loads(spec)
                pools = cluster["cluster"]
                hosts = [h for name in sorted(pools) for h in pools[name]]  # workerpool0, workerpool1, ...
                task = cluster["task"]
                before = sum(len(pools[name]) for name in sorted(pools) if name < task["type"])
                addr, _, port = hosts[0].partition(":")
                return cls(len(hosts), before + int(task["index"]), addr, int(port or 29500))
            except (ValueError, KeyError, TypeError, IndexError) as e:
                raise RequestError(f"CLUSTER_SPEC is not Vertex AI's cluster spec ({type(e).__name__}: {e}); Vertex "
                                   "sets it: unset it to run on one machine") from None
        try:
            if env.get("MASTER_ADDR") and int(env.get("WORLD_SIZE", 1)) > 1:
                return cls(int(env["WORLD_SIZE"]), int(env.get("RANK", 0)), env["MASTER_ADDR"],
                           int(env.get("MASTER_PORT", 29500)))
        except ValueError:
            raise RequestError(f"WORLD_SIZE={env.get('WORLD_SIZE')!r}, RANK={env.get('RANK')!r}, MASTER_PORT="
                               f"{env.get('MASTER_PORT')!r}: Vertex AI sets these to integers; unset them to run on "
                               "one machine") from None
        return cls()


def processes_per_node(env) -> int:
    """NPROC_PER_NODE if set, else the visible GPUs (0 or 1: one process, no launcher)."""
    if env.get("NPROC_PER_NODE"):
        value = env["NPROC_PER_NODE"]
        if not value.isdigit() or int(value) < 1:
            raise RequestError(f"NPROC_PER_NODE={value!r}: the processes (GPUs) per machine, a whole number from 1; "
                               "unset it for one per visible GPU")
        return int(value)
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 1
    except ImportError:  # pragma: no cover - torch is in the image
        return 1


def start(topology: Topology) -> None:
    """Join the process group (nccl on GPUs, gloo on CPUs) before anything needs it; the Trainer's
    accelerate state finds it made."""
    if not topology.distributed:
        return
    import torch
    import torch.distributed as dist

    if not torch.cuda.is_available():
        # accelerate otherwise restores optimizer state with map_location cpu:0 on CPU workers, which fails
        os.environ.setdefault("ACCELERATE_TORCH_DEVICE", "cpu")
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(topology.local_rank)
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def barrier(topology: Topology) -> None:
    if topology.distributed:
        import torch.distributed as dist

        dist.barrier()


def agree(topology: Topology, *flags: bool) -> tuple[bool, ...]:
    """Each flag true if it is true on any rank: the same decision at the same step everywhere."""
    if not topology.distributed:
        return flags
    import torch
    import torch.distributed as dist

    device = f"cuda:{topology.local_rank}" if torch.cuda.is_available() else "cpu"
    values = torch.tensor([1 if f else 0 for f in flags], dtype=torch.int32, device=device)
    dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return tuple(bool(v) for v in values.tolist())


@contextlib.contextmanager
def first_on_node(topology: Topology):
    """The node's first process runs the block first (its downloads), the others after it (reading what it
    downloaded). If the first one fails, it never reaches the barrier: the launcher stops the others."""
    if not topology.distributed:
        yield
        return
    if not topology.node_main:
        barrier(topology)
    yield
    if topology.node_main:
        barrier(topology)


class NodeFiles:
    """The buckets as a process after the node's first sees them: a file that process downloaded is read
    where it is, not downloaded again; everything else is the store's own."""

    def __init__(self, blobs):
        self.blobs = blobs

    def download(self, uri: str, path: Path) -> Path:
        if Path(path).is_file():
            logger.info("%s: read where the node's first process downloaded it", uri)
            return path
        return self.blobs.download(uri, path)

    def download_dir(self, prefix_uri: str, local_dir: Path, names: list[str]) -> list[Path]:
        missing = [n for n in names if not (Path(local_dir) / n).is_file()]
        if missing:
            self.blobs.download_dir(prefix_uri, local_dir, missing)
        return [Path(local_dir) / n for n in names]

    def __getattr__(self, name: str):
        return getattr(self.blobs, name)


class ReadOnlyStore:
    """The job document as a rank other than 0 sees it: it reads (cancel_requested), rank 0 writes. The
    tracker counts no write it drops (`read_only`)."""

    read_only = True

    def __init__(self, store):
        self.store = store

    def create(self, job_id: str, fields: dict[str, Any]) -> bool:
        return False

    def merge(self, job_id: str, fields: dict[str, Any]) -> None:
        return None

    def __getattr__(self, name: str):
        return getattr(self.store, name)


def strategy_for(method: str, fits_one_gpu: bool, gpu: bool) -> str:
    """DDP when the model and its training state fit one GPU (LoRA, QLoRA); FSDP (parameters, gradients
    and optimizer state sharded) for Full and for a LoRA that does not fit. On CPUs DDP: the Trainer's FSDP
    needs CUDA (without it, it trains as DDP while saying FSDP)."""
    return DDP if not gpu or (method in ("LoRA", "QLoRA") and fits_one_gpu) else FSDP


def trainer_args(kind: str, method: str, gpu: bool) -> dict[str, Any]:
    """The Trainer's settings for the strategy. DDP: unused-parameter search off (a PeftModel would make
    the Trainer turn it on, a second pass over the graph every step). FSDP2 (`fully_shard`) wrapping each
    decoder layer, with a full state dict for the final save (a PeftModel or a merged model is saved whole);
    a fused AdamW (8-bit AdamW's state does not shard). (QLoRA's 4-bit weights are stored in the compute
    dtype so that FSDP can shard them: artifacts.nf4_config's quant_storage.)"""
    if kind == DDP:
        return {"ddp_find_unused_parameters": False}
    args: dict[str, Any] = {
        "fsdp": "full_shard auto_wrap",
        "fsdp_config": {"fsdp_version": 2, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                        "transformer_layer_cls_to_wrap": ["Gemma3DecoderLayer"], "reshard_after_forward": True,
                        "state_dict_type": "FULL_STATE_DICT", "cpu_ram_efficient_loading": True,
                        "activation_checkpointing": gpu},
    }
    if method == "Full":
        args["optim"] = "adamw_torch_fused" if gpu else "adamw_torch"
    return args


def launch(nproc: int, nodes: Nodes, job_id: str, argv: list[str]) -> tuple[int, dict[int, Any]]:
    """The workers, as torchrun starts them, each `python main.py argv`; (exit code, failures by rank). Exit
    2 if any worker exited 2 (a permanent error: retrying cannot help), else 1 for any failure, else 0."""
    import sys

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    single = nodes.nnodes == 1
    config = LaunchConfig(
        min_nodes=nodes.nnodes, max_nodes=nodes.nnodes, nproc_per_node=nproc, run_id=job_id,
        rdzv_backend="c10d", rdzv_endpoint="localhost:0" if single else f"{nodes.master_addr}:{nodes.master_port}",
        rdzv_configs={"is_host": nodes.node_rank == 0} if not single else {},  # the chief holds the store
        max_restarts=0, monitor_interval=0.5, start_method="spawn", shutdown_timeout=8)
    try:
        elastic_launch(config, sys.executable)("-u", str(Path(__file__).resolve().parent.parent / "main.py"), *argv)
    except ChildFailedError as e:
        failures = dict(e.failures)
        return (2 if any(f.exitcode == 2 for f in failures.values()) else 1), failures
    except SignalException as e:  # SIGTERM to the launcher: its workers got it too, saved and stopped
        logger.warning("the launcher got %s; its workers were stopped with it (rank 0 recorded how)", e.sigval.name)
        return 1, {}
    return 0, {}


class WorkersFailed(RuntimeError):
    """A worker crashed or was killed (not a permanent error): recorded by the launcher, which outlives it."""


def describe_failure(failure) -> str:
    """A torch elastic ProcessFailure in words: the signal that killed the worker, or its exit code."""
    if failure.exitcode < 0:
        return f"killed by {failure.signal_name()}"
    return f"exited {failure.exitcode}"


def record_error(e: BaseException) -> None:
    """In a worker: the error, for the launcher to read (torch elastic's error file), where one is asked for."""
    if os.environ.get("TORCHELASTIC_ERROR_FILE"):
        from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

        ErrorHandler().record_exception(e)
