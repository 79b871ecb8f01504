"""
Train Gene-DML on one fold (or all folds) of a spatial-transcriptomics cohort.

    python train.py --data demo                       # synthetic cohort, a few minutes on a CPU
    python train.py --data her2st --epochs 50         # real data (python data.py download her2st)
    python train.py --data her2st --fold all          # every leave-one-patient-out fold + table
    python train.py --data my_slides.csv              # your own Visium / HEST-1k slides (visium.py)
    python train.py --data her2st --encoder uni --weights ~/models/uni/pytorch_model.bin   # the paper's frozen UNI
    torchrun --standalone --nproc_per_node 4 train.py --data her2st    # 4 GPUs (see distributed.py)

The story, in order, is `train_fold`: start_run (device, processes, precision) -> prepare_data
(sections, gene list, crops, frozen features, the loader) -> build_model -> build_optimiser ->
resume_from -> the loop (train_epoch, select on the validation patient, checkpoint, stop early).
Read train_fold and train_epoch first; the steps follow them. The file is long because of its
flags (get_args: every one with its help) and those steps; checkpoints are checkpoint.py's.
The best epoch is chosen on a validation patient drawn from the training patients; the published
protocol (every non-test patient trains, the best epoch is chosen on the held-out fold itself) is
`--select-on-test`, and every output made that way says so. `--fold all` runs every fold, then the
cohort table; running the same command again after an interruption picks up where it stopped.
"""
import argparse
import dataclasses
import json
import logging
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from genedml import cohorts
import data
from genedml.cache import ArrayCache
from genedml import distributed
from genedml import encoders
from genedml import resident, runtime
import evaluate
from genedml.crops import native_crop_um
from genedml.checkpoint import CheckpointWriter, check_resume, load_checkpoint, plain, refuse_other_settings
from evaluate import evaluate_split
from genedml.cli import HelpFormatter
from genedml.metrics import summarise
from genedml.features import online_token_statistics, token_statistics
from losses import gene_dml_loss
from model import LEVELS, GeneDML, GeneDMLConfig


# Training recipe per cohort; explicit flags override. The reference used 200 epochs with early
# stopping and batches of 256-512; the demo is sized to finish in minutes on a laptop CPU, so it
# runs the Gene-DML reference's frozen local encoder (README: The demo; trainable: ~2x the time).
RECIPES = {
    "demo": dict(epochs=10, batch_size=64, weights="none", local_encoder="frozen"),
    "default": dict(epochs=200, batch_size=256, weights="imagenet", local_encoder="trainable"),
}


