"""One rank of the DDP gradient tests: `python ddp_worker.py RANK WORLD STORE MODE OUT [BACKEND]`.

MODE is a gather mode (one backward of the rank's rows), or "accum": two micro-batches per rank through the
training loop's accumulate_gradients, with a DDP comm hook counting gradient all-reduces. Runs in its own
process so that the test exercises a real process group and real DDP: gloo on CPU (the default), or nccl with
rank r on GPU r modulo the GPUs there are. run_ranks() launches the ranks."""

import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
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


class MicroBatchTowers(Towers):
    """Towers called as the training loop calls the model: model(batch) -> an output with .loss."""

    def forward(self, batch):
        norm = torch.nn.functional.normalize
        t, v, a = (norm(tower(x), dim=-1) for tower, x in zip((self.text, self.video, self.audio), batch, strict=True))
        return self.loss.compute(t, v, a)


def micro_batches(rank: int, world: int, accum: int):
    """Rank r's rows of global micro-batch i: micro-batch i is rows [i*N/accum, (i+1)*N/accum) of batch()."""
    rows = N // accum // world
    return [
        [x[i * rows * world + rank * rows : i * rows * world + (rank + 1) * rows] for x in batch()]
        for i in range(accum)
    ]


def exchange_case(rank: int, world: int):
    """Rank r's rows (3 x 2, float64, requiring grad) and the global rows it asks for (one of its own, the rest
    from others, one asked twice)."""
    rows = (torch.arange(6, dtype=torch.float64).view(3, 2) + 100 * rank).requires_grad_()
    wanted = torch.tensor([(rank + 1) % world * 3 + 2, rank * 3, (rank + 1) % world * 3 + 2, 1])
    return rows, wanted


def gram_model_and_batch(matching: bool = False):
    """GRAM's encoders (EVA-CLIP tower, BEATs, BERT with cross-attention) at tiny sizes, and a batch of 8, with
    every random draw fixed (eval mode: no dropout) so that ranks and the reference see the same numbers.
    matching: also the fusion and match head, trained by DAM (model.itm_ratio 0.1)."""
    from tiny import GRAM_ENCODERS, random_rows, tiny_config

    from gram_ray.data.collate import Collate
    from gram_ray.data.text import build_word_vocab
    from gram_ray.model.gram import build_model

    cfg = tiny_config(*GRAM_ENCODERS, "model.text.cross_attention=true", f"model.itm_ratio={0.1 if matching else 0}")
    rows = random_rows(cfg, 8)
    vocab = build_word_vocab(c for caps in rows["captions"] for c in caps)
    torch.manual_seed(0)
    model = build_model(cfg, vocab).eval()
    return model, Collate(cfg, vocab, train=True)(rows)  # captions padded alike, before any split into ranks


def nonfinite_run(rank: int, world: int) -> dict:
    """The training loop on 2 gloo ranks, 2 epochs of 2 steps, with a NaN in one audio feature of rank 1's
    second batch of epoch 0: that step's update must be skipped on both ranks and training must go on. Returns
    rank 0's view: every logged and reported metric, and the final weights of every rank."""
    import numpy as np
    from tiny import random_rows, tiny_config

    from gram_ray.data.collate import Collate
    from gram_ray.data.text import build_word_vocab
    from gram_ray.train.loop import run_training

    cfg = tiny_config("train.epochs=2", "model.temperature=0.07")
    rows = random_rows(cfg, 8 * world)
    vocab = build_word_vocab(c for caps in rows["captions"] for c in caps)
    collate = Collate(cfg, vocab, train=True)
    mine = {k: v[rank * 8 : (rank + 1) * 8] for k, v in rows.items()}

    def train_batches(epoch, skip):
        for i in range(2):
            b = {k: v[i * 4 : (i + 1) * 4].copy() for k, v in mine.items()}
            if epoch == 0 and i == 1 and rank == 1:
                b["audio_fbank"][0, 0, 0, 0] = np.nan
            yield collate(b)

    logged, reported, models = [], [], []

    def prepare(model):
        models.append(model)
        return DistributedDataParallel(model)

    run_training(
        cfg,
        train_batches=train_batches,
        val_batches=None,
        steps_per_epoch=2,
        report=lambda metrics, checkpoint: reported.append(dict(metrics)),
        vocab=vocab,
        prepare_model=prepare,
        log=logged.append,
    )
    weights = torch.cat([p.detach().flatten() for p in models[0].parameters()])
    every = [torch.zeros_like(weights) for _ in range(world)]
    dist.all_gather(every, weights)
    return {"logged": logged, "reported": reported, "weights": every}


