"""One rank of the DDP gradient-equivalence test: `python ddp_worker.py RANK WORLD STORE GATHER OUT`.

Runs in its own process (gloo on CPU) so that the test exercises a real process group and real DDP."""

import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from gram_ray.loss import VolumeContrastiveLoss

N, D_IN, D = 12, 10, 6


class Towers(torch.nn.Module):
    """Three linear towers and the loss (its temperature is a parameter DDP must average too)."""

    def __init__(self, gather: str):
        super().__init__()
        torch.manual_seed(0)
        self.text = torch.nn.Linear(D_IN, D).double()
        self.video = torch.nn.Linear(D_IN, D).double()
        self.audio = torch.nn.Linear(D_IN, D).double()
        self.loss = VolumeContrastiveLoss(gather=gather).double()

    def forward(self, t, v, a):
        norm = torch.nn.functional.normalize
        return self.loss(norm(self.text(t), dim=-1), norm(self.video(v), dim=-1), norm(self.audio(a), dim=-1))


def batch():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(N, D_IN, generator=g, dtype=torch.float64) for _ in range(3)]


def grads(model):
    return {name: p.grad.detach().clone() for name, p in model.named_parameters()}


def main():
    rank, world, store, gather, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
    # A file rendezvous: no port to pick, so no race with other processes on the machine.
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    model = DistributedDataParallel(Towers(gather))
    rows = N // world
    local = [x[rank * rows : (rank + 1) * rows] for x in batch()]
    model(*local).backward()
    if rank == 0:
        torch.save({k.removeprefix("module."): v for k, v in grads(model).items()}, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
