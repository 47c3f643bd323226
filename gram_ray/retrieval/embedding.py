"""Embedding a split with the model being trained: every rank embeds its batches and the embeddings are gathered
exactly, in rank order. Training's evaluation (train/evaluation.py) calls it on its workers; the index and
`gram-ray evaluate` embed through Ray Data actors instead (retrieval/inference.py), with the same model calls."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from gram_ray.config import GramConfig
from gram_ray.data.schema import IDS, MODALITIES, TEXT_TO_VIDEO
from gram_ray.distributed import all_gather_no_grad, gather_objects, get_rank, is_distributed
from gram_ray.model.device import autocast, to_device
from gram_ray.model.gram import GramModel

__all__ = ["embed_batches"]


@torch.no_grad()
def embed_batches(
    model: GramModel,
    batches: Iterable[dict],
    device: torch.device,
    cfg: GramConfig,
    fusion_inputs: list | None = None,
):
    """Embeddings of every modality for this rank's batches, then gathered from every rank (exact, no grad).
    Returns ({modality: np.ndarray}, text_to_video, video ids). With a list as fusion_inputs, also keeps this
    rank's (condition features, caption ids, caption mask) of each batch there, for reranking."""
    model.eval()
    parts: dict[str, list] = {}
    text_to_video, ids, offset = [], [], 0
    for batch in batches:
        batch = to_device(batch, device)
        with autocast(device, cfg):
            emb, condition = model.embed_for_eval(batch, with_condition=fusion_inputs is not None)
            if fusion_inputs is not None:
                text_ids, text_mask = (batch[key] for key in MODALITIES["text"].batch_keys)
                fusion_inputs.append((condition, text_ids, text_mask))
        for m, e in emb.items():
            parts.setdefault(m, []).append(e.float())
        text_to_video.append(batch[TEXT_TO_VIDEO].cpu() + offset)
        offset += len(batch[IDS])
        ids.extend(batch[IDS])
    dim = cfg.model.embed_dim
    local = {m: torch.cat(parts[m]) if m in parts else torch.zeros(0, dim, device=device) for m in model.modalities}
    t2v = torch.cat(text_to_video) if text_to_video else torch.zeros(0, dtype=torch.long)
    if is_distributed():
        # Shift this rank's caption -> video indices past the videos of lower ranks, then gather everything.
        counts = gather_objects(len(ids))
        t2v = t2v + sum(counts[: get_rank()])
        local = {m: all_gather_no_grad(e.contiguous()) for m, e in local.items()}
        t2v = all_gather_no_grad(t2v.to(device)).cpu()
        ids = [i for part in gather_objects(ids) for i in part]
    model.train()
    return {m: e.cpu().numpy() for m, e in local.items()}, t2v.numpy(), ids
