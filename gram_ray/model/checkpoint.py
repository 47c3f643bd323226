"""gram-ray's checkpoint format: one folder holding state.pt, position.json, config.yaml and manifest.json.

state.pt is a dict of tensors and plain values only (model and optimizer state, scheduler state, the position in
training, the config as JSON-able values, the word vocabulary), so it loads with `weights_only=True`: a
checkpoint from elsewhere cannot run code when it is opened.

Position in training: `step` (optimizer steps taken), `epoch` (the epoch the checkpoint was taken in),
`epoch_complete` (False for a checkpoint taken mid-epoch), and `epoch_progress` (mid-epoch: the clips every rank
has already trained on in that epoch, as data/epoch_progress.py records them: a bit a cache file trained on whole,
the ids of the files in progress; so a resumed run trains on exactly the rest). Checkpoints written before it
listed every such clip's id as `consumed_ids`; they resume the same way.

manifest.json, written (and uploaded) last, names every other file of the folder with its size: a folder whose
manifest is missing, or whose files are not all there at their sizes, is not a whole checkpoint (a kill or a
storage outage cut its writing off). Hashes are left out: a 15 GB state.pt would take a minute to hash at every
checkpoint, and a cut-off upload never completes an object of the full size.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from gram_ray import storage
from gram_ray.config import GramConfig, save_config
from gram_ray.model.fitting import adapt_state
from gram_ray.model.gram import GramModel, build_model
from gram_ray.model.safe_load import CheckpointError, load_weights


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, permission denied, storage unreachable)."""


__all__ = [
    "STATE_FILE",
    "SPARE",
    "ORIGINALS",
    "POSITION_FILE",
    "MANIFEST_FILE",
    "CheckpointError",
    "CheckpointWriteError",
    "save_checkpoint",
    "checkpoint_state",
    "write_checkpoint",
    "load_checkpoint",
    "init_weights",
    "is_checkpoint",
    "upload_checkpoint",
    "manifest_problem",
    "model_from_state",
    "upgrade_state",
]

STATE_FILE = "state.pt"
POSITION_FILE = "position.json"  # where in training the checkpoint was taken, readable without the weights
MANIFEST_FILE = "manifest.json"  # the folder's files and sizes, written last
# An import of GRAM's weights (gram_checkpoint.import_gram_checkpoint) keeps, beside the model's weights, those of
# the parts its config has not (SPARE) and GRAM's own tensors where it resized them (ORIGINALS), by gram-ray's names.
SPARE = "spare"
ORIGINALS = "originals"


def save_checkpoint(directory: Path, model_state: dict, cfg: GramConfig, vocab: list[str] | None, **position) -> None:
    """checkpoint_state(...) written to the folder `directory` (position: checkpoint_state's keywords)."""
    write_checkpoint(directory, checkpoint_state(model_state, cfg, vocab, **position), cfg)


def checkpoint_state(
    model_state: dict,
    cfg: GramConfig,
    vocab: list[str] | None,
    *,
    optimizer_state: dict | None = None,
    scheduler=None,
    scaler=None,
    step: int = 0,
    epoch: int = 0,
    epoch_complete: bool = True,
    evaluations: int = 0,
    epoch_progress: dict | None = None,
    rng_states: list[dict] | None = None,
    world_size: int = 1,
) -> dict:
    """What state.pt holds. model_state and optimizer_state as one process's model and optimizer have them (by
    parameter index), whatever the strategy that trained them: train/sharding.py's gathered_state gives them."""
    return {
        "model": model_state,
        "optimizer": optimizer_state,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,  # fp16's loss scale
        "step": step,
        "epoch": epoch,
        "epoch_complete": epoch_complete,
        "evaluations": evaluations,  # reported so far in the run: a resumed sweep trial counts from here
        "epoch_progress": epoch_progress,  # mid-epoch: the clips of the epoch trained on (data/epoch_progress.py)
        "rng_states": rng_states,  # mid-epoch: every rank's torch RNG state, so dropout draws continue exactly
        "world_size": world_size,  # the worker group's size: an elastic run may resume at another
        "config": cfg.model_dump(mode="json"),
        "vocab": vocab,
    }


