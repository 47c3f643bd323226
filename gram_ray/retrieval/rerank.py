"""Reranking by the match head (GRAM's refine_score_matrix): the top k candidates by volume, rescored by the match
head's probability that caption and clip match, in both directions.

Text to video: each caption's k lowest-volume clips get the match probability as their score and every other clip
scores below them (-1), so the top k are reordered by the match head and the rest keep their place after them.
Video to text: the same for each clip's k lowest-volume captions. A caption-clip pair that both directions
chose is scored once. Cost: at most 2 x k x captions fusion forwards, in batches; pure torch (the caller gives
the scoring function and, when distributed, decides which rank scores which pairs).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from gram_ray.retrieval.metrics import retrieval_metrics

__all__ = ["rerank_pairs", "rerank_scores", "rerank_metrics"]

BELOW = -1.0  # the score of candidates outside the top k: below any probability


def rerank_pairs(volumes: torch.Tensor, k: int) -> torch.Tensor:
    """[P, 2] unique (caption, clip) pairs: each caption's k lowest-volume clips and each clip's k lowest-volume
    captions. volumes [captions, clips], lower is better."""
    t2v = volumes.topk(min(k, volumes.shape[1]), dim=1, largest=False).indices  # [T, k] clips
    v2t = volumes.topk(min(k, volumes.shape[0]), dim=0, largest=False).indices  # [k, V] captions
    rows = torch.arange(volumes.shape[0]).unsqueeze(1).expand_as(t2v)
    cols = torch.arange(volumes.shape[1]).unsqueeze(0).expand_as(v2t)
    pairs = torch.cat([torch.stack([rows, t2v], -1).view(-1, 2), torch.stack([v2t, cols], -1).view(-1, 2)])
    return torch.unique(pairs, dim=0)


def rerank_scores(
    volumes: torch.Tensor, k: int, pairs: torch.Tensor, probs: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(t2v scores, v2t scores) [captions, clips], higher is better: the match probability of each direction's
    top k candidates, BELOW elsewhere. pairs/probs: rerank_pairs' pairs and their match probabilities."""
    prob = torch.full(volumes.shape, float("nan"))
    prob[pairs[:, 0], pairs[:, 1]] = probs.float().cpu()
    t2v = torch.full(volumes.shape, BELOW)
    top = volumes.topk(min(k, volumes.shape[1]), dim=1, largest=False).indices
    t2v.scatter_(1, top, prob.gather(1, top))
    v2t = torch.full(volumes.shape, BELOW)
    top = volumes.topk(min(k, volumes.shape[0]), dim=0, largest=False).indices
    v2t.scatter_(0, top, prob.gather(0, top))
    return t2v, v2t


def rerank_metrics(
    volumes: torch.Tensor,
    text_to_video: np.ndarray,
    k: int,
    match_probs: Callable[[torch.Tensor], torch.Tensor],
) -> dict:
    """{"t2v": ..., "v2t": ...} after reranking the top k by volume. match_probs(pairs [P, 2]) -> [P] the match
    head's probabilities of (caption, clip) pairs."""
    volumes = volumes.float().cpu()
    pairs = rerank_pairs(volumes, k)
    t2v, v2t = rerank_scores(volumes, k, pairs, match_probs(pairs))
    return {
        "t2v": retrieval_metrics(t2v, text_to_video, higher_is_better=True)["t2v"],
        "v2t": retrieval_metrics(v2t, text_to_video, higher_is_better=True)["v2t"],
    }
