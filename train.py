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
from genedml.crops import at_field_of_view, native_crop_um
from genedml.trunk import MIN_CROP
from genedml.checkpoint import CheckpointWriter, check_resume, load_checkpoint, plain, refuse_other_settings, resume_log
from evaluate import evaluate_split
from genedml.cli import HelpFormatter, comma_list, number
from genedml.metrics import summarise
from genedml.features import online_token_statistics, token_statistics
from losses import gene_dml_loss
from model import LEVELS, GeneDML, GeneDMLConfig


# What --data changes besides the cohort's own sizes (cohorts.COHORTS: root, crop, k, genes): the demo is
# sized to finish in minutes on a laptop CPU, so it runs the Gene-DML reference's frozen local encoder
# (README: The demo; trainable: ~2x the time) on random trunks. Explicit flags win over both.
DEMO_RECIPE = dict(epochs=10, batch_size=64, weights="none", local_encoder="frozen")


def get_args(argv=None):
    """The flags, in groups. A flag whose default depends on --data (the cohort's crop size, k, genes; the
    demo's recipe) or on --encoder is filled in by cohort_defaults once those two are known."""
    p = argparse.ArgumentParser(description="Train Gene-DML on one fold (or all folds) of a cohort (see README).",
                                formatter_class=HelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data", default="demo", help=f"cohort: {' | '.join(sorted(cohorts.COHORTS))}, or a cohort table .csv "
                   "of your own slides (docs/data.md: Your own slides)")
    g.add_argument("--root", default=None, help="cohort folder (default: the cohort's, e.g. data/her2st; a cohort table holds its own paths)")
    g.add_argument("--fold", default="0", type=fold_number, help="fold number, or 'all' to run every fold into <out>/fold<i>/")
    g.add_argument("--sections", default=None, type=comma_list, help="comma list: use only these sections (e.g. the ones with images)")
    g.add_argument("--test-sections", default=None, type=comma_list, help="comma list: hold these out instead of the fold's patient")
    g.add_argument("--val-sections", default=None, type=comma_list, help="comma list: select the epoch on these (default: the fold's validation patient)")
    g.add_argument("--genes", default=None, help="gene list file (.txt or .npy) to predict; default: chosen by --genes-from")
    g.add_argument("--genes-from", default="cohort", choices=("cohort", "train"),
                   help="top --n-genes by total count over every section of the cohort (one list for all folds, "
                        "as the published protocol chose it; limited by --sections), or over this fold's training "
                        "sections only (no test-section information in the choice; folds then differ)")
    g.add_argument("--n-genes", type=number(int, low=1), default=None, help="number of genes (default: the cohort's, 250 for real cohorts)")
    g.add_argument("--no-smooth", action="store_true", help="do not 3x3-smooth the labels (the published numbers used smoothing)")
    g.add_argument("--crop-size", type=number(int, low=MIN_CROP), default=None,
                   help="spot crop / neighbour tile size in pixels (default: the cohort's: 224; demo 64)")
    g.add_argument("--crop-um", type=number(float, above=0), default=None,
                   help="a crop's field of view in µm: each slide is resampled so --crop-size px span it (default: a "
                        "cohort table's 112 = 224 px at 0.5 µm/px, HEST-1k's; a foundation encoder's own; else the "
                        "slides' native resolution)")
    g.add_argument("--cache-dir", default="cache", help="where decoded images, crops and frozen features are cached")
    g = p.add_argument_group("model")
    g.add_argument("--encoder", default="resnet18",
                   help=f"the frozen encoder of every level: {' | '.join(encoders.ENCODERS)} | timm:<model>[,key=value...] "
                        "(docs/encoders.md; all but resnet18 need pip install timm). A foundation model's crops are cut "
                        "at the resolution it was trained at, 0.5 µm/px (112 µm; gigapath 128 µm), in every cohort; "
                        "resnet18's and timm's at the slide's own")
    g.add_argument("--weights", default="imagenet", help="encoder weights: resnet18: none | imagenet | path to a checkpoint "
                   "(demo: none); a foundation model: its pytorch_model.bin / .safetensors, hub (its default: fetch the "
                   "published file from the Hugging Face hub, if online) or hub:<repo id>[:<file>]")
    g.add_argument("--levels", default=",".join(LEVELS), type=levels, help="image levels to use, a comma list (ablation: any non-empty subset)")
    g.add_argument("--dim", type=number(int, low=1), default=None, help="shared width D of tokens and embeddings (default: 512; demo: 128)")
    g.add_argument("--local-encoder", default="trainable", choices=["trainable", "frozen"],
                   help="trainable: a ResNet18 trained on each crop (TRIPLEX); frozen: the frozen encoder's token map "
                        "of each crop (the Gene-DML reference; cheaper per step: docs/results.md). The demo and every "
                        "--encoder but resnet18: frozen")
    g.add_argument("--frozen-tokens", default="auto", choices=["auto", "cached", "online"],
                   help="frozen local encoder: cached = token maps extracted once (disk: UNI ~400 KB a spot); online = "
                        "the frozen encoder runs under no_grad on each augmented crop every step (what the reference "
                        "does; cheap on a GPU). auto: online for a foundation encoder or on CUDA, else cached")
    g.add_argument("--no-augment", action="store_true", help="no random flip / 90-degree rotation of the crop (or token grid)")
    g = p.add_argument_group("losses")
    g.add_argument("--tau", type=number(float, above=0), default=0.07, help="temperature of the instance-level InfoNCE")
    g.add_argument("--tau-group", type=number(float, above=0), default=0.07, help="temperature of the instance-group classification")
    g.add_argument("--k", type=number(int, low=1), default=None, help="k-means groups per batch (default: the cohort's, 18 for her2st; clamped to the batch size)")
    g.add_argument("--lam", type=number(float, low=0), default=0.8, help="weight of the instance-group loss (paper: 0.8; 0 switches it off)")
    g.add_argument("--w-inst", type=number(float, low=0), default=1.0, help="weight of the instance-level loss (0 switches it off)")
    g.add_argument("--w-mse", type=number(float, low=0), default=1.0, help="weight of the regression loss")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=number(int, low=0), default=200, help="epochs (demo: 10)")
    g.add_argument("--batch-size", type=number(int, low=1), default=256, help="spots per step over all processes (demo: 64): "
                   "under torchrun each of N processes takes batch/N of them, so lr and results do not depend on N; use 32-64 on a CPU")
    g.add_argument("--gather", default="global", choices=("global", "local"),
                   help="under torchrun: the InfoNCE and k-means see the global batch (as one process would), "
                        "or each process's own share (BLEEP and CLD trained per GPU)")
    g.add_argument("--lr", type=number(float, above=0), default=1e-4, help="Adam learning rate")
    g.add_argument("--patience", type=number(int, low=1), default=20, help="stop after this many epochs without a better selection metric")
    g.add_argument("--select-on-test", action="store_true", help="published protocol: train on every non-test patient and "
                   "choose the best epoch on the held-out fold itself (optimistic; labelled as such)")
    g.add_argument("--seed", type=int, default=2021, help="seeds shuffling, augmentation, dropout and initialisation (the reference's 2021)")
    g = p.add_argument_group("run")
    g.add_argument("--out", default=None, help="output folder (default: runs/<data>)")
    g.add_argument("--resume", default=None, help="continue from a last.pt, with the same flags (--epochs and --patience may change); "
                   "the frozen trunk comes from the checkpoint, so no weights are downloaded")
    g.add_argument("--workers", type=number(int, low=0), default=None, help="DataLoader worker processes, which load and lay "
                   "out the next batches while the device trains on this one (default: 0 on the CPU, where they would take "
                   "the step's cores; on CUDA min(8, cores - 1), persistent)")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:1 ...")
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None, help="bf16 mixed precision (default: on for CUDA)")
    g.add_argument("--log-every", type=number(int, low=1), default=20, help="steps between progress-bar updates of the loss parts")
    g.add_argument("--compile", action="store_true", help="torch.compile the model and the loss: fewer kernel launches a step "
                   "(the first steps compile, minutes); each step's global layout is padded to a few sizes so graphs are reused")
    g.add_argument("--data-on-device", default="auto", choices=("auto", "on", "off"),
                   help="keep the training set (crops or token maps, features, labels) on the device and gather each batch "
                        "there, with no loader workers; auto: on CUDA when it takes at most half the free GPU memory "
                        "(the run's first line says which)")

    known, _ = p.parse_known_args(argv)  # --data and --encoder first: they set the other defaults
    cohort = known.data
    if cohort.endswith(".csv"):  # a cohort table: registered in cohorts.COHORTS under the file's stem
        from genedml import visium  # lazily: only your own slides need the Visium / HEST readers
        if known.root:
            p.error("--root is for built-in cohorts; a cohort table holds its own paths")
        cohort = visium.register_cohort(known.data, known.crop_um)
    elif cohort not in cohorts.COHORTS:
        p.error(f"--data must be one of {sorted(cohorts.COHORTS)} or a cohort table .csv, got {cohort!r}")
    try:
        encoders.resolve_spec(known.encoder)
    except (ValueError, ImportError) as e:
        p.error(str(e))
    p.set_defaults(**cohort_defaults(cohort, known.encoder))
    args = p.parse_args(argv)
    if args.data != cohort:  # the table's path becomes the root, its name the cohort
        args.root, args.data, args.crop_um = args.data, cohort, cohorts.COHORTS[cohort]["crop_um"]
    # the combinations of flags are checked here too, before any slide is read or cropped
    if args.encoder != "resnet18" and args.local_encoder == "trainable":
        p.error(f"--encoder {args.encoder} is frozen at every level: --local-encoder trainable is for resnet18")
    folds = len(cohorts.COHORTS[args.data]["folds"])
    if args.fold != "all" and int(args.fold) >= folds:
        p.error(f"--fold {args.fold}: {args.data} has {folds} folds, 0..{folds - 1} (or 'all')")
    if args.fold == "all" and args.resume:
        p.error("--resume continues one fold; a --fold all run resumes by running the same command again")
    if args.select_on_test and args.val_sections:
        p.error("--select-on-test selects on the test sections: it takes no --val-sections")
    return args


