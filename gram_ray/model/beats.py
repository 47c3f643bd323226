"""BEATs (Chen et al., "BEATs: Audio Pre-Training with Acoustic Tokenizers", 2023), GRAM's audio encoder.

A filterbank [B, T, F] (time first: GRAM's 64-mel windows are [B, 1024, 64]) becomes tokens [B, N, D]:

  1. 16 x 16 patches by a Conv2d over the filterbank, flattened time-major (token = t * F/16 + f), so a
     1024 x 64 window gives 256 tokens;
  2. LayerNorm over the patch features, then a Linear to the encoder width (when the widths differ);
  3. a convolutional positional embedding (a grouped Conv1d with weight normalisation over the kernel axis,
     kernel 128, padding 64; the extra output frame dropped; exact GELU) added to the tokens, then the
     encoder's LayerNorm (post-LN models) -- all before the first layer;
  4. transformer layers whose attention adds a T5-style relative position bias (buckets over |i - j|, shared by
     every layer), gated per head and per query by the query itself (gru_rel_pos); each layer is post-LN with
     deep-norm scaling x = LN(alpha x + f(x)), alpha = (2 * layers)^(1/4), as the checkpoint's cfg says.

The parameter names and shapes are those of the released checkpoints (`BEATs_iter3_plus_AS2M.pt` is
`{"cfg": {...}, "model": state_dict}`), so they load strictly; every size comes from the cfg. Written from the
paper and the checkpoint layout, and checked number for number against GRAM's own BEATs
(../shared/data/gram-reference/beats_tiny.pt). Not reproduced: layer drop (`encoder_layerdrop`), which would
leave parameters without gradient in a DDP step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint as checkpoint_layer

from gram_ray.model.safe_load import load_weights

__all__ = ["BEATsConfig", "BEATs", "relative_position_buckets", "load_beats_checkpoint"]


@dataclass(frozen=True)
class BEATsConfig:
    """The fields of a BEATs checkpoint's `cfg` that shape or change the computation (defaults: iter3+ AS2M)."""

    encoder_layers: int = 12
    encoder_embed_dim: int = 768
    encoder_ffn_embed_dim: int = 3072
    encoder_attention_heads: int = 12
    activation_fn: str = "gelu"
    layer_norm_first: bool = False
    deep_norm: bool = True
    conv_bias: bool = False
    conv_pos: int = 128
    conv_pos_groups: int = 16
    relative_position_embedding: bool = True
    num_buckets: int = 320
    max_distance: int = 800
    gru_rel_pos: bool = True
    input_patch_size: int = 16
    embed_dim: int = 512  # the patch embedding's width
    layer_wise_gradient_decay_ratio: float = 1.0  # each layer's input gradient scaled by this (iter3+: 0.6)
    dropout: float = 0.0
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    dropout_input: float = 0.0
    finetuned_model: bool = False  # a checkpoint with an AudioSet classifier (predictor.*), which is not used

    @classmethod
    def from_dict(cls, cfg: dict) -> BEATsConfig:
        known = {f.name for f in fields(cls)}
        config = cls(**{k: v for k, v in cfg.items() if k in known})
        if config.activation_fn not in _ACTIVATIONS:
            raise ValueError(f"BEATs activation_fn={config.activation_fn!r} is not supported: {sorted(_ACTIVATIONS)}")
        if config.deep_norm and config.layer_norm_first:
            raise ValueError("a BEATs cfg cannot have both deep_norm and layer_norm_first")
        if config.encoder_embed_dim % config.encoder_attention_heads:
            raise ValueError(
                f"encoder_embed_dim {config.encoder_embed_dim} is not divisible by "
                f"encoder_attention_heads {config.encoder_attention_heads}"
            )
        return config


