"""
What Gene-DML costs: data serving, a training step, evaluation, and how cost grows with slide size.

    python benchmark.py                          # every section but fold, CPU defaults (the step: ~30+ min on 2 cores)
    python benchmark.py --only step,scale --device cuda --json bench.json
    python benchmark.py --quick                  # every size shrunk: a smoke run under a minute
    python benchmark.py --gpu-check              # the GPU check: her2st's step and epoch at batch 256, bf16

Everything runs on synthetic inputs of real sizes, so no data is needed. Each comparison is timed
in the same run and reported as a ratio, which survives a busy machine better than the absolute
figures (on a shared machine both can move; rerun before quoting them, and pass --threads 1 when
other jobs hold cores: torch's threads then wait on each other, up to 20x slower). Sections:

  data   one her2st-sized slide (JPEG of --slide-px, --spots spots ~256 px apart): decoding it and
         building the cache (data.section_crops), then items/s served by data.SpotDataset with
         neighbour tiles from the cache, against cutting the crops per item from an in-memory
         decoded image (both read twice: the first pass maps the cache's pages, the second is what
         later epochs see) and against decoding the JPEG per item. Peak RSS of the section.
  step   spots/s of a full training step at her2st's shape: a fold of --step-sections sections of
         her2st sizes (~400 spots each; fold_benchmark), a batch of --batch spots drawn from all of
         it, so the global level runs over every spot of every section the batch touches (one
         padded pass). GeneDML with all three levels, gene_dml_loss with all losses, fused Adam as
         train.py, with the trainable local encoder (crops) and with the frozen one (cached tokens),
         against a bare torchvision ResNet18 step on the same crops (default and channels-last
         layouts), all timed interleaved, round after round (median); where the trainable step's
         time goes: its local trunk, neighbour and global levels (forward + backward timed alone),
         the Adam step, k-means (losses.kmeans timed by wrapping it) and the rest; the loader's
         items/s in one process (items, stacking and the global layout); the frozen-feature rate
         (features.extract_features: the local crop + 25 tiles per spot) and the token rate
         (features.extract_tokens: 8 transforms of one crop per spot).
  fold   one training epoch per local-encoder mode over a synthetic her2st-sized fold (--fold-spots
         spots in --fold-sections sections) through train.py's loader (workers as train.py picks
         them): seconds, spots/s, the share of the epoch spent waiting for data, peak GPU memory.
  --gpu-check  the one prepared check for a lent GPU (under 5 minutes): step (24 sections) and fold
         at batch 256 in bf16, her2st's sizes. On a CPU it runs the same code at a small size.
  eval   metrics.slide_metrics (vectorised) against a per-gene np.corrcoef loop; they must agree.
  ddp    training steps/s of one process and of two (torchrun's DDP on gloo, one thread each,
         the same global batch, embeddings gathered as train.py does): a smoke figure that the
         distributed path runs, not a scaling claim (two processes share this machine's cores).
  encoders  feature extraction (encoders.FrozenEncoder.features: the tile feature, no gradient) in
         images/s at --encoder-px px for each of --encoders: the ResNet18, a tiny ViT (UNI's entry at
         depth 2, width 64) and UNI-sized (ViT-L/16, random weights: no download), each with its
         forward FLOPs per image counted on the meta device, and what extracting her2st's frozen
         features (13,653 spots x 26 images) takes at that rate. Needs timm for the ViTs (skipped
         without). In bf16 autocast on CUDA, the encoder's precision (UNI: float16).
  scale  forward + backward of the global level on one section of 300 ... 16,000 spots: its
         self-attention is quadratic in the spots per section, so time and memory grow ~N² once N
         is large; a size whose extrapolated cost is above --scale-max-s / --scale-max-gb is
         skipped and its estimate shown. Then RSS while caching a 36-section cohort one section at
         a time (smaller images, --cohort-px): the anonymous (heap) part should stay flat, while
         the file-backed part grows with the memory-mapped pages the kept crops touched (the
         kernel can drop those at will).
  slide  evaluate.py --predict SLIDE end to end on a synthetic tiled pyramidal TIFF (tifffile) whose
         tissue holds ~--wsi-spots spots of a Visium grid, read through OpenSlide, with a random-weight
         model at --wsi-crop px: grid spots/s cold (region reads, frozen features of 26 images a spot,
         prediction) and warm (cache filled: prediction alone). Then the global level's large-grid
         strategy against the full pass on the same grid: time, peak RSS, and how far the windowed
         predictions are from the full pass's (slide.grid_windows, --wsi-window spots a window).

"Peak RSS" is the process's high-water mark (VmHWM), reset at the start of each measurement where
Linux allows it, else resource.getrusage's lifetime peak. On CUDA the step and scale sections run
on the GPU under bf16 autocast (--amp) and report torch.cuda.max_memory_allocated; data and eval
are CPU work on any device.
"""
import argparse
import ctypes
import dataclasses
import gc
import json
import math
import os
import resource
import shutil
import socket
import tempfile
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
import torchvision
from PIL import Image

import cohorts
import data
import distributed
import encoders
import losses
from cache import ArrayCache
from metrics import slide_metrics
from features import extract_features, extract_tokens
import fold_benchmark
from fold_benchmark import grid_xy
from model import GeneDML, GeneDMLConfig
from packing import GlobalContext
from trunk import build_trunk, preprocess

SECTIONS = ("data", "step", "fold", "eval", "ddp", "scale", "encoders", "slide")
HER2ST_IMAGES = 13_653 * 26  # her2st's spots x (the local crop + 25 neighbour tiles)
SPOT_PX = 256  # her2st: spots ~ 200-260 px apart on the full-resolution image
QUICK = dict(slide_px="2000x2000", spots=64, items=32, decode_items=1, batch=8, crop=64, context=64,
             feat_spots=4, warmup=1, reps=2, eval_spots=500, eval_genes=50, scale_spots="100,300",
             cohort_sections=4, cohort_px="800x800", cohort_spots=36, step_sections="1,3", loader_batches=2,
             fold_sections=3, fold_spots=96, fold_steps=None, encoders="resnet18,tiny-vit",
             encoder_px=64, encoder_batch=2, wsi_spots=300, wsi_window=150)
