"""Training's evaluation of the val split, on the workers: every rank embeds its share, the embeddings are
gathered exactly (retrieval/embedding.py), and every rank computes the same metrics; with a match head, the top
candidates are rescored by it, each pair by the rank holding its clip."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from gram_ray.config import GramConfig
from gram_ray.distributed import all_gather_no_grad, gather_objects, get_rank, is_distributed, max_over_ranks
from gram_ray.model.device import autocast
from gram_ray.model.gram import GramModel
from gram_ray.retrieval.embedding import embed_batches
from gram_ray.retrieval.metrics import evaluate_embeddings
from gram_ray.train.sharding import whole_weights

__all__ = ["evaluate_split", "flatten_metrics", "rerank_evaluation"]


def evaluate_split(model: GramModel, batches: Iterable[dict], device: torch.device, cfg: GramConfig) -> dict:
    """The metrics JSON of a split (every rank takes part): volume and cosine retrieval, and reranking by the
    match head when the model has one and eval.rerank_k is set."""
    fusion_inputs = [] if cfg.eval.rerank_k and model.fusion is not None else None
    with whole_weights(model):  # FSDP: gathered once, so ranks may embed different numbers of batches
        emb, text_to_video, _ = embed_batches(model, batches, device, cfg, fusion_inputs)
        evaluation = evaluate_embeddings(emb, text_to_video)
        if fusion_inputs is not None:
            evaluation |= rerank_evaluation(model, fusion_inputs, emb, text_to_video, device, cfg)
            model.train()
    return evaluation


@torch.no_grad()
def rerank_evaluation(
    model: GramModel, fusion_inputs: list, emb: dict, text_to_video, device: torch.device, cfg: GramConfig
) -> dict:
    """Reranking of the val split: {kind: {"<modalities>": {"t2v": ..., "v2t": ...}}} for the volume of every
    modality, its top cfg.eval.rerank_k rescored by the match head, one kind per score (retrieval/rerank.py).
    Every rank finds the same candidate pairs from the gathered embeddings and scores the pairs whose clip it
    holds (its condition features stay where they were computed; the captions' token ids are gathered), then the
    head's log-odds are summed across ranks."""
    from gram_ray.retrieval.metrics import volume_scores
    from gram_ray.retrieval.rerank import rerank_metrics

    model.eval()
    others = [m for m in model.modalities if m != "text"]
    volumes = volume_scores(torch.as_tensor(emb["text"]), [torch.as_tensor(emb[m]) for m in others])
    condition = torch.cat([c for c, _, _ in fusion_inputs]) if fusion_inputs else None
    length = max_over_ranks(max((ids.shape[1] for _, ids, _ in fusion_inputs), default=1), device)
    local_ids = [F.pad(ids, (0, length - ids.shape[1])) for _, ids, _ in fusion_inputs]
    local_mask = [F.pad(mask, (0, length - mask.shape[1])) for _, _, mask in fusion_inputs]
    empty = torch.zeros(0, length, dtype=torch.long, device=device)
    all_ids = all_gather_no_grad(torch.cat(local_ids) if local_ids else empty)
    all_mask = all_gather_no_grad(torch.cat(local_mask) if local_mask else empty)
    clips = condition.shape[0] if condition is not None else 0
    first_clip = sum(gather_objects(clips)[: get_rank()])

    def match_log_odds(pairs: torch.Tensor) -> torch.Tensor:
        log_odds = torch.zeros(pairs.shape[0], device=device)
        mine = torch.nonzero((pairs[:, 1] >= first_clip) & (pairs[:, 1] < first_clip + clips)).flatten()
        # split() of an empty tensor gives one empty chunk: a rank that holds no val clip (fewer val batches than
        # ranks) has no condition features to index, and scores nothing.
        for chunk in mine.split(cfg.train.eval_batch_size) if mine.numel() else ():
            caption, clip = pairs[chunk, 0].to(device), pairs[chunk, 1].to(device) - first_clip
            with autocast(device, cfg):
                logits = model.match_logits(all_ids[caption], all_mask[caption], condition[clip])
            log_odds[chunk.to(device)] = logits.float().diff(dim=-1).squeeze(-1)  # log p / (1 - p)
        if is_distributed():
            dist.all_reduce(log_odds)  # each pair was scored by the one rank holding its clip
        return log_odds.cpu()

    name = "-".join(model.modalities)
    temperature = model.loss_fn.temperature.item()
    by_kind = rerank_metrics(volumes, text_to_video, cfg.eval.rerank_k, match_log_odds, temperature)
    return {kind: {name: metrics} for kind, metrics in by_kind.items()}


def flatten_metrics(metrics: dict, prefix: str) -> dict[str, float]:
    """Metrics JSON -> flat keys: <prefix>/<modalities>/<direction>/<metric> for volume, <prefix>/<kind>/... else."""
    flat = {}
    for kind, by_name in metrics.items():
        for name, directions in by_name.items():
            base = f"{prefix}/{name}" if kind == "volume" else f"{prefix}/{kind}/{name}"
            for direction, values in directions.items():
                for k, v in values.items():
                    flat[f"{base}/{direction}/{k}"] = v
    return flat