def get_args(argv=None):
    p = argparse.ArgumentParser(description="Train Gene-DML (see README).",
                                formatter_class=HelpFormatter)
    # data
    p.add_argument("--data", default="demo", help=f"cohort: {' | '.join(sorted(cohorts.COHORTS))}, or a cohort table .csv of your own slides (docs/data.md: Your own slides)")
    p.add_argument("--crop-um", type=float, default=None, help="cohort tables only: a crop's field of view in µm; each slide is resampled so --crop-size px span it (default 112 = 224 px at 0.5 µm/px, HEST-1k's)")
    p.add_argument("--root", default=None, help="cohort folder (default: the cohort table's, e.g. data/her2st)")
    p.add_argument("--fold", default="0", help="fold number, or 'all' to run every fold into <out>/fold<i>/")
    p.add_argument("--sections", default=None, help="comma list: use only these sections (e.g. the ones with images)")
    p.add_argument("--test-sections", default=None, help="comma list: hold these out instead of the fold's patient")
    p.add_argument("--val-sections", default=None, help="comma list: select the epoch on these (default: the fold's validation patient)")
    p.add_argument("--genes", default=None, help="gene list file (.txt or .npy); default: chosen by --genes-from")
    p.add_argument("--genes-from", default="cohort", choices=("cohort", "train"),
                   help="top --n-genes by total count over every section of the cohort (one list for all folds, "
                        "as the published protocol chose it; limited by --sections), or over this fold's training "
                        "sections only (no test-section information in the choice; folds then differ)")
    p.add_argument("--n-genes", type=int, default=None, help="number of genes (default: cohort table, 250 for real cohorts)")
    p.add_argument("--no-smooth", action="store_true", help="do not 3x3-smooth the labels (the published numbers used smoothing)")
    p.add_argument("--crop-size", type=int, default=None, help="spot crop / neighbour tile size in pixels (default: cohort table)")
    p.add_argument("--cache-dir", default="cache", help="where decoded images, crops and frozen features are cached")
    # model
    p.add_argument("--encoder", default="resnet18",
                   help=f"the frozen encoder of every level: {' | '.join(encoders.ENCODERS)} | timm:<model>[,key=value...] "
                        "(docs/encoders.md; all but resnet18 need pip install timm)")
    p.add_argument("--weights", default=None, help="encoder weights: resnet18: none | imagenet | path to a checkpoint "
                   "(default: imagenet; demo: none); a foundation model: its pytorch_model.bin / .safetensors, hub (default: "
                   "fetch the published file from the Hugging Face hub, if online) or hub:<repo id>[:<file>]")
    p.add_argument("--levels", default="local,neighbour,global", help="image levels to use (ablation: any non-empty subset)")
    p.add_argument("--dim", type=int, default=None, help="shared width D of tokens and embeddings (default: 512; demo: 128)")
    p.add_argument("--local-encoder", default=None, choices=["trainable", "frozen"],
                   help="trainable: a ResNet18 trained on each crop (TRIPLEX); frozen: the frozen encoder's token map "
                        "of each crop (the Gene-DML reference; cheaper per step: docs/results.md). Default: trainable; "
                        "demo and every --encoder but resnet18: frozen")
    p.add_argument("--frozen-tokens", default="auto", choices=["auto", "cached", "online"],
                   help="frozen local encoder: cached = token maps extracted once (disk: UNI ~400 KB a spot); online = "
                        "the frozen encoder runs under no_grad on each augmented crop every step (what the reference "
                        "does; cheap on a GPU). auto: online for a foundation encoder or on CUDA, else cached")
    p.add_argument("--no-augment", action="store_true", help="no random flip / 90-degree rotation of the crop (or token grid)")
    # losses
    p.add_argument("--tau", type=float, default=0.07, help="temperature of the instance-level InfoNCE")
    p.add_argument("--tau-group", type=float, default=0.07, help="temperature of the instance-group classification")
    p.add_argument("--k", type=int, default=None, help="k-means groups per batch (default: cohort table; clamped to the batch size)")
    p.add_argument("--lam", type=float, default=0.8, help="weight of the instance-group loss (paper: 0.8; 0 switches it off)")
    p.add_argument("--w-inst", type=float, default=1.0, help="weight of the instance-level loss (0 switches it off)")
    p.add_argument("--w-mse", type=float, default=1.0, help="weight of the regression loss")
    # optimisation
    p.add_argument("--epochs", type=int, default=None, help="epochs (default: 200; demo: 10)")
    p.add_argument("--batch-size", type=int, default=None, help="spots per step over all processes (default: 256; demo: 64): "
                   "under torchrun each of N processes takes batch/N of them, so lr and results do not depend on N; use 32-64 on a CPU")
    p.add_argument("--gather", default="global", choices=("global", "local"),
                   help="under torchrun: the InfoNCE and k-means see the global batch (as one process would), "
                        "or each process's own share (BLEEP and CLD trained per GPU)")
    p.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate")
    p.add_argument("--patience", type=int, default=20, help="stop after this many epochs without a better selection metric")
    p.add_argument("--select-on-test", action="store_true", help="published protocol: train on every non-test patient and choose the best epoch on the held-out fold itself (optimistic; labelled as such)")
    # run
    p.add_argument("--out", default=None, help="output folder (default: runs/<data>)")
    p.add_argument("--resume", default=None, help="continue from a last.pt, with the same flags (--epochs and --patience may change); "
                   "the frozen trunk comes from the checkpoint, so no weights are downloaded")
    p.add_argument("--seed", type=int, default=2021)
    p.add_argument("--workers", type=int, default=None, help="DataLoader worker processes, which load and lay out the next "
                   "batches while the device trains on this one (default: 0 on the CPU, where they would take the "
                   "step's cores; on CUDA min(8, cores - 1), persistent)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:1 ...")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None, help="mixed precision (default: on for CUDA)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model and the loss: fewer kernel launches a step "
                   "(the first steps compile, minutes); each step's global layout is padded to a few sizes so graphs are reused")
    p.add_argument("--data-on-device", default="auto", choices=("auto", "on", "off"),
                   help="keep the training set (crops or token maps, features, labels) on the device and gather each batch "
                        "there, with no loader workers; auto: on CUDA when it takes at most half the free GPU memory "
                        "(the run's first line says which)")
    p.add_argument("--log-every", type=int, default=20, help="steps between progress-bar updates of the loss parts")
    args = p.parse_args(argv)
    if args.data.endswith(".csv"):  # a cohort table: registered in cohorts.COHORTS under the file's stem
        from genedml import visium  # lazily: only your own slides need the Visium / HEST readers
        if args.root:
            p.error("--root is for built-in cohorts; a cohort table holds its own paths")
        args.root = args.data
        args.data = visium.register_cohort(args.data, args.crop_um)
        args.crop_um = cohorts.COHORTS[args.data]["crop_um"]
    elif args.data not in cohorts.COHORTS:
        p.error(f"--data must be one of {sorted(cohorts.COHORTS)} or a cohort table .csv, got {args.data!r}")
    elif args.crop_um is not None:
        p.error("--crop-um applies to cohort tables; built-in cohorts are cropped at their native resolution")

    spec, recipe = cohorts.COHORTS[args.data], RECIPES.get(args.data, RECIPES["default"])
    try:
        encoders.resolve_spec(args.encoder)
    except (ValueError, ImportError) as e:
        p.error(str(e))
    if args.encoder != "resnet18":  # a foundation model: its published weights, and the reference's frozen local level
        if args.local_encoder == "trainable":
            p.error(f"--encoder {args.encoder} is frozen at every level: --local-encoder trainable is for resnet18")
        recipe = dict(recipe, weights="hub", local_encoder="frozen")
    defaults = dict(root=spec["root"], crop_size=spec["crop"], k=spec["k"], n_genes=spec["genes"],
                    out=f"runs/{args.data}", **recipe)
    for name, value in defaults.items():       # an explicit flag wins, even an explicit 0
        if getattr(args, name) is None:
            setattr(args, name, value)
    # flags are checked here, before any slide is read or cropped
    args.levels = tuple(l.strip() for l in args.levels.split(",") if l.strip())
    unknown = [l for l in args.levels if l not in LEVELS]
    if unknown or not args.levels:
        p.error(f"--levels takes a non-empty comma list of {', '.join(LEVELS)}; got {', '.join(unknown) or 'none'}")
    if args.fold != "all" and not args.fold.isdigit():
        p.error(f"--fold must be a number or 'all', got {args.fold!r}")
    folds = len(cohorts.COHORTS[args.data]["folds"])
    if args.fold != "all" and int(args.fold) >= folds:
        p.error(f"--fold {args.fold}: {args.data} has {folds} folds, 0..{folds - 1} (or 'all')")
    if args.n_genes < 1:
        p.error(f"--n-genes must be at least 1, got {args.n_genes}")
    if args.fold == "all" and args.resume:
        p.error("--resume continues one fold; a --fold all run resumes by running the same command again")
    if args.select_on_test and args.val_sections:
        p.error("--select-on-test selects on the test sections: it takes no --val-sections")
    return args


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def cohort_sections(args):
    """Every section of the cohort, limited to --sections when given."""
    only = set(args.sections.split(",")) if args.sections else None
    everything = cohorts.sections_of(args.data, list(cohorts.COHORTS[args.data]["patients"]), root=args.root)
    return [n for n in everything if only is None or n in only]