GPU_CHECK = dict(only="step,fold", batch=256, step_sections="24", amp=True, reps=5)  # her2st's sizes otherwise
GPU_CHECK_CPU = dict(only="step,fold", step_sections="3", reps=1, warmup=1, fold_spots=24)


def _px(text):
    """"10000x9000" -> (10000, 9000): width x height in pixels."""
    w, h = (int(v) for v in text.lower().split("x"))
    return w, h


def get_args(argv=None):
    p = argparse.ArgumentParser(description="Measure what Gene-DML costs (see the module docstring).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--only", default=",".join(s for s in SECTIONS if s != "fold"),
                   help=f"comma list of sections to run, of {','.join(SECTIONS)} (fold: an epoch of 9,866 spots, for a GPU)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None, help="bf16 autocast (default: on for CUDA)")
    p.add_argument("--json", default=None, help="also write every figure to this JSON file")
    p.add_argument("--tmp", default=None, help="folder for the synthetic slides and caches (default: system temp); a few GB")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default); 1 is far faster when other jobs share the cores")
    p.add_argument("--quick", action="store_true", help="shrink every size (a smoke run under a minute)")
    # data
    p.add_argument("--slide-px", type=_px, default="10000x9000", help="data: slide width x height (her2st: ~10k x 9k)")
    p.add_argument("--spots", type=int, default=400, help="data: spots on the slide (her2st: ~300-700)")
    p.add_argument("--her2st-root", default=None, help="data: measure a real her2st section from this folder instead")
    p.add_argument("--her2st-section", default="C2", help="data: which real section (one with an image)")
    p.add_argument("--items", type=int, default=200, help="data: items read per served variant")
    p.add_argument("--decode-items", type=int, default=3, help="data: items read when decoding the JPEG per item (seconds each)")
    # step
    p.add_argument("--batch", type=int, default=32, help="step: spots per training step")
    p.add_argument("--crop", type=int, default=224, help="crop / tile size in pixels (data and step)")
    p.add_argument("--genes", type=int, default=250, help="step: genes predicted")
    p.add_argument("--k", type=int, default=18, help="step: k-means groups (her2st 18)")
    p.add_argument("--context", type=int, default=400, help="step: mean spots per section (her2st: ~400, 176-712)")
    p.add_argument("--step-sections", type=lambda t: [int(n) for n in t.split(",")], default="1,24",
                   help="step: sections of the fold the batch is drawn from, one shape each (her2st fold: 24)")
    p.add_argument("--loader-batches", type=int, default=4, help="step: batches read to time the loader")
    # fold (an epoch through train.py's loader)
    p.add_argument("--fold-sections", type=int, default=24, help="fold: sections (her2st fold 0: 24)")
    p.add_argument("--fold-spots", type=int, default=9866, help="fold: spots in all (her2st fold 0: 9,866)")
    p.add_argument("--fold-steps", type=int, default=None, help="fold: time only this many steps (default: the whole epoch)")
    p.add_argument("--workers", type=int, default=None, help="fold: loader workers (default: as train.py, 0 on the CPU)")
    p.add_argument("--gpu-check", action="store_true",
                   help="the one prepared GPU check (< 5 min on one GPU): step and fold at batch 256 in bf16; on the "
                        "CPU the same at a small size")
    p.add_argument("--feat-spots", type=int, default=16, help="step: spots for the frozen-feature rate (26 images each)")
    p.add_argument("--warmup", type=int, default=2, help="step: untimed steps first")
    p.add_argument("--reps", type=int, default=5, help="step: timed steps")
    p.add_argument("--ddp-processes", type=lambda t: [int(n) for n in t.split(",")], default="1,2",
                   help="ddp: process counts to time (CPU: gloo, one thread each; CUDA: NCCL, one GPU each); step sizes as above")
    # eval
    p.add_argument("--eval-spots", type=int, default=4000, help="eval: spots of the slide")
    p.add_argument("--eval-genes", type=int, default=250, help="eval: genes")
    # scale
    p.add_argument("--scale-spots", type=lambda t: [int(n) for n in t.split(",")], default="300,1000,4000,16000", help="scale: spots per section (Visium: ~4,000)")
    p.add_argument("--scale-max-s", type=float, default=60.0, help="scale: skip a size whose estimated time is above this")
    p.add_argument("--scale-max-gb", type=float, default=8.0, help="scale: skip a size whose estimated memory is above this")
    p.add_argument("--cohort-sections", type=int, default=36, help="scale: sections cached (her2st: 36)")
    p.add_argument("--cohort-px", type=_px, default="3000x3000", help="scale: image size per cohort section (real: ~10k x 9k, slower)")
    p.add_argument("--cohort-spots", type=int, default=400, help="scale: spots per cohort section")
    p.add_argument("--encoders", default="resnet18,tiny-vit,uni", help="encoders: which (resnet18, tiny-vit, or a name of encoders.ENCODERS)")
    p.add_argument("--encoder-px", type=int, default=224, help="encoders: image size in pixels")
    p.add_argument("--encoder-batch", type=int, default=8, help="encoders: images per forward (UNI-sized ones: a quarter, at least 1)")
    p.add_argument("--wsi-spots", type=int, default=2000, help="slide: grid spots on the synthetic whole slide (Visium: ~4,000 a slide)")
    p.add_argument("--wsi-window", type=int, default=1000, help="slide: spots per global-level window, against the full pass")
    p.add_argument("--wsi-crop", type=int, default=32, help="slide: crop px of the random-weight model (224 for the real recipe; slow on a CPU)")
    args = p.parse_args(argv)
    if args.gpu_check:  # her2st's real step and fold on a GPU; a small one on the CPU, so that it is tested
        cuda = torch.cuda.is_available() and args.device in ("auto", "cuda")
        p.set_defaults(**(GPU_CHECK if cuda else {**QUICK, **GPU_CHECK_CPU}))
        args = p.parse_args(argv)
    elif args.quick:  # quick sizes become the defaults; flags given explicitly still win
        p.set_defaults(**QUICK)
        args = p.parse_args(argv)
    args.only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(args.only) - set(SECTIONS)
    if unknown:
        p.error(f"--only: unknown section(s) {sorted(unknown)}; choose from {','.join(SECTIONS)}")
    return args


