"""
What Gene-DML costs: data serving, a training step, evaluation, and how cost grows with slide size.

    python -m experiments.benchmark                          # every section but fold, CPU defaults (the step: ~30+ min on 2 cores)
    python -m experiments.benchmark --only step,scale --device cuda --json bench.json
    python -m experiments.benchmark --quick                  # every size shrunk: a smoke run under a minute
    python -m experiments.benchmark --gpu-check              # the GPU check: her2st's step and epoch at batch 256, bf16, every mode

Everything runs on synthetic inputs of real sizes, so no data is needed. Each comparison is timed
in the same run and reported as a ratio, which survives a busy machine better than the absolute
figures (on a shared machine both can move; rerun before quoting them, and pass --threads 1 when
other jobs hold cores: torch's threads then wait on each other, up to 20x slower). Sections:

  data   one her2st-sized slide (JPEG of --slide-px, --spots spots ~256 px apart): decoding it and
         building the cache (crops.section_crops), then items/s served by data.SpotDataset (the
         local crop from the cache, the 25 tiles' features), against cutting the crop per item from an
         in-memory decoded image (both read twice: the first pass maps the cache's pages, the second is what
         later epochs see) and against decoding the JPEG per item. Peak RSS of the section.
  step   spots/s of a full training step at her2st's shape: a fold of --step-sections sections of
         her2st sizes (~400 spots each; fold_benchmark), a batch of --batch spots drawn from all of
         it, so the global level runs over every spot of every section the batch touches (one
         packed pass: one padded attention call on CUDA, each section alone on a CPU). GeneDML with all three levels, gene_dml_loss with all losses, fused Adam as
         train.py, with the trainable local encoder (crops) and with the frozen one (cached tokens, and
         online: the frozen encoder's tokens of the step's crops under no_grad, then the same model),
         against a bare torchvision ResNet18 step on the same crops (default and channels-last
         layouts), all timed interleaved, round after round (median); where the trainable step's
         time goes: its local trunk, neighbour and global levels (forward + backward timed alone),
         the Adam step, k-means (losses.kmeans timed by wrapping it) and the rest; the loader's
         items/s in one process (items, stacking and the global layout); the frozen-feature rate
         (features.extract_features: the local crop + 25 tiles per spot) and the token rate
         (features.extract_tokens: 8 transforms of one crop per spot).
  fold   one training epoch over a synthetic her2st-sized fold (--fold-spots spots in --fold-sections
         sections) for each local-encoder mode (--fold-modes: trainable, frozen on cached tokens,
         frozen online), eager or compiled (--fold-compile: train.py --compile, buckets on), fed by
         train.py's loader (workers as train.py picks them) or from the training set on the device
         (--fold-feeds; train.py --data-on-device): spots/s, the share of the timed steps spent waiting
         for data, the epoch's seconds, the first steps' (compiling), peak GPU memory, and on CUDA
         whether a step (and, on the device, fetching its batch) runs without a host-device sync.
         The timed steps follow the warm-up in the same epoch, from the same iterator.
  --gpu-check  the one prepared check for a lent GPU: step (24 sections) and fold at batch 256 in
         bf16, her2st's sizes, every mode, compile off and on, both feeds (unmeasured so far: the
         compiles may take minutes). On a CPU it runs the same code at a small size, eager only.
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
         model (frozen local level) at --wsi-crop px: grid spots/s and peak RSS, cold (region reads,
         frozen features of 26 images a spot and the crop's tokens, untransformed: 27 images a spot;
         prediction) and warm (cache filled: prediction alone). Then the global level's large-grid
         strategy against the full pass on the same grid: time, peak RSS, and how far the windowed
         predictions are from the full pass's (slide.grid_windows, --wsi-window spots a window).

"Peak RSS" is the process's high-water mark (VmHWM), reset at the start of each measurement where
Linux allows it, else resource.getrusage's lifetime peak. On CUDA the step, fold and scale sections
run on the GPU under bf16 autocast (--amp), and fold and scale report torch.cuda.max_memory_allocated;
data and eval are CPU work on any device. The ddp, encoders, scale and slide sections live in
benchmark_scale.py, the timing helpers and synthetic inputs in measure.py.
"""
import argparse
import dataclasses
import gc
import json
import os
import shutil
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image

