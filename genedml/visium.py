"""Your own slides: 10x Visium (Space Ranger output) and HEST-1k samples as Gene-DML cohorts.

A cohort of your own is a small CSV, one row per slide (paths relative to the CSV's folder):

    sample,patient,spaceranger,image                     a Visium slide: Space Ranger's outs/ + the full-res H&E
    sample,patient,h5ad,image[,patches]                  a HEST-1k sample: st/<id>.h5ad + wsis/<id>.tif
    optional columns: fold (patients sharing a fold are held out together; default one fold per
    patient, in table order), geometry (hex | square; HEST default: detected), image_scale (image px
    per position px, when the image was downsampled), um_per_px (instead of deriving it)

`register_cohort(csv)` adds it to cohorts.COHORTS with two hooks, `load` and `check`, which
cohorts.load_section / cohorts.check_cohort call for table cohorts: this module imports cohorts, cohorts never
imports this module (imports run one way). Folds are leave-one-patient-out as for the built-in cohorts.

What is read (visium_files.py): Space Ranger's filtered count matrix (MEX or .h5) and
spatial/tissue_positions, joined on barcode, x = pxl_col_in_fullres, y = pxl_row_in_fullres; a
HEST-1k sample's st/<id>.h5ad (the same position columns in obs) and wsis/<id>.tif.
`python -m genedml.visium hest-cohort` writes the table of her2st, STNet or cSCC from HEST's metadata CSV.

Geometry. The Visium array is hexagonal: array_row + array_col is even, neighbours sit at
Δcol = ±2 in a row and Δrow = ±1, Δcol = ±1 between rows. We store it in axial coordinates,
x = (array_col - array_row) / 2, y = array_row, where the six neighbours are (±1, 0), (0, ±1),
(+1, -1), (-1, +1): a lattice without holes, on which a lattice shift is an integer shift. The
array's rectangle becomes a parallelogram, so its bounding box (the grid the PEG convolves) is not
full: a whole Visium array, 4,992 spots, fills 62.7 % of its 102 x 78 box (docs/data.md: Your own slides).
The label smoothing averages the spot and those six (data.SMOOTH_OFFSETS["hex"]); the global level's
PEG runs its 3x3 depthwise conv on the same grid, so it sees all six neighbours plus the two
second-ring spots on one diagonal (Δcol = ±3, Δrow = ±1), the same two for every spot.

Scale. µm per pixel = spot pitch (Visium 100 µm, ST 200 µm, centre to centre) / the median pixel
distance between array neighbours; 10x's spot_diameter_fullres is not used. Each slide is resampled
once (and cached) so that a crop of crop_size px spans crop_um µm: default 112 µm, HEST-1k's 224 px at
0.5 µm/px, which holds a 55 µm Visium spot with a margin (the 5x5 neighbour window is 560 µm wide).
"""
import argparse
import logging
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from genedml import cohorts
from genedml.crops import um_per_px
from genedml.visium_files import (POSITION_COLUMNS, Sparse, check_image, check_on_image, counts_frame, first_file,
                                  in_tissue_positions, read_10x_h5, read_h5ad, read_mex, read_positions)

log = logging.getLogger(__name__)

DEFAULT_CROP_UM = 112.0  # 224 px at 0.5 µm/px (HEST-1k's patches)
DEFAULT_K = 25           # k-means groups per batch for a cohort table (cSCC's; --k overrides)
# HEST-1k ids of the three built-in cohorts (issue 11); the patients come from HEST's metadata CSV
HEST_IDS = {"her2st": ("SPA", 119, 154), "stnet": ("SPA", 51, 118), "cscc": ("NCBI", 759, 770)}