# ----------------------------------------------------------------------------- measuring
def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, reps=1) -> float:
    """Seconds per call of fn, averaged over reps calls (the device is synchronised around them)."""
    sync(device)
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    sync(device)
    return (time.perf_counter() - t) / reps


def _status_mb(field):
    """A memory line of /proc/self/status in MB (None off Linux)."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def reset_peak_rss():
    """Free what Python and malloc hold, then reset the high-water mark, so a peak is this step's."""
    gc.collect()
    try:  # glibc keeps freed heap pages mapped; without this a peak hides under earlier ones
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:  # "5" resets VmHWM to the current RSS (Linux >= 4.0, own process)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss_mb() -> float:
    hwm = _status_mb("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@contextmanager
def counting_kmeans(device, spent):
    """Wrap losses.kmeans (called by instance_group_loss) so its seconds add up in spent["kmeans"]."""
    original = losses.kmeans

    def kmeans(*a, **kw):
        sync(device)
        t = time.perf_counter()
        out = original(*a, **kw)
        sync(device)
        spent["kmeans"] += time.perf_counter() - t
        return out

    losses.kmeans = kmeans
    try:
        yield
    finally:
        losses.kmeans = original


def extrapolate(points, n):
    """y(n) from y = a·N + b·N² (a, b >= 0) through the last two measured (N, y); with one point, N²."""
    if len(points) == 1:
        (n1, y1), = points
        return y1 * (n / n1) ** 2
    (n1, y1), (n2, y2) = points[-2:]
    b = (y2 / n2 - y1 / n1) / (n2 - n1)
    a = y1 / n1 - b * n1
    if b < 0:
        a, b = y2 / n2, 0.0
    elif a < 0:
        a, b = 0.0, y2 / n2 ** 2
    return a * n + b * n * n


def _ddp_worker(rank, world, port, args, device_type, amp, result):
    """One of `world` processes training GeneDML as train.py does (DDP, gathered embeddings, its share
    of the global batch --batch); rank 0 writes the seconds per step to `result`."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    device = distributed.device_for(device_type)
    distributed.init(device)  # a no-op for one process
    b, c, G, N = args.batch // world, args.crop, args.genes, args.context
    torch.manual_seed(rank)   # each process its own spots
    local = torch.randint(0, 256, (b, 3, c, c), dtype=torch.uint8, device=device)
    neighbour, mask = torch.randn(b, 25, 512, device=device), torch.ones(b, 25, dtype=torch.bool, device=device)
    section, index = torch.zeros(b, dtype=torch.long, device=device), torch.randperm(N)[:b].to(device)
    context = GlobalContext.of([(torch.randn(N, 512), grid_xy(N))], device)
    label = 3 * torch.rand(b, G, device=device)
    torch.manual_seed(0)
    model = GeneDML(GeneDMLConfig.for_cohort("her2st", G)).to(device).train()
    ddp = distributed.wrap(model, device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            out = ddp(local, neighbour, mask, section, index, context, expression=label)
        loss, _ = losses.gene_dml_loss(distributed.gather_outputs(out), label, k=args.k)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(args.warmup):
        step()
    distributed.barrier()
    seconds = timed(step, device, args.reps)
    if rank == 0:
        Path(result).write_text(str(seconds))
    distributed.shutdown()


def bench_ddp(args, device, amp, tmp):
    seconds = {}
    for world in args.ddp_processes:
        if device.type == "cuda" and world > torch.cuda.device_count():
            continue  # NCCL wants one GPU per process
        with socket.socket() as s:  # a free port for the process group
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        result = tmp / f"seconds-{world}.txt"
        mp.start_processes(_ddp_worker, args=(world, port, args, device.type, amp, str(result)), nprocs=world,
                           start_method="spawn")
        seconds[world] = float(result.read_text())
    how = "one GPU each, NCCL" if device.type == "cuda" else "one thread each, gloo"
    fig = dict(batch=args.batch, crop=args.crop, context=args.context, how=how,
               steps_per_s={w: 1 / t for w, t in seconds.items()})
    rows = [(f"{w} process{'es' if w > 1 else ''} ({how if w > 1 else how.split(',')[0].replace(' each', '')}), "
             f"global batch {args.batch} at {args.crop} px",
             f"{1 / t:.2f} steps/s") for w, t in seconds.items()]
    return fig, rows


# ----------------------------------------------------------------------------- synthetic inputs
def write_slide(path, width, height, rng):
    """A pink H&E-like JPEG: low-resolution noise blown up 16x (writes fast, decodes like a real slide)."""
    small = rng.integers(0, 60, (height // 16 + 1, width // 16 + 1, 3)) + np.array([190, 130, 170])
    img = Image.fromarray(small.clip(0, 255).astype(np.uint8)).resize((width, height), Image.BILINEAR)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, quality=90)


def synthetic_section(name, image_path, n, width, height, rng, genes=20):
    """A cohorts.Section of n spots on a square grid centred on the image, at most SPOT_PX apart."""
    array_xy = grid_xy(n)
    side = array_xy.max() + 1
    step = min(SPOT_PX, min(width, height) / (side + 1))
    pixel_xy = (array_xy - (side - 1) / 2) * step + np.array([width, height]) / 2  # (n, 2)
    ids = [f"{x}x{y}" for x, y in array_xy]
    counts = pd.DataFrame(rng.poisson(5, (n, genes)).astype(np.float32), index=ids, columns=[f"G{j}" for j in range(genes)])
    return cohorts.Section("her2st", name, name[0], Path(image_path), ids, array_xy, pixel_xy.astype(np.float64), counts)


class CropPerItem:
    """Stands in for SectionCrops.local: cuts spot j's crop from the image each time it is asked."""

    def __init__(self, image, centres, size):
        self.image, self.centres, self.size = image, centres, size

    def __len__(self):
        return len(self.centres)

    def __getitem__(self, j):
        return data.crop_image(self.image, self.centres[j], self.size)


class FakeCrops:
    """What features.extract_features reads: n local crops and, per spot, 25 on-image random tiles."""

    def __init__(self, n, size):
        self.window = np.random.default_rng(0).integers(0, 256, (25, size, size, 3), dtype=np.uint8)
        self.local = self.window[np.arange(n) % 25]  # (n, c, c, 3)

    def tiles(self, i):
        return self.window, np.ones(25, bool)


# ----------------------------------------------------------------------------- sections
def bench_data(args, device, tmp):
    rng = np.random.default_rng(0)
    if args.her2st_root:  # a real section: its JPEG and spots instead of a synthetic slide
        section = cohorts.load_section("her2st", args.her2st_root, args.her2st_section)
        jpg = section.image_path
        with Image.open(jpg) as im:
            width, height = im.size
    else:
        width, height = args.slide_px
        jpg = tmp / "ST-imgs" / "A" / "A1" / "slide.jpg"
        write_slide(jpg, width, height, rng)
        section = synthetic_section("A1", jpg, args.spots, width, height, rng)
    spots = len(section.spot_ids)
    cache = ArrayCache(tmp / "cache")
    reset_peak_rss()
    base = _status_mb("VmRSS") or 0.0
    build = timed(lambda: data.section_crops(section, cache, args.crop, progress=False), device)
    crops = data.section_crops(section, cache, args.crop, progress=False)  # a cache hit now
    image = np.array(crops.image)  # (H, W, 3) decoded, in memory
    in_memory = dataclasses.replace(crops, image=image, local=CropPerItem(image, crops.centres, args.crop))
    genes = list(section.counts.columns)
    order = np.resize(rng.permutation(spots), args.items)
    rates = {}
    for label, c in (("cached", crops), ("in_memory", in_memory)):
        ds = data.SpotDataset([section], [c], genes)  # no features: 25 neighbour tiles per item
        read = lambda: [ds[int(i)] for i in order]
        rates[label + "_first_pass"] = args.items / timed(read, device)  # cached: maps the pages it reads
        rates[label] = args.items / timed(read, device)

    def decode_item(i):
        img = data._decode(jpg)
        data.crop_image(img, section.pixel_xy[i], args.crop)
        data.neighbour_window(img, section.pixel_xy[i], args.crop)

    rates["decode"] = args.decode_items / timed(lambda: [decode_item(int(i)) for i in order[:args.decode_items]], device)
    fig = dict(slide_px=f"{width}x{height}", jpeg_mb=jpg.stat().st_size / 1e6, spots=spots,
               decode_and_cache_s=build, items_per_s=rates, cached_over_in_memory=rates["cached"] / rates["in_memory"],
               cached_over_decode=rates["cached"] / rates["decode"], peak_rss_mb=peak_rss_mb(), start_rss_mb=base)
    rows = [(f"decode + cache build, {width}x{height} JPEG ({fig['jpeg_mb']:.0f} MB), {spots} spots", f"{build:.1f} s"),
            ("items/s from the cache (local + 25 tiles): first / second pass", f"{rates['cached_first_pass']:.1f} / {rates['cached']:.1f}"),
            ("items/s cut per item from in-memory image: first / second", f"{rates['in_memory_first_pass']:.1f} / {rates['in_memory']:.1f}"),
            (f"items/s decoding the JPEG per item ({args.decode_items} items)", f"{rates['decode']:.2f}"),
            ("cache / in-memory (second passes)", f"{fig['cached_over_in_memory']:.2f}x"),
            ("cache / decode per item", f"{fig['cached_over_decode']:.0f}x"),
            ("peak RSS (above the section's start)", f"{fig['peak_rss_mb']:.0f} MB (+{fig['peak_rss_mb'] - base:.0f} MB)")]
    return fig, rows


def bench_step(args, device, amp):
    """The training step at her2st's shape, for each --step-sections S: a fold of S sections of her2st
    sizes (~400 spots each, fold_benchmark), a batch of --batch spots drawn from all of it."""
    fig, rows = {"shapes": {}}, []
    for S in args.step_sections:
        f, r = _step_at(args, device, amp, S)
        fig["shapes"][S] = f
        rows += r
    return fig, rows


def _step_at(args, device, amp, S):
    B, c, G = args.batch, args.crop, args.genes
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if amp else nullcontext
    split = fold_benchmark.synthetic_fold(S, S * args.context, c, tokens=True, device=device, genes=G)
    batch = next(iter(fold_benchmark.loader(split, B, torch.device("cpu"), workers=0)))
    on = lambda x: x.to(device)
    # the loader serves this fold's tokens (frozen mode); the trainable step reads the same spots' crops
    tokens = on(torch.stack([torch.from_numpy(np.array(split.tokens[s][j, 0]).reshape(-1, 512))
                             for s, j in zip(batch["section"].tolist(), batch["index"].tolist())]))
    local = on(torch.stack([torch.from_numpy(split.dataset.crops[s].local[j]).permute(2, 0, 1)
                            for s, j in zip(batch["section"].tolist(), batch["index"].tolist())]))
    neighbour, mask, label = on(batch["neighbour_feats"]), on(batch["neighbour_mask"]), on(batch["label"])
    section, index, layout, context = on(batch["section"]), on(batch["index"]), batch["layout"].to(device), split.context
    fused = dict(fused=device.type in ("cpu", "cuda"))  # as train.py builds its Adam

    def gene_dml(mode):
        model = GeneDML(GeneDMLConfig.for_cohort("her2st", G, local_encoder=mode)).to(device).train()
        opt = torch.optim.Adam(model.parameters(), lr=1e-4, **fused)
        inputs = local if mode == "trainable" else tokens

        def step():
            with autocast():
                out = model(inputs, neighbour, mask, section, index, context, expression=label, layout=layout)
            loss, _ = losses.gene_dml_loss(out, label, k=args.k, sync=False)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return model, opt, step

    def bare_resnet18(channels_last):
        resnet = torchvision.models.resnet18(num_classes=G).to(device).train()
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        resnet = resnet.to(memory_format=fmt)
        opt = torch.optim.Adam(resnet.parameters(), lr=1e-4, **fused)

        def step():
            with autocast():
                pred = resnet(preprocess(local).contiguous(memory_format=fmt))
            loss = F.mse_loss(pred.float(), label)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return step

    model, opt, trainable_step = gene_dml("trainable")
    steps = {"trainable": trainable_step, "frozen": gene_dml("frozen")[2],
             "resnet18": bare_resnet18(False), "resnet18_channels_last": bare_resnet18(True)}

    def fwd_bwd(fn):  # forward + backward of one part of the trainable model, timed alone
        def run():
            with autocast():
                out = fn()
            out.float().sum().backward()
        return run

    parts = {  # where the trainable step's time goes
        "local trunk": fwd_bwd(lambda: model.local_encoder(local)),
        "neighbour level": fwd_bwd(lambda: model.neighbour_encoder(neighbour, mask)),
        "global level": fwd_bwd(lambda: model.global_tokens(section, index, context, layout)),
        "Adam step": opt.step,  # on the gradients the parts above left behind
    }
    # Interleaved: every round times each step once, so a neighbour's load on a shared machine hits
    # all of them alike; the median over rounds is reported.
    for step in [*steps.values(), *parts.values()]:
        for _ in range(args.warmup):
            step()
    times = {name: [] for name in [*steps, *parts]}
    spent = {"kmeans": 0.0}
    for _ in range(args.reps):
        for name, step in [*steps.items(), *parts.items()]:
            with counting_kmeans(device, spent) if name == "trainable" else nullcontext():
                times[name].append(timed(step, device))
    seconds = {name: float(np.median(t)) for name, t in times.items()}
    part_names = list(parts)
    del model, opt, steps, parts

    trunk = build_trunk("none")
    extract_features(trunk, FakeCrops(2, c), device=device, progress=False)  # warm-up
    t = timed(lambda: extract_features(trunk, FakeCrops(args.feat_spots, c), device=device, progress=False), device)
    t_tok = timed(lambda: extract_tokens(trunk, FakeCrops(args.feat_spots, c), device=device, progress=False), device)
    loader_rates = {"trainable": fold_benchmark.items_per_s(_without_tokens(split), B, args.loader_batches),
                    "frozen": fold_benchmark.items_per_s(split, B, args.loader_batches)}
    rate = {k: B / seconds[k] for k in ("trainable", "frozen", "resnet18", "resnet18_channels_last")}
    share = {k: seconds[k] / seconds["trainable"] for k in part_names}
    fig = dict(sections=S, sections_in_batch=int(layout.pad.shape[0]), spots_in_fold=len(split.dataset),
               batch=B, crop=c, amp=amp, reps=args.reps, seconds_per_step=seconds, spots_per_s=rate,
               trainable_over_resnet18=rate["trainable"] / rate["resnet18"],
               frozen_over_resnet18=rate["frozen"] / rate["resnet18"],
               trainable_over_resnet18_channels_last=rate["trainable"] / rate["resnet18_channels_last"],
               frozen_over_trainable=rate["frozen"] / rate["trainable"],
               kmeans_share=spent["kmeans"] / args.reps / seconds["trainable"], shares=share,
               rest_share=1 - sum(share.values()), feature_images_per_s=args.feat_spots * 26 / t,
               token_spots_per_s=args.feat_spots / t_tok, loader_items_per_s=loader_rates)
    where = f"{S} section{'s' if S > 1 else ''} ({len(split.dataset)} spots), batch {B} from {fig['sections_in_batch']} of them"
    rows = [(f"[{where}] trainable local encoder, GeneDML step at {c} px", f"{rate['trainable']:.1f} spots/s"),
            ("  frozen local encoder: GeneDML step on cached tokens", f"{rate['frozen']:.1f} spots/s"),
            ("  bare ResNet18 step, same crops (torchvision, fused Adam)", f"{rate['resnet18']:.1f} spots/s"),
            ("  bare ResNet18 step, channels-last", f"{rate['resnet18_channels_last']:.1f} spots/s"),
            ("  trainable / bare ResNet18 (spots/s)", f"{fig['trainable_over_resnet18']:.2f}x"),
            ("  frozen / bare ResNet18 (spots/s)", f"{fig['frozen_over_resnet18']:.1f}x"),
            ("  trainable / channels-last bare ResNet18", f"{fig['trainable_over_resnet18_channels_last']:.2f}x"),
            ("  frozen / trainable", f"{fig['frozen_over_trainable']:.1f}x")]
    rows += [(f"  share of the trainable step: {k} (timed alone)", f"{100 * v:.1f} %") for k, v in share.items()]
    rows += [("  share of the trainable step: k-means (2 calls)", f"{100 * fig['kmeans_share']:.2g} %"),
             ("  rest: fusion, heads, gene encoder, losses, dropout masks", f"{100 * fig['rest_share']:.1f} %"),
             ("  loader, one process: trainable items (crop + 25 features)", f"{loader_rates['trainable']:.0f} items/s"),
             ("  loader, one process: frozen items (tokens + 25 features)", f"{loader_rates['frozen']:.0f} items/s"),
             ("  frozen features (local + 25 tiles per spot)", f"{fig['feature_images_per_s']:.1f} images/s"),
             ("  frozen tokens (8 transforms of the local crop, float16)", f"{fig['token_spots_per_s']:.1f} spots/s")]
    return fig, rows


def _without_tokens(split):
    """The same fold served as the trainable mode reads it: crops, not tokens."""
    d = split.dataset
    plain = data.SpotDataset.__new__(data.SpotDataset)
    plain.__dict__.update(d.__dict__, tokens=None)
    return dataclasses.replace(split, dataset=plain, tokens=None)


def bench_fold(args, device, amp):
    """One epoch of a synthetic her2st-sized fold per local-encoder mode, through train.py's loader."""
    workers = args.workers if args.workers is not None else \
        min(8, max(1, (os.cpu_count() or 2) - 1)) if device.type == "cuda" else 0
    split = fold_benchmark.synthetic_fold(args.fold_sections, args.fold_spots, args.crop, tokens=True, device=device,
                                          genes=args.genes)
    fig, rows = {"sections": args.fold_sections, "spots": len(split.dataset), "batch": args.batch, "workers": workers}, []
    for mode, s in (("trainable", _without_tokens(split)), ("frozen", split)):
        r = fold_benchmark.train_epoch(s, mode, args.batch, device, amp, workers, warmup=args.warmup,
                                       max_steps=args.fold_steps)
        fig[mode] = r
        mem = f", peak {r['peak_gb']:.1f} GB" if r["peak_gb"] is not None else ""
        if r["sync_free_step"] is not None:
            rows.append((f"{mode}: a step without host-device syncs", "yes" if r["sync_free_step"] is True else
                         f"no: {r['sync_free_step'][:60]}"))
        rows.append((f"{mode}: epoch of {r['steps']} steps x {args.batch} ({args.fold_sections} sections, {workers} workers)",
                     f"{r['seconds']:.1f} s, {r['spots_per_s']:.0f} spots/s, data wait {100 * r['data_wait_share']:.0f} %{mem}"))
        if r["steps"] < len(split.dataset) // args.batch:
            full = r["seconds"] * (len(split.dataset) // args.batch) / r["steps"]
            fig[mode]["epoch_s_extrapolated"] = full
            rows.append((f"  {mode}: the full epoch ({len(split.dataset) // args.batch} steps), extrapolated", f"{full:.1f} s"))
    return fig, rows


def bench_eval(args, device):
    rng = np.random.default_rng(0)
    true = np.log10(1 + rng.gamma(0.5, 20, (args.eval_spots, args.eval_genes)))
    pred = 0.5 * true + rng.normal(0, 0.3, true.shape)

    def per_gene_loop():
        return {"pcc": np.array([np.corrcoef(pred[:, j], true[:, j])[0, 1] for j in range(true.shape[1])]),
                "mse": np.array([((pred[:, j] - true[:, j]) ** 2).mean() for j in range(true.shape[1])]),
                "mae": np.array([np.abs(pred[:, j] - true[:, j]).mean() for j in range(true.shape[1])])}

    vec = min(timed(lambda: slide_metrics(pred, true), device) for _ in range(3))
    loop = min(timed(per_gene_loop, device) for _ in range(3))
    a, b = slide_metrics(pred, true), per_gene_loop()
    diff = max(float(np.abs(a[m] - b[m]).max()) for m in ("pcc", "mse", "mae"))
    fig = dict(spots=args.eval_spots, genes=args.eval_genes, vectorised_s=vec, loop_s=loop, speedup=loop / vec, max_abs_diff=diff)
    rows = [(f"slide_metrics, {args.eval_spots} spots x {args.eval_genes} genes", f"{1e3 * vec:.1f} ms"),
            ("per-gene np.corrcoef loop", f"{1e3 * loop:.1f} ms"),
            ("loop / vectorised", f"{fig['speedup']:.1f}x"),
            ("max |difference| (PCC, MSE, MAE)", f"{diff:.1e}")]
    return fig, rows


def bench_scale(args, device, amp, tmp):
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if amp else nullcontext
    model = GeneDML(GeneDMLConfig.for_cohort("her2st", args.genes, levels=("global",))).to(device).train()  # dropout on

    def fwd_bwd(n):
        context = GlobalContext.of([(torch.randn(n, 512), grid_xy(n))], device)
        section, index = torch.zeros(n, dtype=torch.long), torch.arange(n)  # every spot's row, as prediction needs
        layout = context.grids.layout(section, index).to(device)
        section, index = section.to(device), index.to(device)
        model.zero_grad(set_to_none=True)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        else:
            reset_peak_rss()
            base = _status_mb("VmRSS") or 0.0

        def run():
            with autocast():
                out = model.global_tokens(section, index, context, layout)
            out.float().sum().backward()

        t = timed(run, device)
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20 if device.type == "cuda" else peak_rss_mb() - base
        return t, peak

    fwd_bwd(min(args.scale_spots))  # warm-up
    times, mems, fig, rows = [], [], {"global_level": []}, []
    for n in args.scale_spots:
        est_t, est_mb = (extrapolate(times, n), extrapolate(mems, n)) if times else (0.0, 0.0)
        if est_t > args.scale_max_s or est_mb > 1024 * args.scale_max_gb:
            fig["global_level"].append(dict(spots=n, skipped=True, est_s=est_t, est_mb=est_mb))
            rows.append((f"global level fwd+bwd, {n} spots", f"skipped (est. {est_t:.0f} s, {est_mb / 1024:.1f} GB)"))
            continue
        t, mb = fwd_bwd(n)
        times.append((n, t))
        mems.append((n, mb))
        fig["global_level"].append(dict(spots=n, seconds=t, peak_mb=mb))
        rows.append((f"global level fwd+bwd, {n} spots", f"{t:.2f} s, {mb:.0f} MB"))
    if len(times) > 1:
        (n1, t1), (n2, t2) = times[-2:]
        fig["time_exponent"] = math.log(t2 / t1) / math.log(n2 / n1)
        rows.append((f"time grows as N^{fig['time_exponent']:.2f} from {n1} to {n2}", "attention: O(N²) per section"))
    del model

    # caching a cohort: one section after another, as data.cohort_crops does
    rng = np.random.default_rng(1)
    width, height = args.cohort_px
    names = cohorts.sections_of("her2st", cohorts.COHORTS["her2st"]["patients"])
    names = [names[i % len(names)] + ("" if i < len(names) else f"_{i}") for i in range(args.cohort_sections)]
    write_slide(tmp / "cohort" / "slide.jpg", width, height, rng)
    sections = []
    for name in names:  # a copy per section: each has its own cache entry, as on disk
        jpg = tmp / "cohort" / name / "slide.jpg"
        jpg.parent.mkdir(parents=True)
        shutil.copy(tmp / "cohort" / "slide.jpg", jpg)
        sections.append(synthetic_section(name, jpg, args.cohort_spots, width, height, rng))
    cache, kept, peaks, rss, anon = ArrayCache(tmp / "cohort-cache"), [], [], [], []
    t = time.perf_counter()
    for s in sections:
        reset_peak_rss()
        before = _status_mb("VmRSS") or 0.0
        kept.append(data.section_crops(s, cache, args.crop, progress=False))  # kept, as prepare_split does
        peaks.append(peak_rss_mb() - before)  # this section's own peak
        rss.append(_status_mb("VmRSS") or 0.0)
        anon.append(_status_mb("RssAnon") or 0.0)
    per_section = (time.perf_counter() - t) / len(sections)
    fig["cohort"] = dict(sections=len(sections), px=f"{width}x{height}", spots=args.cohort_spots,
                         seconds_per_section=per_section, section_peak_above_start_mb=peaks,
                         rss_after_each_mb=rss, rss_growth_mb=rss[-1] - rss[0], anon_growth_mb=anon[-1] - anon[0])
    rows += [(f"cache {len(sections)} sections of {width}x{height} px, {args.cohort_spots} spots", f"{per_section:.2f} s/section"),
             ("one section's peak above its start: max / first / last", f"{max(peaks):.0f} / {peaks[0]:.0f} / {peaks[-1]:.0f} MB"),
             (f"RSS after section 1: {rss[0]:.0f} MB; growth to section {len(sections)} (anonymous)",
              f"{rss[-1] - rss[0]:+.0f} MB ({anon[-1] - anon[0]:+.0f} MB)")]
    return fig, rows


def bench_slide(args, device, tmp):
    """--predict SLIDE on a synthetic pyramidal TIFF, cold and warm; the grid windows against the full pass."""
    import evaluate
    import prediction
    import slide
    from features import prepare_split
    try:
        import openslide  # noqa: F401  (the region reader under test)
        import tifffile
    except ImportError as e:
        return {"skipped": str(e)}, [("skipped: needs the optional extras", "pip install tifffile openslide-python openslide-bin")]
    um, pitch, crop_um = 2.0, slide.PITCH_UM["hex"], 112.0
    rng = np.random.default_rng(0)
    # an ellipse of tissue that holds ~wsi_spots hexagonal spots: area = spots x pitch² x sqrt(3)/2
    a = math.sqrt(args.wsi_spots * pitch ** 2 * math.sqrt(3) / 2 / math.pi * 1.3) / um  # semi-axis x, px
    b = a / 1.3
    w, h = int(2 * a + 400), int(2 * b + 400)
    yy, xx = np.mgrid[:h // 8, :w // 8] * 8.0
    inside = ((xx - w / 2) / a) ** 2 + ((yy - h / 2) / b) ** 2 < 1
    blocks = np.where(inside[..., None], rng.integers(0, 90, (h // 8, w // 8, 1)) + np.array([150, 60, 150]), 250)
    img = np.repeat(np.repeat(blocks.astype(np.uint8), 8, 0), 8, 1)  # 8 px blocks: texture the trunk can see
    path = tmp / "slide.tif"
    with tifffile.TiffWriter(path) as tw:
        for lvl in range(3):
            tw.write(img[::2 ** lvl, ::2 ** lvl], tile=(256, 256), photometric="rgb", compression="zlib",
                     subfiletype=int(lvl > 0), resolution=(1e4 / (um * 2 ** lvl),) * 2, resolutionunit="CENTIMETER")
    genes = [f"G{i}" for i in range(50)]
    cfg = GeneDMLConfig.for_cohort("demo", len(genes))
    ckpt = {"model": GeneDML(cfg).state_dict(), "frozen_trunk": build_trunk("none").state_dict(),
            "config": dataclasses.asdict(cfg), "genes": genes, "selection": "validation",
            "data": {"cohort": "bench", "root": "", "crop_size": args.wsi_crop, "crop_um": crop_um, "geometry": "hex",
                     "smooth": True, "fold": None, "normalisation": "log10(1+x), random weights"}}
    torch.save(ckpt, tmp / "ckpt.pt")
    argv = ["--ckpt", str(tmp / "ckpt.pt"), "--predict", str(path), "--cache-dir", str(tmp / "cache"),
            "--out", str(tmp / "out"), "--maps", "1", "--device", str(device), "--batch-size", "64"]
    cold = timed(lambda: evaluate.main(argv), device)
    warm = timed(lambda: evaluate.main(argv), device)
    n = len(pd.read_csv(tmp / "out" / "predictions.csv"))

    # the global level: the full pass against windows of the grid, on the cached features of the same grid
    ns = argparse.Namespace(um_per_px=None, lattice=None, pitch_um=None, crop_um=None, tissue_mask=None)
    section, _ = prediction.grid_section(path, genes, ckpt["data"], ns)
    model, trunk = evaluate.rebuild(ckpt, device)
    split = prepare_split([section], genes, args.wsi_crop, trunk, ArrayCache(tmp / "cache"), device)
    runs = {}
    for label, max_spots in (("full", n), ("windows", args.wsi_window)):
        reset_peak_rss()
        before = _status_mb("VmRSS") or 0.0
        t = time.perf_counter()
        runs[label] = evaluate.predict_slide(model, split, device, 64, max_spots)
        runs[label + "_s"], runs[label + "_peak_mb"] = time.perf_counter() - t, peak_rss_mb() - before
    windows = len(slide.grid_windows(section.array_xy, args.wsi_window))
    full, win = runs["full"], runs["windows"]
    rel = float(np.abs(win - full).mean() / full.std(0).mean())
    r = float(np.nanmean(slide_metrics(win, full)["pcc"]))
    fig = dict(spots=n, px=f"{w}x{h}", um_per_px=um, crop=args.wsi_crop, cold_s=cold, warm_s=warm,
               cold_spots_per_s=n / cold, cold_images_per_s=26 * n / cold, warm_spots_per_s=n / warm,
               windows=windows, window_spots=args.wsi_window, full_s=runs["full_s"], windows_s=runs["windows_s"],
               full_peak_mb=runs["full_peak_mb"], windows_peak_mb=runs["windows_peak_mb"],
               windows_mean_abs_diff_over_spread=rel, windows_pcc_with_full=r)
    rows = [(f"--predict SLIDE, {n} grid spots, {w}x{h} px TIFF, crops {args.wsi_crop} px, cold cache",
             f"{n / cold:.1f} spots/s ({26 * n / cold:.0f} images/s; {cold:.0f} s)"),
            ("  the same, warm cache (prediction and outputs alone)", f"{n / warm:.1f} spots/s ({warm:.1f} s)"),
            (f"global level: full pass over {n} spots", f"{runs['full_s']:.1f} s, peak +{runs['full_peak_mb']:.0f} MB"),
            (f"global level: {windows} windows of <= {args.wsi_window} spots", f"{runs['windows_s']:.1f} s, peak +{runs['windows_peak_mb']:.0f} MB"),
            ("  windows vs full: mean |diff| / spread; per-gene r", f"{rel:.3f}; {r:.3f} (random weights)")]
    return fig, rows


# ----------------------------------------------------------------------------- main
def bench_encoders(args, device):
    """images/s of each encoder's tile features, its counted forward FLOPs, her2st's extraction time."""
    from torch.utils.flop_counter import FlopCounterMode
    fig, rows = {}, []
    for name in [n.strip() for n in args.encoders.split(",") if n.strip()]:
        if name == "resnet18":
            spec, net = encoders.ENCODERS["resnet18"], lambda where: build_trunk("none").to(where)
        else:
            try:
                encoders._timm()
            except ImportError as e:
                rows.append((f"{name}: skipped", str(e)[:60]))
                continue
            spec = encoders.ENCODERS["uni"] if name == "tiny-vit" else encoders.resolve_spec(name)
            if name == "tiny-vit":  # UNI's entry at depth 2, width 64
                spec = dataclasses.replace(spec, name="tiny-vit", width=64,
                                           kwargs=dict(spec.kwargs, depth=2, embed_dim=64, num_heads=2))
            net = lambda where, spec=spec: encoders.build_net(spec, where)
        spec = dataclasses.replace(spec, input_size=None if spec.input_size is None else args.encoder_px)
        with FlopCounterMode(display=False) as flops:  # shapes only: the meta device does no arithmetic
            encoders.FrozenEncoder(spec, net("meta"), {"id": "meta"}).to("meta").features(
                torch.zeros(1, 3, args.encoder_px, args.encoder_px, dtype=torch.uint8, device="meta"))
        encoder = encoders.FrozenEncoder(spec, net("cpu"), {"id": "random"}).to(device)
        big = sum(p.numel() for p in encoder.parameters()) > 100e6
        b = max(1, args.encoder_batch // 4) if big else args.encoder_batch
        x = torch.randint(0, 256, (b, 3, args.encoder_px, args.encoder_px), dtype=torch.uint8, device=device)
        timed(lambda: encoder.features(x), device)  # warm-up (oneDNN picks its kernels per shape)
        t = min(timed(lambda: encoder.features(x), device) for _ in range(1 if big else max(2, args.reps // 2)))
        rate = b / t
        fig[name] = dict(images_per_s=rate, gflop_per_image=flops.get_total_flops() / 1e9, batch=b,
                         params_m=sum(p.numel() for p in encoder.parameters()) / 1e6, precision=encoder.precision(device),
                         her2st_extraction_h=HER2ST_IMAGES / rate / 3600)
        f = fig[name]
        rows.append((f"{name} ({f['params_m']:.0f}M params, {f['gflop_per_image']:.3g} GFLOP/image), batch {b} at {args.encoder_px} px",
                     f"{rate:.2f} images/s"))
        rows.append((f"  her2st's frozen features at that rate ({HER2ST_IMAGES:,} images)", f"{f['her2st_extraction_h']:.2f} h"))
        del encoder
    return fig, rows


def main(argv=None):
    args = get_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    amp = device.type == "cuda" if args.amp is None else args.amp
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    start = time.perf_counter()
    print(f"benchmark on {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}"
          f" ({torch.get_num_threads()} threads), amp {'bf16' if amp else 'off'}, torch {torch.__version__}")
    figures = {"device": str(device), "amp": amp, "args": {k: v for k, v in vars(args).items()}}
    with tempfile.TemporaryDirectory(prefix="gene-dml-bench-", dir=args.tmp) as tmp:
        for name in args.only:
            t = time.perf_counter()
            sub = Path(tmp) / name
            sub.mkdir()
            fig, rows = {"data": lambda: bench_data(args, device, sub), "step": lambda: bench_step(args, device, amp),
                         "fold": lambda: bench_fold(args, device, amp),
                         "eval": lambda: bench_eval(args, device), "ddp": lambda: bench_ddp(args, device, amp, sub),
                         "scale": lambda: bench_scale(args, device, amp, sub),
                         "encoders": lambda: bench_encoders(args, device),
                         "slide": lambda: bench_slide(args, device, sub)}[name]()
            fig["wall_s"] = time.perf_counter() - t
            figures[name] = fig
            print(f"\n== {name} ({fig['wall_s']:.0f} s)")
            for label, value in rows:
                print(f"  {label:<64} {value}")
            shutil.rmtree(sub)  # the next section starts without this one's GBs on disk
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    figures["wall_s"] = time.perf_counter() - start
    print(f"\ntotal {figures['wall_s']:.0f} s")
    if args.json:
        path = Path(args.json)
        tmp_path = path.with_name(f".{path.name}.tmp{os.getpid()}")
        tmp_path.write_text(json.dumps(figures, indent=1, default=str))
        os.replace(tmp_path, path)
    return figures


if __name__ == "__main__":
    main()