from genedml import cohorts
from genedml.crops import _decode, crop_image, neighbour_window, section_crops
import data
from experiments import fold_benchmark
import losses
from experiments.benchmark_scale import bench_ddp, bench_encoders, bench_scale, bench_slide
from genedml.cache import ArrayCache
from genedml.features import extract_features, extract_tokens
from experiments.measure import (CropPerItem, FakeCrops, _status_mb, counting_kmeans, peak_rss_mb, reset_peak_rss,
                     synthetic_section, timed, write_slide)
from genedml.metrics import slide_metrics
from model import GeneDML, GeneDMLConfig
from genedml import runtime
from genedml.encoders import as_encoder
from genedml.trunk import Preprocess, build_trunk

SECTIONS = ("data", "step", "fold", "eval", "ddp", "scale", "encoders", "slide")
QUICK = dict(slide_px="2000x2000", spots=64, items=32, decode_items=1, batch=8, crop=64, context=64,
             feat_spots=4, warmup=1, reps=2, eval_spots=500, eval_genes=50, scale_spots="100,300",
             cohort_sections=4, cohort_px="800x800", cohort_spots=36, step_sections="1,3", loader_batches=2,
             fold_sections=3, fold_spots=96, fold_steps=None, encoders="resnet18,tiny-vit",
             encoder_px=64, encoder_batch=2, wsi_spots=300, wsi_window=150)
GPU_CHECK = dict(only="step,fold", batch=256, step_sections="24", amp=True, reps=5, fold_compile="off,on")  # her2st's sizes otherwise
GPU_CHECK_CPU = dict(only="step,fold", step_sections="3", reps=1, warmup=1, fold_spots=16, crop=32)


def _choices(allowed):
    """A comma list of some of `allowed`, for argparse."""
    def parse(text):
        picked = [t.strip() for t in text.split(",") if t.strip()]
        if not picked or set(picked) - set(allowed):
            raise argparse.ArgumentTypeError(f"a comma list of {', '.join(allowed)}, got {text!r}")
        return picked
    return parse


def _px(text):
    """"10000x9000" -> (10000, 9000): width x height in pixels."""
    w, h = (int(v) for v in text.lower().split("x"))
    return w, h