def split_sections(args, fold):
    """Which sections train, select the epoch, and are held out: by patient (the fold), never by spot,
    unless --test-sections / --val-sections name sections explicitly. With --select-on-test there is
    no validation part: every non-test section trains (the published protocol)."""
    pool = cohort_sections(args)
    if args.test_sections:
        test = args.test_sections.split(",")
        pool = [n for n in pool if n not in test]
        val = [] if args.select_on_test else args.val_sections.split(",") if args.val_sections else pool[:1]
        names = {"train": [n for n in pool if n not in val], "val": val, "test": test}
    else:
        split = cohorts.fold_split(args.data, fold, select_on_test=args.select_on_test)
        names = {part: [n for n in cohorts.sections_of(args.data, split[part], root=args.root) if n in pool]
                 for part in ("train", "val", "test")}
        if args.val_sections:
            val = args.val_sections.split(",")
            names = {"train": [n for n in names["train"] + names["val"] if n not in val], "val": val, "test": names["test"]}
    for part, ns in names.items():
        if not ns and not (part == "val" and args.select_on_test):
            raise SystemExit(f"fold {fold}: no {part} sections left (check --sections / --test-sections / --val-sections)")
    if len(set(sum(names.values(), []))) < sum(map(len, names.values())):
        raise SystemExit(f"a section is in two of train / val / test: {names}")
    return names


