"""
Evaluate Gene-DML checkpoints on their held-out patients, the way the field reports it.

    python evaluate.py --ckpt runs/demo/best.pt                    # one fold
    python evaluate.py --ckpt runs/her2st/fold*/best.pt            # the cohort table over folds
    python evaluate.py --ckpt best.pt --predict SLIDE              # a slide alone: spots laid on its tissue
    python evaluate.py --ckpt best.pt --predict IMAGE SPOTFILE     # a new slide without counts, at given spots
    python evaluate.py --ckpt best.pt --external my_slides.csv     # external test on another cohort

Per held-out slide: the Pearson r of every gene across the slide's spots, PCC(M) = mean over the
genes, MSE and MAE per gene; then the mean over the slides of a fold, then mean ± std over folds.
PCC(H) is the mean over the 50 "highly predictive genes", ranked by their PCC averaged over folds.
Beside it, the pooled PCC(M) of HEST-Benchmark: each gene's r over the pooled spots of all the
fold's test slides, then the mean over genes (the metrics themselves: metrics.py). An external test scores the genes the other cohort
has (matched by name) and says how many it lacks.
Everything the model needs is read from the checkpoint (loaded with weights_only=True); a checkpoint
trained with a foundation encoder (train.py --encoder uni) also needs that encoder's weights file,
found where it was at training time, or given with --weights, and checked against the recorded hash.
Every mode writes predictions.csv and predictions.h5ad (AnnData as scanpy and squidpy read it: hires and
lowres images, one library a slide; h5ad.py, docs/data.md) and PNG maps over a thumbnail that is decoded
once per slide. --predict SLIDE finds the tissue and lays the spots (prediction.py, slide.py). Inference
reads the frozen local tokens of the crop as it is: only that map is extracted (features.section_tokens).
"""
import argparse
import glob
import json
import logging
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageDraw

import data
from genedml import cohorts
from genedml import distributed
from genedml.cache import ArrayCache
from genedml.checkpoint import check_for_evaluation, load_checkpoint, write_csv  # CSVs written whole (atomic)
from genedml.cli import HelpFormatter, comma_list, number
from genedml.crops import at_field_of_view
from genedml.encoders import rebuild_encoder
from genedml.metrics import highly_predictive_genes, pooled_pcc, shared_genes, slide_metrics, summarise
from model import GeneDML, GeneDMLConfig
from genedml.packing import GlobalContext
from tqdm import tqdm


# Paper Table 1 (MSE / PCC(M) / PCC(H)), for the printed comparison. These are the published
# numbers, chosen with the best epoch on the test fold; see docs/results.md.
PAPER_TABLE1 = {
    "her2st": {"ST-Net": (.260, .194, .345), "BLEEP": (.277, .151, .277),
               "TRIPLEX": (.228, .314, .497), "Gene-DML": (.210, .331, .541)},
    "stnet": {"ST-Net": (.209, .116, .223), "BLEEP": (.235, .095, .193),
              "TRIPLEX": (.202, .206, .352), "Gene-DML": (.179, .237, .384)},
    "cscc": {"ST-Net": (.294, .274, .382), "BLEEP": (.297, .269, .396),
             "TRIPLEX": (.268, .374, .490), "Gene-DML": (.237, .433, .520)},
}

# -----------------------------------------------------------------------------
# running a checkpoint