_ACTIVATIONS = {
    "gelu": lambda x: F.gelu(x.float()).type_as(x),
    "gelu_accurate": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


def relative_position_buckets(length: int, num_buckets: int, max_distance: int, device=None) -> torch.Tensor:
    """[length, length] bucket of key j relative to query i (T5, bidirectional): half the buckets for keys after
    the query; within each half, distances below a quarter of the buckets get one bucket each, longer ones
    share logarithmically wider buckets up to max_distance."""
    position = torch.arange(length, dtype=torch.long, device=device)
    relative = position[None, :] - position[:, None]
    half = num_buckets // 2
    buckets = (relative > 0).long() * half
    distance = relative.abs()
    exact = half // 2
    # log(0) at distance 0 gives -inf; those entries take the exact branch below.
    far = exact + (torch.log(distance.float() / exact) / math.log(max_distance / exact) * (half - exact)).to(torch.long)
    far = far.clamp(max=half - 1)
    return buckets + torch.where(distance < exact, distance, far)


class _ScaleGradient(torch.autograd.Function):
    """Identity forward; the gradient times `scale` backward (BEATs' layer-wise gradient decay)."""

    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


class _WeightNormConv1d(nn.Module):
    """Conv1d whose weight is g * v / ||v||, the norm over every axis but the kernel's (weight_norm, dim=2):
    the checkpoint stores weight_g [1, 1, K] and weight_v [C_out, C_in / groups, K]."""

    def __init__(self, channels: int, kernel: int, groups: int) -> None:
        super().__init__()
        self.weight_g = nn.Parameter(torch.ones(1, 1, kernel))
        self.weight_v = nn.Parameter(torch.empty(channels, channels // groups, kernel))
        self.bias = nn.Parameter(torch.zeros(channels))
        nn.init.normal_(self.weight_v, std=math.sqrt(4 / (kernel * channels)))
        self.padding, self.groups = kernel // 2, groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight_v * (self.weight_g / self.weight_v.norm(dim=(0, 1), keepdim=True))
        return F.conv1d(x, weight, self.bias, padding=self.padding, groups=self.groups)


class BEATsAttention(nn.Module):
    """Multi-head self-attention plus the gated relative position bias."""

    def __init__(self, c: BEATsConfig, relative_bias: nn.Embedding | None) -> None:
        super().__init__()
        dim, self.heads = c.encoder_embed_dim, c.encoder_attention_heads
        self.head_dim = dim // self.heads
        self.q_proj, self.k_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.v_proj, self.out_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.dropout = c.attention_dropout
        if relative_bias is not None:  # one module for every layer: its weight appears under each layer's name
            self.relative_attention_bias = relative_bias
        self.gru_rel_pos = c.gru_rel_pos
        if c.gru_rel_pos:
            self.grep_linear = nn.Linear(self.head_dim, 8)
            self.grep_a = nn.Parameter(torch.ones(1, self.heads, 1, 1))

    def forward(self, x: torch.Tensor, position_bias: torch.Tensor | None) -> torch.Tensor:
        b, n, dim = x.shape
        q, k, v = (proj(x).view(b, n, self.heads, self.head_dim).transpose(1, 2) for proj in
                   (self.q_proj, self.k_proj, self.v_proj))  # fmt: skip
        bias = None
        if position_bias is not None:  # [heads, n, n], the same for every layer
            bias = position_bias[None]
            if self.gru_rel_pos:
                # Each query scales its head's bias by a gate computed from the (unscaled) query itself.
                gates = torch.sigmoid(self.grep_linear(q).view(b, self.heads, n, 2, 4).sum(-1))
                gate_a, gate_b = gates.chunk(2, dim=-1)
                bias = (gate_a * (gate_b * self.grep_a - 1.0) + 2.0) * bias
            bias = bias.to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, dim))


class BEATsLayer(nn.Module):
    def __init__(self, c: BEATsConfig, relative_bias: nn.Embedding | None) -> None:
        super().__init__()
        dim = c.encoder_embed_dim
        self.self_attn = BEATsAttention(c, relative_bias)
        self.self_attn_layer_norm = nn.LayerNorm(dim)
        self.fc1, self.fc2 = nn.Linear(dim, c.encoder_ffn_embed_dim), nn.Linear(c.encoder_ffn_embed_dim, dim)
        self.final_layer_norm = nn.LayerNorm(dim)
        self.activation = _ACTIVATIONS[c.activation_fn]
        self.dropout, self.activation_dropout = nn.Dropout(c.dropout), nn.Dropout(c.activation_dropout)
        self.pre_norm = c.layer_norm_first
        self.alpha = (2 * c.encoder_layers) ** 0.25 if c.deep_norm else 1.0

    def _ffn(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.fc2(self.activation_dropout(self.activation(self.fc1(x)))))

    def forward(self, x: torch.Tensor, position_bias: torch.Tensor | None) -> torch.Tensor:
        if self.pre_norm:
            x = x + self.dropout(self.self_attn(self.self_attn_layer_norm(x), position_bias))
            return x + self._ffn(self.final_layer_norm(x))
        x = self.self_attn_layer_norm(self.alpha * x + self.dropout(self.self_attn(x, position_bias)))
        return self.final_layer_norm(self.alpha * x + self._ffn(x))


class BEATsEncoder(nn.Module):
    def __init__(self, c: BEATsConfig) -> None:
        super().__init__()
        self.config = c
        # A list of one, so that the parameters are named pos_conv.0.* as in the checkpoints.
        self.pos_conv = nn.ModuleList([_WeightNormConv1d(c.encoder_embed_dim, c.conv_pos, c.conv_pos_groups)])
        shared = nn.Embedding(c.num_buckets, c.encoder_attention_heads) if c.relative_position_embedding else None
        self.layers = nn.ModuleList([BEATsLayer(c, shared) for _ in range(c.encoder_layers)])
        self.layer_norm = nn.LayerNorm(c.encoder_embed_dim)
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.config
        positional = self.pos_conv[0](x.transpose(1, 2))
        if c.conv_pos % 2 == 0:  # an even kernel with padding k/2 gives one frame too many: drop the last
            positional = positional[..., :-1]
        x = x + F.gelu(positional).transpose(1, 2)
        if not c.layer_norm_first:
            x = self.layer_norm(x)
        x = F.dropout(x, c.dropout, self.training)
        bias = None
        if c.relative_position_embedding:
            buckets = relative_position_buckets(x.shape[1], c.num_buckets, c.max_distance, x.device)
            bias = self.layers[0].self_attn.relative_attention_bias(buckets).permute(2, 0, 1)  # [heads, n, n]
        for layer in self.layers:
            if c.layer_wise_gradient_decay_ratio != 1.0:
                x = _ScaleGradient.apply(x, c.layer_wise_gradient_decay_ratio)
            if self.gradient_checkpointing and self.training:
                x = checkpoint_layer(layer, x, bias, use_reentrant=False)
            else:
                x = layer(x, bias)
        return self.layer_norm(x) if c.layer_norm_first else x


class BEATs(nn.Module):
    """fbank [B, T, F] (T and F multiples of the patch size) -> tokens [B, T/16 * F/16, encoder width]."""

    def __init__(self, config: BEATsConfig) -> None:
        super().__init__()
        c = self.config = config
        p = c.input_patch_size
        self.patch_embedding = nn.Conv2d(1, c.embed_dim, kernel_size=p, stride=p, bias=c.conv_bias)
        self.layer_norm = nn.LayerNorm(c.embed_dim)
        self.post_extract_proj = (
            nn.Linear(c.embed_dim, c.encoder_embed_dim) if c.embed_dim != c.encoder_embed_dim else None
        )
        self.encoder = BEATsEncoder(c)

    @property
    def width(self) -> int:
        return self.config.encoder_embed_dim

    def patch_tokens(self, fbank: torch.Tensor) -> torch.Tensor:
        """The tokens entering the encoder: patches, LayerNorm, projection to the encoder width."""
        p = self.config.input_patch_size
        if fbank.ndim != 3 or fbank.shape[1] % p or fbank.shape[2] % p:
            raise ValueError(
                f"BEATs takes a filterbank [batch, frames, mel_bins] with frames and mel_bins multiples of {p}; "
                f"got {tuple(fbank.shape)}"
            )
        patches = self.patch_embedding(fbank.unsqueeze(1))  # [B, E, T/p, F/p]
        tokens = self.layer_norm(patches.flatten(2).transpose(1, 2))  # time-major: t * (F/p) + f
        tokens = F.dropout(tokens, self.config.dropout_input, self.training)
        return self.post_extract_proj(tokens) if self.post_extract_proj is not None else tokens

    def forward(self, fbank: torch.Tensor) -> torch.Tensor:
        return self.encoder(self.patch_tokens(fbank))


def load_beats_checkpoint(checkpoint: str | Path | dict) -> BEATs:
    """A BEATs from a checkpoint in the released layout {"cfg": ..., "model": state_dict} (a path, read with
    weights_only=True, or the dict itself), loaded strictly; in eval mode."""
    if not isinstance(checkpoint, dict):
        checkpoint = load_weights(checkpoint)
    if not {"cfg", "model"} <= set(checkpoint):
        raise ValueError(
            f"not a BEATs checkpoint: expected the keys 'cfg' and 'model' (BEATs_iter3_plus_AS2M.pt's layout), "
            f"got {sorted(checkpoint)[:10]}"
        )
    config = BEATsConfig.from_dict(dict(checkpoint["cfg"]))
    model = BEATs(config)
    # The AudioSet classifier of fine-tuned checkpoints is not part of the encoder.
    state = {k: v for k, v in checkpoint["model"].items() if not k.startswith("predictor")}
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"the BEATs checkpoint does not fit its own cfg: missing {result.missing_keys[:10]}, unexpected "
            f"{result.unexpected_keys[:10]}"
        )
    return model.eval()
