"""Where a run continues from: `gram-ray train --resume auto`, and every worker group Ray Train (re)starts.

Ray Train V2 writes each checkpoint folder into the run's storage (<storage_path>/<run.name>/checkpoint_<time>/)
and only then registers it in checkpoint_manager_snapshot.json beside them (read here through Ray's public
ray.train.Result.from_path); a driver killed mid-upload leaves a folder that was never registered, possibly with
a truncated state.pt. So the candidates are the registered checkpoints, newest first (or, before the first
registration, every checkpoint folder by its time-stamped name), and each is taken only if its manifest.json
(uploaded last) names files all there at their sizes, and its state.pt is whole: a PyTorch checkpoint is a zip
file whose central directory is written last, so reading that directory (a few KB at the end, also from cloud
storage) tells a finished file from a cut-off one without reading the weights.

resume_plan() decides once, on the driver, where a fit starts; its ResumePlan answers every worker group's start
(continues_from), so the datasets and the weights agree.
"""

from __future__ import annotations

import json
import posixpath
import zipfile
from dataclasses import dataclass

import pyarrow.fs as pafs

from gram_ray import storage
from gram_ray.model.checkpoint import MANIFEST_FILE, POSITION_FILE, STATE_FILE, load_checkpoint, manifest_problem

__all__ = [
    "SNAPSHOT",
    "ResumePlan",
    "checkpoint_is_whole",
    "latest_checkpoint",
    "latest_registered",
    "position",
    "resume_plan",
]

SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train V2's record of the checkpoints it registered


def checkpoint_is_whole(folder: str) -> bool:
    """Whether a checkpoint folder is whole: its manifest's files all there at their sizes (checkpoints written
    before manifests existed: none), and its state.pt a complete PyTorch checkpoint file (its zip directory
    reads)."""
    return _not_whole(folder) is None


def _not_whole(folder: str) -> str | None:
    """Why a checkpoint folder is not whole, or None when it is: one listing tells whether it has a manifest."""
    if MANIFEST_FILE in storage.list_names(folder):
        problem = manifest_problem(folder)
        if problem is not None:
            return problem
    path = storage.join(folder, STATE_FILE)
    incomplete = f"its {STATE_FILE} is missing or incomplete"

    def read_directory() -> str | None:
        fs, p = storage.resolve(path)
        if fs.get_file_info(p).type != pafs.FileType.File:
            return incomplete
        try:
            with fs.open_input_file(p) as f, zipfile.ZipFile(f) as z:
                return None if any(name.endswith("/data.pkl") for name in z.namelist()) else incomplete
        except (zipfile.BadZipFile, ValueError):
            return incomplete

    # A storage error is not an answer: a 503 here must not pass over a whole checkpoint for an older one.
    return storage.with_retries("reading", path, read_directory)


def _registered(run_root: str) -> list[str] | None:
    """The checkpoint folders Ray Train registered for the run at run_root, the latest first, then the others by
    step, newest first; None before the first registration. Read through Ray Train's own Result.from_path (its
    snapshot's format is Ray's business), with the storage settings' retries on a bucket."""
    if not storage.exists(storage.join(run_root, SNAPSHOT)):
        return None
    import ray.train

    where = storage.run_storage(run_root)
    result = ray.train.Result.from_path(where["storage_path"], storage_filesystem=where.get("storage_filesystem"))
    steps = sorted(result.best_checkpoints, key=lambda pair: pair[1].get("step", -1), reverse=True)
    names = [posixpath.basename(checkpoint.path.rstrip("/")) for checkpoint, _ in steps]
    latest = [posixpath.basename(result.checkpoint.path.rstrip("/"))] if result.checkpoint is not None else []
    return latest + [n for n in names if n not in latest]