# ----------------------------------------------------------------------------- geometry and scale
def hex_axial(array_row, array_col, where="") -> np.ndarray:
    """(N, 2) int64 axial coordinates (x, y) = ((col - row) / 2, row) of a Visium array (see above)."""
    row, col = np.asarray(array_row, np.int64), np.asarray(array_col, np.int64)
    odd = (row + col) % 2 != 0
    if odd.any():
        i = int(odd.argmax())
        raise ValueError(f"{where}: not a hexagonal Visium array: array_row + array_col is odd for "
                         f"{int(odd.sum())} spot(s), e.g. row {row[i]} col {col[i]} (set geometry=square?)")
    return np.stack([(col - row) // 2, row], axis=1)



def make_section(cohort, name, patient, image, pos: pd.DataFrame, sparse: Sparse, files: dict, geometry: str,
                 crop_um=None, image_scale=1.0, resolution=None) -> cohorts.Section:
    """Join counts and positions on the barcode; check the geometry and that the spots lie on the image."""
    where = f"{files['counts']} and {files['spots']}"
    in_matrix = pd.Index(sparse.spots)
    if in_matrix.duplicated().any():
        raise ValueError(f"{files['counts']}: duplicate barcode(s) {in_matrix[in_matrix.duplicated()].unique().tolist()[:5]}")
    # Spots in barcode order, whatever order the matrix or the positions list them in: the same slide
    # read with or without its counts (evaluate.py --predict) gives the same crops, so the same cache entries.
    common = in_matrix[in_matrix.isin(pos.index)].sort_values()
    if not len(common):
        raise ValueError(f"{where}: no barcode in common between the matrix and the in-tissue positions "
                         f"(e.g. {sparse.spots[:2]} vs {pos.index[:2].tolist()})")
    if len(common) < len(in_matrix) or len(common) < len(pos):
        log.info("%s/%s: dropped %d barcode(s) in the matrix but not in tissue, %d in tissue but not in the matrix",
                 cohort, name, len(in_matrix) - len(common), len(pos) - len(common))
    pos = pos.loc[common]
    if geometry == "hex":
        array_xy = hex_axial(pos["array_row"], pos["array_col"], str(files["spots"]))
    else:
        array_xy = pos[["array_col", "array_row"]].to_numpy(np.int64)
    if len(np.unique(array_xy, axis=0)) < len(array_xy):
        raise ValueError(f"{files['spots']}: two spots share an array position")
    pixel_xy = pos[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(np.float64) * image_scale  # x = column
    check_on_image(pixel_xy, common, image, files["spots"])
    resolution = resolution or um_per_px(array_xy, pixel_xy, geometry, str(files["spots"]))
    counts = counts_frame(sparse, in_matrix.get_indexer(common), common.tolist(), str(files["counts"]))
    return cohorts.Section(cohort, name, patient, Path(image), common.tolist(), array_xy, pixel_xy, counts,
                        {**files, "image": Path(image)}, geometry, resolution, crop_um)


# ----------------------------------------------------------------------------- Space Ranger
def spaceranger_files(outs) -> dict:
    """The matrix (MEX folder preferred, else .h5) and positions of a Space Ranger output folder."""
    outs = Path(outs)
    outs = outs / "outs" if (outs / "outs").is_dir() else outs
    mex, h5 = outs / "filtered_feature_bc_matrix", outs / "filtered_feature_bc_matrix.h5"
    return {"counts": mex if mex.is_dir() or not h5.is_file() else h5, "spatial": outs / "spatial"}


def load_spaceranger(cohort, name, patient, outs, image, **kw) -> cohorts.Section:
    files = spaceranger_files(outs)
    files["spots"] = first_file(files["spatial"], ["tissue_positions.csv", "tissue_positions_list.csv"], "tissue positions")
    pos = read_positions(files["spots"])
    sparse = read_10x_h5(files["counts"]) if files["counts"].suffix == ".h5" else read_mex(files["counts"])
    return make_section(cohort, name, patient, image, pos, sparse, files, "hex", **kw)


def positions_section(image, positions, genes, crop_um) -> cohorts.Section:
    """A Visium slide without counts, for evaluate.py --predict IMAGE tissue_positions.csv."""
    pos = read_positions(positions)
    empty = Sparse(pos.index.tolist(), list(genes), np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0))
    files = {"counts": Path(positions), "spots": Path(positions)}
    return make_section("predict", Path(image).stem, "new", image, pos, empty, files, "hex", crop_um=crop_um)


def load_hest(cohort, name, patient, h5ad, image, geometry=None, **kw) -> cohorts.Section:
    obs, sparse = read_h5ad(h5ad)
    need = [c for c in POSITION_COLUMNS[2:] if c not in obs.columns]
    if need:
        raise ValueError(f"{h5ad}: obs lacks column(s) {need} (has {list(obs.columns)[:12]})")
    obs = obs.assign(in_tissue=obs["in_tissue"] if "in_tissue" in obs.columns else 1)
    pos = in_tissue_positions(obs.assign(barcode=obs.index), h5ad)
    if geometry is None:  # Visium's hexagonal array has an even row + col everywhere; ST's square one does not
        geometry = "hex" if ((pos["array_row"] + pos["array_col"]) % 2 == 0).all() else "square"
        log.info("%s: %s array grid (detected)", h5ad, geometry)
    return make_section(cohort, name, patient, image, pos, sparse, {"counts": Path(h5ad), "spots": Path(h5ad)},
                        geometry, **kw)


# ----------------------------------------------------------------------------- cohort tables
def read_cohort_table(path) -> pd.DataFrame:
    """The rows of a cohort table, paths resolved against the table's folder; errors name the row."""
    path = Path(path)
    df = cohorts._read_table(path, "cohort table", dtype=str, keep_default_na=False)
    df.columns = [c.strip().lower() for c in df.columns]
    missing = [c for c in ("sample", "patient", "image") if c not in df.columns]
    if missing or ("spaceranger" not in df.columns and "h5ad" not in df.columns):
        raise ValueError(f"{path}: a cohort table needs the columns sample, patient, image and spaceranger or h5ad "
                         f"(has {list(df.columns)})")
    if not len(df):
        raise ValueError(f"{path}: a cohort table without slides (a header and no rows)")
    df = df.apply(lambda col: col.str.strip())
    for c in ("spaceranger", "h5ad", "patches", "fold", "geometry", "image_scale", "um_per_px"):
        df[c] = df[c] if c in df.columns else ""
    for i, r in df.iterrows():
        if not r["sample"] or not r["patient"] or bool(r["spaceranger"]) == bool(r["h5ad"]):
            raise ValueError(f"{path}: row {i + 1} needs a sample, a patient and exactly one of spaceranger / h5ad")
        if r["geometry"] not in ("", "hex", "square"):
            raise ValueError(f"{path}: row {i + 1}: geometry must be hex or square, got {r['geometry']!r}")
        for c in ("image_scale", "um_per_px"):  # a scale: a positive number, or empty for the default
            try:
                ok = not r[c] or 0 < float(r[c]) < np.inf
            except ValueError:
                ok = False
            if not ok:
                raise ValueError(f"{path}: row {i + 1}: {c} must be a positive number (or empty), got {r[c]!r}")
    if df["sample"].duplicated().any():
        raise ValueError(f"{path}: duplicate sample(s) {df['sample'][df['sample'].duplicated()].tolist()}")
    for c in ("spaceranger", "h5ad", "patches", "image"):
        df[c] = [str(path.parent / v) if v else "" for v in df[c]]  # absolute paths stay absolute
    return df.set_index("sample", drop=False)


def register_cohort(path, crop_um=None) -> str:
    """Read a cohort table and add it to cohorts.COHORTS (named after the file); returns the name."""
    path = Path(path)
    rows = read_cohort_table(path)
    name = path.stem
    if name in cohorts.COHORTS and "table" not in cohorts.COHORTS[name]:
        raise ValueError(f"{path}: a cohort table cannot be named like the built-in cohort {name!r}; rename the file")
    patients = {p: rows.index[rows["patient"] == p].tolist() for p in dict.fromkeys(rows["patient"])}  # table order
    if (rows["fold"] != "").any():  # folds as the table groups them, in order of first appearance
        fold_of = {p: sorted(set(rows.loc[rows["patient"] == p, "fold"])) for p in patients}
        bad = [p for p, f in fold_of.items() if len(f) != 1 or not f[0]]
        if bad:
            raise ValueError(f"{path}: every patient needs exactly one fold; not so for {bad}")
        folds = [[p for p in patients if fold_of[p] == [f]] for f in dict.fromkeys(fold_of[p][0] for p in patients)]
    else:
        folds = [[p] for p in patients]
    crop_um = float(crop_um or DEFAULT_CROP_UM)

    def row(sample):
        if sample not in rows.index:
            raise ValueError(f"{path}: no sample {sample!r} (samples: {rows.index.tolist()[:10]})")
        return rows.loc[sample]

    cohorts.COHORTS[name] = dict(
        layout="table", table=str(path), patients=patients, folds=folds, k=DEFAULT_K, crop=224, genes=250,
        sizes="her2st",  # encoder sizes (model.COHORT_SIZES): the published breast-cancer recipe
        root=str(path), crop_um=crop_um, fetch=f"correct the paths in the cohort table {path}",
        citation=f"cohort table {path}",
        load=lambda sample: load_row(name, row(sample), crop_um),
        check=lambda samples: check_rows(rows if samples is None else pd.DataFrame([row(s) for s in samples]), path))
    return name


def load_row(cohort, r, crop_um) -> cohorts.Section:
    kw = dict(crop_um=crop_um, image_scale=float(r["image_scale"] or 1.0),
              resolution=float(r["um_per_px"]) if r["um_per_px"] else None)
    if r["spaceranger"]:
        return load_spaceranger(cohort, r["sample"], r["patient"], r["spaceranger"], r["image"], **kw)
    return load_hest(cohort, r["sample"], r["patient"], r["h5ad"], r["image"], r["geometry"] or None, **kw)


def check_rows(rows, table) -> None:
    """Every file of these rows exists and every image can be decoded, before anything long starts."""
    missing, bad = [], []
    for sample, r in rows.iterrows():
        if r["spaceranger"]:
            f = spaceranger_files(r["spaceranger"])
            missing += [] if f["counts"].exists() else [f"{f['counts'].parent}/filtered_feature_bc_matrix/ (or .h5)"]
            if not any((f["spatial"] / n).is_file() for n in ("tissue_positions.csv", "tissue_positions_list.csv")):
                missing.append(f"{f['spatial']}/tissue_positions.csv (or tissue_positions_list.csv)")
        else:
            missing += [] if Path(r["h5ad"]).is_file() else [r["h5ad"]]
        if not r["image"] or not Path(r["image"]).is_file():
            missing.append(r["image"] or f"{sample}: no image given")
            continue
        try:
            check_image(r["image"])
        except ValueError as e:
            bad.append(f"{sample}: {e}")
    if missing:
        raise FileNotFoundError(f"{table}: {len(missing)} file(s) missing:\n  " + "\n  ".join(missing))
    if bad:
        raise ValueError(f"{table}: image(s) that cannot be used:\n  " + "\n  ".join(bad))


def cohort_for(name, root, crop_um=None) -> str:
    """The cohorts.COHORTS name of a checkpoint's cohort, registering a cohort table again if need be."""
    if str(root).endswith(".csv"):
        return register_cohort(root, crop_um)
    return name


# ----------------------------------------------------------------------------- HEST cohort tables
def hest_table(cohort, meta, hest_root, out) -> pd.DataFrame:
    """Write the cohort table of a built-in cohort's HEST-1k samples. The id -> patient map is read
    from HEST's metadata CSV (columns id, patient, st_technology), not assumed here."""
    meta_path, hest_root, out = Path(meta), Path(hest_root), Path(out)
    df = cohorts._read_table(meta_path, "HEST metadata", dtype=str, keep_default_na=False)
    lacking = [c for c in ("id", "patient") if c not in df.columns]
    if lacking:
        raise ValueError(f"{meta_path}: HEST metadata lacks column(s) {lacking} (has {list(df.columns)[:10]})")
    prefix, lo, hi = HEST_IDS[cohort]
    ids = [f"{prefix}{i}" for i in range(lo, hi + 1)]
    df = df.set_index("id")
    absent = [i for i in ids if i not in df.index]
    if absent:
        raise ValueError(f"{meta_path}: no row for HEST id(s) {absent[:8]}{' ...' if len(absent) > 8 else ''}")
    no_patient = [i for i in ids if not df.loc[i, "patient"]]
    if no_patient:
        raise ValueError(f"{meta_path}: no patient given for {no_patient[:8]}: fill the patient column first")
    tech = df["st_technology"] if "st_technology" in df.columns else pd.Series("", index=df.index)
    rel = lambda p: os.path.relpath(p, out.parent.resolve())
    rows = pd.DataFrame({
        "sample": ids, "patient": [df.loc[i, "patient"] for i in ids],
        "h5ad": [rel(hest_root.resolve() / "st" / f"{i}.h5ad") for i in ids],
        "image": [rel(hest_root.resolve() / "wsis" / f"{i}.tif") for i in ids],
        "geometry": ["hex" if "visium" in tech[i].lower() else "square" if tech[i] else "" for i in ids]})
    builtin = cohorts.COHORTS[cohort]
    if set(rows["patient"]) <= set(builtin["patients"]):  # HEST names the patients as the authors did: their folds
        rows["fold"] = [next(k for k, f in enumerate(builtin["folds"]) if p in f) for p in rows["patient"]]
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    rows.to_csv(tmp, index=False)
    os.replace(tmp, out)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m genedml.visium", description="cohort tables of your own slides (docs/data.md: Your own slides)")
    sub = p.add_subparsers(dest="command", required=True)
    h = sub.add_parser("hest-cohort", help="write the cohort table of her2st, STNet or cSCC from a HEST-1k download")
    h.add_argument("cohort", choices=sorted(HEST_IDS))
    h.add_argument("--meta", required=True, help="HEST's metadata CSV (e.g. HEST_v1_1_0.csv): columns id, patient, st_technology")
    h.add_argument("--hest-root", required=True, help="the HEST-1k folder holding st/ and wsis/")
    h.add_argument("--out", default=None, help="the table to write (default: hest-<cohort>.csv)")
    i = sub.add_parser("info", help="list the slides of a cohort table: spots, genes, µm/px, image; "
                                    "exits 1 when any slide cannot be read (a pre-flight check)")
    i.add_argument("table")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        if args.command == "hest-cohort":
            out = Path(args.out or f"hest-{args.cohort}.csv")
            rows = hest_table(args.cohort, args.meta, args.hest_root, out)
            print(f"wrote {out}: {len(rows)} samples of {rows['patient'].nunique()} patients"
                  + ("" if "fold" in rows else "; one fold per patient"))
            return 0
        name = register_cohort(args.table)
        print(f"{'sample':<14}{'patient':<10}{'spots':>6}{'genes':>7}{'µm/px':>8}  grid  image")
        failed, samples = [], [sample for s in cohorts.COHORTS[name]["patients"].values() for sample in s]
        for sample in samples:
            try:
                sec = cohorts.load_section(name, None, sample)
                print(f"{sample:<14}{sec.patient:<10}{len(sec.spot_ids):>6}{sec.counts.shape[1]:>7}"
                      f"{sec.um_per_px:>8.3f}  {sec.geometry:<5} {sec.image_path}")
            except (FileNotFoundError, ValueError) as e:
                print(f"{sample:<14}error: {e}")
                failed.append(sample)
        if failed:  # non-zero, so `visium.py info` can gate a script before a long run
            print(f"error: {len(failed)} of {len(samples)} slides of {args.table} cannot be read: "
                  f"{', '.join(failed)} (reasons above)", file=sys.stderr)
            return 1
        return 0
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # python -m genedml.visium: run the module under its one name, genedml.visium, whose
    from genedml.visium import main  # cohort tables register into cohorts.COHORTS (never a second copy as __main__)
    sys.exit(main())
