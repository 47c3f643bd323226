"""Reranking the top k by volume with the match head, in both directions, with one of two scores.

Text to video: each caption's k lowest-volume clips are rescored and every other clip scores below them, so the
top k are reordered and the rest keep their place after them. Video to text: the same for each clip's k
lowest-volume captions. A caption-clip pair that both directions chose is scored once. Cost: at most
2 x k x captions fusion forwards, in batches; pure torch (the caller gives the scoring function and, when
distributed, decides which rank scores which pairs).

The scores (`eval.rerank_score`; evaluation reports both, as the kinds RERANK_KINDS name):
- "match": GRAM's (refine_score_matrix): the match head's probability alone. The first stage only picks the
  candidates; an unsure head reorders them at random.
- "match_plus_volume": BLIP's form, the match score plus the contrastive score, here both as the logits the
  model was trained to produce with cross-entropy, so neither needs a hand-set weight:
      log-odds of the match head, log p / (1 - p) = l_match - l_no_match   (its cross-entropy's logit)
    + -volume / temperature                                                 (the InfoNCE loss's logit)
  The temperature is the model's own (learned with the loss), so the volume term has the scale on which the
  contrastive loss was fitted: a volume gap of one temperature is worth one unit of the head's log-odds. Where
  the head is unsure its log-odds are near 0 and flat, and the first stage's order stands; where it is sure, it
  moves a candidate by as much as it is sure. (BLIP adds its head's raw logit to an unscaled cosine.)
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from gram_ray.retrieval.metrics import retrieval_metrics

__all__ = ["RERANK_SCORES", "RERANK_KINDS", "rerank_pairs", "pair_scores", "rerank_scores", "rerank_metrics"]

RERANK_SCORES = ("match", "match_plus_volume")
# The metrics JSON kind each score is reported under ("rerank" is GRAM's, as before).
RERANK_KINDS = {"match": "rerank", "match_plus_volume": "rerank_plus_volume"}
BELOW = float("-inf")  # the score of candidates outside the top k: below any candidate's


def rerank_pairs(volumes: torch.Tensor, k: int) -> torch.Tensor:
    """[P, 2] unique (caption, clip) pairs: each caption's k lowest-volume clips and each clip's k lowest-volume
    captions. volumes [captions, clips], lower is better."""
    t2v = volumes.topk(min(k, volumes.shape[1]), dim=1, largest=False).indices  # [T, k] clips
    v2t = volumes.topk(min(k, volumes.shape[0]), dim=0, largest=False).indices  # [k, V] captions
    rows = torch.arange(volumes.shape[0]).unsqueeze(1).expand_as(t2v)
    cols = torch.arange(volumes.shape[1]).unsqueeze(0).expand_as(v2t)
    pairs = torch.cat([torch.stack([rows, t2v], -1).view(-1, 2), torch.stack([v2t, cols], -1).view(-1, 2)])
    return torch.unique(pairs, dim=0)


def pair_scores(volumes: torch.Tensor, log_odds: torch.Tensor, score: str, temperature: float) -> torch.Tensor:
    """The reranked score of candidate pairs (higher is better) from their volumes and the match head's log-odds."""
    if score == "match":
        return torch.sigmoid(log_odds.float())
    if score == "match_plus_volume":
        return log_odds.float() - volumes.float() / temperature
    raise ValueError(f"eval.rerank_score must be one of {', '.join(RERANK_SCORES)}, got {score!r}")


def rerank_scores(
    volumes: torch.Tensor, k: int, pairs: torch.Tensor, log_odds: torch.Tensor, score: str, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(t2v scores, v2t scores) [captions, clips], higher is better: each direction's top k candidates get their
    reranked score, the rest BELOW. pairs/log_odds: rerank_pairs' pairs and the match head's log-odds of each."""
    scored = torch.full(volumes.shape, float("nan"))
    picked = volumes[pairs[:, 0], pairs[:, 1]]
    scored[pairs[:, 0], pairs[:, 1]] = pair_scores(picked, log_odds.cpu(), score, temperature)
    t2v = torch.full(volumes.shape, BELOW)
    top = volumes.topk(min(k, volumes.shape[1]), dim=1, largest=False).indices
    t2v.scatter_(1, top, scored.gather(1, top))
    v2t = torch.full(volumes.shape, BELOW)
    top = volumes.topk(min(k, volumes.shape[0]), dim=0, largest=False).indices
    v2t.scatter_(0, top, scored.gather(0, top))
    return t2v, v2t


def rerank_metrics(
    volumes: torch.Tensor,
    text_to_video: np.ndarray,
    k: int,
    match_log_odds: Callable[[torch.Tensor], torch.Tensor],
    temperature: float,
) -> dict:
    """{kind: {"t2v": ..., "v2t": ...}} for each score in RERANK_SCORES, after reranking the top k by volume (the
    head runs once; the scores share its output). match_log_odds(pairs [P, 2]) -> [P]: the match head's log-odds
    of (caption, clip) pairs. temperature: the model's contrastive temperature."""
    volumes = volumes.float().cpu()
    pairs = rerank_pairs(volumes, k)
    log_odds = match_log_odds(pairs)
    out = {}
    for score in RERANK_SCORES:
        t2v, v2t = rerank_scores(volumes, k, pairs, log_odds, score, temperature)
        out[RERANK_KINDS[score]] = {
            "t2v": retrieval_metrics(t2v, text_to_video, higher_is_better=True)["t2v"],
            "v2t": retrieval_metrics(v2t, text_to_video, higher_is_better=True)["v2t"],
        }
    return out
