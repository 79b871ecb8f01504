"""The benchmark's sections on how cost grows: processes (ddp), slide size (scale), whole slides
(slide) and foundation encoders (encoders). `python -m experiments.benchmark --only ddp,scale,slide,encoders`
runs them; benchmark.py's docstring says what each measures, and its flags set their sizes.
"""
import argparse
import dataclasses
import gc
import math
import os
import socket
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.multiprocessing as mp

import data
from genedml import cohorts
from genedml.crops import section_crops

from genedml import distributed
from genedml import encoders
import losses
from genedml.cache import ArrayCache
from experiments.fold_benchmark import grid_xy
from experiments.measure import _status_mb, extrapolate, peak_rss_mb, reset_peak_rss, synthetic_section, timed, write_slide
from genedml.metrics import slide_metrics
from model import GeneDML, GeneDMLConfig
from genedml.packing import GlobalContext
from genedml.trunk import build_trunk

HER2ST_IMAGES = 13_653 * 26  # her2st's spots x (the local crop + 25 neighbour tiles)


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

    # caching a cohort: one section after another, as cohort_crops does
    rng = np.random.default_rng(1)
    width, height = args.cohort_px
    names = cohorts.sections_of("her2st", cohorts.COHORTS["her2st"]["patients"])
    names = [names[i % len(names)] + ("" if i < len(names) else f"_{i}") for i in range(args.cohort_sections)]
    sections = []
    for name in names:  # a slide of its own per section: the cache is keyed by content, so copies would share one entry
        jpg = tmp / "cohort" / name / "slide.jpg"
        write_slide(jpg, width, height, rng)
        sections.append(synthetic_section(name, jpg, args.cohort_spots, width, height, rng))
    cache, kept, peaks, rss, anon = ArrayCache(tmp / "cohort-cache"), [], [], [], []
    t = time.perf_counter()
    for s in sections:
        reset_peak_rss()
        before = _status_mb("VmRSS") or 0.0
        kept.append(section_crops(s, cache, args.crop, progress=False))  # kept, as prepare_split does
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
    from genedml import prediction
    from genedml import slide
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
    # the frozen local level (the Gene-DML reference's) reads cached tokens: one map a crop at inference
    cfg = dataclasses.replace(GeneDMLConfig.for_cohort("demo", len(genes)), local_encoder="frozen")
    ckpt = {"model": GeneDML(cfg).state_dict(), "frozen_trunk": build_trunk("none").state_dict(),
            "config": dataclasses.asdict(cfg), "genes": genes, "selection": "validation",
            "data": {"cohort": "bench", "root": "", "crop_size": args.wsi_crop, "crop_um": crop_um, "geometry": "hex",
                     "smooth": True, "fold": None, "normalisation": "log10(1+x), random weights"}}
    torch.save(ckpt, tmp / "ckpt.pt")
    argv = ["--ckpt", str(tmp / "ckpt.pt"), "--predict", str(path), "--cache-dir", str(tmp / "cache"),
            "--out", str(tmp / "out"), "--maps", "1", "--device", str(device), "--batch-size", "64"]
    peak = {}
    for label in ("cold", "warm"):  # the first run fills the cache, the second reads it
        reset_peak_rss()
        peak[label + "_s"] = timed(lambda: evaluate.main(argv), device)
        peak[label + "_peak_mb"] = peak_rss_mb()
    cold, warm = peak["cold_s"], peak["warm_s"]
    n = len(pd.read_csv(tmp / "out" / "predictions.csv"))
    images = 27 * n  # a spot's crop (tokens, once) and its 25 tiles and crop again (features): 1 + 26

    # the global level: the full pass against windows of the grid, on the cached features of the same grid
    ns = argparse.Namespace(um_per_px=None, lattice=None, pitch_um=None, crop_um=None, tissue_mask=None)
    section, _ = prediction.grid_section(path, genes, ckpt["data"], ns)
    model, trunk = evaluate.rebuild(ckpt, device)
    split = data.prepare_split([section], genes, args.wsi_crop, trunk, ArrayCache(tmp / "cache"), device, local_tokens=True)
    runs = {}
    for label, max_spots in (("full", n), ("windows", args.wsi_window)):
        reset_peak_rss()
        before = _status_mb("VmRSS") or 0.0
        t = time.perf_counter()
        runs[label] = evaluate.predict_slide(model, split, device, 64, max_spots, evaluate.online(model, trunk))
        runs[label + "_s"], runs[label + "_peak_mb"] = time.perf_counter() - t, peak_rss_mb() - before
    windows = len(slide.grid_windows(section.array_xy, args.wsi_window))
    full, win = runs["full"], runs["windows"]
    rel = float(np.abs(win - full).mean() / full.std(0).mean())
    r = float(np.nanmean(slide_metrics(win, full)["pcc"]))
    fig = dict(spots=n, px=f"{w}x{h}", um_per_px=um, crop=args.wsi_crop, cold_s=cold, warm_s=warm,
               cold_spots_per_s=n / cold, cold_images_per_s=images / cold, warm_spots_per_s=n / warm,
               cold_peak_mb=peak["cold_peak_mb"], warm_peak_mb=peak["warm_peak_mb"],
               windows=windows, window_spots=args.wsi_window, full_s=runs["full_s"], windows_s=runs["windows_s"],
               full_peak_mb=runs["full_peak_mb"], windows_peak_mb=runs["windows_peak_mb"],
               windows_mean_abs_diff_over_spread=rel, windows_pcc_with_full=r)
    rows = [(f"--predict SLIDE, {n} grid spots, {w}x{h} px TIFF, crops {args.wsi_crop} px, cold cache",
             f"{n / cold:.1f} spots/s ({images / cold:.0f} images/s; {cold:.0f} s), peak {peak['cold_peak_mb']:.0f} MB"),
            ("  the same, warm cache (prediction and outputs alone)",
             f"{n / warm:.1f} spots/s ({warm:.1f} s), peak {peak['warm_peak_mb']:.0f} MB"),
            (f"global level: full pass over {n} spots", f"{runs['full_s']:.1f} s, peak +{runs['full_peak_mb']:.0f} MB"),
            (f"global level: {windows} windows of <= {args.wsi_window} spots", f"{runs['windows_s']:.1f} s, peak +{runs['windows_peak_mb']:.0f} MB"),
            ("  windows vs full: mean |diff| / spread; per-gene r", f"{rel:.3f}; {r:.3f} (random weights)")]
    return fig, rows


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