ELASTIC_ROWS, ELASTIC_STOP = 16, 3


def elastic_setup():
    """The elastic resume case: 16 clips, 2 a micro-batch, [1, 2] workers (4 clips a step at either size), 2
    epochs (8 steps), a checkpoint every 3 steps (step 3 is mid-epoch 0)."""
    from tiny import random_rows, tiny_config

    from gram_ray.data.collate import Collate
    from gram_ray.data.text import build_word_vocab

    cfg = tiny_config(
        "train.batch_size=2",
        "scaling.num_workers=[1, 2]",
        "scaling.max_failures=1",
        "train.epochs=2",
        "train.checkpoint_every_steps=3",
        "train.log_every_steps=1",
    )
    rows = random_rows(cfg, ELASTIC_ROWS)
    vocab = build_word_vocab(c for caps in rows["captions"] for c in caps)
    return cfg, rows, vocab, Collate(cfg, vocab, train=True)


def elastic_run(rank: int, world: int, resume: dict | None = None, stop_at: int | None = None) -> dict:
    """run_training at `world` workers with the world plan's micro-batch and accumulation; rank r takes every
    world-th micro-batch of the epoch's order (less the clips a resumed epoch already trained on). Stops after the
    checkpoint of step stop_at. Returns rank 0's view: the checkpoints, the logged metrics, the clips seen per
    epoch by this rank, and the final weights."""
    from tiny import saved

    from gram_ray.config.world import plan_for_world
    from gram_ray.data.collate import epoch_batches
    from gram_ray.train.loop import run_training

    cfg, rows, vocab, collate = elastic_setup()
    plan = plan_for_world(cfg.step_clips, cfg.train.batch_size, world)  # as worker.plan_of
    seen, logged, checkpoints, models = {}, [], [], []

    def train_batches(epoch, skip):
        for i, batch in enumerate(epoch_batches(rows, plan.micro_batch, collate, epoch, skip)):
            if i % world == rank:
                seen.setdefault(epoch, []).extend(batch["ids"])
                yield batch

    class Stop(Exception):
        pass

    def report(metrics, checkpoint):
        if checkpoint is not None:
            checkpoints.append(saved(checkpoint))
        if metrics["step"] == stop_at:
            raise Stop

    def prepare(model):
        models.append(model)
        return DistributedDataParallel(model) if world > 1 else model

    try:
        run_training(
            cfg,
            train_batches=train_batches,
            val_batches=None,
            steps_per_epoch=ELASTIC_ROWS // (plan.micro_batch * world),
            grad_accum=plan.grad_accum,
            report=report,
            vocab=vocab,
            resume=resume,
            prepare_model=prepare,
            log=logged.append,
        )
    except Stop:
        pass
    weights = {k: v.detach().clone() for k, v in models[0].state_dict().items()}
    return {"checkpoints": checkpoints, "logged": logged, "seen": seen, "weights": weights}


FSDP_ROWS, FSDP_VAL_ROWS = 16, 8


def fsdp_setup(*extra: str):
    """The FSDP loop case: GRAM's encoders with DAM, gradient checkpointing and reranking; 16 clips, micro-batches
    of 2, 2 of them a step on each of 2 workers (8 clips a step, 2 steps an epoch), 2 epochs, a checkpoint every
    step, an evaluation before the first step (8 val clips in batches of 3: the ranks embed 2 and 1 batches)."""
    from tiny import GRAM_ENCODERS, random_rows, tiny_config

    from gram_ray.data.text import build_word_vocab

    cfg = tiny_config(
        *GRAM_ENCODERS,
        "model.text.cross_attention=true",
        "model.itm_ratio=0.1",
        "model.gradient_checkpointing=true",
        "eval.rerank_k=4",
        "train.batch_size=2",
        "train.grad_accum=2",
        "train.epochs=2",
        "train.checkpoint_every_steps=1",
        "train.first_eval=true",
        "train.eval_batch_size=3",
        *extra,
    )
    rows = random_rows(cfg, FSDP_ROWS + FSDP_VAL_ROWS)
    vocab = build_word_vocab(c for caps in rows["captions"] for c in caps)
    train = {k: v[:FSDP_ROWS] for k, v in rows.items()}
    val = {k: v[FSDP_ROWS:] for k, v in rows.items()}
    return cfg, train, val, vocab


