"""Ray Data batch inference: a checkpoint's model embeds every clip and caption of a Parquet cache, and the
metrics come from the pure evaluation functions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from gram_ray import storage
from gram_ray.data.collate import Collate
from gram_ray.data.schema import IDS, TEXT_TO_VIDEO, object_column
from gram_ray.evaluate import evaluate_embeddings
from gram_ray.model.checkpoint import STATE_FILE, is_checkpoint, load_checkpoint, model_from_state

__all__ = ["check_inputs", "evaluate_checkpoint"]


class _EmbedClips:
    """map_batches UDF (an actor): one row per clip in, its embeddings out (captions as a ragged list)."""

    def __init__(self, checkpoint_dir: str) -> None:
        state = load_checkpoint(checkpoint_dir)
        self.model, cfg = model_from_state(state)
        self.collate = Collate(cfg, state["vocab"], train=False)

    def __call__(self, batch: dict) -> dict:
        model_batch = self.collate(batch)
        with torch.no_grad():
            emb = self.model.embed(model_batch)
        ids = model_batch[IDS]
        t2v = model_batch[TEXT_TO_VIDEO].numpy()
        out = {"id": np.asarray(ids, dtype=object), "num_captions": np.bincount(t2v, minlength=len(ids))[: len(ids)]}
        for m, e in emb.items():
            if m == "text":  # several captions per clip: a ragged list per row
                out["text"] = object_column([e[t2v == i].numpy().ravel() for i in range(len(ids))])
            else:
                out[m] = e.numpy()
        return out


def check_inputs(checkpoint_dir: str | Path, data_dir: str | Path) -> None:
    """FileNotFoundError naming what is missing, before any Ray work starts."""
    if not is_checkpoint(checkpoint_dir):
        raise FileNotFoundError(f"{checkpoint_dir} is not a gram-ray checkpoint folder (no {STATE_FILE} in it)")
    if not storage.exists(data_dir):
        raise FileNotFoundError(f"{data_dir} not found: give a `gram-ray preprocess --out` folder")


def evaluate_checkpoint(checkpoint_dir: str | Path, data_dir: str | Path, batch_size: int = 64) -> dict:
    """Embed a Parquet cache with a checkpoint's model through Ray Data, then compute the metrics JSON."""
    import ray.data

    from gram_ray.data.parquet_layout import read_cache

    check_inputs(checkpoint_dir, data_dir)
    shards = storage.join(data_dir, "shards")
    ds = read_cache(shards if storage.exists(shards) else storage.absolute(data_dir))
    rows = ds.map_batches(
        _EmbedClips,
        fn_constructor_kwargs={"checkpoint_dir": storage.absolute(checkpoint_dir)},
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=1),
    ).take_all()
    rows.sort(key=lambda r: r["id"])
    emb: dict[str, list] = {}
    text_rows, text_to_video = [], []
    for i, r in enumerate(rows):
        text_rows.append(np.asarray(r["text"], dtype=np.float32).reshape(r["num_captions"], -1))
        text_to_video.extend([i] * r["num_captions"])
        for m, v in r.items():
            if m not in ("id", "text", "num_captions"):
                emb.setdefault(m, []).append(np.asarray(v))
    embeddings = {m: np.stack(v) for m, v in emb.items()} | {"text": np.concatenate(text_rows)}
    return evaluate_embeddings(embeddings, np.asarray(text_to_video))
