"""GRAM's data-anchor matching loss (DAM), with negatives drawn by the volume: Ray-free math.

For each local caption, one negative clip is drawn from softmax(-volume / T) + 1e-4 over the clips of every
rank (its own clip excluded); for each local clip, one negative caption the same way from the transposed
scores. The fusion encoder then reads [caption + its clip, caption + negative clip, negative caption + clip],
and the match head is trained to say 1, 0, 0 (cross-entropy over the 3B rows).

The draw uses inverse-CDF sampling with one uniform per global row, drawn on rank 0 and broadcast: a row's
negative depends on its scores and its uniform only, not on how the global batch is split over ranks, so two
ranks draw exactly what one process would for the same batch.

The negative exchange. GRAM all-gathers every rank's token-level condition features with gradient (W x B clips of
M tokens each on every rank, and the same again in the backward all-reduce) just to pick B of them. Here each
rank gathers only the B indices it drew (integers), and the rows travel once, to the rank that asked, in one
all_to_all with gradient (exchange_rows): per rank B x M x D in and out, forward and backward, instead of
W x B x M x D; the token ids of negative captions (no gradient, integers) are all-gathered.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gram_ray.distributed import all_gather_no_grad, broadcast_from_rank0, exchange_rows, max_over_ranks

__all__ = ["NEGATIVE_FLOOR", "sampling_weights", "sample_negatives", "draw_uniforms", "matching_loss"]

NEGATIVE_FLOOR = 1e-4  # added to every softmax weight (GRAM's), so every other clip can be drawn


def sampling_weights(logits: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """Unnormalised draw weights [rows, columns]: softmax(logits) + 1e-4, each row's positive column zeroed.
    logits are -volume / T (higher: a harder negative)."""
    weights = F.softmax(logits.float(), dim=1) + NEGATIVE_FLOOR
    weights[torch.arange(weights.shape[0], device=weights.device), positives] = 0.0
    return weights


def sample_negatives(logits: torch.Tensor, positives: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """One column per row, drawn with probability proportional to sampling_weights, by inverse CDF with the
    row's uniform in [0, 1). Never the positive."""
    with torch.no_grad():
        cdf = sampling_weights(logits, positives).cumsum(1)
        target = uniforms.to(cdf.device, cdf.dtype).unsqueeze(1) * cdf[:, -1:]
        drawn = torch.searchsorted(cdf, target, right=True).squeeze(1)
        return drawn.clamp_(max=logits.shape[1] - 1)  # u * total can round up to the last edge


def draw_uniforms(total: int, device: torch.device) -> torch.Tensor:
    """`total` uniforms, the same on every rank: drawn from rank 0's generator and broadcast."""
    uniforms = torch.rand(total).to(device)
    return broadcast_from_rank0(uniforms)


def matching_loss(
    match,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    condition: torch.Tensor,
    logits_t2v: torch.Tensor,
    logits_v2t: torch.Tensor,
    sizes: list[int],
    offset: int,
) -> torch.Tensor:
    """DAM for this rank's B rows. match(ids, mask, condition) -> [N, 2] match-head logits of captions fused with
    clips.
    condition [B, M, D]: the clips' fusion inputs (differentiable); logits_*: [B, sum(sizes)] -volume / T of the
    volume loss (detached); sizes: rows per rank; offset: this rank's first global row."""
    rows = input_ids.shape[0]
    positives = torch.arange(offset, offset + rows, device=logits_t2v.device)
    uniforms = draw_uniforms(2 * sum(sizes), logits_t2v.device)  # [clip draws | caption draws], global rows
    total = sum(sizes)
    negative_clips = sample_negatives(logits_t2v, positives, uniforms[offset : offset + rows])
    negative_texts = sample_negatives(logits_v2t, positives, uniforms[total + offset : total + offset + rows])

    condition_neg = exchange_rows(condition, negative_clips, sizes)
    # Caption tokens of every rank, padded to the longest (no gradient: integers), to pick the negative captions.
    pad = max_over_ranks(input_ids.shape[1], input_ids.device) - input_ids.shape[1]
    ids = F.pad(input_ids, (0, pad))
    mask = F.pad(attention_mask, (0, pad))
    ids_neg = all_gather_no_grad(ids, sizes)[negative_texts]
    mask_neg = all_gather_no_grad(mask, sizes)[negative_texts]

    logits = match(
        torch.cat([ids, ids, ids_neg]),
        torch.cat([mask, mask, mask_neg]),
        torch.cat([condition, condition_neg, condition]),
    ).float()
    labels = torch.zeros(3 * rows, dtype=torch.long, device=logits.device)
    labels[:rows] = 1
    return F.cross_entropy(logits, labels)
