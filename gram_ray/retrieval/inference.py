"""Ray Data batch inference: a checkpoint's model embeds every clip and caption of a Parquet cache, and the
metrics come from the pure evaluation functions. A checkpoint trained with the matching loss is also reranked
(eval.rerank_k): a second pass in which the actor embedding each clip scores that clip's candidate pairs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from gram_ray import storage
from gram_ray.data.collate import Collate
from gram_ray.data.schema import IDS, TEXT_TO_VIDEO, object_column
from gram_ray.data.text import tokenize
from gram_ray.model.checkpoint import STATE_FILE, checkpoint_config, is_checkpoint, load_checkpoint, model_from_state
from gram_ray.retrieval.metrics import evaluate_embeddings

__all__ = ["check_inputs", "evaluate_checkpoint", "inference_model"]


def inference_model(checkpoint_dir: str, device: torch.device | str = "cpu", every_caption: bool = False):
    """(model in eval mode on `device`, its config, the collate of eval batches for it) from a checkpoint. Frames
    of a JPEG cache are decoded by collate on the CPU, so the model gets decoded frames whatever its device.
    every_caption: each clip's every caption is embedded, whatever eval.protocol says (a search index)."""
    state = load_checkpoint(checkpoint_dir)
    model, cfg = model_from_state(state)
    model.to(device)
    cfg.data.video.decode_device = "cpu"
    if every_caption:
        cfg.eval.protocol = "all"
    return model, cfg, Collate(cfg, state["vocab"], train=False)


class _EmbedClips:
    """map_batches UDF (an actor): one row per clip in, its embeddings out (captions as a ragged list)."""

    def __init__(self, checkpoint_dir: str) -> None:
        self.model, _, self.collate = inference_model(checkpoint_dir)

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


class _ScorePairs:
    """map_batches UDF (an actor) for reranking: each clip's condition features, fused with the captions the
    candidate pairs name for it; one output row per pair: its index and the match head's log-odds."""

    def __init__(self, checkpoint_dir: str, captions: list[str], pairs_by_clip: dict) -> None:
        self.model, cfg, self.collate = inference_model(checkpoint_dir)
        tokens = tokenize(self.collate.tokenizer, captions, cfg.model.max_text_length)
        self.ids, self.mask = tokens["input_ids"], tokens["attention_mask"]
        self.pairs_by_clip = pairs_by_clip  # clip id -> (pair indices, caption indices)

    def __call__(self, batch: dict) -> dict:
        model_batch = self.collate(batch)
        pair_index, log_odds = [], []
        with torch.no_grad():
            condition = self.model.condition(self.model.encode(model_batch, self.model.fusion.order))
            for row, clip_id in enumerate(model_batch[IDS]):
                pairs, captions = self.pairs_by_clip.get(clip_id, ([], []))
                if len(pairs) == 0:
                    continue
                captions = torch.as_tensor(captions)
                clip = condition[row : row + 1].expand(len(captions), -1, -1)
                logits = self.model.match_logits(self.ids[captions], self.mask[captions], clip)
                pair_index.append(np.asarray(pairs))
                log_odds.append(logits.float().diff(dim=-1).squeeze(-1).numpy())
        if not pair_index:
            pair_index, log_odds = [np.zeros(0, dtype=np.int64)], [np.zeros(0, dtype=np.float32)]
        pairs = np.concatenate(pair_index).astype(np.int64)
        # The model's contrastive temperature: the scale of the volume term of the combined score.
        temperature = np.full(len(pairs), self.model.loss_fn.temperature.item(), dtype=np.float64)
        return {"pair": pairs, "log_odds": np.concatenate(log_odds).astype(np.float32), "temperature": temperature}


def _rerank(ds, checkpoint_dir: str, clip_ids: list[str], embeddings: dict, text_to_video, batch_size: int) -> dict:
    """The rerank metrics (model.itm_ratio > 0 checkpoints): candidate pairs from the volumes of every modality,
    each scored by the actor that embeds its clip; the captions' token ids travel to the actors (integers)."""
    from gram_ray.retrieval.metrics import volume_scores
    from gram_ray.retrieval.rerank import rerank_metrics, rerank_pairs

    # The config beside the weights: deciding not to rerank must not read a gigabyte-sized state on the driver.
    cfg = checkpoint_config(checkpoint_dir)
    if not cfg.eval.rerank_k or cfg.model.itm_ratio <= 0:
        return {}
    import ray.data

    captions = {r["id"]: [str(c) for c in r["captions"]] for r in ds.select_columns(["id", "captions"]).take_all()}
    texts = [c for clip in clip_ids for c in captions[clip]]
    others = [m for m in cfg.model.modalities if m != "text"]
    volumes = volume_scores(torch.as_tensor(embeddings["text"]), [torch.as_tensor(embeddings[m]) for m in others])
    pairs = rerank_pairs(volumes, cfg.eval.rerank_k)
    by_clip: dict[str, tuple[list, list]] = {}
    for index, (caption, clip) in enumerate(pairs.tolist()):
        entry = by_clip.setdefault(clip_ids[clip], ([], []))
        entry[0].append(index)
        entry[1].append(caption)
    scored = ds.map_batches(
        _ScorePairs,
        fn_constructor_kwargs={
            "checkpoint_dir": checkpoint_dir,
            "captions": texts,
            "pairs_by_clip": by_clip,
        },
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=1),
    ).take_all()
    log_odds = torch.zeros(len(pairs))
    for r in scored:
        log_odds[int(r["pair"])] = float(r["log_odds"])
    name = "-".join(cfg.model.modalities)
    temperature = float(scored[0]["temperature"]) if scored else float(cfg.model.temperature)
    by_kind = rerank_metrics(volumes, text_to_video, cfg.eval.rerank_k, lambda p: log_odds, temperature)
    return {kind: {name: metrics} for kind, metrics in by_kind.items()}


def run_checkpoint(path: str) -> str:
    """A checkpoint folder as given, or, for a training run's folder (<run.storage_path>/<run.name>, holding its
    result.json), the run's best checkpoint: what a job can name before it knows the checkpoint's number."""
    from gram_ray.model.checkpoint import STATE_FILE

    if storage.exists(storage.join(path, STATE_FILE)) or not storage.exists(storage.join(path, "result.json")):
        return path
    best = storage.read_json(storage.join(path, "result.json")).get("checkpoint")
    return best or path


def check_inputs(checkpoint_dir: str | Path, data_dir: str | Path) -> None:
    """FileNotFoundError naming what is missing, or CheckpointError for a checkpoint that is refused (one that
    would run code, or a truncated one), before any Ray work starts."""
    if not is_checkpoint(checkpoint_dir):
        raise FileNotFoundError(f"{checkpoint_dir} is not a gram-ray checkpoint folder (no {STATE_FILE} in it)")
    if not storage.exists(data_dir):
        raise FileNotFoundError(f"{data_dir} not found: give a `gram-ray preprocess --out` folder")
    load_checkpoint(checkpoint_dir)  # read here, once, so a refused file fails before Ray starts its actors


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
    metrics = evaluate_embeddings(embeddings, np.asarray(text_to_video))
    clip_ids = [str(r["id"]) for r in rows]
    absolute = storage.absolute(checkpoint_dir)
    return metrics | _rerank(ds, absolute, clip_ids, embeddings, np.asarray(text_to_video), batch_size)