def cohort_defaults(cohort: str, encoder: str) -> dict:
    """The defaults that --data and --encoder set: the cohort's root, crop size, k and gene count, the
    demo's recipe, and a foundation encoder's published weights and frozen local level."""
    spec = cohorts.COHORTS[cohort]
    defaults = dict(root=spec["root"], crop_size=spec["crop"], k=spec["k"], n_genes=spec["genes"], out=f"runs/{cohort}")
    if cohort == "demo":
        defaults.update(DEMO_RECIPE)
    if encoder != "resnet18":  # a foundation model: its published weights, and the reference's frozen local level
        defaults.update(weights="hub", local_encoder="frozen")
    return defaults


def fold_number(text: str) -> str:
    """--fold: a fold number or 'all' (checked against the cohort's folds once --data is known)."""
    if text != "all" and not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a fold number or 'all', got {text!r}")
    return text


def levels(text) -> tuple:
    """--levels: a non-empty comma list of the image levels, in the model's order."""
    names = tuple(comma_list(text))
    unknown = [n for n in names if n not in LEVELS]
    if unknown:
        raise argparse.ArgumentTypeError(f"expected a comma list of {', '.join(LEVELS)}; got {', '.join(unknown)}")
    return names


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def cohort_sections(args):
    """Every section of the cohort, limited to --sections when given."""
    everything = cohorts.sections_of(args.data, list(cohorts.COHORTS[args.data]["patients"]), root=args.root)
    return [n for n in everything if args.sections is None or n in args.sections]


