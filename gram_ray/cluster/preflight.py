"""Before paying: every file, folder and URI a job will read or write, checked before any clip is decoded and any
GPU is requested.

On a cluster, a wrong weights path found by the Ray Train workers costs the decode of every clip and the start of
the GPU nodes (minutes of them, and their bill) before the run ends in a worker's traceback. So the driver of
`train`, `tune`, `preprocess`, `evaluate` and `index` first checks what the job names (`needs_of_config` and the
commands' own options): annotations and media folders, `model.init_from` and each encoder's `pretrained` file, that
`run.storage_path` takes a write (one small object, written and deleted), the caches. Each problem is one line
naming the key, the value and what to do; all of them are reported at once.

Where: a URI is checked from the driver (object storage looks the same from every node). A local path is checked
where the workers will read it: on a cluster (RAY_ADDRESS set, as in a `ray job submit` job) in a CPU-only Ray
task, which runs on a node of the CPU group (the autoscaler does not start a GPU node for a task that asks for
none, and the head schedules nothing), since the head that runs the driver may not mount what the workers do;
without a cluster, here, before Ray starts.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from pathlib import PurePath
from typing import Literal

from gram_ray import storage

__all__ = ["Need", "PreflightError", "needs_of_config", "problems", "check_here", "check_on_cluster"]

Kind = Literal["file", "dir", "inputs", "checkpoint", "weights", "writable", "cache"]


@dataclass(frozen=True)
class Need:
    """Something a job will read or write: the key (config key or option) that names it, its value, what it must
    be (kind), and for `inputs` the source shape that reads them (data.source.kind)."""

    key: str
    value: str
    kind: Kind
    source: str = "gram"


class PreflightError(ValueError):
    """Problems found before the job started; str() is one line per problem."""

    def __init__(self, lines: list[str]) -> None:
        super().__init__("\n".join(lines))
        self.lines = lines


_WEIGHT_FILES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors", ".pkl")


def _is_hub_name(value: str) -> bool:
    """A Hugging Face model id (bert-base-uncased, MIT/ast-finetuned-audioset-10-10-0.4593), read from the hub by
    name, not a path: at most one slash, no leading / . ~, no weights file's extension."""
    if storage.is_uri(value) or value.startswith((".", "/", "~")) or os.path.exists(value):
        return False
    return value.count("/") <= 1 and PurePath(value).suffix not in _WEIGHT_FILES


def needs_of_config(cfg) -> list[Need]:
    """What a training run (train, tune) of this config reads and writes."""
    d, m = cfg.data, cfg.model
    needs: list[Need] = []
    train_source, val_source = d.source.kind, (d.val_source or d.source).kind
    if d.train_annotations:
        needs.append(Need("data.train_annotations", str(d.train_annotations), "inputs", train_source))
    if d.val_annotations:
        needs.append(Need("data.val_annotations", str(d.val_annotations), "inputs", val_source))
    if d.video_dir and d.video.format != "none":
        needs.append(Need("data.video_dir", str(d.video_dir), "dir"))
    if d.audio_dir:
        needs.append(Need("data.audio_dir", str(d.audio_dir), "dir"))
    if m.init_from:
        needs.append(Need("model.init_from", str(m.init_from), "checkpoint"))
    else:  # with init_from every weight comes from it: the encoders' own files are not read
        towers = {"text": m.text, "video": m.vision, "audio": m.audio}
        for tower, name in (("text", "text"), ("video", "vision"), ("audio", "audio")):
            pretrained = towers[tower].pretrained
            if tower in m.modalities and pretrained and not _is_hub_name(str(pretrained)):
                needs.append(Need(f"model.{name}.pretrained", str(pretrained), "weights"))
    if cfg.run.storage_path:
        needs.append(Need("run.storage_path", str(cfg.run.storage_path), "writable"))
    if d.cache_dir:
        needs.append(Need("data.cache_dir", str(d.cache_dir), "writable"))
    return needs


