"""A checkpoint taken at a step, stored while training goes on.

Writing state.pt and uploading it take seconds to minutes at GRAM's sizes (a 1 B-parameter model with AdamW is
12 GB), and every rank used to wait for both. Now rank 0 copies the state to host memory (the only pause: the
live tensors change with the next step), and the copy is written and uploaded in the background, by Ray Train's
checkpoint upload thread (worker.py reports it with CheckpointUploadMode.ASYNC). At most one checkpoint is in
flight: the next one waits for the last to be stored, so host memory holds at most one copy, and a failure of
the last is raised on the training thread there (Ray Train also fails the group with it at once).

A TakenCheckpoint is registered only once it is whole: store() writes the folder (manifest last) and uploads
it (manifest last); Ray Train registers what the upload returns. With train.checkpoint_in_background off, the
same store() runs on the training thread from the live tensors, without a copy: the old synchronous pause.

Ray-free: the loop takes checkpoints, worker.py hands them to Ray Train, the bench times both ways.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import TypeVar

import torch

from gram_ray.config import GramConfig
from gram_ray.model.checkpoint import CheckpointWriteError, write_checkpoint
from gram_ray.storage import StorageError

__all__ = ["TakenCheckpoint", "host_copy", "remove_orphans", "stamped_failure"]

T = TypeVar("T")
FOLDER_PREFIX = "gram-ray-checkpoint-"  # then the writing process's id, the step, a random tag


def remove_orphans(folder: Path | None = None) -> list[Path]:
    """Remove the local checkpoint folders (in the temp folder) of processes that are gone: a worker killed while
    it wrote or uploaded a checkpoint leaves its folder, up to the whole state's size, on the node it ran on.
    Another process's folder that is still being written is kept. Returns what was removed."""
    removed = []
    for path in Path(folder or tempfile.gettempdir()).glob(FOLDER_PREFIX + "*"):
        pid = path.name.removeprefix(FOLDER_PREFIX).split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def host_copy(tree):
    """tree (dicts, lists and tuples of tensors and plain values) with every tensor copied to host memory: a copy
    the next optimizer step cannot change. Plain values are immutable or rebuilt here (lists, dicts)."""
    if isinstance(tree, torch.Tensor):
        return tree.detach().to("cpu", copy=True)
    if isinstance(tree, dict):
        return {k: host_copy(v) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        return type(tree)(host_copy(v) for v in tree)
    return tree


def stamped_failure(e: BaseException, step: int, stopped: str) -> CheckpointWriteError:
    """The error a failed checkpoint of `step` stops the run with: what failed, what is kept, what to do. One
    already stamped for this step is passed on as it is (a failure seen by the background and the loop)."""
    if isinstance(e, CheckpointWriteError) and getattr(e, "step", None) == step:
        return e
    what_to_do = (
        "."  # a StorageError says what to do
        if isinstance(e, StorageError)
        else ". Free space or fix the storage's permissions, then continue with gram-ray train --resume auto."
    )
    failure = CheckpointWriteError(
        f"step {step}: the checkpoint could not be written or stored ({e}). {stopped}{what_to_do}"
    )
    failure.step = step
    return failure


class TakenCheckpoint:
    """The state of a checkpoint at `step` (model, optimizer, position: model/checkpoint.py's format), in host
    memory of its own when `copied`. store() writes and uploads it once; `stored` settles when it is stored (its
    result: seconds from taking to stored) or could not be (the stamped failure)."""

    def __init__(self, state: dict, cfg: GramConfig, step: int, stopped: str, copied: bool) -> None:
        """stopped: what the run keeps should this checkpoint fail (TrainState.stopped() with the last stored)."""
        self.state, self.cfg, self.step, self.stopped, self.copied = state, cfg, step, stopped, copied
        self.taken_at = time.perf_counter()
        self.stored: Future = Future()
        # Where store() writes the folder before uploading it: made there, removed once uploaded or failed.
        self.folder = Path(tempfile.gettempdir()) / f"{FOLDER_PREFIX}{os.getpid()}-{step}-{uuid.uuid4().hex[:8]}"
        self._lock = threading.Lock()

    @classmethod
    def take(cls, state: dict, cfg: GramConfig, step: int, stopped: str, copy: bool) -> TakenCheckpoint:
        """The checkpoint of `state`: copied to host memory first when it is to be stored in the background."""
        return cls(host_copy(state) if copy else state, cfg, step, stopped, copied=copy)

    def write(self, folder: Path) -> Path:
        """The whole checkpoint folder at `folder` (state.pt, position, config, manifest last)."""
        write_checkpoint(folder, self.state, self.cfg)
        return folder

    def store(self, upload: Callable[[Path], T]) -> T:
        """Write the folder locally, then upload(folder) (manifest last) and return what it returns; the local
        folder is removed either way. Called once by whoever stores it (Ray Train's upload thread, or the
        training thread); a second call (Ray Train retries an upload whose error names a transient AWS fault)
        raises the first failure again: gram-ray's storage retries have already ridden out what they could."""
        with self._lock:
            if self.stored.done():
                self.stored.result()  # raises the failure
                raise RuntimeError(f"the checkpoint of step {self.step} was stored already")
            try:
                result = upload(self.write(self.folder))
            except BaseException as e:
                failure = stamped_failure(e, self.step, self.stopped)
                self.stored.set_exception(failure)
                if failure is e:
                    raise
                raise failure from e
            finally:
                shutil.rmtree(self.folder, ignore_errors=True)
                self.state = {}  # the host copy goes as soon as it is written: not held until the next one
            self.stored.set_result(time.perf_counter() - self.taken_at)
            return result

    def settle(self) -> None:
        """Its report returned having stored it (or written it where it wanted, or not at all): done now."""
        with self._lock:
            if not self.stored.done():
                self.stored.set_result(time.perf_counter() - self.taken_at)
            self.state = {}