@torch.no_grad()
def predict(model, loader, context, device, amp=None, encoder=None):
    """Run the image side over a loader (amp: autocast in bf16, float16 where a GPU lacks bf16; default:
    on CUDA, as in training); returns {section index: (predictions (N, G), rows (N,))}. Batches of
    Split.loader carry their global layout. encoder: an online frozen local level's frozen encoder,
    which turns each batch's crops into the tokens the model reads (as the training step does)."""
    model.eval()
    device = torch.device(device)
    amp = device.type == "cuda" if amp is None else amp
    half = torch.bfloat16 if device.type != "cuda" or torch.cuda.is_bf16_supported() else torch.float16
    out = {}
    for batch in loader:
        on = lambda x: x.to(device, non_blocking=True)  # asynchronous from a pinned loader's batches
        layout = on(batch["layout"]) if "layout" in batch else None
        with torch.autocast(device.type, dtype=half, enabled=amp):
            local = on(batch["local"])
            if encoder is not None:
                local = encoder.tokens(local).flatten(1, 2)  # (B, h*w, C)
            pred = model(local, on(batch["neighbour_feats"]), on(batch["neighbour_mask"]),
                         on(batch["section"]), on(batch["index"]), context, layout=layout).prediction.float().cpu()
        for s in batch["section"].unique().tolist():
            m = batch["section"] == s
            p, r = out.get(s, (torch.empty(0, pred.shape[1]), torch.empty(0, dtype=torch.long)))
            out[s] = (torch.cat([p, pred[m]]), torch.cat([r, batch["index"][m]]))
    return {s: (p[r.argsort()].numpy(), r.sort().values.numpy()) for s, (p, r) in out.items()}


def evaluate_split(model, split, device, batch_size=64, amp=None, encoder=None, loader=None):
    """Per-slide metrics of a model on one prepared split (see data.prepare_split); amp and encoder as predict's.
    loader: the split's batches in order (default: split.loader(batch_size), in this process)."""
    preds = predict(model, loader or split.loader(batch_size), split.context, device, amp, encoder)
    per_slide = {}
    for s, (pred, rows) in sorted(preds.items()):
        assert len(rows) == len(split.sections[s].spot_ids), "every spot of a slide must be predicted"
        per_slide[split.sections[s].name] = slide_metrics(pred, split.dataset.labels[s])
    return per_slide, preds


# -----------------------------------------------------------------------------
# outputs a person can open: PNG maps (and CSV tables, checkpoint.write_csv)

def _colour(values):
    """Map values to RGB with a small perceptual ramp (dark blue -> teal -> yellow), no matplotlib."""
    ramp = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], float)
    v = np.asarray(values, dtype=np.float64)
    lo, hi = np.nanmin(v), np.nanmax(v)
    x = np.zeros_like(v) if hi - lo < 1e-12 else (v - lo) / (hi - lo) * (len(ramp) - 1)
    i = np.clip(np.floor(x).astype(int), 0, len(ramp) - 2)
    f = (x - i)[:, None]
    return ((1 - f) * ramp[i] + f * ramp[i + 1]).astype(np.uint8)


def expression_map(thumb, scale, pixel_xy, panels, path, title, spacing=None):
    """Save a PNG: the H&E thumbnail once per panel with the spots coloured by each panel's values.

    thumb: the slide's map thumbnail (PIL RGB, see map_thumbnail) at `scale` thumbnail px per slide
    px, or None for a white canvas around the spots. panels: list of (label, values (N,)), typically
    [("measured", y), ("predicted", y_hat)]. spacing: slide.spot_spacing(pixel_xy), when the caller
    draws several maps of one slide and has it already.
    """
    from genedml import slide
    if thumb is None:  # no image: white canvas around the spots
        scale = 600 / (pixel_xy[:, 0].max() + 100)
        thumb = Image.new("RGB", (600, round((pixel_xy[:, 1].max() + 100) * scale)), "white")
    radius = max(2, round(0.4 * (slide.spot_spacing(pixel_xy) if spacing is None else spacing) * scale))
    canvas = Image.new("RGB", (thumb.width * len(panels), thumb.height + 36), "white")
    for p, (label, values) in enumerate(panels):
        tile = thumb.copy()
        draw = ImageDraw.Draw(tile)
        for (x, y), c in zip(pixel_xy * scale, _colour(values)):
            draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=tuple(int(v) for v in c))
        canvas.paste(tile, (p * thumb.width, 36))
        ImageDraw.Draw(canvas).text((p * thumb.width + 4, 20), label, fill="black")
    ImageDraw.Draw(canvas).text((4, 4), title, fill="black")
    tmp = Path(path).with_name(f".{Path(path).name}.tmp{os.getpid()}.png")
    canvas.save(tmp)
    os.replace(tmp, path)