def fsdp_run(
    rank: int, world: int, strategy: str, resume: dict | None = None, *extra: str, device: torch.device | None = None
) -> dict:
    """run_training on `world` ranks under DDP or FSDP (or one plain process), on CPU or a GPU: every checkpoint
    (rank 0's) and every logged metric."""
    from tiny import saved

    from gram_ray.config.world import plan_for_world
    from gram_ray.data.collate import Collate, epoch_batches
    from gram_ray.train.loop import run_training
    from gram_ray.train.sharding import shard_model

    cfg, train, val, vocab = fsdp_setup(*extra)
    device = device or torch.device("cpu")
    plan = plan_for_world(cfg.step_clips, cfg.train.batch_size, world)  # as worker.plan_of
    collate = Collate(cfg, vocab, train=True)
    val_collate = Collate(cfg, vocab, train=False)
    val_batches = [val_collate({k: v[i : i + 3] for k, v in val.items()}) for i in range(0, FSDP_VAL_ROWS, 3)][
        rank::world
    ]
    checkpoints, logged = [], []

    def train_batches(epoch, skip):
        for i, batch in enumerate(epoch_batches(train, plan.micro_batch, collate, epoch, skip)):
            if i % world == rank:
                yield batch

    def report(metrics, checkpoint):
        if checkpoint is not None:
            checkpoints.append(saved(checkpoint))

    def prepare(model):
        if strategy == "fsdp":
            return shard_model(model, cfg, device)
        on_device = {"device_ids": [device]} if device.type == "cuda" else {}
        return DistributedDataParallel(model, **on_device) if world > 1 else model

    run_training(
        cfg,
        train_batches=train_batches,
        val_batches=lambda: val_batches,
        steps_per_epoch=FSDP_ROWS // (plan.micro_batch * world),
        grad_accum=plan.grad_accum,
        report=report,
        vocab=vocab,
        resume=resume,
        device=device,
        prepare_model=prepare,
        log=logged.append,
    )
    return {"checkpoints": checkpoints, "logged": logged}


def grads(model):
    return {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}