def freeze_unreached(model, args):
    """Freeze the parameters that no loss term reaches when a loss weight is 0: the clustering head
    without the instance-group loss (--lam 0), the gene encoder too when neither pathway runs, the
    regression head without the regression loss. In one process nothing changes (Adam skips a
    parameter without a gradient); DDP waits for every trainable parameter's gradient, and this
    spares it find_unused_parameters, a search of the autograd graph at every step of every run."""
    unreached = {"cluster_head": not args.lam, "gene_encoder": not (args.lam or args.w_inst), "head": not args.w_mse}
    for name, off in unreached.items():
        if off:
            getattr(model, name).requires_grad_(False)


# ----------------------------------------------------------------------------- one fold, step by step
def train_fold(args, fold):
    """Train one fold: the steps below in order, then the loop. Returns the path of its best.pt."""
    run = start_run(args)                                # device, processes, precision, the checkpoint to resume
    d = prepare_data(args, fold, run)                    # sections, genes, crops, frozen features, the loader
    model, cfg = build_model(args, d, run.device)
    opt, sched, scaler = build_optimiser(args, model, run)
    progress = resume_from(args, run, model, opt, sched, scaler, d.select_part)
    ddp = distributed.wrap(model, run.device)            # DDP under torchrun; the model itself in one process
    step_loss = gene_dml_loss
    if args.compile:                                     # fewer, fused kernels; validation runs the plain model
        ddp, step_loss = runtime.compile_step(ddp, gene_dml_loss)
    val_loader = validation_loader(args, d, run) if run.main else None
    # on a GPU best.pt and last.pt are written during the next epoch, each by its own thread
    writer, best_writer = (CheckpointWriter(background=run.device.type == "cuda") for _ in range(2))

    # ---- loop: train an epoch, select on the validation patient (or, labelled, on the test fold), checkpoint
    for epoch in range(progress.start, args.epochs):
        if progress.bad >= args.patience:  # also when resuming a run that had already stopped early
            if run.main:
                print(f"early stop: no better {d.select_part} PCC(M) for {args.patience} epochs")
            break
        seen, sums, train_time = train_epoch(args, epoch, model, ddp, d, opt, sched, scaler, run,
                                             first=epoch == progress.start, loss_fn=step_loss)
        if run.main:  # rank 0 alone validates and writes
            t1 = time.time()
            per_slide, _ = evaluate_split(model, d.splits[d.select_part], run.device, args.batch_size, run.amp, val_loader)
            validation_seconds = time.time() - t1
            metric = summarise(per_slide)[1]
            score = metric["pcc_m"] if math.isfinite(metric["pcc_m"]) else -math.inf
            improved = score > progress.best
            if improved:
                progress.best, progress.best_epoch, progress.bad = score, epoch, 0
            else:
                progress.bad += 1
            record = {"epoch": epoch, **{f"train_{k}": v / max(seen, 1) for k, v in sums.items()},
                      f"{d.select_part}_pcc_m": metric["pcc_m"], f"{d.select_part}_mse": metric["mse"],
                      "lr": opt.param_groups[0]["lr"], "spots_per_s": seen / train_time, "seconds": train_time}
            print(f"epoch {epoch}: loss {record.get('train_total', float('nan')):.4f} "
                  f"(inst {record.get('train_inst', 0):.3f} group {record.get('train_group', 0):.3f} "
                  f"mse {record.get('train_mse', 0):.4f}) | {d.select_part} PCC(M) {metric['pcc_m']:.4f} "
                  f"MSE {metric['mse']:.4f}{' *' if improved else ''} | {record['spots_per_s']:.0f} spots/s")
            t1 = time.time()
            ckpt = fold_checkpoint(args, fold, d, model, cfg, epoch, progress)
            if improved:
                best_writer.save(ckpt, run.out / "best.pt")  # the model, no optimiser: what evaluation reads
            best_seconds = time.time() - t1
            # last.pt: best.pt's contents plus what --resume needs (Adam's state is 2x the model)
            writer.save({**ckpt, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                         "scaler": scaler.state_dict()}, run.out / "last.pt")
            # what validation and checkpointing (both files; best.pt's part alone) kept the loop waiting
            record.update(validation_seconds=validation_seconds, checkpoint_seconds=time.time() - t1,
                          best_seconds=best_seconds)
            with open(run.out / "log.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
        progress.bad = distributed.broadcast(progress.bad, run.device)  # rank 0's count: every process stops together

    writer.wait()
    best_writer.wait()
    if run.main:
        print(f"best {d.select_part} PCC(M) {progress.best:.4f} at epoch {progress.best_epoch}; checkpoint {run.out / 'best.pt'}")
    return run.out / "best.pt"


def train_epoch(args, epoch, model, ddp, d, opt, sched, scaler, run, first=False, loss_fn=None):
    """One pass over the training spots. Returns the spots seen, the summed loss parts and the seconds,
    over every process. ddp and loss_fn: the model and loss the step calls (compiled, with --compile)."""
    loss_fn = loss_fn or gene_dml_loss
    # Every epoch reseeds from (seed, epoch): shuffling, augmentation and dropout then do not
    # depend on what ran before, which makes --resume exact without saving RNG states. The batches
    # are the same on every process; augmentation and dropout draw from each process's own seed.
    d.batches.set_epoch(epoch)
    seed_everything(args.seed * 1000 + epoch + 10**9 * distributed.rank())
    model.train()
    device, use_genes = run.device, bool(args.w_inst or args.lam)  # regression only: the gene side is not run at all
    sums, seen, t0 = {}, 0, time.time()
    # The step never waits for the device: the loss parts are summed where they are, and the loss is
    # checked for being finite at each progress update (the first step's included), not every step.
    nonfinite = torch.zeros((), dtype=torch.bool, device=device)
    bar = tqdm(d.loader, desc=f"epoch {epoch}", leave=False, dynamic_ncols=True, disable=not run.main)
    for step, batch in enumerate(bar):
        on = lambda x: x.to(device, non_blocking=True)
        label = on(batch["label"])
        with torch.autocast(device.type, dtype=run.amp_dtype, enabled=run.amp):
            outputs = ddp(on(batch["local"]), on(batch["neighbour_feats"]), on(batch["neighbour_mask"]),
                          on(batch["section"]), on(batch["index"]), d.splits["train"].context,
                          expression=label if use_genes else None, layout=batch["layout"].to(device, non_blocking=True))
        if args.gather == "global" and use_genes:    # under torchrun: InfoNCE and k-means over the global batch
            outputs = distributed.gather_outputs(outputs)
        loss, parts = loss_fn(outputs, label, tau=args.tau, tau_group=args.tau_group, k=args.k,
                              lam=args.lam, w_inst=args.w_inst, w_mse=args.w_mse, sync=False)
        nonfinite |= ~torch.isfinite(loss.detach())
        if step % args.log_every == 0:
            stop_if_nonfinite(nonfinite, f"epoch {epoch} step {step}", run)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if first and step == 0 and run.world > 1:
            distributed.check_every_parameter_trained(model)
        scaler.step(opt)
        scaler.update()
        n = len(label)
        seen += n
        for key, value in parts.items():
            sums[key] = sums.get(key, 0.0) + value * n
        if step % args.log_every == 0:
            bar.set_postfix_str(" ".join(f"{k} {float(sums[k]) / seen:.3f}" for k in ("total", "inst", "group", "mse"))
                                + f" {seen / (time.time() - t0):.0f} spots/s")
    stop_if_nonfinite(nonfinite, f"epoch {epoch} (its last steps)", run)
    sched.step()
    train_time = time.time() - t0
    sums = {k: float(v) for k, v in sums.items()}
    totals = distributed.sum_over_processes([seen, *sums.values()], device)   # log every process's spots
    return totals[0], dict(zip(sums, totals[1:])), train_time


def stop_if_nonfinite(flag, when, run):
    """Stop on a non-finite loss; every process takes the decision together (one process stopping
    alone would leave the others waiting in the next collective)."""
    failed = distributed.ranks_where(flag, run.device)
    if failed:
        where = f" on process(es) {failed} of {run.world}" if run.world > 1 else ""
        raise SystemExit(f"{when}: non-finite loss{where}; stopping. The last good checkpoint is "
                         f"{run.out / 'last.pt'} (lower --lr or disable --amp).")


# ---- the steps
@dataclass
class Run:
    """Where and how this process trains."""
    out: Path
    device: torch.device
    main: bool                 # the process that prints, validates and writes files (rank 0 under torchrun)
    amp: bool
    amp_dtype: torch.dtype
    resume: dict | None        # the last.pt --resume continues from
    world: int                 # processes (torchrun's), 1 without it


def start_run(args) -> Run:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = distributed.device_for(args.device)     # under torchrun: this process's GPU
    distributed.init(device)                         # a no-op without torchrun
    main_process = distributed.is_main()
    if not main_process:                             # the other processes log warnings only
        logging.getLogger().setLevel(logging.WARNING)
    amp = (device.type == "cuda") if args.amp is None else args.amp
    amp_dtype = torch.bfloat16 if device.type != "cuda" or torch.cuda.is_bf16_supported() else torch.float16
    runtime.setup_cuda(device)                       # cuDNN autotuning, TF32 (the benchmarks' set-up too)
    resume = load_checkpoint(args.resume) if args.resume else None
    seed_everything(args.seed)
    return Run(out, device, main_process, amp, amp_dtype, resume, distributed.world_size())


@dataclass
class FoldData:
    """What a fold trains and selects on."""
    names: dict                # part ("train", "val", "test") -> section names
    sections: dict             # name -> cohorts.Section
    genes: list
    crop_um: float | None      # a crop's field of view, so an external test cuts crops of the same width
    encoder: object            # the frozen encoder (encoders.FrozenEncoder)
    online: bool               # a frozen local level that runs the encoder on each step's crops
    splits: dict               # part -> data.Split (rank 0 holds all, the others "train" only)
    train_tokens: tuple | None  # (mean, std) of the frozen local tokens over the training crops
    select_part: str           # "val", or "test" under --select-on-test
    batches: object            # distributed.ShardedBatchSampler
    loader: object             # the training DataLoader


def prepare_data(args, fold, run) -> FoldData:
    """Sections, the gene list, crops and frozen features of each part, the training loader."""
    if args.data == "demo":
        from genedml import demo  # lazily: only the demo writes its cohort
        with distributed.main_process_first():      # rank 0 writes it, the others then find it there
            demo.make_demo_cohort(args.root)
    names = split_sections(args, fold)
    if run.resume:
        check_resume(run.resume, args, names)
    everything = names["train"] + names["val"] + names["test"]
    cohorts.check_cohort(args.data, args.root, everything)
    sections = {n: cohorts.load_section(args.data, args.root, n) for n in everything}
    if run.resume:
        genes, genes_from = run.resume["genes"], args.resume
    elif args.genes:
        genes, genes_from = data.read_gene_list(args.genes), args.genes
    elif args.genes_from == "train":
        genes, genes_from = data.select_genes([sections[n] for n in names["train"]], args.n_genes), "training sections"
    else:  # one list for the cohort: every fold of a cross-validation run gets the same genes
        pool = cohort_sections(args)
        pool += [n for n in everything if n not in pool]  # --test-sections may lie outside --sections
        genes = data.select_genes([sections[n] if n in sections else cohorts.load_section(args.data, args.root, n)
                                   for n in pool], args.n_genes)
        genes_from = f"cohort, {len(pool)} sections"
    crop_um = args.crop_um or native_crop_um([sections[n] for n in names["train"]], args.crop_size)
    cache = ArrayCache(args.cache_dir)
    # Rank 0 fetches the weights and fills the caches (crops, frozen features) first; the other processes
    # wait, then read them. Only rank 0 validates, so only it prepares the validation and test sections.
    # The frozen local level runs its encoder online (on each augmented crop) or reads cached token maps.
    online = args.local_encoder == "frozen" and (args.frozen_tokens == "online" or args.frozen_tokens == "auto"
                                                 and (args.encoder != "resnet18" or run.device.type == "cuda"))
    with distributed.main_process_first():
        # a resumed run's encoder is the checkpoint's: nothing downloaded (GPU nodes are often offline)
        if run.resume:  # the checkpoint's own encoder (a foundation model's file must be the same file)
            encoder = encoders.rebuild_encoder(run.resume.get("encoder"), run.resume["frozen_trunk"],
                                               None if str(args.weights).startswith("hub") else args.weights, run.device)
        else:
            encoder = encoders.load_encoder(args.encoder, args.weights, run.device)
        splits = {part: data.prepare_split([sections[n] for n in ns], genes, args.crop_size, encoder, cache, run.device,
                                      smooth=not args.no_smooth, augment=part == "train" and not args.no_augment,
                                      local_tokens=args.local_encoder == "frozen" and not online)
                  for part, ns in names.items() if ns and (run.main or part == "train")}
        train_tokens = None
        if args.local_encoder == "frozen":  # the frozen tokens' per-channel statistics, over the training crops
            train_tokens = online_token_statistics(encoder, splits["train"], cache, run.device) if online \
                else token_statistics(splits["train"].tokens)
    select_part = "test" if args.select_on_test else "val"
    on_device, feeding = resident.choose(args.data_on_device, splits["train"], run.device)
    if run.main:
        print(f"fold {fold}: train {names['train']}  val {names['val']}  test {names['test']}  "
              f"| {len(splits['train'].dataset)} training spots, {len(genes)} genes ({genes_from}), selection on {select_part}, "
              f"{args.local_encoder}{' (online)' if online else ''} local encoder, {args.encoder} "
              f"({encoder.feature_dim}-d features, {encoder.token_dim}-d tokens) | batches: {feeding}"
              f"{', compiled' if args.compile else ''}")
    # --batch-size is the global batch: under torchrun each process loads its 1/N share of every one.
    train_set = splits["train"].dataset
    if args.batch_size % run.world or len(train_set) < run.world:
        raise SystemExit(f"--batch-size {args.batch_size} (the global batch) and the {len(train_set)} training "
                         f"spots must split into {run.world} equal shares, one per process")
    batches = distributed.ShardedBatchSampler(len(train_set), args.batch_size, drop_last=len(train_set) > args.batch_size,
                                              seed=args.seed, rank=distributed.rank(), world=run.world)
    loader = training_batches(args, splits["train"], batches, run.device, on_device)
    return FoldData(names, sections, genes, crop_um, encoder, online, splits, train_tokens, select_part, batches, loader)


def training_batches(args, split, batches, device, on_device: bool):
    """The training set gathered on the device (resident.py), or the loader whose workers lay out
    batches ahead; with --compile each layout padded to a few sizes (packing.bucket)."""
    if on_device:
        return resident.ResidentBatches(split, batches, device, buckets=args.compile)
    return split.train_loader(batches, device, args.workers, buckets=args.compile)


def validation_loader(args, d: FoldData, run):
    """The selection split's batches in order, with the training loader's workers, prefetch and pinning."""
    split = d.splits[d.select_part]
    return split.loader(args.batch_size, **split.loader_settings(args.batch_size, run.device, args.workers))


def build_model(args, d: FoldData, device):
    sizes = cohorts.COHORTS[args.data].get("sizes", args.data)  # a cohort table borrows a built-in cohort's encoder sizes
    cfg = GeneDMLConfig.for_cohort(sizes, len(d.genes), levels=args.levels, local_encoder=args.local_encoder,
                                   frozen_tokens="online" if d.online else "cached", feat_dim=d.encoder.feature_dim,
                                   token_dim=d.encoder.token_dim, **({'dim': args.dim} if args.dim else {}))
    model = GeneDML(cfg).to(device)
    model.attach_encoder(d.encoder)                   # online: the local level runs it (never trained, never saved)
    model.load_trunk_weights(d.encoder.net.state_dict())  # the trainable local trunk starts where the frozen one is
    model.set_statistics(np.concatenate(d.splits["train"].dataset.labels),
                         d.splits["train"].context.feats.cpu(), tokens=d.train_tokens)
    freeze_unreached(model, args)
    return model, cfg


def build_optimiser(args, model, run):
    """Adam (fused: one kernel for all parameters), StepLR(20, 0.95), gradient scaling only for float16."""
    opt = torch.optim.Adam(model.parameters(), lr=args.lr, fused=run.device.type in ("cpu", "cuda"))
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=20, gamma=0.95)
    scaler = torch.amp.GradScaler(run.device.type, enabled=run.amp and run.amp_dtype == torch.float16)
    return opt, sched, scaler


