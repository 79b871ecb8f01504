"""
Train Gene-DML on one fold (or all folds) of a spatial-transcriptomics cohort.

    python train.py --data demo                       # synthetic cohort, a few minutes on a CPU
    python train.py --data her2st --epochs 50         # real data (python data.py download her2st)
    python train.py --data her2st --fold all          # every leave-one-patient-out fold + table
    python train.py --data my_slides.csv              # your own Visium / HEST-1k slides (visium.py)
    torchrun --standalone --nproc_per_node 4 train.py --data her2st    # 4 GPUs (see distributed.py)

The story, in order: data (sections, gene list, crops, frozen features) -> model -> losses ->
optimiser -> resume -> loop (train, select on the validation patient, checkpoint, stop early).
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
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import data
from cache import ArrayCache
import demo
import distributed
import evaluate
from evaluate import HelpFormatter, evaluate_split, load_checkpoint, summarise
from features import frozen_trunk, prepare_split, token_statistics
from losses import gene_dml_loss
from model import GeneDML, GeneDMLConfig
import visium

log = logging.getLogger("train")

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
    p.add_argument("--data", default="demo", help=f"cohort: {' | '.join(sorted(data.COHORTS))}, or a cohort table .csv of your own slides (README: Your own slides)")
    p.add_argument("--crop-um", type=float, default=None, help=f"cohort tables only: a crop's field of view in µm; each slide is resampled so --crop-size px span it (default {visium.DEFAULT_CROP_UM:g} = 224 px at 0.5 µm/px, HEST-1k's)")
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
    p.add_argument("--weights", default=None, help="trunk weights: none | imagenet | path to a checkpoint (default: imagenet; demo: none)")
    p.add_argument("--levels", default="local,neighbour,global", help="image levels to use (ablation: any non-empty subset)")
    p.add_argument("--dim", type=int, default=None, help="shared width D of tokens and embeddings (default: 512; demo: 128)")
    p.add_argument("--local-encoder", default=None, choices=["trainable", "frozen"],
                   help="trainable: a ResNet18 trained on each crop (TRIPLEX); frozen: the frozen trunk's 7x7x512 "
                        "token map of each crop, extracted once and cached (the Gene-DML reference; cheaper per step: "
                        "README Results). Default: trainable; demo: frozen")
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
    p.add_argument("--resume", default=None, help="continue from a last.pt")
    p.add_argument("--seed", type=int, default=2021)
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:1 ...")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None, help="mixed precision (default: on for CUDA)")
    p.add_argument("--log-every", type=int, default=20, help="steps between progress-bar updates of the loss parts")
    args = p.parse_args(argv)
    if args.data.endswith(".csv"):  # a cohort table: registered in data.COHORTS under the file's stem
        if args.root:
            p.error("--root is for built-in cohorts; a cohort table holds its own paths")
        args.root = args.data
        args.data = visium.register_cohort(args.data, args.crop_um)
        args.crop_um = data.COHORTS[args.data]["crop_um"]
    elif args.data not in data.COHORTS:
        p.error(f"--data must be one of {sorted(data.COHORTS)} or a cohort table .csv, got {args.data!r}")
    elif args.crop_um is not None:
        p.error("--crop-um applies to cohort tables; built-in cohorts are cropped at their native resolution")

    spec, recipe = data.COHORTS[args.data], RECIPES.get(args.data, RECIPES["default"])
    defaults = dict(root=spec["root"], crop_size=spec["crop"], k=spec["k"], n_genes=spec["genes"],
                    out=f"runs/{args.data}", **recipe)
    for name, value in defaults.items():       # an explicit flag wins, even an explicit 0
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.levels = tuple(l.strip() for l in args.levels.split(",") if l.strip())
    if args.fold != "all" and not args.fold.isdigit():
        p.error(f"--fold must be a number or 'all', got {args.fold!r}")
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
    everything = data.sections_of(args.data, list(data.COHORTS[args.data]["patients"]), root=args.root)
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
        split = data.fold_split(args.data, fold, select_on_test=args.select_on_test)
        names = {part: [n for n in data.sections_of(args.data, split[part], root=args.root) if n in pool]
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


# -----------------------------------------------------------------------------

def save_atomic(obj, path):
    tmp = Path(path).with_name(f".{Path(path).name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def plain(x):
    """Arguments as checkpoint-safe primitives (weights_only=True loads no Path or Namespace)."""
    return {k: (list(v) if isinstance(v, tuple) else str(v) if isinstance(v, Path) else v) for k, v in vars(x).items()}


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


def train_fold(args, fold):
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = distributed.device_for(args.device)     # under torchrun: this process's GPU
    distributed.init(device)                         # a no-op without torchrun
    main_process = distributed.is_main()             # prints, validates and writes files
    if not main_process:                             # the other processes log warnings only
        logging.getLogger().setLevel(logging.WARNING)
    amp = (device.type == "cuda") if args.amp is None else args.amp
    amp_dtype = torch.bfloat16 if device.type != "cuda" or torch.cuda.is_bf16_supported() else torch.float16
    resume = load_checkpoint(args.resume) if args.resume else None
    seed_everything(args.seed)

    # ---- data
    if args.data == "demo":
        with distributed.main_process_first():      # rank 0 writes it, the others then find it there
            demo.make_demo_cohort(args.root)
    names = split_sections(args, fold)
    if resume and resume["config"].get("local_encoder", "trainable") != args.local_encoder:
        raise SystemExit(f"--resume {args.resume} has a {resume['config'].get('local_encoder', 'trainable')} "
                         f"local encoder, not {args.local_encoder}: pass the same --local-encoder")
    if resume and resume["data"]["sections"] != names:
        raise SystemExit(f"--resume {args.resume} was trained on {resume['data']['sections']}, not {names}")
    everything = names["train"] + names["val"] + names["test"]
    data.check_cohort(args.data, args.root, everything)
    sections = {n: data.load_section(args.data, args.root, n) for n in everything}
    if resume:
        genes, genes_from = resume["genes"], args.resume
    elif args.genes:
        genes, genes_from = data.read_gene_list(args.genes), args.genes
    elif args.genes_from == "train":
        genes, genes_from = data.select_genes([sections[n] for n in names["train"]], args.n_genes), "training sections"
    else:  # one list for the cohort: every fold of a cross-validation run gets the same genes
        pool = cohort_sections(args)
        pool += [n for n in everything if n not in pool]  # --test-sections may lie outside --sections
        genes = data.select_genes([sections[n] if n in sections else data.load_section(args.data, args.root, n)
                                   for n in pool], args.n_genes)
        genes_from = f"cohort, {len(pool)} sections"
    # the crop's field of view, so an external test (evaluate.py --external) cuts crops of the same width
    crop_um = args.crop_um or visium.native_crop_um([sections[n] for n in names["train"]], args.crop_size)
    cache = ArrayCache(args.cache_dir)
    # Rank 0 fetches the weights and fills the caches (crops, frozen features) first; the other processes
    # wait, then read them. Only rank 0 validates, so only it prepares the validation and test sections.
    with distributed.main_process_first():
        trunk = frozen_trunk(args.weights, device)
        if resume:
            trunk.load_state_dict(resume["frozen_trunk"])
        splits = {part: prepare_split([sections[n] for n in ns], genes, args.crop_size, trunk, cache, device,
                                      smooth=not args.no_smooth, augment=part == "train" and not args.no_augment,
                                      local_tokens=args.local_encoder == "frozen")
                  for part, ns in names.items() if ns and (main_process or part == "train")}
    select_part = "test" if args.select_on_test else "val"
    if main_process:
        print(f"fold {fold}: train {names['train']}  val {names['val']}  test {names['test']}  "
              f"| {len(splits['train'].dataset)} training spots, {len(genes)} genes ({genes_from}), selection on {select_part}, "
              f"{args.local_encoder} local encoder")
    # --batch-size is the global batch: under torchrun each process loads its 1/N share of every one.
    world, train_set = distributed.world_size(), splits["train"].dataset
    if args.batch_size % world or len(train_set) < world:
        raise SystemExit(f"--batch-size {args.batch_size} (the global batch) and the {len(train_set)} training "
                         f"spots must split into {world} equal shares, one per process")
    batches = distributed.ShardedBatchSampler(len(train_set), args.batch_size, drop_last=len(train_set) > args.batch_size,
                                              seed=args.seed, rank=distributed.rank(), world=world)
    loader = torch.utils.data.DataLoader(train_set, batch_sampler=batches, num_workers=args.workers,
                                         pin_memory=device.type == "cuda")

    # ---- model
    sizes = data.COHORTS[args.data].get("sizes", args.data)  # a cohort table borrows a built-in cohort's encoder sizes
    cfg = GeneDMLConfig.for_cohort(sizes, len(genes), levels=args.levels, local_encoder=args.local_encoder,
                                   **({'dim': args.dim} if args.dim else {}))
    model = GeneDML(cfg).to(device)
    model.load_trunk_weights(trunk.state_dict())    # the trainable local trunk starts where the frozen one is
    model.set_statistics(np.concatenate(splits["train"].dataset.labels),
                         torch.cat([feats for feats, _ in splits["train"].context]).cpu(),
                         tokens=token_statistics(splits["train"].tokens) if splits["train"].tokens else None)
    freeze_unreached(model, args)
    use_genes = bool(args.w_inst or args.lam)       # regression only: the gene side is not run at all

    # ---- optimiser: Adam (fused: one kernel for all parameters), StepLR(20, 0.95), gradient scaling only for float16
    opt = torch.optim.Adam(model.parameters(), lr=args.lr, fused=device.type in ("cpu", "cuda"))
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=20, gamma=0.95)
    scaler = torch.amp.GradScaler(device.type, enabled=amp and amp_dtype == torch.float16)

    # ---- resume
    start, best, best_epoch, bad = 0, -math.inf, -1, 0
    if resume:
        model.load_state_dict(resume["model"])
        opt.load_state_dict(resume["optimizer"])
        sched.load_state_dict(resume["scheduler"])
        scaler.load_state_dict(resume["scaler"])
        start, best, best_epoch, bad = resume["epoch"] + 1, resume["best"]["metric"], resume["best"]["epoch"], resume["best"]["bad_epochs"]
        if main_process:
            print(f"=> loaded checkpoint '{args.resume}' (epoch {resume['epoch']}, best {select_part} PCC(M) {best:.4f} at epoch {best_epoch})")
        # Drop log lines of epochs after the checkpoint (a run killed between its log line and its
        # checkpoint), so the resumed log reads as if the run had never stopped.
        if main_process and (out / "log.jsonl").exists():
            lines = [l for l in (out / "log.jsonl").read_text().splitlines() if json.loads(l)["epoch"] < start]
            (out / "log.jsonl").write_text("".join(l + "\n" for l in lines))

    def checkpoint(epoch):
        return {"model": model.state_dict(), "frozen_trunk": trunk.state_dict(),
                "config": dataclasses.asdict(cfg), "genes": list(genes),
                "data": {"cohort": args.data, "root": str(args.root), "crop_size": args.crop_size, "crop_um": crop_um,
                         "geometry": sections[names["train"][0]].geometry,  # the spot lattice, for --predict SLIDE
                         "smooth": not args.no_smooth, "fold": None if args.test_sections else fold, "sections": names,
                         "normalisation": "counts of the selected genes scaled to 1e4 per spot, log10(1+x)"
                                          + ("" if args.no_smooth else ", 7-spot hexagonal array-grid mean"
                                             if sections[names["train"][0]].geometry == "hex" else ", 3x3 array-grid mean")},
                "selection": "test (published protocol: best epoch chosen on the held-out fold; optimistic)"
                             if args.select_on_test else "validation",
                "args": plain(args), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "scaler": scaler.state_dict(), "epoch": epoch,
                "best": {"metric": best, "epoch": best_epoch, "bad_epochs": bad}}

    ddp = distributed.wrap(model, device)            # DDP under torchrun; the model itself in one process

    # ---- loop
    for epoch in range(start, args.epochs):
        if bad >= args.patience:  # also when resuming a run that had already stopped early
            if main_process:
                print(f"early stop: no better {select_part} PCC(M) for {args.patience} epochs")
            break
        # Every epoch reseeds from (seed, epoch): shuffling, augmentation and dropout then do not
        # depend on what ran before, which makes --resume exact without saving RNG states. The batches
        # are the same on every process; augmentation and dropout draw from each process's own seed.
        batches.set_epoch(epoch)
        seed_everything(args.seed * 1000 + epoch + 10**9 * distributed.rank())
        model.train()
        sums, seen, t0 = {}, 0, time.time()
        bar = tqdm(loader, desc=f"epoch {epoch}", leave=False, dynamic_ncols=True, disable=not main_process)
        for step, batch in enumerate(bar):
            label = batch["label"].to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp):
                outputs = ddp(batch["local"].to(device), batch["neighbour_feats"].to(device),
                              batch["neighbour_mask"].to(device), batch["section"].to(device),
                              batch["index"].to(device), splits["train"].context,
                              expression=label if use_genes else None)
            if args.gather == "global" and use_genes:    # under torchrun: InfoNCE and k-means over the global batch
                outputs = distributed.gather_outputs(outputs)
            loss, parts = gene_dml_loss(outputs, label, tau=args.tau, tau_group=args.tau_group, k=args.k,
                                        lam=args.lam, w_inst=args.w_inst, w_mse=args.w_mse)
            if not torch.isfinite(loss):
                raise SystemExit(f"epoch {epoch} step {step}: non-finite loss {parts}; stopping. "
                                 f"The last good checkpoint is {out / 'last.pt'} (lower --lr or disable --amp).")
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if epoch == start and step == 0 and world > 1:
                distributed.check_every_parameter_trained(model)
            scaler.step(opt)
            scaler.update()
            n = len(label)
            seen += n
            for key, value in parts.items():
                sums[key] = sums.get(key, 0.0) + value * n
            if step % args.log_every == 0:
                bar.set_postfix_str(" ".join(f"{k} {sums[k] / seen:.3f}" for k in ("total", "inst", "group", "mse"))
                                    + f" {seen / (time.time() - t0):.0f} spots/s")
        sched.step()
        train_time = time.time() - t0
        totals = distributed.sum_over_processes([seen, *sums.values()], device)   # log every process's spots
        seen, sums = totals[0], dict(zip(sums, totals[1:]))

        # ---- select: PCC(M) on the validation patient (or, labelled, on the test fold); rank 0 only
        if main_process:
            per_slide, _ = evaluate_split(model, splits[select_part], device, args.batch_size)
            metric = summarise(per_slide)[1]
            score = metric["pcc_m"] if math.isfinite(metric["pcc_m"]) else -math.inf
            improved = score > best
            if improved:
                best, best_epoch, bad = score, epoch, 0
            else:
                bad += 1
            record = {"epoch": epoch, **{f"train_{k}": v / max(seen, 1) for k, v in sums.items()},
                      f"{select_part}_pcc_m": metric["pcc_m"], f"{select_part}_mse": metric["mse"],
                      "lr": opt.param_groups[0]["lr"], "spots_per_s": seen / train_time, "seconds": train_time}
            print(f"epoch {epoch}: loss {record.get('train_total', float('nan')):.4f} "
                  f"(inst {record.get('train_inst', 0):.3f} group {record.get('train_group', 0):.3f} "
                  f"mse {record.get('train_mse', 0):.4f}) | {select_part} PCC(M) {metric['pcc_m']:.4f} "
                  f"MSE {metric['mse']:.4f}{' *' if improved else ''} | {record['spots_per_s']:.0f} spots/s")
            with open(out / "log.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            ckpt = checkpoint(epoch)
            if improved:
                save_atomic(ckpt, out / "best.pt")
            save_atomic(ckpt, out / "last.pt")
        bad = distributed.broadcast(bad, device)   # rank 0's count everywhere: every process stops at the same epoch

    if main_process:
        print(f"best {select_part} PCC(M) {best:.4f} at epoch {best_epoch}; checkpoint {out / 'best.pt'}")
    return out / "best.pt"


# Flags that do not change what a run computes: a re-run of --fold all may differ in these.
RUN_ONLY = {"out", "fold", "resume", "root", "cache_dir", "workers", "device", "log_every"}


def train_all_folds(args):
    """Every fold into <out>/fold<i>/, then the cohort table into <out>/eval/.

    Re-running the same command after an interruption (mid-epoch, between folds, during the table)
    skips the finished folds, resumes the interrupted one from its last.pt (exactly: see the loop's
    reseeding) and rebuilds the table, so it ends where an uninterrupted run ends.
    """
    root_out, best = Path(args.out), []
    for fold in range(len(data.COHORTS[args.data]["folds"])):
        fold_args = argparse.Namespace(**{**vars(args), "out": str(root_out / f"fold{fold}"), "fold": str(fold)})
        last = Path(fold_args.out) / "last.pt"
        if last.is_file():
            ckpt = load_checkpoint(last)
            now = plain(fold_args)
            changed = sorted(k for k in now if k not in RUN_ONLY and ckpt["args"].get(k) != now[k])
            if changed:
                was = ", ".join(f"--{k.replace('_', '-')} {ckpt['args'].get(k)!r}" for k in changed)
                raise SystemExit(f"{last} was trained with other settings ({was}); re-run with those, or give another --out")
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
    except (FileNotFoundError, ValueError) as e:  # bad input: what and where, without a traceback
        sys.exit(f"error: {e}")
    finally:
        distributed.shutdown()
