"""Training on several processes: torchrun, one global contrastive batch, one process that writes.

    torchrun --standalone --nproc_per_node 4 train.py --data her2st ...     # 4 GPUs of one machine

torchrun starts one process per GPU (or per CPU share) and tells each its RANK, LOCAL_RANK and
WORLD_SIZE in the environment; `init` joins them into a process group (NCCL on GPUs, gloo on the
CPU). Without torchrun nothing here does anything: one process, rank 0 of 1.

What changes with N processes (train.py):
- `--batch-size` stays the global batch. Every process draws the same shuffled global batches from
  (seed, epoch) and takes its contiguous 1/N share of each (`ShardedBatchSampler`), so the spots of
  a global batch, and their order, do not depend on N. Dropout and augmentation draw from a seed
  of their own per process.
- The two discrimination pathways need the whole batch: the soft InfoNCE compares every gene with
  every image, and k-means groups the batch. `gather_outputs` concatenates every process's
  embeddings in rank order (= the single-process batch order, so k-means starts from the same
  first k rows) with `gather_rows`, an all-gather whose backward sums the incoming gradients over
  the processes and returns this process's rows (see GatherRows).
- Every process computes the same contrastive losses of the global batch, plus the regression loss
  of its own rows; DDP averages the parameter gradients over the N processes. With the summing
  backward that average is exactly the single-process gradient of the global batch; the
  regression loss is a mean over the local rows, and the average of N equal-sized local means is
  the global mean. (tests/test_distributed.py: 2 processes against 1, to 1e-5.)
- One process (rank 0) validates and writes; the others wait for its early-stopping count (`broadcast`).
  A non-finite loss on any process stops every process at the same step (`ranks_where`).

Imports nothing of the project.
"""
import dataclasses
import datetime
import os
from contextlib import contextmanager

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn


def launched() -> bool:
    """True in a process started by torchrun for more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


DEVICES = "auto, cpu, cuda or cuda:N (mps on a Mac)"  # the forms --device takes


def device_for(name: str) -> torch.device:
    """The device of this process: --device as given, except that "auto"/"cuda" under torchrun
    means this process's own GPU, cuda:LOCAL_RANK. A name that is no device, or a device this
    machine lacks, is a ValueError naming the valid forms, before anything is read or built
    (torch would only fail at the first tensor moved there, with a traceback)."""
    given = name
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and launched():
        name = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    usable = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    try:
        device = torch.device(name)
    except RuntimeError:  # "gpu0", "cuda:x", ...
        device = None
    if device is None or device.type not in usable:
        raise ValueError(f"--device {given!r} is not a device; expected {DEVICES}")
    if not usable[device.type]:
        raise ValueError(f"--device {given}: torch finds no usable {device.type} device on this machine "
                         f"(no GPU, no driver, or a torch built without it); expected {DEVICES}, here cpu or auto")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {given}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                         f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return device


def init(device: torch.device) -> None:
    """Join torchrun's process group (once; a no-op without torchrun). The timeout is long because
    rank 0 may extract frozen features for minutes while the others wait at a barrier."""
    if not launched() or dist.is_initialized():
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(hours=2))


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    """The one process that prints, validates and writes files."""
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


@contextmanager
def main_process_first():
    """Rank 0 runs the block first (building caches, the demo cohort); the others wait, then run it
    and find everything built. No two processes write the same cache entry."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


def broadcast(value: int, device) -> int:
    """Rank 0's integer on every process (its count of epochs without improvement: every process
    then takes the same early-stopping decision, and nobody is left waiting in a collective)."""
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.broadcast(t, src=0)
    return int(t.item())


def ranks_where(flag: torch.Tensor, device) -> list[int]:
    """The ranks whose boolean scalar `flag` is true, the same list on every process. A decision that one
    process alone would take (stopping on its non-finite loss) is taken on this by all of them, so none
    is left waiting in the next collective. One all_reduce of N integers; without torchrun, [0] or []."""
    if not dist.is_initialized():
        return [0] if bool(flag) else []
    t = torch.zeros(dist.get_world_size(), dtype=torch.int32, device=device)
    t[dist.get_rank()] = flag.to(device=device, dtype=torch.int32)
    dist.all_reduce(t)
    return t.nonzero().flatten().tolist()


def sum_over_processes(values: list[float], device) -> list[float]:
    """Element-wise sum of a list of numbers over the processes (epoch totals for the log)."""
    if not dist.is_initialized():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