def split_sections(args, fold):
    """Which sections train, select the epoch, and are held out: by patient (the fold), never by spot,
    unless --test-sections / --val-sections name sections explicitly. With --select-on-test there is
    no validation part: every non-test section trains (the published protocol)."""
    names = named_parts(args) if args.test_sections else fold_parts(args, fold)
    for part, ns in names.items():
        if not ns and not (part == "val" and args.select_on_test):
            raise SystemExit(f"fold {fold}: no {part} sections left (check --sections / --test-sections / --val-sections)")
    if len(set(sum(names.values(), []))) < sum(map(len, names.values())):
        raise SystemExit(f"a section is in two of train / val / test: {names}")
    return names


def fold_parts(args, fold):
    """The fold's patients' sections (limited to --sections); --val-sections, when given, select instead
    of the validation patient, who then trains."""
    split = cohorts.fold_split(args.data, fold, select_on_test=args.select_on_test)
    pool = cohort_sections(args)
    names = {part: [n for n in cohorts.sections_of(args.data, split[part], root=args.root) if n in pool]
             for part in ("train", "val", "test")}
    if args.val_sections:
        train = [n for n in names["train"] + names["val"] if n not in args.val_sections]
        names = {"train": train, "val": args.val_sections, "test": names["test"]}
    return names


