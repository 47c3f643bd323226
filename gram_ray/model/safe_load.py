"""Reading checkpoint files someone else may have written, without letting them run code.

A PyTorch checkpoint is a pickle, and unpickling can call any function the file names. Every checkpoint gram-ray
opens (its own folders, GRAM's released checkpoints for `import-checkpoint`, EVA-CLIP and BEATs weights, the
checkpoint `gram-ray evaluate` scores) goes through `load_weights`: `torch.load(weights_only=True)`, whose
unpickler builds tensors, containers and plain values only and refuses anything else before it is called.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import torch

__all__ = ["CheckpointError", "load_weights"]


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and why."""


def load_weights(source: str | Path, map_location="cpu"):
    """The contents of a checkpoint file (a local path or a storage URI), tensors and plain values only.
    Raises CheckpointError naming the file when it holds anything else, or is not a readable checkpoint."""
    from gram_ray import storage

    local = "://" not in str(source)  # a local file is read by torch itself (no copy of a multi-GB file in memory)
    try:
        data = Path(source) if local else io.BytesIO(storage.read_bytes(str(source)))
        if local and not data.is_file():
            raise FileNotFoundError(f"{source} not found" + (": it is a folder" if data.is_dir() else ""))
        return torch.load(data, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        reason = str(e).splitlines()[0][:300]
        raise CheckpointError(
            f"refused to load {source}: it holds objects other than tensors and plain values ({reason}). "
            "Loading it could run code; use checkpoints from a source you trust."
        ) from None
    except (RuntimeError, EOFError, ValueError) as e:  # truncated, not a zip/pickle, half-written
        reason = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
        raise CheckpointError(
            f"{source} is not a readable PyTorch checkpoint ({reason}): truncated, still being written, or another "
            "kind of file"
        ) from None
    except PermissionError as e:
        raise CheckpointError(f"cannot read {source}: {e}") from None