def _candidates(run_root: str) -> list[str]:
    """Checkpoint folder names, newest first: the registered ones, or before the first registration every
    checkpoint folder (Ray names them checkpoint_<YYYY-mm-dd_HH-MM-SS.micro>)."""
    registered = _registered(run_root)
    if registered is not None:
        return registered

    def listing() -> list[pafs.FileInfo]:
        fs, p = storage.resolve(run_root)
        if fs.get_file_info(p).type != pafs.FileType.Directory:
            return []
        return fs.get_file_info(pafs.FileSelector(p))

    infos = storage.with_retries("listing", run_root, listing)
    folders = [i.base_name for i in infos if i.type == pafs.FileType.Directory]
    return sorted((name for name in folders if name.startswith("checkpoint_")), reverse=True)


def latest_checkpoint(run_root: str, log=print) -> str | None:
    """The newest whole checkpoint folder of the run at run_root (a local path or URI), or None if it has none.
    Folders passed over (cut off by a kill) are named in the log."""
    for name in _candidates(run_root):
        folder = storage.join(run_root, name)
        why = _not_whole(folder)
        if why is None:
            return folder
        log(f"passing over {folder}: {why} (written when the run was killed, or storage failed?)")
    return None


def latest_registered(run_root: str) -> str | None:
    """The checkpoint Ray Train hands a (re)started worker group: the latest it registered."""
    registered = _registered(run_root)
    return storage.join(run_root, registered[0]) if registered else None


def position(folder: str) -> dict:
    """{"step", "epoch", "epoch_complete", "epoch_progress"} of a checkpoint (or "consumed_ids", for one written
    before epoch_progress), from its small position.json (read from the full state for checkpoints written before
    it existed)."""
    path = storage.join(folder, POSITION_FILE)
    if storage.exists(path):
        return json.loads(storage.read_text(path))
    state = load_checkpoint(folder)
    return {k: state.get(k) for k in ("step", "epoch", "epoch_complete", "epoch_progress", "consumed_ids")}


@dataclass(frozen=True)
class ResumePlan:
    """Where a fit's worker groups start, decided once, on the driver, by resume_plan().

    Ray Train V2 hands every worker group a checkpoint: at the fit's start the run's latest registered one
    (`restored`, when the run name has checkpoints), after a failure or an elastic resize the latest this fit
    registered. The first is overridden by where the user said to start (`start`: --resume PATH or auto); the
    second is a restart, and wins. EpochSplits (the datasets of a group) and the worker (its weights and
    optimizer) both ask continues_from(), so that they agree."""

    run_root: str
    start: str | None = None  # the checkpoint folder or URI the fit continues from; None: afresh
    restored: str | None = None  # the run's latest whole checkpoint when the fit started

    def continues_from(self, handed: str | None) -> tuple[str | None, bool]:
        """(the checkpoint a worker group starting now continues from, or None: afresh; whether it is a restart
        of this fit), given the checkpoint Ray Train handed it (its path or URI, or None)."""
        if handed is not None and (self.restored is None or _name(handed) != _name(self.restored)):
            return handed, True  # registered by this fit: a restart after a failure or a resize
        return self.start, False


def _name(folder: str) -> str:
    return posixpath.basename(str(folder).rstrip("/"))


def resume_plan(run_root: str, name: str, resume: str | None, log=print) -> ResumePlan:
    """The plan of a fit of the run `name` at run_root: resume is None (afresh: refused when the run already has
    checkpoints, which Ray Train would hand the workers), "auto" (its newest whole checkpoint, or afresh when it
    has none) or a checkpoint folder or URI."""
    existing = latest_checkpoint(run_root, log=log)  # Train V2 continues a run of the same name
    if resume == "auto":
        if existing is None:
            log(f"--resume auto: no checkpoint of run {name!r} in {run_root} yet: starting afresh")
        else:
            log(f"--resume auto: continuing from {existing}")
        resume = existing
    elif resume is None and existing is not None:
        raise ValueError(
            f"{run_root} already holds checkpoints of a run named {name!r} (latest: {existing}). --resume auto "
            "continues it; to start afresh, give another --out or run.name, or delete that folder."
        )
    start = storage.absolute(resume) if resume else None  # a folder or a URI every worker can read
    return ResumePlan(run_root, start, existing)