def map_thumbnail(overview, width=600):
    """The thumbnail every map of a slide is drawn on, made once from its overview (image, scale)."""
    image, scale = overview
    if image is None:
        return None, None
    f = width / image.width
    return image.resize((width, max(1, round(image.height * f))), Image.Resampling.BOX), scale * f


# -----------------------------------------------------------------------------

def get_args(argv=None):
    from genedml import slide
    p = argparse.ArgumentParser(description="Evaluate Gene-DML checkpoints on their held-out slides, on another "
                                "cohort's, or predict a slide without counts (see README).", formatter_class=HelpFormatter)
    g = p.add_argument_group("checkpoints and outputs")
    g.add_argument("--ckpt", nargs="+", required=True, help="one best.pt, or several (one per fold; globs allowed) for the cohort table")
    g.add_argument("--out", default=None, help="output folder (default: <folder of the first checkpoint>/eval)")
    g.add_argument("--root", default=None, help="cohort folder, if it moved since training")
    g.add_argument("--cache-dir", default="cache", help="where decoded images, crops and frozen features are cached")
    g.add_argument("--weights", default=None, help="the frozen encoder's weights file, if the checkpoint's "
                   "(a foundation model's, e.g. pytorch_model.bin) moved since training")
    g.add_argument("--maps", type=number(int, low=0), default=3, help="PNG maps for this many best-predicted genes per slide")
    g.add_argument("--map-genes", default=None, type=comma_list, help="comma list of genes to map instead of the best-predicted ones")
    g.add_argument("--n-hpg", type=number(int, low=1), default=50, help="number of highly predictive genes in PCC(H)")
    g.add_argument("--crop-um", type=number(float, above=0), default=None,
                   help="a crop's field of view in µm, with --external / --predict (default: the checkpoint's)")
    g = p.add_argument_group("external test")
    g.add_argument("--external", default=None, metavar="COHORT",
                   help="score the checkpoint on the slides of another cohort (a built-in name with --root, or a cohort table .csv); genes matched by name")
    g.add_argument("--external-sections", default=None, type=comma_list, help="comma list: with --external, score only these slides")
    g = p.add_argument_group("prediction")
    g.add_argument("--predict", nargs="+", metavar="SLIDE", default=None,
                   help="predict a slide without counts: SLIDE alone (spots laid on the tissue found; docs/data.md, 'Predict a slide'), "
                        "or IMAGE SPOTFILE (a spot file with x, y, pixel_x, pixel_y, or Space Ranger's tissue positions); "
                        "predictions.h5ad has hires/lowres images, one library per slide (obs library_id), X in log10 "
                        "units (uns log1p base 10) (docs/data.md, 'predictions.h5ad')")
    g.add_argument("--tissue-mask", default=None, help="with --predict SLIDE: an image of the tissue (nonzero = tissue, any size) instead of finding it")
    g.add_argument("--mpp", "--um-per-px", dest="um_per_px", type=number(float, above=0), default=None,
                   help="with --predict SLIDE: its microns per pixel (default: the slide's metadata, e.g. openslide.mpp-x)")
    g.add_argument("--pitch-um", type=number(float, above=0), default=None, help="with --predict SLIDE: spot pitch in µm (default: the training cohort's, ST 200, Visium 100)")
    g.add_argument("--lattice", choices=sorted(slide.PITCH_UM), default=None, help="with --predict SLIDE: spot lattice (default: the training cohort's)")
    g.add_argument("--global-max-spots", type=number(int, low=100), default=slide.MAX_GLOBAL_SPOTS,
                   help="with --predict: spots per global-level pass; a larger grid is cut into windows of the array (docs/data.md)")
    g = p.add_argument_group("run")
    g.add_argument("--batch-size", type=number(int, low=1), default=64, help="spots per forward pass")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:1 ...")
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None, help="bf16 mixed precision (default: on for CUDA, as in training)")
    args = p.parse_args(argv)
    if args.predict and len(args.predict) > 2:
        p.error(f"--predict takes SLIDE or IMAGE SPOTFILE, got {len(args.predict)} paths")
    if (not args.predict or len(args.predict) != 1) and (args.tissue_mask or args.um_per_px or args.pitch_um or args.lattice):
        p.error("--tissue-mask, --mpp, --pitch-um and --lattice go with --predict SLIDE (no spot file)")
    if args.external_sections and not args.external:
        p.error("--external-sections goes with --external")
    args.ckpt = [c for pattern in args.ckpt for c in (sorted(glob.glob(pattern)) or [pattern])]
    args.out = Path(args.out or Path(args.ckpt[0]).parent / "eval")
    return args


