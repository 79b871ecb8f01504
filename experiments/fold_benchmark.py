"""A synthetic her2st-shaped fold in memory, and one training epoch over it, timed: what
`python -m experiments.benchmark --gpu-check` runs, and the shape benchmark.py's step takes.

A her2st training fold is 24 sections of 176-712 spots (9,866 spots in fold 0: `python data.py
folds her2st`); a batch of 256 spots drawn from it holds ~24 sections, so the global level runs
over every spot of ~24 sections at each step. The fold here has the real sizes (HER2ST_SIZES,
scaled to the asked total), random crops, frozen features and token maps of the real shapes, and
goes through the code that trains: data.SpotDataset, data.Collate, a DataLoader as train.py
builds it (or the training set on the device, resident.py), runtime's CUDA set-up and compile,
GeneDML and gene_dml_loss, fused Adam. Only the pixels and counts are random.
"""
import dataclasses
import time

import numpy as np
import pandas as pd
import torch

from genedml import cohorts
from genedml.crops import N_DIHEDRAL, SectionCrops
import data
import losses
from model import GeneDML, GeneDMLConfig
from genedml import resident, runtime
from genedml.encoders import as_encoder
from genedml.packing import GlobalContext
from genedml.trunk import FEAT_DIM, build_trunk

# Spots per her2st section (counts joined with the spot file), all 36 sections, sorted.
HER2ST_SIZES = [176, 178, 180, 181, 184, 187, 270, 277, 283, 289, 295, 298, 301, 302, 303, 306, 306, 315,
                325, 332, 343, 346, 359, 360, 441, 463, 467, 510, 570, 572, 587, 603, 613, 691, 695, 712]


