"""Volume contrastive loss (GRAM): bidirectional InfoNCE on -volume / temperature.

For a batch of B samples, row i of the anchor (the caption) is scored against every clip j by the volume its
embedding spans with clip j's other modalities; the matching clip should give the smallest volume. So logits
are -vol / T, and cross-entropy (label smoothing 0.1 by default) is taken both ways: anchor -> clip over the
columns ("t2v") and clip -> anchor over the rows ("v2t"), averaged.

How features are gathered across data-parallel workers is explicit (`gather`), as in OpenCLIP:

- "exact" (default): every rank's features are all-gathered WITH gradient. Rank r scores its local anchors
  against all clips and its local clips against all anchors, with targets offset by its first global row.
  The all_gather backward sums, over ranks, the gradients flowing into rank r's rows, so DDP's averaged
  parameter gradients equal the single-process gradients of the full global batch, to rounding.
- "local": other ranks' features are gathered without gradient while the rank's own rows keep theirs (its
  anchors against its own clips train both sides). Rank r's features get gradient only from its own rows of
  the loss; the terms where they serve as negatives in other ranks' rows are dropped, so gradients differ from
  the full-batch ones (with 2 ranks of 6 samples, by tens of percent). This is NOT GRAM's code: see "seed".
- "seed": GRAM's code (concat_all_gather): every gathered feature is detached, the rank's own rows included. The
  caption -> clip term then trains only the caption side and the clip -> caption term only the clip side, even
  on one GPU. For reproducing GRAM's numbers.
- "none": no communication; each rank contrasts its local batch only.

Without an initialised process group (one process, a notebook) "exact", "local" and "none" are the same
full-batch loss; "seed" is not (its gradients are one-sided).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from gram_ray.distributed import all_gather_no_grad, all_gather_with_grad, gathered_sizes, get_rank
from gram_ray.volume import DEFAULT_EPS, gram_volume, validate_modalities

__all__ = ["VolumeContrastiveLoss", "VolumeLossOutput", "GatherMode", "COMPILED_REFINE"]

COMPILED_REFINE = 2  # pairs per row recomputed in float64 when compiled and refine is not set: the positive + 1

GatherMode = Literal["exact", "local", "seed", "none"]


@dataclass
class VolumeLossOutput:
    """What a training step logs, without recomputing anything. Tensors other than `loss` are detached."""

    loss: torch.Tensor  # scalar, differentiable
    logits_t2v: torch.Tensor  # [local B, global B]: local anchors against every clip
    logits_v2t: torch.Tensor  # [local B, global B]: local clips against every anchor
    positive_volume: torch.Tensor  # [local B]: volume of each local sample's own tuple
    temperature: torch.Tensor  # scalar
    refine_overflow: torch.Tensor | None = None  # refine=m: flagged pairs left unrefined (on device, not synced)
    sizes: list[int] | None = None  # rows per rank of the global batch (the columns of the logits)
    offset: int = 0  # this rank's first global row
    matching_loss: torch.Tensor | None = None  # DAM (detached), when the model trains the match head


class VolumeContrastiveLoss(nn.Module):
    """loss_fn(anchor, *others) -> scalar. anchor [B, D], each other modality [B, D], row j = sample j.

    temperature: initial value (0.07). learnable_temperature: a parameter (stored as its log, so it stays
    positive and updates are scale-free) or a fixed buffer. temperature_bounds: optional (min, max) clamp.
    refine: how gram_volume picks the pairs it recomputes in float64 (None: every flagged pair, one host sync;
    m: each row's m most cancelling pairs, static shapes). compile: run the volumes through torch.compile
    (fullgraph; with refine=None it uses m = COMPILED_REFINE, since a host sync cannot be compiled). The gathers
    stay eager.
    """

    def __init__(
        self,
        temperature: float = 0.07,
        learnable_temperature: bool = True,
        label_smoothing: float = 0.1,
        gather: GatherMode = "exact",
        temperature_bounds: tuple[float, float] | None = None,
        eps: float = DEFAULT_EPS,
        refine: int | None = None,
        compile: bool = False,
    ) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        if gather not in ("exact", "local", "seed", "none"):
            raise ValueError(f"gather must be 'exact', 'local', 'seed' or 'none', got {gather!r}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        if temperature_bounds is not None:
            lo, hi = temperature_bounds
            if not 0 < lo <= temperature <= hi:
                raise ValueError(
                    f"temperature_bounds {temperature_bounds} must satisfy 0 < min <= {temperature} <= max"
                )
        # One element, not a scalar: FSDP shards parameters along their first dimension and refuses 0-d ones.
        log_t = torch.tensor([math.log(temperature)], dtype=torch.float32)
        if learnable_temperature:
            self.log_temperature = nn.Parameter(log_t)
        else:
            self.register_buffer("log_temperature", log_t)
        self.label_smoothing = label_smoothing
        self.gather = gather
        self.temperature_bounds = temperature_bounds
        self.eps = eps
        self.refine = COMPILED_REFINE if compile and refine is None else refine
        self._volume = torch.compile(gram_volume, fullgraph=True) if compile else gram_volume

    @property
    def temperature(self) -> torch.Tensor:
        t = self.log_temperature.exp().reshape(())
        if self.temperature_bounds is not None:
            t = t.clamp(*self.temperature_bounds)
        return t

    def forward(self, anchor: torch.Tensor, *others: torch.Tensor) -> torch.Tensor:
        return self.compute(anchor, *others).loss

    def compute(self, anchor: torch.Tensor, *others: torch.Tensor) -> VolumeLossOutput:
        validate_modalities(anchor, others, aligned=True)
        local_rows = anchor.shape[0]
        if self.gather == "none":
            sizes = [local_rows]
            offset = 0
            all_anchor, all_others = anchor, others
        elif self.gather == "seed":  # every gathered row detached, this rank's own included (GRAM's code)
            sizes = gathered_sizes(local_rows, anchor.device)
            offset = sum(sizes[: get_rank()])
            all_anchor = all_gather_no_grad(anchor.detach(), sizes)
            all_others = tuple(all_gather_no_grad(o.detach(), sizes) for o in others)
        else:
            sizes = gathered_sizes(local_rows, anchor.device)
            offset = sum(sizes[: get_rank()])
            gather = all_gather_with_grad if self.gather == "exact" else all_gather_no_grad
            all_anchor = gather(anchor, sizes)
            all_others = tuple(gather(o, sizes) for o in others)

        temperature = self.temperature
        stats: dict = {}
        logits_t2v = -self._volume(anchor, *all_others, eps=self.eps, refine=self.refine, stats=stats) / temperature
        overflow = stats.get("refine_overflow")
        if len(sizes) == 1 and self.gather != "seed":
            logits_v2t = logits_t2v.T  # one batch: the same matrix read by columns
        else:
            logits_v2t = -self._volume(all_anchor, *others, eps=self.eps, refine=self.refine, stats=stats).T
            logits_v2t = logits_v2t / temperature  # [b, B]
            overflow = overflow + stats["refine_overflow"] if overflow is not None else None

        targets = torch.arange(offset, offset + local_rows, device=anchor.device)
        loss = 0.5 * (
            F.cross_entropy(logits_t2v, targets, label_smoothing=self.label_smoothing)
            + F.cross_entropy(logits_v2t, targets, label_smoothing=self.label_smoothing)
        )
        rows = torch.arange(local_rows, device=anchor.device)
        with torch.no_grad():
            positive_volume = -logits_t2v[rows, targets] * temperature
        return VolumeLossOutput(
            loss=loss,
            logits_t2v=logits_t2v.detach(),
            logits_v2t=logits_v2t.detach(),
            positive_volume=positive_volume.detach(),
            temperature=temperature.detach(),
            refine_overflow=overflow,
            sizes=sizes,
            offset=offset,
        )