@dataclass
class Progress:
    start: int = 0             # the first epoch to run
    best: float = -math.inf    # the best selection PCC(M) so far
    best_epoch: int = -1
    bad: int = 0               # epochs since it last improved (early stopping)


def resume_from(args, run, model, opt, sched, scaler, select_part) -> Progress:
    """A fresh Progress, or the resumed checkpoint's states and progress."""
    if not run.resume:
        return Progress()
    r = run.resume
    model.load_state_dict(r["model"])
    opt.load_state_dict(r["optimizer"])
    sched.load_state_dict(r["scheduler"])
    scaler.load_state_dict(r["scaler"])
    progress = Progress(r["epoch"] + 1, r["best"]["metric"], r["best"]["epoch"], r["best"]["bad_epochs"])
    if run.main:
        print(f"=> loaded checkpoint '{args.resume}' (epoch {r['epoch']}, best {select_part} PCC(M) "
              f"{progress.best:.4f} at epoch {progress.best_epoch})")
        # Drop log lines of epochs after the checkpoint (a run killed between its log line and its
        # checkpoint), so the resumed log reads as if the run had never stopped.
        log_file = run.out / "log.jsonl"
        if log_file.exists():
            lines = [l for l in log_file.read_text().splitlines() if json.loads(l)["epoch"] < progress.start]
            log_file.write_text("".join(l + "\n" for l in lines))
    return progress