def write_checkpoint(directory: str | Path, state: dict, cfg: GramConfig) -> None:
    """The checkpoint folder (a local path or a storage URI): state.pt (tensors and plain values only, so it
    loads with weights_only=True) and the config beside it, for people."""
    if storage.is_uri(directory):  # written locally, then uploaded: an object appears whole or not at all
        with tempfile.TemporaryDirectory(prefix="gram-ray-checkpoint-") as tmp:
            write_checkpoint(Path(tmp), state, cfg)
            try:
                storage.upload_dir(tmp, directory, last=(MANIFEST_FILE,))
            except OSError as e:
                raise CheckpointWriteError(f"uploading the checkpoint to {directory} failed: {e}") from e
        return
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # Written beside, then renamed: a write cut off (disk full, a kill) leaves no state.pt that looks whole.
    partial = directory / (STATE_FILE + ".partial")
    try:
        torch.save(state, partial)
        save_config(cfg, directory / "config.yaml")
        kept = ("step", "epoch", "epoch_complete", "evaluations", "epoch_progress", "world_size")
        position = {k: state.get(k) for k in kept}
        (directory / POSITION_FILE).write_text(json.dumps(position))
        partial.replace(directory / STATE_FILE)
        sizes = {name: (directory / name).stat().st_size for name in (STATE_FILE, POSITION_FILE, "config.yaml")}
        (directory / MANIFEST_FILE).write_text(json.dumps({"files": sizes}))
    except OSError as e:
        partial.unlink(missing_ok=True)
        raise CheckpointWriteError(f"writing the checkpoint {directory} failed: {e}") from e


def upload_checkpoint(local: Path, fs, dest: str, target: str) -> None:
    """Copy a checkpoint folder written by write_checkpoint to dest on fs (Ray Train's storage filesystem), its
    manifest last, each file with the storage settings' retries; target: the folder's URI or path, for messages."""
    storage.copy_files_to(Path(local), fs, dest, last=(MANIFEST_FILE,), target=target)


def manifest_problem(directory: str | Path) -> str | None:
    """Why a checkpoint folder is not whole by its manifest (None when it is): the manifest is missing or cut off,
    or a file it names is missing or of another size. One listing and one small read."""
    infos = storage.file_infos(directory)
    if MANIFEST_FILE not in infos:
        return f"it has no {MANIFEST_FILE} (written last: the checkpoint's writing was cut off)"
    try:
        files = json.loads(storage.read_text(storage.join(directory, MANIFEST_FILE)))["files"]
    except (ValueError, KeyError, TypeError):
        return f"its {MANIFEST_FILE} is cut off or not gram-ray's"
    for name, size in files.items():
        if name not in infos:
            return f"{name}, named in its {MANIFEST_FILE}, is missing"
        if infos[name].size != size:
            return f"{name} holds {infos[name].size} bytes, its {MANIFEST_FILE} says {size}"
    return None


def is_checkpoint(directory: str | Path) -> bool:
    return storage.exists(storage.join(directory, STATE_FILE))


def checkpoint_config(directory: str | Path) -> GramConfig:
    """The config beside a checkpoint's weights: what a caller needs to decide before it reads a state that may
    be gigabytes (whether to rerank, the modalities of an index)."""
    import yaml

    return GramConfig.model_validate(yaml.safe_load(storage.read_text(storage.join(directory, "config.yaml"))))


def load_checkpoint(directory: str | Path, map_location="cpu") -> dict:
    """A checkpoint's state from a local folder or a storage URI (s3://.../checkpoint_000003). Tensors and plain
    values only: anything else in the file is refused, never executed."""
    path = storage.join(directory, STATE_FILE)
    if not storage.exists(path):
        raise FileNotFoundError(f"{path} not found: is {directory} a gram-ray checkpoint folder?")
    state = load_weights(path, map_location)
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"{path} is not a gram-ray checkpoint (no 'model' weights in it)")
    return upgrade_state(state)


_ENCODERS = ("text", "vision", "audio")


TEMPERATURE = "loss_fn.log_temperature"


