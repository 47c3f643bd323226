"""FSDP2 for GRAM (`scaling.strategy: fsdp`), free of Ray: what is sharded, in which precision, how micro-batches
sync, and how a sharded model's state becomes one checkpoint.

Units. Every transformer block of every encoder is one `fully_shard` unit (the backbones name them:
`shard_units()`); BERT's blocks carry the cross-attention of GRAM's fusion, so the matching loss's passes over
the text encoder are sharded too. Everything else (embeddings, final norms, projection heads, the fusion's
projections and match head, the temperature) is the root unit's. A block's parameters are gathered just before
its forward and freed after it (and again for its backward), so a rank holds its 1/W shard of every weight,
gradient and AdamW moment plus one block's full weights at a time.

Precision. On a GPU with train.bf16 the blocks compute in bf16 from fp32 master weights and gradients are
reduced in fp32 (MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)); the optimizer state stays fp32 and
sharded. On CPU (the tests) everything is fp32, so FSDP's numbers can be compared with DDP's.

Micro-batches (train.grad_accum, or an elastic group's plan). `scaling.fsdp_sync: every_micro_batch` (default)
reduce-scatters each micro-batch's gradients into the sharded ones: the least memory, and one all-gather of
the weights per block per forward and backward of every micro-batch. `last_micro_batch` keeps every micro-batch's
gradients unsharded on each rank and the weights gathered until the last micro-batch of the step (one
reduce-scatter a step, no re-gathering in between), which costs a full fp32 gradient and a full bf16 copy of the
weights per rank: the DDP-like trade for models that fit anyway.

Checkpoints. The sharded weights and AdamW state are gathered to rank 0's CPU memory one tensor at a time
(torch.distributed.checkpoint.state_dict with full_state_dict and cpu_offload) and written as the same state.pt
a DDP run writes (the optimizer state by parameter index, as a plain `optimizer.state_dict()`). Chosen over
torch.distributed.checkpoint's sharded files because every consumer (`evaluate`, `--resume` at any world size
and under either strategy, `model.init_from`, the exported checkpoints) then reads one file without a process
group; the cost is GRAM's 1.24 B parameters' ~15 GB (weights and both moments, fp32) in rank 0's host memory
while it writes, which a GPU node has.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch import nn

from gram_ray.config import GramConfig
from gram_ray.model.gram import GramModel

__all__ = [
    "shard_units",
    "shard_model",
    "is_sharded",
    "micro_batch_sync",
    "whole_weights",
    "as_local",
    "gathered_state",
    "load_optimizer_state",
]


def shard_units(model: GramModel) -> list[nn.Module]:
    """The modules sharded one by one (innermost first): each encoder backbone's blocks."""
    return [
        unit
        for enc in (model.text, model.vision, model.audio)
        if enc is not None
        for unit in enc.backbone.shard_units()
    ]


def _fsdp():
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    return FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method


def shard_model(model: GramModel, cfg: GramConfig, device: torch.device) -> GramModel:
    """The model sharded in place over every rank of the default process group (FSDP2), on `device`."""
    from torch.distributed.device_mesh import init_device_mesh

    _, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method = _fsdp()
    if not dist.is_initialized():
        raise RuntimeError("scaling.strategy: fsdp needs a process group (Ray Train or torchrun sets one up)")
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    bf16 = device.type == "cuda" and cfg.train.bf16
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
    options = {"mesh": mesh} | ({"mp_policy": policy} if policy is not None else {})
    model = model.to(device)
    for unit in shard_units(model):
        fully_shard(unit, **options)
    # The root's parameters are used again right after forward (the loss, the backward): not freed after forward.
    fully_shard(model, reshard_after_forward=False, **options)
    for name in GramModel.ENTRY_POINTS:  # evaluation and reranking call these outside forward
        register_fsdp_forward_method(model, name)
    return model


def is_sharded(model: nn.Module) -> bool:
    return isinstance(model, _fsdp()[0])


def _fsdp_modules(model: nn.Module) -> list[nn.Module]:
    kind = _fsdp()[0]
    return [m for m in model.modules() if isinstance(m, kind)]


@contextlib.contextmanager
def micro_batch_sync(model: nn.Module, sync: bool, sync_every_micro_batch: bool = True):
    """Around one micro-batch's forward and backward: whether its gradients are reduced across ranks now.
    DDP: every micro-batch but the last of a step runs under no_sync (its forward too: DDP decides there).
    FSDP: see the module's docstring (scaling.fsdp_sync)."""
    if is_sharded(model):
        if not sync_every_micro_batch:  # gradients and gathered weights stay until the step's last micro-batch
            model.set_requires_gradient_sync(sync)
            model.set_reshard_after_backward(sync)
        yield
    elif not sync and hasattr(model, "no_sync"):
        with model.no_sync():
            yield
    else:
        yield


@contextlib.contextmanager
def whole_weights(model: nn.Module):
    """Every unit's weights gathered for the block's duration and left gathered between forwards (FSDP's own
    recipe for evaluation): the forwards inside run without collectives, so ranks may embed different numbers of
    batches. Costs the whole model in the compute dtype per rank (GRAM in bf16: 2.5 GB). A no-op unsharded."""
    if not is_sharded(model):
        yield
        return
    units = _fsdp_modules(model)
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
            unit.set_reshard_after_forward(unit is not model, recurse=False)


def as_local(value: torch.Tensor) -> torch.Tensor:
    """A plain tensor from a DTensor (FSDP's gradient norm is one, replicated), else the tensor itself."""
    from torch.distributed.tensor import DTensor

    return value.full_tensor() if isinstance(value, DTensor) else value


def _full_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def gathered_state(model: nn.Module, optimizer) -> tuple[dict | None, dict | None]:
    """(model state, optimizer state) as one process's model and optimizer would have them. Sharded: a collective
    (call it on every rank); rank 0 gets both, the other ranks (None, None). Otherwise this rank's own."""
    if not is_sharded(model):
        plain = model.module if hasattr(model, "module") else model
        return plain.state_dict(), optimizer.state_dict() if optimizer is not None else None
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    weights = get_model_state_dict(model, options=_full_options())
    by_name = get_optimizer_state_dict(model, optimizer, options=_full_options()) if optimizer is not None else None
    if dist.get_rank() != 0:
        return None, None
    return weights, _by_index(by_name, _parameter_names(model, optimizer)) if by_name is not None else None


def load_optimizer_state(model: nn.Module, optimizer, state: dict) -> None:
    """A checkpoint's optimizer state (by parameter index, from either strategy) into this optimizer; sharded,
    every rank keeps its shard of each moment."""
    if not is_sharded(model):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    by_name = _by_name(state, _parameter_names(model, optimizer))
    set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))


def _parameter_names(model: nn.Module, optimizer) -> list[str]:
    """The name of each parameter in the optimizer's order (its groups in order): what index i stands for."""
    names = {id(p): name for name, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def _by_index(state: dict, names: list[str]) -> dict:
    index = {name: i for i, name in enumerate(names)}
    groups = [g | {"params": [index[n] for n in g["params"]]} for g in state["param_groups"]]
    return {"state": {index[n]: v for n, v in state["state"].items()}, "param_groups": groups}


def _by_name(state: dict, names: list[str]) -> dict:
    groups = [g | {"params": [names[i] for i in g["params"]]} for g in state["param_groups"]]
    return {"state": {names[i]: v for i, v in state["state"].items()}, "param_groups": groups}