def named_parts(args):
    """--test-sections held out; --val-sections select (default: the first other section; none under
    --select-on-test); every other section trains."""
    test = args.test_sections
    pool = [n for n in cohort_sections(args) if n not in test]
    if args.select_on_test:
        val = []
    elif args.val_sections:
        val = args.val_sections
    else:
        val = pool[:1]
    return {"train": [n for n in pool if n not in val], "val": val, "test": test}


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
            per_slide, _ = evaluate_split(model, d.splits[d.select_part], run.device, args.batch_size, run.amp,
                                          d.encoder if d.online else None, val_loader)
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
            # last.pt: best.pt's contents plus what --resume needs (Adam's state is 2x the model), and
            # this epoch's log line, which a kill before the append below would otherwise lose
            writer.save({**ckpt, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                         "scaler": scaler.state_dict(), "log": json.loads(json.dumps(record))},  # plain floats
                        run.out / "last.pt")
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
        label, local = on(batch["label"]), on(batch["local"])
        with torch.autocast(device.type, dtype=run.amp_dtype, enabled=run.amp):
            if d.online:  # the frozen encoder's tokens of this step's augmented crops: under no_grad, outside the model
                local = d.encoder.tokens(local).flatten(1, 2)  # (B, h*w, C)
            outputs = ddp(local, on(batch["neighbour_feats"]), on(batch["neighbour_mask"]),
                          on(batch["section"]), on(batch["index"]), d.splits["train"].context,
                          expression=label if use_genes else None, layout=batch["layout"].to(device, non_blocking=True))
        if args.gather == "global" and use_genes:    # under torchrun: InfoNCE and k-means over the global batch
            outputs = distributed.gather_outputs(outputs)
        loss, parts = loss_fn(outputs, label, tau=args.tau, tau_group=args.tau_group, k=args.k,
                              lam=args.lam, w_inst=args.w_inst, w_mse=args.w_mse)
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
    crop_from: str             # "native" (measured at the slides' own resolution), "encoder" or "given": cut at crop_um
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
    cache = ArrayCache(args.cache_dir)
    # Rank 0 fetches the weights and fills the caches (crops, frozen features) first; the other processes
    # wait, then read them. Only rank 0 validates, so only it prepares the validation and test sections.
    # The frozen local level runs its encoder online (on each augmented crop) or reads cached token maps.
    online = runs_online(args, run.device)
    with distributed.main_process_first():
        # a resumed run's encoder is the checkpoint's: nothing downloaded (GPU nodes are often offline)
        if run.resume:  # the checkpoint's own encoder (a foundation model's file must be the same file)
            encoder = encoders.rebuild_encoder(run.resume.get("encoder"), run.resume["frozen_trunk"],
                                               None if str(args.weights).startswith("hub") else args.weights, run.device)
        else:
            encoder = encoders.load_encoder(args.encoder, args.weights, run.device)
        # a foundation encoder's crops are cut at the resolution it was trained at, in every cohort
        crop_um, crop_from = encoders.field_of_view(encoder.spec, args.crop_um)
        sections = {n: at_field_of_view(s, crop_um) for n, s in sections.items()}
        splits = {part: data.prepare_split([sections[n] for n in ns], genes, args.crop_size, encoder, cache, run.device,
                                      smooth=not args.no_smooth, augment=part == "train" and not args.no_augment,
                                      local_tokens=args.local_encoder == "frozen" and not online)
                  for part, ns in names.items() if ns and (run.main or part == "train")}
        train_tokens = None
        if args.local_encoder == "frozen":  # the frozen tokens' per-channel statistics, over the training crops
            train_tokens = online_token_statistics(encoder, splits["train"], cache, run.device) if online \
                else token_statistics(splits["train"].tokens)
    crop_um = crop_um or native_crop_um([sections[n] for n in names["train"]], args.crop_size)
    select_part = "test" if args.select_on_test else "val"
    on_device, feeding = resident.choose(args.data_on_device, splits["train"], run.device)
    if run.main:
        print(f"fold {fold}: train {names['train']}  val {names['val']}  test {names['test']}  "
              f"| {len(splits['train'].dataset)} training spots, {len(genes)} genes ({genes_from}), selection on {select_part}, "
              f"{args.local_encoder}{' (online)' if online else ''} local encoder, {args.encoder} "
              f"({encoder.feature_dim}-d features, {encoder.token_dim}-d tokens)"
              + ("" if crop_from == "native" else f", crops of {crop_um:.4g} µm ({crop_from})")
              + f" | batches: {feeding}{', compiled' if args.compile else ''}")
    # --batch-size is the global batch: under torchrun each process loads its 1/N share of every one.
    train_set = splits["train"].dataset
    if args.batch_size % run.world or len(train_set) < run.world:
        raise SystemExit(f"--batch-size {args.batch_size} (the global batch) and the {len(train_set)} training "
                         f"spots must split into {run.world} equal shares, one per process")
    batches = distributed.ShardedBatchSampler(len(train_set), args.batch_size, drop_last=len(train_set) > args.batch_size,
                                              seed=args.seed, rank=distributed.rank(), world=run.world)
    loader = training_batches(args, splits["train"], batches, run.device, on_device)
    return FoldData(names, sections, genes, crop_um, crop_from, encoder, online, splits, train_tokens, select_part, batches, loader)


