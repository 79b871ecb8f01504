"""How a training process runs its steps: the one CUDA set-up, torch.compile of the step, and loader
workers sized to the shared memory they pass batches through.

train.py, experiments/benchmark.py and experiments/fold_benchmark.py all call these, so that the
benchmarks measure what training runs. Needs nothing of ours.
"""
import logging
import shutil

import torch

log = logging.getLogger(__name__)


def setup_cuda(device) -> None:
    """cuDNN autotuning and TF32 on a CUDA device (nothing elsewhere). The legacy switches only:
    torch refuses to read a mix of them and the newer fp32_precision ones."""
    if torch.device(device).type != "cuda":
        return
    torch.backends.cudnn.benchmark = True          # the trunk sees one crop size: pick its fastest kernels once
    torch.set_float32_matmul_precision("high")     # TF32 matmuls for what stays in float32 (e.g. the losses)
    torch.backends.cudnn.allow_tf32 = True         # and TF32 convolutions


def compile_step(model, loss, backend: str = "inductor"):
    """torch.compile of the model and of the loss (train.py --compile): fewer, fused kernels, so the
    host launches fewer of them per step. Inductor compiles on the first calls of each new shape;
    the global level's layouts are padded to a few sizes (packing.SpotGrids.layout, buckets) so that
    a fold's steps reuse one or two graphs. (The tests capture the same graphs with "aot_eager".)"""
    return torch.compile(model, backend=backend), torch.compile(loss, backend=backend)


SHM = "/dev/shm"  # where a DataLoader's workers put the batches they hand to the main process (Linux)


def shm_free_bytes(path: str = SHM) -> int | None:
    """Free bytes of the shared-memory file system, or None where there is none (macOS, Windows)."""
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def fit_to_shm(workers: int, prefetch: int, batch_bytes: int, free: int | None) -> tuple[int, int, str | None]:
    """Loader workers and prefetch whose batches in flight (workers x prefetch x batch_bytes) fit in
    half the free shared memory (a container's default /dev/shm is 64 MB; more in flight there is a
    bus error, not a Python error). Fewer prefetched batches first (down to 2 a worker), then fewer
    workers, then none (the main process loads, through no shared memory). Returns (workers,
    prefetch, a message saying what changed, or None)."""
    if workers == 0 or free is None or workers * prefetch * batch_bytes <= free // 2:
        return workers, prefetch, None
    fits = int(free // 2 // max(batch_bytes, 1))         # batches that fit in flight
    if fits >= 2 * workers:
        new = workers, fits // workers
    elif fits >= 1:
        new = max(1, fits // 2), min(2, fits)
    else:
        new = 0, prefetch
    what = f"{new[0]} workers x prefetch {new[1]}" if new[0] else "loading in the main process (no workers)"
    return (*new, f"{SHM} has {free / 2**20:.0f} MB free: {workers} workers x prefetch {prefetch} x "
                  f"{batch_bytes / 2**20:.0f} MB a batch would not fit in half of it; {what} "
                  f"(give the container more, e.g. docker run --shm-size 8g)")
