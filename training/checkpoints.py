"""Training that survives the machine: checkpoints in the export bucket, and early stops that save one.

`CheckpointStore` mirrors the trainer's checkpoints to `gs://{export}/checkpoints/{job_id}/checkpoint-{step}/`.
A checkpoint counts only once its manifest `_COMPLETE.json` (written last: every file's name, size and
CRC32C) is there and the bucket holds every file it lists with that size and checksum, so a checkpoint cut
off mid-upload, or an object replaced after the manifest, is never resumed from.

`Guard` says when training must stop before its end: SIGTERM (Cloud Run gives 10 s before SIGKILL),
the task timeout ahead, or `cancel_requested: true` in the job document. `checkpoint_callback` acts
on it at each step's end: save, upload (in the background while training goes on), stop; the
workflow then raises `Interrupted` (exit 1, the next attempt resumes) or `Cancelled` (exit 0, no retry).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import signal
import time
from pathlib import Path

from runtime.distributed import Topology, agree, barrier
from runtime.errors import Interrupted
from storage import BlobStore, crc32c

logger = logging.getLogger(__name__)

MARKER = "_COMPLETE.json"
CANCEL = "cancel_requested"


def checkpoint_step(path: str | None) -> int | None:
    """N of a path ending in checkpoint-N, else None."""
    found = re.search(r"checkpoint-(\d+)$", path or "")
    return int(found[1]) if found else None


def best_step(folder: Path) -> int | None:
    """The step of the best checkpoint as the Trainer's state in a checkpoint folder names it, if any."""
    state = folder / "trainer_state.json"
    if not state.is_file():
        return None
    try:
        best = json.loads(state.read_text()).get("best_model_checkpoint")
    except (ValueError, AttributeError) as e:  # not the Trainer's: no best to keep (the resume will say more)
        logger.warning("%s is not a trainer state (%s): no best checkpoint read from it", state, e)
        return None
    return checkpoint_step(best)


