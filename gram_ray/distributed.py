"""Rank/world helpers and an all_gather that carries gradient.

Plain torch.distributed, so it works wherever a process group is initialised: Ray Train (which sets one up for
TorchTrainer workers), torchrun, or a test spawning processes. Without a process group everything degrades to
the single-process case.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = [
    "is_distributed",
    "get_rank",
    "get_world_size",
    "gathered_sizes",
    "all_gather_with_grad",
    "all_gather_no_grad",
]


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def gathered_sizes(local_rows: int, device: torch.device) -> list[int]:
    """Rows held by each rank. Ranks may hold different numbers (a short last batch): one tiny collective."""
    if not is_distributed():
        return [local_rows]
    sizes = torch.zeros(get_world_size(), dtype=torch.long, device=device)
    sizes[get_rank()] = local_rows
    dist.all_reduce(sizes)
    return sizes.tolist()


def _all_gather_padded(tensor: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    rows = max(sizes)
    padded = tensor.new_zeros((rows, *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    out = tensor.new_empty((len(sizes) * rows, *tensor.shape[1:]))
    dist.all_gather_into_tensor(out, padded.contiguous())
    return torch.cat([out[r * rows : r * rows + n] for r, n in enumerate(sizes)])


class _AllGatherWithGrad(torch.autograd.Function):
    """Forward: concatenate every rank's rows. Backward: each rank gets the SUM over ranks of the gradient
    flowing into its rows, because every rank's loss used them. That sum is what makes DDP's averaged
    parameter gradients equal the single-process full-batch gradients."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        ctx.sizes = sizes
        return _all_gather_padded(tensor, sizes)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        # all_reduce works on every backend (gloo has no reduce_scatter); it costs W x the bytes of a
        # reduce_scatter, negligible next to the encoders for embedding-sized tensors.
        dist.all_reduce(grad)
        rank = get_rank()
        start = sum(ctx.sizes[:rank])
        return grad[start : start + ctx.sizes[rank]], None


def all_gather_with_grad(tensor: torch.Tensor, sizes: list[int] | None = None) -> torch.Tensor:
    """Rows of every rank, in rank order, differentiable w.r.t. this rank's rows. Identity without a group.
    `sizes` (from gathered_sizes) saves the size exchange when several tensors of one batch are gathered."""
    if not is_distributed():
        return tensor
    return _AllGatherWithGrad.apply(tensor, sizes or gathered_sizes(tensor.shape[0], tensor.device))


def all_gather_no_grad(tensor: torch.Tensor, sizes: list[int] | None = None) -> torch.Tensor:
    """Rows of every rank with this rank's own rows left in place (so they keep their gradient) and the
    other ranks' rows as constants."""
    if not is_distributed():
        return tensor
    sizes = sizes or gathered_sizes(tensor.shape[0], tensor.device)
    with torch.no_grad():
        gathered = _all_gather_padded(tensor.detach(), sizes)
    start = sum(sizes[: get_rank()])
    return torch.cat([gathered[:start], tensor, gathered[start + tensor.shape[0] :]])
