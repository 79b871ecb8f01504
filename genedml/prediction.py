"""Predicting slides that have no counts: the spots to predict, and the AnnData that holds the result.

    spot file    `spot_file_section`: a her2st-style spot file (x, y, pixel_x, pixel_y), or Space
                 Ranger's positions, known by their columns whatever the file is named (visium_files.py)
    no spots     `grid_section`: a virtual grid on the tissue found (slide.py), with the geometry and
                 field of view of the checkpoint's training slides
    big grids    `WindowSpots`: a slide's spots served window by window (slide.grid_windows), so the
                 global level attends over one window of the array at a time (evaluate.predict_slide)
    AnnData      `write_anndata`: predictions.h5ad for every mode of evaluate.py (h5ad.py writes it)

A predicted slide's cohort says where its spots came from, and so names its cache entries (crops,
features, tokens): "predict" at a spot file's spots, "predict-grid" on a grid laid on the tissue. The
same image predicted both ways keeps both sets of entries instead of evicting the other's.

Imports run one way: cohorts, visium, visium_files, slide, h5ad -> prediction -> evaluate.
"""
import hashlib
import importlib.util
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from genedml import cohorts
from genedml import h5ad
from genedml import slide
from genedml import visium
from genedml import visium_files

GRID = "predict-grid"  # the cohort of a slide's virtual spots; a spot file's are "predict" (here and visium.py)
PREDICTED = ("predict", GRID)  # cohorts without counts: nothing measured to store beside the predictions
SPOT_UM = {"square": 100.0, "hex": 65.0}  # a spot's diameter: ST's 100 µm; Visium's as Space Ranger states it
#                                          (a "theoretical" 65 µm spot: the 55 µm capture area and its halo)


def spot_file_section(image, spots, genes, crop_um=None):
    """A cohorts.Section for a slide that has an image and a spot file but no counts. A Space Ranger
    positions file (known by its columns, whatever its name) is read as a Visium slide, cropped at crop_um µm."""
    if not Path(spots).is_file():
        raise FileNotFoundError(f"{spots}: spot file not found")
    if visium_files.is_positions_file(spots):
        return visium.positions_section(image, spots, genes, crop_um or visium.DEFAULT_CROP_UM)
    ids, array_xy, pixel_xy = cohorts.read_spots(Path(spots))  # same checks as the cohort readers
    visium_files.check_on_image(pixel_xy, ids, image, spots)  # as training checks them (cohorts.load_section)
    return cohorts.Section(cohort="predict", name=Path(image).stem, patient="new", image_path=Path(image),
                        spot_ids=ids, array_xy=array_xy, pixel_xy=pixel_xy,
                        counts=pd.DataFrame(0.0, index=ids, columns=genes))


def training_lattice(d) -> str | None:
    """The spot lattice of a checkpoint's training slides: ST cohorts are square, Visium hexagonal."""
    if d.get("geometry"):
        return d["geometry"]
    if d["cohort"] in cohorts.COHORTS and "table" not in cohorts.COHORTS[d["cohort"]]:
        return "square"  # the built-in cohorts are all ST
    norm = d.get("normalisation", "")
    return "hex" if "hexagonal" in norm else "square" if "3x3" in norm else None


def grid_section(path, genes, d, args):
    """A cohorts.Section of virtual spots on the tissue of a slide that has no spot file (slide.py), and
    what the outputs say about it: the grid, the tissue search, the overview image."""
    s = slide.open_slide(path, args.um_per_px)
    um = s.resolution()
    lattice = args.lattice or training_lattice(d)
    if lattice is None:
        raise ValueError(f"{path}: the checkpoint does not say its spot lattice; pass --lattice square or hex")
    crop_um = args.crop_um or d.get("crop_um")
    if not crop_um:
        raise ValueError(f"{path}: the checkpoint does not say its crops' field of view; pass --crop-um")
    pitch_um = args.pitch_um or slide.PITCH_UM[lattice]
    scale = min(1.0, um / slide.THUMB_UM)  # thumbnail px per slide px
    thumb = s.thumbnail(scale)
    if args.tissue_mask:
        mask, tissue = slide.read_mask(args.tissue_mask, thumb.size), {"method": f"mask {args.tissue_mask}"}
    else:
        mask, tissue = slide.tissue_mask(thumb, um / scale)
    grid = slide.spot_grid(mask, thumb, scale, pitch_um / um, lattice, crop_um / um)
    if not len(grid["pixel_xy"]):
        raise ValueError(f"{path}: no tissue found ({tissue['method']}; no {pitch_um:g} µm spot has "
                         f"{slide.MIN_TISSUE:.0%} of its tile on tissue and a mean RGB under {slide.WHITE_MEAN:g}); "
                         f"give the tissue with --tissue-mask")
    ids = [f"{x}x{y}" for x, y in grid["array_xy"]]
    section = cohorts.Section(GRID, Path(path).stem, "new", Path(path), ids, grid["array_xy"], grid["pixel_xy"],
                           pd.DataFrame(0.0, index=ids, columns=genes), {"image": Path(path)}, lattice, um, crop_um)
    print(f"{path}: {len(ids)} spots on a {lattice} grid of {pitch_um:g} µm, {um:.4g} µm/px ({s.reader}), "
          f"crops of {crop_um:.4g} µm; tissue: {tissue['method']}")
    # the maps' and the .h5ad's image: Space Ranger's hires size (at most 2,000 px a side), from the tissue
    # thumbnail when that is finer, else read again at that size (the thumbnail is 8 µm/px, coarse on a small slide)
    hires = min(1.0, h5ad.HIRES_PX / max(s.width, s.height))
    size = (max(1, round(s.width * hires)), max(1, round(s.height * hires)))
    image = thumb if thumb.size == size else thumb.resize(size) if scale > hires else s.thumbnail(hires)
    overview = (image, size[0] / s.width)
    return section, {"grid": grid, "tissue": tissue, "pitch_um": pitch_um, "lattice": lattice, "overview": overview}