def upgrade_state(state: dict) -> dict:
    """An older checkpoint in today's layout. Before encoders sat behind backbone adapters its Hugging Face
    weights were under <encoder>.backbone.* (now <encoder>.backbone.model.*), and its projection heads had a
    bias, which configs then did not mention (now model.head_bias, default false as GRAM). Before FSDP the
    temperature was a scalar (now one element), and so were its AdamW moments."""
    state = _one_element_temperature(state)
    weights = state["model"]
    if not any(k.startswith(f"{e}.backbone.") for k in weights for e in _ENCODERS):
        return state
    if any(k.startswith(f"{e}.backbone.model.") for k in weights for e in _ENCODERS):
        return state  # already today's layout
    renamed = {}
    for key, value in weights.items():
        encoder = key.split(".", 1)[0]
        if encoder in _ENCODERS and key.startswith(f"{encoder}.backbone."):
            key = f"{encoder}.backbone.model." + key[len(f"{encoder}.backbone.") :]
        renamed[key] = value
    model_cfg = state["config"].setdefault("model", {})
    model_cfg.setdefault("head_bias", any(k.startswith("projections.") and k.endswith(".bias") for k in weights))
    return state | {"model": renamed}


def _one_element_temperature(state: dict) -> dict:
    weights = state["model"]
    if TEMPERATURE not in weights or weights[TEMPERATURE].ndim != 0:
        return state
    state = state | {"model": weights | {TEMPERATURE: weights[TEMPERATURE].reshape(1)}}
    optimizer = state.get("optimizer")
    if optimizer:  # the only 0-d parameter was the temperature: its moments are the 0-d ones (not the step count)
        moments = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
        states = {
            i: {k: v.reshape(1) if k in moments and torch.is_tensor(v) and v.ndim == 0 else v for k, v in s.items()}
            for i, s in optimizer["state"].items()
        }
        state["optimizer"] = optimizer | {"state": states}
    return state


def model_from_state(state: dict) -> tuple[GramModel, GramConfig]:
    """The model a checkpoint state describes, with its weights, in eval mode."""
    cfg = GramConfig.model_validate(state["config"])
    model = build_model(cfg, state["vocab"])
    model.load_state_dict(state["model"])
    return model.eval(), cfg


def init_weights(model: GramModel, checkpoint: str, log=print) -> None:
    """Load a checkpoint's weights (GRAM's, imported once by `gram-ray import-checkpoint`, or a gram-ray run's) into
    the model of any recipe: tensors whose shape follows the frame or window count or the resolution are resized
    as GRAM's code resizes them (from GRAM's originals, for an import), the weights of a modality or of a matching
    loss the recipe does not have are left out with one line saying so, and an import fills the parts its own
    config had no place for (the subtitle head) from GRAM's weights it kept. Any other mismatch is a
    CheckpointError naming the tensor and the config key that sets its shape. An import made with --allow-partial
    may leave some of the model's weights out: those are named."""
    state = load_checkpoint(checkpoint)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    weights = dict(state["model"]) | state.get(ORIGINALS, {})
    filled = [k for k in state.get(SPARE, {}) if k in shapes and k not in weights]
    weights |= {k: state[SPARE][k] for k in filled}
    weights, report = adapt_state(weights, shapes)
    problems = report.unexpected + report.misshaped  # a tensor of another encoder says more than a shape
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        kind = "has no place in this model" if report.unexpected else "does not fit this model"
        raise CheckpointError(
            f"model.init_from={checkpoint}: a tensor {kind}: {problems[0]}{more}. Was it written for another model "
            "config? Set that key as the checkpoint's config.yaml has it, or start from another checkpoint."
        )
    model.load_state_dict(weights, strict=False)
    log(f"initialised from {checkpoint}: {report.loaded} tensors")
    if filled:
        log(f"  {len(filled)} tensors from the import's spare weights (its config had no place for them): {filled}")
    for line in report.lines()[1:]:
        if not line.startswith("MISSING"):
            log("  " + line)
    if report.missing:
        log(
            f"  {len(report.missing)} of the model's tensors were not in it and keep their initial values: "
            f"{report.missing[:10]}"
        )