def fold_checkpoint(args, fold, d: FoldData, model, cfg, epoch, progress: Progress) -> dict:
    """best.pt: everything evaluate.py needs to rebuild the model and its inputs (no optimiser)."""
    geometry = d.sections[d.names["train"][0]].geometry  # the spot lattice, for --predict SLIDE
    return {"model": model.state_dict(), "encoder": d.encoder.record(),
            # the ResNet18's weights travel in the checkpoint; a foundation model's stay in their file (recorded)
            "frozen_trunk": d.encoder.net.state_dict() if d.encoder.spec.arch == "resnet18" else None,
            "config": dataclasses.asdict(cfg), "genes": list(d.genes),
            "data": {"cohort": args.data, "root": str(args.root), "crop_size": args.crop_size, "crop_um": d.crop_um,
                     "geometry": geometry,
                     "smooth": not args.no_smooth, "fold": None if args.test_sections else fold, "sections": d.names,
                     "normalisation": "counts of the selected genes scaled to 1e4 per spot, log10(1+x)"
                                      + ("" if args.no_smooth else ", 7-spot hexagonal array-grid mean"
                                         if geometry == "hex" else ", 3x3 array-grid mean")},
            "selection": "test (published protocol: best epoch chosen on the held-out fold; optimistic)"
                         if args.select_on_test else "validation",
            "args": plain(args), "epoch": epoch,
            "best": {"metric": progress.best, "epoch": progress.best_epoch, "bad_epochs": progress.bad}}