def online(model, encoder):
    """The frozen encoder when the model's frozen local level reads tokens computed on each crop (online),
    else None (a trainable trunk reads the crops itself; cached tokens come from the loader)."""
    cfg = model.cfg
    return encoder if "local" in cfg.levels and cfg.local_encoder == "frozen" and cfg.frozen_tokens == "online" else None


def rebuild(ckpt, device, weights=None):
    """The model and its frozen encoder, from the checkpoint alone (no download, no training flags), plus
    for a foundation encoder its weights file (`weights`, or where the checkpoint says it was)."""
    cfg = GeneDMLConfig(**{**ckpt["config"], "levels": tuple(ckpt["config"]["levels"])})
    model = GeneDML(cfg)
    model.load_state_dict(ckpt["model"])
    encoder = rebuild_encoder(ckpt.get("encoder"), ckpt["frozen_trunk"], weights, device)
    return model.to(device).eval(), encoder


def predict_slide(model, split, device, batch_size, max_spots, encoder=None, amp=None):
    """Predictions (N, G) for the one slide of a split; on a grid of more than max_spots spots the global
    level sees one window of the array at a time (slide.grid_windows), so its cost stays bounded."""
    from genedml import prediction, slide
    feats, xy = split.context.feats, split.sections[0].array_xy
    windows = slide.grid_windows(xy, max_spots) if "global" in model.cfg.levels else [(np.arange(len(feats)),) * 2]
    if len(windows) > 1:
        print(f"global level: {len(windows)} windows of at most {max_spots} spots (--global-max-spots)")
    # each window is a section of the global level's context; batches are laid out as in training (Collate)
    context = GlobalContext.of([(feats[torch.as_tensor(m, device=feats.device)].cpu(), xy[m]) for m, _ in windows], device)
    loader = torch.utils.data.DataLoader(prediction.WindowSpots(split.dataset, windows), batch_size=batch_size,
                                         collate_fn=data.Collate(context.grids))
    out = predict(model, tqdm(loader, desc="predicting", unit="batch"), context, device, amp, encoder)
    pred = np.zeros((len(feats), model.cfg.n_genes), np.float32)
    for w, (p, rows) in out.items():
        pred[windows[w][0][rows]] = p
    return pred


def predictions_frame(section, genes, pred):
    df = pd.DataFrame({"section": section.name, "spot_id": section.spot_ids,
                       "array_x": section.array_xy[:, 0], "array_y": section.array_xy[:, 1],
                       "pixel_x": section.pixel_xy[:, 0], "pixel_y": section.pixel_xy[:, 1]})
    return pd.concat([df, pd.DataFrame(pred, columns=genes)], axis=1)