def runs_online(args, device) -> bool:
    """Whether a frozen local level runs its encoder on each step's crops (--frozen-tokens online) rather than
    reading cached token maps; auto: online for a foundation encoder (its token maps are large) or on CUDA."""
    if args.local_encoder != "frozen":
        return False
    if args.frozen_tokens == "auto":
        return args.encoder != "resnet18" or device.type == "cuda"
    return args.frozen_tokens == "online"


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
        resume_log(run.out / "log.jsonl", r)  # as if the run had never stopped
    return progress


def fold_checkpoint(args, fold, d: FoldData, model, cfg, epoch, progress: Progress) -> dict:
    """best.pt: everything evaluate.py needs to rebuild the model and its inputs (no optimiser)."""
    geometry = d.sections[d.names["train"][0]].geometry  # the spot lattice, for --predict SLIDE
    return {"model": model.state_dict(), "encoder": d.encoder.record(),
            # the ResNet18's weights travel in the checkpoint; a foundation model's stay in their file (recorded)
            "frozen_trunk": d.encoder.net.state_dict() if d.encoder.spec.arch == "resnet18" else None,
            "config": dataclasses.asdict(cfg), "genes": list(d.genes),
            "data": {"cohort": args.data, "root": str(args.root), "crop_size": args.crop_size, "crop_um": d.crop_um, "crop_from": d.crop_from,
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