class WindowSpots(torch.utils.data.Dataset):
    """One slide's spots, each served as a spot of the grid window that predicts it (slide.grid_windows):
    section = the window, index = its row among the window's members, the global level's context."""

    def __init__(self, dataset, windows):
        self.dataset = dataset
        self.items = [(w, int(j), int(np.searchsorted(members, j))) for w, (members, core) in enumerate(windows) for j in core]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        w, j, row = self.items[i]
        return {**self.dataset[j], "section": w, "index": row}


def array_row_col(section) -> tuple[np.ndarray, np.ndarray]:
    """Space Ranger's array_row, array_col (N,) int64 of a section's array_xy: (y, x) on ST's square
    array, (y, 2x + y) on Visium's hexagonal one (array_xy is axial there: visium.hex_axial)."""
    x, y = np.asarray(section.array_xy, np.int64).T
    return y, (x if section.geometry == "square" else 2 * x + y)


def spot_diameter(section, virtual: bool) -> float:
    """spot_diameter_fullres (slide px): what a spot covers. A real array's physical spot (SPOT_UM; from
    the spot pitch where the slide does not say its µm per px), or for a virtual spot of a grid the
    crop's field of view: what the model saw of it, and what squidpy's image features crop."""
    if virtual:
        return section.crop_um / section.um_per_px
    if section.um_per_px:
        return SPOT_UM[section.geometry] / section.um_per_px
    return SPOT_UM[section.geometry] / cohorts.PITCH_UM[section.geometry] * slide.spot_spacing(section.pixel_xy)


def write_anndata(path, ckpt_path, ckpt, sections, preds, split, overviews, grid, crop_um):
    """predictions.h5ad (h5ad.py): X = the predictions in the training labels' units (log10(1 + counts
    per 10⁴), data.expression_labels), one obs row a spot; measured labels as a layer where the slides
    have counts. Skipped, with the reason, without h5py."""
    if importlib.util.find_spec("h5py") is None:
        print(f"note: {path.name} not written: it needs h5py (pip install h5py); predictions.csv holds the same numbers")
        return
    d = ckpt["data"]
    h = hashlib.sha1()
    with open(ckpt_path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    slides = []
    for i, s in enumerate(sections):
        image, scale = overviews[i]
        row, col = array_row_col(s)
        slides.append({"name": s.name, "spot_ids": s.spot_ids, "X": preds[i][0], "pixel_xy": s.pixel_xy,
                       "array_row": row, "array_col": col, "image": None if image is None else np.asarray(image),
                       "scale": scale, "spot_diameter": spot_diameter(s, virtual=grid is not None),
                       "obs": {} if grid is None else {"tissue_fraction": grid["grid"]["tissue"]}, "image_path": s.image_path,
                       "measured": None if s.cohort in PREDICTED else split.dataset.labels[i]})
    about = {"checkpoint": str(ckpt_path), "checkpoint_sha1": h.hexdigest(), "cohort": d["cohort"],
             "genes": list(ckpt["genes"]), "units": d["normalisation"] + " (the training labels' units)",
             "crop_size": d["crop_size"], "crop_um": crop_um, "fold": d.get("fold"),
             "slides": {s.name: {"um_per_px": s.um_per_px, "image": str(s.image_path), "geometry": s.geometry}
                        for s in sections}}
    if grid is not None:
        about["slides"][sections[0].name].update(pitch_um=grid["pitch_um"], lattice=grid["lattice"], tissue=grid["tissue"],
                                                 min_tissue=slide.MIN_TISSUE, white_mean=slide.WHITE_MEAN)
    # log1p: X is log10(1 + x); without the base, scanpy's seurat HVG and rank_genes_groups' fold changes read it as ln
    h5ad.write_predictions(path, slides, ckpt["genes"], {"gene_dml": about, "log1p": {"base": 10}})
