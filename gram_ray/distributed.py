"""Rank/world helpers, an all_gather that carries gradient, and a row exchange that sends each rank only the rows
it asked for (with gradient).

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
    "broadcast_from_rank0",
    "max_over_ranks",
    "exchange_rows",
    "gather_objects",
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


def gather_objects(value) -> list:
    """value of every rank, in rank order ([value] without a process group)."""
    if not is_distributed():
        return [value]
    out = [None] * get_world_size()
    dist.all_gather_object(out, value)
    return out


def max_over_ranks(value: int, device: torch.device) -> int:
    """The largest of every rank's value (one tiny collective); the value itself without a group."""
    if not is_distributed():
        return value
    t = torch.tensor(value, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t)


def broadcast_from_rank0(tensor: torch.Tensor) -> torch.Tensor:
    """Rank 0's tensor on every rank (in place); itself without a group."""
    if is_distributed():
        dist.broadcast(tensor, src=0)
    return tensor


class _AllToAllRows(torch.autograd.Function):
    """Rows to other ranks (send_counts[d] rows to rank d, in order) and theirs to this one; backward sends each
    row's gradient back the way it came."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, send_counts: list[int], receive_counts: list[int]) -> torch.Tensor:
        ctx.counts = send_counts, receive_counts
        out = rows.new_empty((sum(receive_counts), *rows.shape[1:]))
        dist.all_to_all_single(out, rows.contiguous(), receive_counts, send_counts)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        send_counts, receive_counts = ctx.counts
        back = grad.new_empty((sum(send_counts), *grad.shape[1:]))
        dist.all_to_all_single(back, grad.contiguous(), send_counts, receive_counts)
        return back, None, None


def exchange_rows(local: torch.Tensor, wanted: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Rows `wanted` (global indices into the concatenation of every rank's rows, `sizes` rows per rank) of the
    global batch, fetched from the ranks that hold them: [len(wanted), ...], differentiable w.r.t. the rows this
    rank sent (their gradient comes back to it). Each row travels once, to the rank that asked for it, through one
    all_to_all of the indices' owners' rows; only the indices are gathered to everyone."""
    if not is_distributed():
        return local[wanted]
    rank, world = get_rank(), get_world_size()
    starts = torch.tensor([0, *sizes], device=wanted.device).cumsum(0)
    # Everyone's requests (W x n small ints): who wants which of my rows, in their order.
    requests = wanted.new_empty(world * wanted.shape[0])
    dist.all_gather_into_tensor(requests, wanted.contiguous())
    requests = requests.view(world, -1)
    owner_of = torch.bucketize(requests, starts[1:], right=True)  # [W, n]: the rank holding each requested row
    mine = owner_of == rank
    send_index = torch.cat([requests[d][mine[d]] - starts[rank] for d in range(world)])
    send_counts = mine.sum(1).tolist()
    my_owners = owner_of[rank]
    receive_counts = [int((my_owners == s).sum()) for s in range(world)]
    received = _AllToAllRows.apply(local[send_index], send_counts, receive_counts)
    # Rows arrive grouped by source rank, each group in this rank's request order: put them back in that order.
    order = torch.cat([torch.nonzero(my_owners == s).flatten() for s in range(world)])
    return torch.empty_like(received).index_copy(0, order, received)
