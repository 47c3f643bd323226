"""Finding where a killed run can go on from: `gram-ray train --resume auto`.

Ray Train V2 writes each checkpoint folder into the run's storage (<storage_path>/<run.name>/checkpoint_<time>/)
and only then registers it in checkpoint_manager_snapshot.json beside them; a driver killed mid-upload leaves a
folder that was never registered, possibly with a truncated state.pt. So the candidates are the registered
checkpoints, newest first (or, before the first registration, every checkpoint folder by its time-stamped name),
and each is taken only if its manifest.json (uploaded last) names files all there at their sizes, and its
state.pt is whole: a PyTorch checkpoint is a zip file whose central directory is
written last, so reading that directory (a few KB at the end, also from cloud storage) tells a finished file from
a cut-off one without reading the weights.
"""

from __future__ import annotations

import json
import zipfile

import pyarrow.fs as pafs

from gram_ray import storage
from gram_ray.model.checkpoint import MANIFEST_FILE, POSITION_FILE, STATE_FILE, load_checkpoint, manifest_problem

__all__ = ["SNAPSHOT", "checkpoint_is_whole", "latest_checkpoint", "latest_registered", "position"]

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


def _candidates(run_root: str) -> list[str]:
    """Checkpoint folder names, newest first."""
    snapshot = storage.join(run_root, SNAPSHOT)
    if storage.exists(snapshot):
        state = json.loads(storage.read_text(snapshot))
        results = sorted(state.get("checkpoint_results") or [], key=lambda r: r["metrics"].get("step", -1))
        names = [r["checkpoint_dir_name"] for r in reversed(results)]
        latest = (state.get("latest_checkpoint_result") or {}).get("checkpoint_dir_name")
        return ([latest] if latest else []) + [n for n in names if n != latest]

    def listing() -> list[pafs.FileInfo]:
        fs, p = storage.resolve(run_root)
        if fs.get_file_info(p).type != pafs.FileType.Directory:
            return []
        return fs.get_file_info(pafs.FileSelector(p))

    infos = storage.with_retries("listing", run_root, listing)
    folders = [i.base_name for i in infos if i.type == pafs.FileType.Directory]
    folders = [name for name in folders if name.startswith("checkpoint_")]
    return sorted(folders, reverse=True)  # Ray names them checkpoint_<YYYY-mm-dd_HH-MM-SS.micro>


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
    """The checkpoint Ray Train hands a (re)started worker group: the latest its snapshot registered."""
    snapshot = storage.join(run_root, SNAPSHOT)
    if not storage.exists(snapshot):
        return None
    latest = (json.loads(storage.read_text(snapshot)).get("latest_checkpoint_result") or {}).get("checkpoint_dir_name")
    return storage.join(run_root, latest) if latest else None


def position(folder: str) -> dict:
    """{"step", "epoch", "epoch_complete", "consumed_ids"} of a checkpoint, from its small position.json (read from
    the full state for checkpoints written before it existed)."""
    path = storage.join(folder, POSITION_FILE)
    if storage.exists(path):
        return json.loads(storage.read_text(path))
    state = load_checkpoint(folder)
    return {k: state.get(k) for k in ("step", "epoch", "epoch_complete", "consumed_ids")}