def grid_xy(n):
    """(n, 2) array x, y of n spots filling a square grid row by row."""
    side = int(np.ceil(np.sqrt(n)))
    i = np.arange(n)
    return np.stack([i % side, i // side], 1).astype(np.int64)


def section_sizes(sections: int, total: int, seed: int = 0) -> list[int]:
    """`sections` sizes drawn from HER2ST_SIZES, scaled so that they sum to about `total`."""
    sizes = np.random.default_rng(seed).choice(HER2ST_SIZES, sections)
    return [max(2, int(round(s))) for s in sizes * total / sizes.sum()]


def synthetic_fold(sections: int, total: int, crop: int, tokens: bool, device, genes: int = 250, seed: int = 0) -> data.Split:
    """A data.Split of `sections` her2st-sized sections (`total` spots): crops (N, c, c, 3) uint8,
    tile features (N, 25, 512), and with tokens the 8 token maps per crop (N, 8, c/32, c/32, 512) float16."""
    rng = np.random.default_rng(seed)
    names = [f"G{j}" for j in range(genes)]
    secs, crops, feats, toks = [], [], [], []
    for k, n in enumerate(section_sizes(sections, total, seed)):
        xy = grid_xy(n)
        pixel = (xy * 256 + 1200).astype(np.float64)  # 256 px apart, every 5x5 window on the image
        ids = [f"{x}x{y}" for x, y in xy]
        counts = pd.DataFrame(rng.poisson(5, (n, genes)).astype(np.float32), index=ids, columns=names)
        secs.append(cohorts.Section("her2st", f"S{k}", f"P{k}", None, ids, xy, pixel, counts))
        side = int(pixel.max()) + 1200
        image = np.broadcast_to(np.zeros((1, 1, 3), np.uint8), (side, side, 3))  # shape only: no tiles are cut
        crops.append(SectionCrops(rng.integers(0, 256, (n, crop, crop, 3), dtype=np.uint8), image, crop, {}, pixel))
        feats.append({"local": rng.random((n, FEAT_DIM), dtype=np.float32),
                      "tiles": rng.random((n, 25, FEAT_DIM), dtype=np.float32)})
        if tokens:
            h = max(1, crop // 32)
            toks.append(rng.random((n, N_DIHEDRAL, h, h, FEAT_DIM), dtype=np.float32).astype(np.float16))
    dataset = data.SpotDataset(secs, crops, names, feats, augment=True, tokens=toks if tokens else None)
    context = GlobalContext.of([(f["local"], s.array_xy) for f, s in zip(feats, secs)], device)
    return data.Split(secs, dataset, context, toks if tokens else None)


def without_tokens(split: data.Split) -> data.Split:
    """The same fold served as the trainable and online frozen modes read it: crops, not tokens."""
    d = split.dataset
    plain = data.SpotDataset.__new__(data.SpotDataset)
    plain.__dict__.update(d.__dict__, tokens=None)
    return dataclasses.replace(split, dataset=plain, tokens=None)


def loader(split: data.Split, batch: int, device, workers: int, seed: int = 0):
    """The training loader as train.py builds it: shuffled full batches, laid out by Collate in workers."""
    sampler = torch.utils.data.BatchSampler(
        torch.utils.data.RandomSampler(split.dataset, generator=torch.Generator().manual_seed(seed)), batch, drop_last=True)
    return split.train_loader(sampler, device, workers)


def items_per_s(split: data.Split, batch: int, batches: int) -> float:
    """Items/s the loader serves in this process (stacking and the global layout included)."""
    it = iter(loader(split, batch, torch.device("cpu"), workers=0))
    t = time.perf_counter()
    n = sum(len(next(it)["label"]) for _ in range(batches))
    return n / (time.perf_counter() - t)


MODES = ("trainable", "frozen", "online")  # local encoder: trained on crops, frozen on cached tokens, frozen on each step's crops
FEEDS = ("loader", "device")  # train.py's loader (workers), or the training set on the device (--data-on-device)


def train_epochs(split: data.Split, mode: str, batch: int, device, amp: bool, workers: int, warmup: int = 2,
                 max_steps: int | None = None, compile: bool = False, feeds=FEEDS) -> dict:
    """One epoch of training steps as train.py runs them, for each way of feeding them (`feeds`), with
    one model (built once, compiled once with --compile): per feed, seconds, spots/s, the share of the
    timed steps the loop waited for its batch, peak device memory, and (CUDA) whether a step ran
    under torch.cuda.set_sync_debug_mode("error") without a host-device sync.

    split serves tokens (mode "frozen") or crops. "online": the frozen encoder runs under no_grad on
    each step's (augmented) crops and the model reads its tokens, as the cached mode reads the stored
    ones. The first `warmup` steps (and the sync check) are untimed; the timed steps are the rest of
    the same epoch, from the same iterator, whose workers kept prefetching meanwhile (a second
    iterator would start on an empty pipeline, which train.py's epochs after the first do not)."""
    runtime.setup_cuda(device)
    torch.manual_seed(0)
    G = split.dataset.labels[0].shape[1]
    frozen = mode != "trainable"
    model = GeneDML(GeneDMLConfig.for_cohort("her2st", G, local_encoder="frozen" if frozen else "trainable")).to(device).train()
    model.set_statistics(np.concatenate(split.dataset.labels), split.context.feats.cpu(),
                         tokens=(np.zeros(FEAT_DIM, np.float32), np.ones(FEAT_DIM, np.float32)) if frozen else None)
    encoder = as_encoder(build_trunk("none")).to(device) if mode == "online" else None
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, fused=device.type in ("cpu", "cuda"))
    forward, loss_fn = runtime.compile_step(model, losses.gene_dml_loss) if compile else (model, losses.gene_dml_loss)
    on = lambda x: x.to(device, non_blocking=True)

    def step(b):
        label, local = on(b["label"]), on(b["local"])
        if encoder is not None:
            local = encoder.tokens(local).flatten(1, 2)  # (B, h*w, C), under no_grad
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            out = forward(local, on(b["neighbour_feats"]), on(b["neighbour_mask"]), on(b["section"]),
                          on(b["index"]), split.context, expression=label, layout=b["layout"].to(device, non_blocking=True))
        loss, _ = loss_fn(out, label, k=18)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    out = {}
    for feed in feeds:
        sampler = torch.utils.data.BatchSampler(
            torch.utils.data.RandomSampler(split.dataset, generator=torch.Generator().manual_seed(0)), batch, drop_last=True)
        batches = resident.ResidentBatches(split, sampler, device, buckets=compile) if feed == "device" else \
            split.train_loader(sampler, device, workers, buckets=compile)
        out[feed] = _time_epoch(batches, step, device, warmup, max_steps, checked_batch=feed == "device")
        out[feed].update(mode=mode, compile=compile, feed=feed, workers=0 if feed == "device" else workers)
        del batches
    return out


def _time_epoch(batches, step, device, warmup, max_steps, checked_batch) -> dict:
    """Warm-up steps, a sync-checked step (CUDA; checked_batch: fetching the batch too), then the rest
    of the epoch timed, all from one iterator."""
    it, total = iter(batches), len(batches)
    t0 = time.perf_counter()
    for _ in range(warmup):
        step(next(it))
    used = warmup
    sync_free = None  # on CUDA: does a step run without waiting for the device? (torch raises at a sync)
    if device.type == "cuda":
        b = None if checked_batch else next(it)
        torch.cuda.synchronize(device)
        torch.cuda.set_sync_debug_mode("error")
        try:
            step(next(it) if checked_batch else b)
            sync_free = True
        except RuntimeError as e:
            sync_free = str(e).splitlines()[0]
        finally:
            torch.cuda.set_sync_debug_mode("default")
        used += 1
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    warmup_s = time.perf_counter() - t0  # the first steps: compiling, with --compile
    steps = total - used if max_steps is None else min(max_steps, total - used)
    assert steps > 0, f"an epoch of {total} steps leaves none to time after {used} untimed ones"
    waited, seen = 0.0, 0
    t0 = time.perf_counter()
    for _ in range(steps):
        t = time.perf_counter()
        b = next(it)
        waited += time.perf_counter() - t
        step(b)
        seen += len(b["label"])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return dict(steps=steps, untimed_steps=used, epoch_steps=total, spots=seen, seconds=seconds,
                spots_per_s=seen / seconds, epoch_s=seconds * total / steps, data_wait_share=waited / seconds,
                warmup_s=warmup_s, peak_gb=peak, sync_free_step=sync_free)