def train_all_folds(args):
    """Every fold into <out>/fold<i>/, then the cohort table into <out>/eval/.

    Re-running the same command after an interruption (mid-epoch, between folds, during the table)
    skips the finished folds, resumes the interrupted one from its last.pt (exactly: see
    train_epoch's reseeding) and rebuilds the table, so it ends where an uninterrupted run ends.
    """
    root_out, best = Path(args.out), []
    for fold in range(len(cohorts.COHORTS[args.data]["folds"])):
        fold_args = argparse.Namespace(**{**vars(args), "out": str(root_out / f"fold{fold}"), "fold": str(fold)})
        last = Path(fold_args.out) / "last.pt"
        if last.is_file():
            ckpt = load_checkpoint(last)
            refuse_other_settings(ckpt["args"], fold_args, last)
            if ckpt["epoch"] + 1 >= args.epochs or ckpt["best"]["bad_epochs"] >= args.patience:
                if distributed.is_main():
                    print(f"fold {fold}: finished earlier (best epoch {ckpt['best']['epoch']}), {last.parent / 'best.pt'}")
                best.append(last.parent / "best.pt")
                continue
            fold_args.resume = str(last)
        best.append(train_fold(fold_args, fold))
    if not distributed.is_main():  # under torchrun, rank 0 alone builds the table
        return best
    rc = evaluate.main(["--ckpt", *map(str, best), "--out", str(root_out / "eval"), "--cache-dir", args.cache_dir,
                        *(["--root", str(args.root)] if args.root else [])])
    if rc != 0:
        raise SystemExit(f"error: the cohort table of {root_out} could not be built (evaluate.py exited {rc}, "
                         "reason above); the folds are saved: fix the cause and re-run the same command")
    return best


def main(argv=None):
    args = get_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.fold != "all":
        return train_fold(args, int(args.fold))
    return train_all_folds(args)


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError, ImportError) as e:  # bad input or a missing extra: what and where
        sys.exit(f"error: {e}")
    finally:
        distributed.shutdown()