def run_ranks(mode: str, tmp_path: Path, backend: str = "gloo", world: int = 2, timeout: float = 120):
    """Run `world` ranks of this worker; returns (rank 0's saved gradients or None, [(returncode, stderr)])."""
    out, store = tmp_path / f"{mode}-{backend}.pt", tmp_path / f"{mode}-{backend}.store"
    worker = Path(__file__)
    procs = [
        subprocess.Popen(
            [sys.executable, str(worker), str(r), str(world), str(store), mode, str(out), backend],
            cwd=worker.parent,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(world)
    ]
    results = []
    for p in procs:
        try:
            _, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:  # a rank stuck in a collective its peer never joined
            p.kill()
            err = p.communicate()[1] + f"\n(rank killed after {timeout} s)"
        results.append((p.returncode, err))
    return (torch.load(out) if out.exists() else None), results


def _finish() -> None:
    """Leave the process group together, then exit without the interpreter's teardown: a gloo rank's C++ threads
    destroyed at interpreter exit sometimes abort the process ("terminate called without an active exception",
    about 1 run in 8 of the NaN test's rank 1) after everything it was asked to do is done and saved."""
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def main():
    rank, world, store, gather, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
    backend = sys.argv[6] if len(sys.argv) > 6 else "gloo"
    device = torch.device("cpu")
    if backend == "nccl":
        device = torch.device("cuda", rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    # A file rendezvous: no port to pick, so no race with other processes on the machine.
    dist.init_process_group(backend, init_method=f"file://{store}", rank=rank, world_size=world)
    on_device = {"device_ids": [device]} if device.type == "cuda" else {}
    if gather == "accum":
        from gram_ray.train.step import accumulate_gradients

        model = DistributedDataParallel(MicroBatchTowers("exact").to(device), **on_device)
        allreduces = []

        def counting_hook(state, bucket):
            allreduces.append(bucket.index())
            return default_hooks.allreduce_hook(dist.group.WORLD, bucket)

        model.register_comm_hook(None, counting_hook)
        micros = [[x.to(device) for x in micro] for micro in micro_batches(rank, world, accum=2)]
        accumulate_gradients(model, micros[0], grad_accum=2, sync=False)
        after_first = len(allreduces)
        accumulate_gradients(model, micros[1], grad_accum=2, sync=True)
        extra = {"allreduces_after_first": after_first, "allreduces_after_last": len(allreduces)}
    elif gather == "exchange":
        from gram_ray.distributed import exchange_rows

        rows, wanted = exchange_case(rank, world)
        fetched = exchange_rows(rows, wanted, [rows.shape[0]] * world)
        (fetched * torch.arange(1.0, 1 + fetched.numel(), dtype=fetched.dtype).view_as(fetched)).sum().backward()
        all_fetched = [torch.zeros_like(fetched) for _ in range(world)]
        dist.all_gather(all_fetched, fetched.detach().contiguous())
        all_grads = [torch.zeros_like(rows.grad) for _ in range(world)]
        dist.all_gather(all_grads, rows.grad.contiguous())
        if rank == 0:
            torch.save({"fetched": torch.cat(all_fetched), "grad": torch.cat(all_grads)}, out)
        _finish()
        return
    elif gather == "elastic":  # 2 ranks train to the checkpoint of step ELASTIC_STOP, then stop
        result = elastic_run(rank, world, stop_at=ELASTIC_STOP)
        seen = [None] * world
        dist.all_gather_object(seen, result["seen"])
        if rank == 0:
            torch.save(result | {"seen_by_rank": seen}, out)
        _finish()
        return
    elif gather == "nonfinite":
        extra = nonfinite_run(rank, world)
        if rank == 0:
            torch.save(extra, out)
        _finish()
        return
    elif gather.startswith("loop-"):  # loop-ddp, loop-fsdp, loop-fsdp-resume (from resume.pt beside the output)
        resume = torch.load(Path(out).parent / "resume.pt", weights_only=False) if gather.endswith("-resume") else None
        # The resumed run also accumulates the other way (gradients kept until the step's last micro-batch).
        extra = ["scaling.fsdp_sync=last_micro_batch"] if resume is not None else []
        extra += ["train.bf16=true"] if device.type == "cuda" else []  # FSDP's mixed precision on a GPU
        result = fsdp_run(rank, world, gather.split("-")[1], resume, *extra, device=device)
        if rank == 0:
            torch.save(result, out)
        _finish()
        return
    elif gather in ("fsdp", "fsdp-dam"):  # the same case as gram / gram-dam, sharded with FSDP2
        from tiny import tiny_config

        from gram_ray.train.sharding import shard_model

        model, full = gram_model_and_batch(matching=gather == "fsdp-dam")
        model = shard_model(model, tiny_config(), device)
        rows = len(full["ids"]) // world
        local = {k: v[rank * rows : (rank + 1) * rows] for k, v in full.items()}
        loss = model(local).loss
        loss.backward()
        full_grads = {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.grad is not None}
        # What each rank holds: its shard of every parameter (a DTensor, split along the first dimension).
        held = {n: (type(p.data).__name__, p.to_local().numel(), p.numel()) for n, p in model.named_parameters()}
        every, losses = [None] * world, [torch.zeros(()) for _ in range(world)]
        dist.all_gather_object(every, held)
        dist.all_gather(losses, loss.detach())
        if rank == 0:
            result = {"losses": torch.stack(losses), "held": every}
            torch.save({k: v.cpu() for k, v in full_grads.items()} | result, out)
        _finish()
        return
    elif gather in ("gram", "gram-dam"):
        model, full = gram_model_and_batch(matching=gather == "gram-dam")
        model = DistributedDataParallel(model.to(device), **on_device)
        rows = len(full["ids"]) // world
        local = {k: v[rank * rows : (rank + 1) * rows] for k, v in full.items()}
        model(local).loss.backward()
        extra = {}
    else:
        model = DistributedDataParallel(Towers(gather).to(device), **on_device)
        rows = N // world
        local = [x[rank * rows : (rank + 1) * rows].to(device) for x in batch()]
        model(*local).backward()
        extra = {}
    if rank == 0:
        torch.save({k.removeprefix("module."): v.cpu() for k, v in grads(model).items()} | extra, out)
    _finish()


if __name__ == "__main__":
    main()