_ADVICE = {
    "inputs": "give the annotation file (or manifest, or shards) as every node reads it",
    "file": "give a file every node reads",
    "dir": "give the folder as every node reads it (a bucket URI, or a path every node mounts)",
    "checkpoint": "give a gram-ray checkpoint folder (`gram-ray import-checkpoint` makes one from GRAM's weights)",
    "weights": "give the encoder's weights file as every node reads it (or set model.init_from)",
    "writable": "give a location the job may write (check the bucket's name and the node's credentials)",
    "cache": "give a `gram-ray preprocess --out` folder",
}


def _problem(need: Need, data_config) -> str | None:
    """Why need is not met (None when it is); the checks read no more than a listing and a few bytes."""
    from gram_ray.data.manifest import ManifestError
    from gram_ray.data.preprocess import check_inputs
    from gram_ray.model.checkpoint import STATE_FILE

    value = need.value
    try:
        if need.kind == "inputs":
            source = data_config.source.model_copy(update={"kind": need.source})
            check_inputs([value], None, None, data_config.model_copy(update={"source": source}))
            return None
        found = _kind(value)
        if need.kind in ("dir", "checkpoint", "cache") and found != "dir":
            return "a file, not a folder" if found == "file" else "no such folder"
        if need.kind in ("file", "weights") and found != "file":
            return "a folder, not a file" if found == "dir" else "no such file"
        if need.kind == "checkpoint" and _kind(storage.join(value, STATE_FILE)) != "file":
            return f"not a gram-ray checkpoint folder (no {STATE_FILE} in it)"
        if need.kind == "writable":
            probe = storage.join(value, f".gram-ray-write-check-{uuid.uuid4().hex[:12]}")
            storage.write_text(probe, "gram-ray checks that it may write here; deleted at once\n")
            storage.delete_file(probe)
        return None
    except ManifestError as e:
        return str(e)
    except OSError as e:  # storage unreachable, credentials refused, a bucket that does not exist, no permission
        first = (str(e).splitlines() or [type(e).__name__])[0][:300]
        return f"cannot reach {value}: {first}" if storage.is_uri(value) else (e.strerror or first)


def _kind(path: str) -> str:
    """'file', 'dir' or 'none' for a local path or a URI (a bucket's prefix with objects under it is a folder)."""
    import pyarrow.fs as pafs

    return {pafs.FileType.File: "file", pafs.FileType.Directory: "dir"}.get(storage.kind(path), "none")


def problems(needs: list[Need], data_config) -> list[str]:
    """One line per need not met: the key, the value, what is wrong, what to do."""
    lines = []
    for need in needs:
        why = _problem(need, data_config)
        if why is not None:
            advice = _ADVICE[need.kind]
            lines.append(f"{need.key}={need.value}: {why}. {advice[0].upper()}{advice[1:]}.")
    return lines


def on_cluster() -> bool:
    """A job on a Ray cluster (ray job submit sets RAY_ADDRESS for its driver), not a local Ray started here."""
    return bool(os.environ.get("RAY_ADDRESS"))


def check_here(needs: list[Need], data_config) -> list[Need]:
    """Check, from this process, the URIs (and the local paths too when there is no cluster: the workers run on
    this machine); raises PreflightError. Returns the needs left for check_on_cluster."""
    here = [n for n in needs if storage.is_uri(n.value) or not on_cluster()]
    lines = problems(here, data_config)
    if lines:
        raise PreflightError(lines)
    return [n for n in needs if n not in here]


def check_on_cluster(needs: list[Need], data_config, timeout_s: float = 900) -> None:
    """Check local paths on a node of the CPU group, where decode tasks read them (Ray is initialised)."""
    if not needs:
        return
    import ray

    task = ray.remote(num_cpus=1, num_gpus=0, max_retries=1)(problems)
    try:
        lines = ray.get(task.remote(needs, data_config), timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        raise PreflightError(
            [
                f"no CPU node ran the check of {', '.join(n.key for n in needs)} within {timeout_s:.0f} s: does the "
                "cluster have a CPU worker group (its nodes decode the clips)? See `ray status`."
            ]
        ) from None
    if lines:
        raise PreflightError([f"{line} (checked on a CPU node of the cluster)" for line in lines])