# ----------------------------------------------------------------------------- the gathered batch
class GatherRows(torch.autograd.Function):
    """all_gather along rows with the right backward: (b, D) on each of N processes -> (N·b, D).

    Every process computes the same loss L of the gathered batch. Process r's rows x_r reach L on
    every process, so the gradient it must backpropagate into its own network is
        Σ_p ∂L_p/∂x_r = N · ∂L/∂x_r      (all_reduce-sum of the incoming gradients, then its slice);
    DDP's average over the N processes then divides the N back out, leaving ∂L/∂θ exactly.
    The version widely copied from SimCLR/CLIP ports returns only grad[r-th slice] without the
    sum, which gives ∂L/∂θ / N here (and the wrong gradient when the processes' losses differ).
    """

    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)                     # sum over processes
        return grad.chunk(dist.get_world_size())[dist.get_rank()]


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """GatherRows, or x itself in one process. Every process must hold the same number of rows."""
    return GatherRows.apply(x) if dist.is_initialized() and dist.get_world_size() > 1 else x


def gather_outputs(out):
    """The model's output with every embedding the two discrimination pathways read gathered from all
    processes (image embeddings per level, gene embedding, both clustering-space embeddings), in rank
    order. The prediction stays local: the regression loss is per spot. One collective for all of them."""
    if world_size() == 1:
        return out
    fields = {f"embeddings.{level}": v for level, v in out.embeddings.items()}
    fields.update({name: getattr(out, name) for name in ("image_cluster", "gene", "gene_cluster")
                   if getattr(out, name) is not None})
    widths = [v.shape[1] for v in fields.values()]
    gathered = gather_rows(torch.cat([v.float() for v in fields.values()], dim=1))   # (N·b, Σ widths)
    full = dict(zip(fields, gathered.split(widths, dim=1)))
    embeddings = {level: full[f"embeddings.{level}"] for level in out.embeddings}
    return dataclasses.replace(out, embeddings=embeddings,
                               **{k: v for k, v in full.items() if not k.startswith("embeddings.")})


# ----------------------------------------------------------------------------- model and batches
def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """DistributedDataParallel around the model (the model itself in one process).

    BatchNorm (the trainable local ResNet18): on GPUs it becomes SyncBatchNorm, so its statistics are
    those of the global batch, as in one process. SyncBatchNorm runs on GPUs only: on the CPU (gloo)
    each process normalises by the statistics of its own b = B/N rows, and the running statistics
    kept are rank 0's (DDP broadcasts buffers from rank 0 before every forward).
    Every trainable parameter must receive a gradient in every step (train.py freezes the ones no
    loss term reaches), so DDP runs without find_unused_parameters' extra graph traversal.
    """
    if world_size() == 1:
        return model
    if device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def check_every_parameter_trained(model: nn.Module) -> None:
    """After the first backward under DDP: a trainable parameter without a gradient would leave DDP
    waiting for it (an error at the next step at best); name them instead."""
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    if missing:
        raise SystemExit(f"{len(missing)} trainable parameters got no gradient under DDP "
                         f"({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}): "
                         "freeze them when no loss term reaches them")


class ShardedBatchSampler(torch.utils.data.Sampler):
    """Shuffled global batches of `batch_size` spots, each cut into `world` contiguous shares; yields this rank's.

    The order is drawn from (seed, epoch) alone (`set_epoch`, as DistributedSampler's), so every
    process draws the same one, the shares of one step are disjoint and together form the batch one
    process would see, in the same order; and --resume replays an epoch exactly. A last batch that
    does not split evenly (only when drop_last is off, i.e. the whole training set is smaller than
    one batch) loses up to world-1 spots, because the gather needs equal shares.
    """

    def __init__(self, n: int, batch_size: int, drop_last: bool, seed: int, rank: int = 0, world: int = 1):
        assert batch_size % world == 0 and n >= world, \
            f"the global batch {batch_size} and the {n} spots must split into {world} equal shares"
        self.n, self.batch_size, self.drop_last, self.seed = n, batch_size, drop_last, seed
        self.rank, self.world, self.epoch = rank, world, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self):
        return self.n // self.batch_size if self.drop_last else -(-self.n // self.batch_size)

    def __iter__(self):
        order = np.random.default_rng([self.seed, self.epoch]).permutation(self.n).tolist()
        for step in range(len(self)):
            batch = order[step * self.batch_size:(step + 1) * self.batch_size]
            share = len(batch) // self.world
            yield batch[self.rank * share:(self.rank + 1) * share]