def get_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m experiments.benchmark", description="Measure what Gene-DML costs (see the module docstring).",
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
    p.add_argument("--fold-modes", type=_choices(fold_benchmark.MODES), default=",".join(fold_benchmark.MODES),
                   help="fold: local-encoder modes (online: the frozen encoder on each step's crops, train.py's default on CUDA)")
    p.add_argument("--fold-compile", type=_choices(("off", "on")), default="off",
                   help="fold: eager steps, compiled ones (train.py --compile; inductor, minutes to compile), or both: off,on")
    p.add_argument("--fold-feeds", type=_choices(fold_benchmark.FEEDS), default=",".join(fold_benchmark.FEEDS),
                   help="fold: batches from train.py's loader, or gathered from the training set on the device (--data-on-device)")
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
    build = timed(lambda: section_crops(section, cache, args.crop, progress=False), device)
    crops = section_crops(section, cache, args.crop, progress=False)  # a cache hit now
    image = np.array(crops.image)  # (H, W, 3) decoded, in memory
    in_memory = dataclasses.replace(crops, image=image, local=CropPerItem(image, crops.centres, args.crop))
    genes = list(section.counts.columns)
    order = np.resize(rng.permutation(spots), args.items)
    rates = {}
    for label, c in (("cached", crops), ("in_memory", in_memory)):
        feats = [{"tiles": np.zeros((spots, 25, 512), np.float32)}]  # what a training item reads besides its crop
        ds = data.SpotDataset([section], [c], genes, feats)
        read = lambda: [ds[int(i)] for i in order]
        rates[label + "_first_pass"] = args.items / timed(read, device)  # cached: maps the pages it reads
        rates[label] = args.items / timed(read, device)

    def decode_item(i):
        img = _decode(jpg)
        crop_image(img, section.pixel_xy[i], args.crop)
        neighbour_window(img, section.pixel_xy[i], args.crop)

    rates["decode"] = args.decode_items / timed(lambda: [decode_item(int(i)) for i in order[:args.decode_items]], device)
    fig = dict(slide_px=f"{width}x{height}", jpeg_mb=jpg.stat().st_size / 1e6, spots=spots,
               decode_and_cache_s=build, items_per_s=rates, cached_over_in_memory=rates["cached"] / rates["in_memory"],
               cached_over_decode=rates["cached"] / rates["decode"], peak_rss_mb=peak_rss_mb(), start_rss_mb=base)
    rows = [(f"decode + cache build, {width}x{height} JPEG ({fig['jpeg_mb']:.0f} MB), {spots} spots", f"{build:.1f} s"),
            ("items/s from the cache (local crop + 25 tile features): first / second pass", f"{rates['cached_first_pass']:.1f} / {rates['cached']:.1f}"),
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

    encoder = as_encoder(build_trunk("none")).to(device)  # the online frozen mode's encoder

    def gene_dml(mode, online=False):
        model = GeneDML(GeneDMLConfig.for_cohort("her2st", G, local_encoder=mode)).to(device).train()
        opt = torch.optim.Adam(model.parameters(), lr=1e-4, **fused)
        inputs = local if mode == "trainable" else tokens

        def step():
            # online: the frozen encoder's tokens of this step's crops (under no_grad), then the frozen model
            x = encoder.tokens(local).flatten(1, 2) if online else inputs
            with autocast():
                out = model(x, neighbour, mask, section, index, context, expression=label, layout=layout)
            loss, _ = losses.gene_dml_loss(out, label, k=args.k)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return model, opt, step

    def bare_resnet18(channels_last):
        resnet = torchvision.models.resnet18(num_classes=G).to(device).train()
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        resnet = resnet.to(memory_format=fmt)
        normalise = Preprocess().to(device)  # its constants on the device once, as the trunk holds them
        opt = torch.optim.Adam(resnet.parameters(), lr=1e-4, **fused)

        def step():
            with autocast():
                pred = resnet(normalise(local).contiguous(memory_format=fmt))
            loss = F.mse_loss(pred.float(), label)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return step

    model, opt, trainable_step = gene_dml("trainable")
    steps = {"trainable": trainable_step, "frozen": gene_dml("frozen")[2], "online": gene_dml("frozen", online=True)[2],
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
    loader_rates = {"trainable": fold_benchmark.items_per_s(fold_benchmark.without_tokens(split), B, args.loader_batches),
                    "frozen": fold_benchmark.items_per_s(split, B, args.loader_batches)}
    rate = {k: B / seconds[k] for k in ("trainable", "frozen", "online", "resnet18", "resnet18_channels_last")}
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
            ("  frozen local encoder online: its tokens of the step's crops, then the step", f"{rate['online']:.1f} spots/s"),
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


def bench_fold(args, device, amp):
    """One epoch of a synthetic her2st-sized fold for each local-encoder mode (--fold-modes), compiled
    or not (--fold-compile), fed by train.py's loader or from the device (--fold-feeds)."""
    workers = data.default_workers(device) if args.workers is None else args.workers
    split = fold_benchmark.synthetic_fold(args.fold_sections, args.fold_spots, args.crop, tokens=True, device=device,
                                          genes=args.genes)
    fig, rows = {"sections": args.fold_sections, "spots": len(split.dataset), "batch": args.batch, "workers": workers,
                 "runs": []}, []
    for mode in args.fold_modes:
        for compiled in args.fold_compile:
            served = split if mode == "frozen" else fold_benchmark.without_tokens(split)
            runs = fold_benchmark.train_epochs(served, mode, args.batch, device, amp, workers, warmup=args.warmup,
                                               max_steps=args.fold_steps, compile=compiled == "on", feeds=args.fold_feeds)
            for feed, r in runs.items():
                fig["runs"].append(r)
                name = f"{mode}, compile {compiled}, {'data on the device' if feed == 'device' else f'loader ({workers} workers)'}"
                mem = f", peak {r['peak_gb']:.1f} GB" if r["peak_gb"] is not None else ""
                if r["sync_free_step"] is not None:
                    rows.append((f"{name}: a step without host-device syncs", "yes" if r["sync_free_step"] is True else
                                 f"no: {r['sync_free_step'][:60]}"))
                rows.append((f"{name}: {r['steps']} of {r['epoch_steps']} steps x {args.batch} timed",
                             f"{r['spots_per_s']:.0f} spots/s, data wait {100 * r['data_wait_share']:.0f} %{mem}"))
                rows.append((f"  epoch of {r['epoch_steps']} steps ({args.fold_sections} sections); first steps",
                             f"{r['epoch_s']:.2f} s; {r['warmup_s']:.1f} s"))
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


# ----------------------------------------------------------------------------- main
def main(argv=None):
    args = get_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    amp = device.type == "cuda" if args.amp is None else args.amp
    runtime.setup_cuda(device)  # train.py's set-up: cuDNN autotuning, TF32
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