def ended(folder: Path) -> bool:
    """Whether a checkpoint folder is training's last: its Trainer state's global step reached max_steps."""
    try:
        state = json.loads((folder / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    return state.get("max_steps", 0) > 0 and state.get("global_step", 0) >= state["max_steps"]


class CheckpointStore:
    def __init__(self, blobs: BlobStore, prefix_uri: str, keep: int = 2):
        self.blobs, self.prefix, self.keep = blobs, prefix_uri.rstrip("/") + "/", keep

    def _listing(self) -> dict[int, dict[str, tuple[int, str]]]:
        """step -> {file name: (size, CRC32C)} as the bucket has them."""
        found: dict[int, dict[str, tuple[int, str]]] = {}
        for uri, stat in self.blobs.stat(self.prefix).items():
            m = re.fullmatch(r"checkpoint-(\d+)/(.+)", uri[len(self.prefix):])
            if m:
                found.setdefault(int(m[1]), {})[m[2]] = stat
        return found

    def complete(self) -> list[int]:
        """Steps of the complete checkpoints, oldest first: each file its manifest lists is in the bucket with
        the size and CRC32C the manifest gives (a manifest from before checksums: the sizes)."""
        steps = []
        for step, held in sorted(self._listing().items()):
            if MARKER not in held:
                continue
            manifest = json.loads(self.blobs.read_bytes(f"{self.prefix}checkpoint-{step}/{MARKER}"))
            sums = manifest.get("crc32c", {})
            wrong = sorted(name for name, size in manifest["files"].items() if name not in held
                           or held[name][0] != size or held[name][1] != sums.get(name, held[name][1]))
            if wrong:
                logger.warning("checkpoint-%d: %s missing or not as its manifest lists them: not resumable", step,
                               wrong)
            else:
                steps.append(step)
        return steps

    def upload(self, local: Path) -> str:
        step = int(local.name.rsplit("-", 1)[1])
        uri = f"{self.prefix}checkpoint-{step}/"
        t = time.perf_counter()
        self.blobs.upload_dir(local, uri)  # also removes an older marker of the same step first
        paths = {p.relative_to(local).as_posix(): p for p in sorted(local.rglob("*")) if p.is_file()}
        manifest = {"step": step, "files": {name: p.stat().st_size for name, p in paths.items()},
                    "crc32c": {name: crc32c(p) for name, p in paths.items()}}
        self.blobs.write_bytes(uri + MARKER, json.dumps(manifest).encode())
        logger.info("checkpoint-%d uploaded to %s in %.1fs", step, uri, time.perf_counter() - t)
        self.prune(newest=step, best=best_step(local))
        return uri

    def prune(self, newest: int, best: int | None = None) -> None:
        """Keep the newest `keep` complete checkpoints, and the best one (load_best_model_at_end exports it);
        drop older ones and incomplete leftovers below them."""
        complete = self.complete()
        keep = set(complete[-self.keep:]) | {newest} | ({best} if best is not None else set())
        for step in self.held():
            if step not in keep and step < newest:
                self.blobs.delete_prefix(f"{self.prefix}checkpoint-{step}/")

    def restore(self, dest: Path) -> Path | None:
        """Download the newest complete checkpoint into dest/checkpoint-{step}/ (dest is emptied first)."""
        shutil.rmtree(dest, ignore_errors=True)
        complete = self.complete()
        if not complete:
            return None
        step = complete[-1]
        local = self.download(step, dest)
        best = best_step(local)
        if best is not None and best != step and best in complete:  # the Trainer loads it at the end
            self.download(best, dest)
        return local

    def held(self) -> set[int]:
        """The steps of every checkpoint folder in the bucket, complete or not."""
        return {int(m[1]) for uri in self.blobs.list(self.prefix)
                if (m := re.match(r"checkpoint-(\d+)/", uri[len(self.prefix):]))}

    def drop_after(self, step: int) -> None:
        """Delete every checkpoint newer than step (a divergence's: they may hold its weights)."""
        for newer in sorted(s for s in self.held() if s > step):
            self.blobs.delete_prefix(f"{self.prefix}checkpoint-{newer}/")
            logger.info("checkpoint-%d deleted from %s", newer, self.prefix)

    @staticmethod
    def local_newest(dest: Path) -> Path | None:
        """The newest checkpoint folder in dest, as the node's first process restored it there (the others'
        view: they wait for it, then resume from the same one)."""
        found = [p for p in Path(dest).glob("checkpoint-*") if checkpoint_step(str(p)) is not None]
        return max(found, key=lambda p: checkpoint_step(str(p)), default=None)

    def download(self, step: int, dest: Path) -> Path:
        uri = f"{self.prefix}checkpoint-{step}/"
        local = dest / f"checkpoint-{step}"
        names = [n for n in (blob[len(uri):] for blob in self.blobs.list(uri)) if n != MARKER]
        t = time.perf_counter()
        self.blobs.download_dir(uri, local, names)  # concurrently: Full's are GBs
        logger.info("restored checkpoint-%d from %s (%d files) in %.1fs", step, uri, len(names),
                    time.perf_counter() - t)
        return local

    def clear(self) -> None:
        self.blobs.delete_prefix(self.prefix)


class Guard:
    """Why training must stop early, if it must. The SIGTERM handler only sets a flag while training
    (the step in flight finishes, then a checkpoint is saved); outside training it raises Interrupted."""

    def __init__(self, read_doc=None, timeout_s: float | None = None, reserve_s: float = 60.0,
                 started: float | None = None, poll_s: float = 3.0, clock=time.monotonic):
        self.read_doc, self.timeout_s, self.reserve_s, self.poll_s, self.clock = \
            read_doc, timeout_s, reserve_s, poll_s, clock
        self.started = clock() if started is None else started
        self.reason: str | None = None
        self.cancelled = False
        self.training = False
        self._last_poll = -float("inf")

    def __enter__(self) -> Guard:
        """Handle SIGTERM until the with block ends (then the handler before it again)."""
        self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        return self

    def __exit__(self, *exc) -> None:
        signal.signal(signal.SIGTERM, self._previous)

    def _on_sigterm(self, signum, frame) -> None:
        self.reason = "SIGTERM (the task is being stopped)"
        logger.warning("SIGTERM received%s", ": saving a checkpoint after this step" if self.training else "")
        if not self.training:
            raise Interrupted(self.reason)

    def remaining(self) -> float | None:
        return None if self.timeout_s is None else self.timeout_s - (self.clock() - self.started)

    def check(self, needed_s: float = 0.0) -> str | None:
        """Called at each step's end; needed_s is the time one more step plus a save would take."""
        if self.reason:
            return self.reason
        left = self.remaining()
        if left is not None and left < self.reserve_s + needed_s:
            self.reason = f"the task timeout is {left:.0f}s away (timeout {self.timeout_s:.0f}s)"
        elif self.read_doc and self.clock() - self._last_poll >= self.poll_s:
            self._last_poll = self.clock()
            try:
                doc = self.read_doc() or {}
            except Exception as e:  # the document store is down: keep training, ask again in a minute
                logger.warning("could not read the job document for %s: %s", CANCEL, e)
                self._last_poll += 60.0
                doc = {}
            if doc.get(CANCEL):
                self.reason, self.cancelled = "cancelled on request (cancel_requested: true)", True
        return self.reason


def checkpoint_callback(store: CheckpointStore, guard: Guard, tracker, minutes: float, save_strategy: str,
                        run_logger=None, place: Topology | None = None):
    """Saves when the guard or the clock says, and uploads each checkpoint in a background thread while
    training goes on. One upload at a time: the one in flight is waited for before the next save (the
    Trainer's rotation, inside a save, may delete the folder being uploaded) and when training ends, and
    its error is raised there, in the training thread."""
    from concurrent.futures import Future, ThreadPoolExecutor

    from transformers import TrainerCallback

    class Checkpoints(TrainerCallback):
        def __init__(self):
            self.last_save = time.monotonic()
            self.step_started = time.monotonic()
            self.step_s = 0.0
            self.save_s = 0.0
            self.step_ended = time.monotonic()
            self.uploaded: int | None = None
            self.pool: ThreadPoolExecutor | None = None  # started by the first upload, ended with training
            self.pending: tuple[int, Path, float, Future] | None = None

        def finish_upload(self) -> None:
            """Wait for the upload in flight, if any, and record it."""
            if self.pending is None:
                return
            step, folder, local_s, future = self.pending
            self.pending = None
            uri, upload_s = future.result()
            self.save_s = max(self.save_s, local_s + upload_s)  # writing it locally, then uploading
            if run_logger is not None:  # log_model: checkpoint
                run_logger.log_model(folder, f"checkpoint-{tracker.job_id}", "checkpoint")
            tracker.defer({"checkpoint": {"step": step, "uri": uri}})  # no write of its own
            tracker.event("checkpoint", step=step, uri=uri, loss=tracker.latest.get("loss"),
                          last_eval=tracker.last_eval)

        def on_train_begin(self, args, state, control, **kwargs):
            self.uploaded = None  # training may start again at an earlier step (training/divergence.py)

        def on_step_begin(self, args, state, control, **kwargs):
            self.step_started = time.monotonic()

        def on_step_end(self, args, state, control, **kwargs):
            self.step_ended = time.monotonic()
            self.step_s = max(self.step_s, self.step_ended - self.step_started)
            if state.global_step >= state.max_steps and save_strategy != "epoch":
                control.should_save = True  # the last step is always saved: a retry then skips to export
            if time.monotonic() - self.last_save >= minutes * 60:
                control.should_save = True
            stop = guard.check(needed_s=2 * self.step_s + 1.5 * self.save_s)
            if place is not None and place.distributed:
                # every rank stops, and saves (the clock's save is each process's own reading), at the same
                # step or none does: a save or a stop on one rank alone would leave the others waiting
                stop, cancelled, save = agree(place, bool(stop), guard.cancelled, control.should_save)
                if stop and not guard.reason:
                    guard.reason = "another process stopped"
                guard.cancelled = cancelled
                if cancelled:
                    guard.reason = "cancelled on request (cancel_requested: true)"
                control.should_save = save
            if stop:
                control.should_training_stop = True
                if not guard.cancelled:
                    control.should_save = True
            if control.should_save:
                self.finish_upload()
            return control

        def on_epoch_end(self, args, state, control, **kwargs):
            if control.should_save:  # an epoch's save, decided by the Trainer's flow callback before this one
                self.finish_upload()

        def on_save(self, args, state, control, **kwargs):
            if place is not None and place.distributed:
                barrier(place)  # every rank's files of the checkpoint (its RNG state) are written before upload
            self.last_save = time.monotonic()  # on every rank: the clock's next save is agreed from it
            if not state.is_world_process_zero or self.uploaded == state.global_step:
                return
            self.finish_upload()
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            local_s = time.monotonic() - self.step_ended

            def upload() -> tuple[str, float]:
                t = time.monotonic()
                return store.upload(folder), time.monotonic() - t

            self.pending = (state.global_step, folder, local_s, self.submit(upload))
            self.uploaded = state.global_step
            if control.should_training_stop or state.global_step >= state.max_steps:
                # Training's last save: the Trainer may delete this folder before on_train_end (after loading
                # the best checkpoint with save_total_limit 1), so it is in the bucket before on_save returns.
                self.finish_upload()

        def on_train_end(self, args, state, control, **kwargs):
            self.finish_upload()  # the last checkpoint is in the bucket before train() returns
            if self.pool is not None:  # its thread ends with training
                self.pool.shutdown(wait=True)
                self.pool = None

        def submit(self, upload) -> Future:
            if self.pool is None:
                self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-upload")
            return self.pool.submit(upload)

    return Checkpoints()