def evaluate_checkpoint(path, args, device, sub=""):
    """Evaluate one checkpoint on its held-out sections; writes CSVs and maps into args.out/<name>."""
    from genedml import prediction, slide, visium  # what writing the outputs and --predict / --external need
    ckpt = load_checkpoint(path)
    check_for_evaluation(ckpt, path, held_out=not (args.predict or args.external))
    genes, d = ckpt["genes"], ckpt["data"]
    try:
        model, trunk = rebuild(ckpt, device, args.weights)
    except (TypeError, RuntimeError) as e:  # unknown config field, weights of another shape
        raise ValueError(f"{path}: the model weights do not fit the checkpoint's config "
                         f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    cache = ArrayCache(args.cache_dir)
    crop_um = args.crop_um or d.get("crop_um")  # the field of view the checkpoint was trained on
    grid = None  # --predict SLIDE: the virtual spots and how they were found
    if args.predict and len(args.predict) == 1:
        section, grid = prediction.grid_section(args.predict[0], genes, d, args)
        sections = [section]
    elif args.predict:
        sections = [prediction.spot_file_section(*args.predict, genes, crop_um)]
    elif args.external:  # every slide of another cohort (or --sections of it)
        if args.external.endswith(".csv"):
            cohort, root = visium.register_cohort(args.external, crop_um), args.external
        elif args.external in cohorts.COHORTS:
            cohort, root = args.external, args.root or cohorts.COHORTS[args.external]["root"]
        else:
            raise ValueError(f"--external must be a built-in cohort {sorted(cohorts.COHORTS)} or a cohort table .csv, "
                             f"got {args.external!r}")
        names = args.external_sections or \
            cohorts.sections_of(cohort, list(cohorts.COHORTS[cohort]["patients"]), root=root)
        cohorts.check_cohort(cohort, root, names)
        sections = [cohorts.load_section(cohort, root, n) for n in names]
    else:
        root = args.root or d["root"]
        cohort = visium.cohort_for(d["cohort"], root, crop_um)  # a cohort table is registered again
        cohorts.check_cohort(cohort, root, d["sections"]["test"])
        sections = [cohorts.load_section(cohort, root, n) for n in d["sections"]["test"]]
    if args.crop_um or d.get("crop_from", "native") != "native":  # cut where training cut (a table's already are)
        sections = [at_field_of_view(s, crop_um) for s in sections]
    split = data.prepare_split(sections, genes, d["crop_size"], trunk, cache, device, smooth=d["smooth"],
                          local_tokens=model.cfg.local_encoder == "frozen" and model.cfg.frozen_tokens == "cached")
    tokens_of = online(model, trunk)  # an online frozen local level: the encoder's tokens of each crop
    if args.predict:
        per_slide, preds = {}, {0: (predict_slide(model, split, device, args.batch_size, args.global_max_spots,
                                                  tokens_of, args.amp), None)}
    else:
        per_slide, preds = evaluate_split(model, split, device, args.batch_size, args.amp, tokens_of)
    # Scored genes: all of the checkpoint's, or in an external test those the other cohort has.
    present = set().union(*(s.counts.columns for s in sections)) if args.external else set(genes)
    scored = [j for j, g in enumerate(genes) if g in present]
    if args.external:
        print(f"external test on {args.external}: {len(scored)} of the checkpoint's {len(genes)} genes present, "
              f"{len(genes) - len(scored)} missing{': ' + ', '.join(g for g in genes if g not in present)[:300] if len(scored) < len(genes) else ''}")
        if not scored:
            raise ValueError(f"{args.external}: none of the checkpoint's genes is in its slides")
        per_slide = {name: {m: v[scored] for m, v in met.items()} for name, met in per_slide.items()}
    pooled = pooled_pcc([preds[i][0][:, scored] for i in range(len(sections))],
                        [split.dataset.labels[i][:, scored] for i in range(len(sections))]) if per_slide else None

    unknown = [g for g in args.map_genes or [] if g not in genes]
    if unknown:  # before anything is written
        raise ValueError(f"--map-genes: {', '.join(map(repr, unknown))} not in the checkpoint's gene list")
    # one reduced decode of each slide's image, for its maps and the .h5ad
    overviews = [grid["overview"] if grid else slide.overview(s.image_path)
                 if s.image_path is not None and Path(s.image_path).is_file() else (None, None) for s in sections]

    out = args.out / sub
    (out / "maps").mkdir(parents=True, exist_ok=True)
    write_csv(pd.concat([predictions_frame(s, genes, preds[i][0]) for i, s in enumerate(sections)]),
              out / "predictions.csv")
    prediction.write_anndata(out / "predictions.h5ad", path, ckpt, sections, preds, split, overviews, grid, crop_um)
    if per_slide:
        write_csv(pd.concat([pd.DataFrame({"slide": name, "gene": [genes[j] for j in scored], **m})
                             for name, m in per_slide.items()]), out / "per_gene.csv")
    for i, s in enumerate(sections):
        pcc = np.full(len(genes), np.nan)
        pcc[scored] = per_slide[s.name]["pcc"] if per_slide else 0.0
        chosen = args.map_genes or [genes[j] for j in np.argsort(-np.nan_to_num(pcc, nan=-2), kind="stable")[:args.maps]]
        thumb, scale = map_thumbnail(overviews[i])
        spacing = slide.spot_spacing(s.pixel_xy)  # once per slide, not once per map
        for g in chosen:
            j = genes.index(g)
            panels = [("predicted", preds[i][0][:, j])]
            title = f"{s.name} {g}"
            if per_slide:
                panels.insert(0, ("measured", split.dataset.labels[i][:, j]))
                title += f"  r = {pcc[j]:.3f}"
            expression_map(thumb, scale, s.pixel_xy, panels, out / "maps" / f"{s.name}_{g}.png", title, spacing)
    return ckpt, per_slide, {"genes": [genes[j] for j in scored], "pooled": pooled}


def main(argv=None):
    args = get_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        device = distributed.device_for(args.device)  # a bad --device is an error line, not a traceback
        if len(args.ckpt) > 1 and not args.predict:  # refuse a mixed fold table before the long part
            meta = [(c["data"]["cohort"], c["selection"], c["genes"]) for c in map(load_checkpoint, args.ckpt)]
            cohort_names, selections = sorted({m[0] for m in meta}), sorted({m[1] for m in meta})
            if len(cohort_names) > 1 or len(selections) > 1:
                raise ValueError(f"the checkpoints do not belong together (cohorts {cohort_names}, selection {selections})")
            if not shared_genes([m[2] for m in meta]):
                raise ValueError("the checkpoints do not belong together: no gene is in every fold's list")
        # One output folder per checkpoint, named after its folder (fold0, fold1...) when unique.
        names = [Path(p).parent.name for p in args.ckpt]
        subs = [""] if len(names) == 1 else names if len(set(names)) == len(names) else [f"ckpt{i}" for i in range(len(names))]
        results = [evaluate_checkpoint(p, args, device, sub) for p, sub in zip(args.ckpt, subs)]
    except (ValueError, FileNotFoundError, ImportError) as e:  # ImportError: an optional extra (timm) missing
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.predict:
        print(f"predictions for {args.predict[0]} written to {args.out}")
        return 0
    cohort_names = {r[0]["data"]["cohort"] for r in results}

    # fold table: PCC(M), MSE, MAE per fold over its own genes; PCC(H) over the genes ranked best across
    # folds, among the genes every fold predicts (all of them when the folds share one list). The genes
    # of a fold are those it scored: in an external test, the checkpoint's genes the other cohort has.
    folds = [summarise(per_slide) for _, per_slide, _ in results]
    gene_lists = [extra["genes"] for _, _, extra in results]
    shared = shared_genes(gene_lists)
    every_gene = list(dict.fromkeys(g for genes in gene_lists for g in genes))  # first-seen order
    pcc = pd.DataFrame({f"pcc_fold{i}": pd.Series(g["pcc"], index=genes)
                        for i, ((g, _), genes) in enumerate(zip(folds, gene_lists))}).reindex(every_gene)
    # (all genes, F): NaN where a fold does not predict the gene
    pooled = pd.DataFrame({f"pcc_pooled_fold{i}": pd.Series(extra["pooled"], index=genes)
                           for i, ((_, _, extra), genes) in enumerate(zip(results, gene_lists))}).reindex(every_gene)
    hpg = [shared[i] for i in highly_predictive_genes(pcc.loc[shared].to_numpy().T, args.n_hpg)]
    rows = []
    for (ckpt, per_slide, extra), (per_gene, s), col in zip(results, folds, pcc):
        rows.append({"fold": ckpt["data"]["fold"], "test": ",".join(per_slide), "pcc_m": s["pcc_m"],
                     "pcc_h": float(np.nanmean(pcc.loc[hpg, col])), "mse": s["mse"], "mae": s["mae"],
                     "pcc_m_pooled": float(np.nanmean(extra["pooled"])) if np.isfinite(extra["pooled"]).any() else float("nan"),
                     "genes": len(per_gene["pcc"]), "undefined_pcc": s["undefined_pcc"], "selection": ckpt["selection"]})
    table = pd.DataFrame(rows)
    write_csv(table, args.out / "folds.csv")
    write_csv(pd.concat([pcc, pooled], axis=1).rename_axis("gene").reset_index()
              .assign(hpg=lambda d: d["gene"].isin(hpg)), args.out / "genes.csv")

    cohort = cohort_names.pop()
    if args.external:
        print(f"\n{cohort} checkpoint(s) on external slides {args.external}: {len(gene_lists[0])} of "
              f"{len(results[0][0]['genes'])} genes scored, the others missing there")
        cohort = f"{cohort} -> {args.external}"
    print(f"\n{cohort}: {len(rows)} fold(s), selection on {rows[0]['selection']}")
    if len(shared) < len(pcc):  # per-fold gene lists (train.py --genes-from train)
        print(f"the folds chose their genes separately: {len(pcc)} genes in all, {len(shared)} in every fold; "
              f"PCC(M) is over each fold's own {', '.join(sorted({str(len(g)) for g in gene_lists}))} genes, "
              f"PCC(H) over the {len(hpg)} best of the {len(shared)} shared ones")
    print(table[["fold", "test", "pcc_m", "pcc_h", "mse", "mae", "pcc_m_pooled"]].to_string(index=False, float_format="%.4f"))
    print("pcc_m: per slide, mean over genes then slides (the papers'); pcc_m_pooled: over the pooled spots of the "
          "fold's test slides, then the mean over genes (HEST-Benchmark's)")
    mean = table[["mse", "pcc_m", "pcc_h", "mae", "pcc_m_pooled"]].mean()
    std = table[["mse", "pcc_m", "pcc_h", "mae", "pcc_m_pooled"]].std(ddof=0)
    print(f"\n{'':10s} {'MSE':>15s} {'PCC(M)':>15s} {'PCC(H)':>15s} {'pooled PCC(M)':>15s}")
    print(f"{'ours':10s} " + " ".join(f"{mean[m]:7.3f} ± {std[m]:5.3f}" for m in ("mse", "pcc_m", "pcc_h", "pcc_m_pooled")))
    for method, (mse, pm, ph) in PAPER_TABLE1.get(cohort, {}).items():
        print(f"{method + '*':10s} {mse:15.3f} {pm:15.3f} {ph:15.3f}")
    if cohort in PAPER_TABLE1:
        print("* paper Table 1: all sections, pretrained weights, best epoch chosen on the test fold")
    undefined = int(table["undefined_pcc"].sum())
    if undefined:
        print(f"note: {undefined} (slide, gene) pairs had a constant prediction or label; their PCC is undefined and left out of the means")
    summary = {"cohort": cohort, "folds": len(rows), **{f"{k}_mean": float(v) for k, v in mean.items()},
               **{f"{k}_std": float(v) for k, v in std.items()}, "selection": rows[0]["selection"]}
    tmp = args.out / ".summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=1))
    os.replace(tmp, args.out / "summary.json")
    print(f"wrote {args.out}/folds.csv, genes.csv, summary.json and per-fold predictions, per-gene CSVs and maps")
    return 0


if __name__ == "__main__":
    sys.exit(main())
