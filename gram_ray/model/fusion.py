"""GRAM's fusion inputs and match head.

The "condition features" a caption cross-attends to are the clip's token states: every frame's vision tokens
and every window's audio tokens (and the subtitle's, when it is a modality), each through Linear + LayerNorm to
the text encoder's width, plus a learned embedding per frame (per window) and one per modality (GRAM's
get_multimodal_forward_input_*). Clips with more frames or windows than the embeddings were trained with take
the nearest one, as GRAM does at test time. The match head (GRAM's Match_head) maps the fused caption (pooled as
the text encoder pools: GRAM's CLS) to [not a match, a match]: Linear, GELU, LayerNorm, Linear.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MatchHead", "Fusion"]


class MatchHead(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear1 = nn.Linear(width, width)
        self.layernorm = nn.LayerNorm(width, eps=1e-12)
        self.linear2 = nn.Linear(width, 2)

    def forward(self, cls: torch.Tensor) -> torch.Tensor:
        return self.linear2(self.layernorm(F.gelu(self.linear1(cls))))


def _projection(width: int, text_width: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(width, text_width), nn.LayerNorm(text_width, eps=1e-12))


class Fusion(nn.Module):
    """condition(encoded) -> [B, M, text width]; match_head(pooled fused caption) -> [B, 2]."""

    def __init__(self, text_width: int, widths: dict[str, int], parts: dict[str, int]) -> None:
        """widths: token width of each conditioning modality (video, audio, subtitle); parts: frames (video) or
        windows (audio) the per-part embeddings are made for."""
        super().__init__()
        self.order = [m for m in ("video", "audio", "subtitle") if m in widths]
        self.hidden_trans = nn.ModuleDict({m: _projection(widths[m], text_width) for m in self.order})
        self.part_embedding = nn.ParameterDict(
            {m: nn.Parameter(0.02 * torch.randn(1, parts[m], text_width)) for m in self.order if m in parts}
        )
        self.type_embedding = nn.ParameterDict(
            {m: nn.Parameter(0.02 * torch.randn(1, 1, text_width)) for m in self.order}
        )
        self.match_head = MatchHead(text_width)

    def _part_embedding(self, modality: str, parts: int) -> torch.Tensor:
        embedding = self.part_embedding[modality]
        if embedding.shape[1] != parts:  # nearest of the trained ones (GRAM: F.interpolate, nearest)
            embedding = F.interpolate(embedding.transpose(1, 2).float(), parts, mode="nearest").transpose(1, 2)
            embedding = embedding.to(self.part_embedding[modality].dtype)
        return embedding

    def condition(self, tokens: dict[str, torch.Tensor], parts: dict[str, int]) -> torch.Tensor:
        """tokens: each modality's token states [B, parts x L, width] (parts in order); -> [B, M, text width]."""
        out = []
        for m in self.order:
            x = self.hidden_trans[m](tokens[m])
            if m in self.part_embedding:
                b, n = x.shape[0], parts[m]
                x = (x.view(b, n, -1, x.shape[-1]) + self._part_embedding(m, n).unsqueeze(2)).flatten(1, 2)
            out.append(x + self.type_embedding[m])
        return torch.cat(out, dim=1)
