"""The files of a 10x Visium run and of a HEST-1k sample, read into plain arrays and frames.

  Space Ranger  filtered_feature_bc_matrix/ (MEX: matrix.mtx.gz rows = features, columns = barcodes,
                1-based; features.tsv.gz id, name, type; barcodes.tsv.gz) read with numpy/pandas; or
                filtered_feature_bc_matrix.h5 with h5py (optional). spatial/tissue_positions.csv (>= 2.0,
                header) or tissue_positions_list.csv (no header): barcode, in_tissue, array_row,
                array_col, pxl_row_in_fullres, pxl_col_in_fullres; in_tissue == 1.
  HEST-1k       st/<id>.h5ad read with h5py alone (anndata's on-disk spec: X dense or a CSR/CSC group,
                obs/var dataframes with _index, categoricals as codes + categories); obs holds the
                same position columns.
  Images        checked before anything long starts (`check_image`): what PIL decodes whole, or a
                whole-slide image OpenSlide reads region by region (slide.py).

Every reader names the file and the problem when the input is bad. visium.py joins what these read
into a cohorts.Section (geometry, scale, the spots on the image) and registers cohort tables.
"""
import gzip
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from genedml import cohorts
from genedml import slide

log = logging.getLogger(__name__)
POSITION_COLUMNS = ["barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres"]
UNDECODABLE_TIFF = {33003: "JPEG 2000 (Aperio)", 33005: "JPEG 2000 (Aperio)", 34712: "JPEG 2000"}



# ----------------------------------------------------------------------------- counts
@dataclass
class Sparse:
    """Counts as entries: spots[spot_idx[k]] has values[k] counts of genes[gene_idx[k]]."""
    spots: list
    genes: list
    spot_idx: np.ndarray
    gene_idx: np.ndarray
    values: np.ndarray


def _open(path: Path):
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")


def first_file(folder: Path, names: list[str], what: str) -> Path:
    for n in names:
        if (folder / n).is_file():
            return folder / n
    raise FileNotFoundError(f"{folder}: no {what} file ({' or '.join(names)})")


def read_mex(folder) -> Sparse:
    """A Space Ranger MEX folder (matrix.mtx[.gz], features.tsv[.gz] or genes.tsv[.gz], barcodes.tsv[.gz])."""
    folder = Path(folder)
    mtx = first_file(folder, ["matrix.mtx.gz", "matrix.mtx"], "matrix")
    feats = cohorts._read_table(first_file(folder, ["features.tsv.gz", "features.tsv", "genes.tsv.gz", "genes.tsv"], "features"),
                             "features", sep="\t", header=None, dtype=str)
    bc_path = first_file(folder, ["barcodes.tsv.gz", "barcodes.tsv"], "barcodes")
    barcodes = cohorts._read_table(bc_path, "barcodes", sep="\t", header=None, dtype=str)[0].tolist()
    try:
        with _open(mtx) as f:
            head = f.readline().decode()
            if not head.startswith("%%MatrixMarket matrix coordinate"):
                raise ValueError(f"not a MatrixMarket coordinate file (first line {head.strip()[:60]!r})")
            line = f.readline()
            while line.startswith(b"%"):
                line = f.readline()
            n_feat, n_bc, nnz = (int(v) for v in line.split())
            entries = pd.read_csv(f, sep=" ", header=None, names=["i", "j", "v"], dtype=np.float64, engine="c")
    except Exception as e:  # truncated gzip (EOFError), bad bytes, ragged rows
        raise ValueError(f"{mtx}: cannot read matrix ({type(e).__name__}: {e})") from e
    i, j, v = (entries[c].to_numpy() for c in "ijv")
    if len(v) != nnz or np.isnan(entries.to_numpy()).any():
        raise ValueError(f"{mtx}: truncated or malformed: the header promises {nnz} entries, found {len(v)} "
                         f"({int(np.isnan(entries.to_numpy()).any(axis=1).sum())} incomplete)")
    if len(feats) != n_feat or len(barcodes) != n_bc:
        raise ValueError(f"{mtx}: {n_feat} features x {n_bc} barcodes, but {len(feats)} feature and "
                         f"{len(barcodes)} barcode lines in {folder}")
    if len(v) and (i.min() < 1 or i.max() > n_feat or j.min() < 1 or j.max() > n_bc or v.min() < 0):
        raise ValueError(f"{mtx}: an index outside 1..{n_feat} / 1..{n_bc} or a negative count")
    keep = _gene_expression(feats[2].tolist() if feats.shape[1] > 2 else ["gene"] * len(feats))[i.astype(np.int64) - 1]
    return Sparse(barcodes, feats[1 if feats.shape[1] > 1 else 0].tolist(), j[keep].astype(np.int64) - 1,
                  i[keep].astype(np.int64) - 1, v[keep])


def _gene_expression(types) -> np.ndarray:
    """Which features are genes (Space Ranger also lists antibody captures etc.)."""
    return np.array([t in ("Gene Expression", "gene") for t in types], bool)


def _h5py(path):
    try:
        import h5py  # optional: only .h5 matrices and HEST's .h5ad need it
    except ImportError:
        raise ValueError(f"{path}: reading this file needs h5py, which is not installed (pip install h5py); "
                         f"for Space Ranger, point to the MEX folder filtered_feature_bc_matrix/ instead") from None
    return h5py


def _strings(a) -> list[str]:
    return [x.decode() if isinstance(x, bytes) else str(x) for x in np.asarray(a).reshape(-1)]


def read_10x_h5(path) -> Sparse:
    """Space Ranger's filtered_feature_bc_matrix.h5 (v3+): a CSC matrix, columns = barcodes."""
    path = Path(path)
    h5py = _h5py(path)
    try:
        with h5py.File(path, "r") as f:
            m = f["matrix"]
            barcodes, indptr = _strings(m["barcodes"][:]), m["indptr"][:].astype(np.int64)
            genes, types = _strings(m["features/name"][:]), _strings(m["features/feature_type"][:])
            gene_idx, values = m["indices"][:].astype(np.int64), m["data"][:].astype(np.float64)
    except Exception as e:
        raise ValueError(f"{path}: not a Space Ranger v3+ matrix .h5 ({type(e).__name__}: {e})") from e
    if len(indptr) != len(barcodes) + 1 or indptr[-1] != len(values):
        raise ValueError(f"{path}: truncated matrix (indptr does not match {len(barcodes)} barcodes)")
    spot_idx = np.repeat(np.arange(len(barcodes)), np.diff(indptr))
    keep = _gene_expression(types)[gene_idx]
    return Sparse(barcodes, genes, spot_idx[keep], gene_idx[keep], values[keep])


def counts_frame(sparse: Sparse, rows: np.ndarray, spot_ids: list[str], where: str) -> pd.DataFrame:
    """(N, genes) float32 counts of the spots sparse.spots[rows], as cohorts.Section wants them. Genes
    without a count on these spots are left out (a Visium panel lists ~36k; a slide's
    counts are ~4 bytes x spots x detected genes); duplicate gene names are summed."""
    if len(sparse.values) and (sparse.values.min() < 0 or not np.isfinite(sparse.values).all()):
        raise ValueError(f"{where}: negative or non-finite count(s)")
    codes, names = pd.factorize(pd.Index(sparse.genes))  # a duplicate gene name shares one column
    if len(names) < len(sparse.genes):
        log.info("%s: %d gene name(s) appear more than once; their counts are summed", where, len(sparse.genes) - len(names))
    to_row = np.full(len(sparse.spots), -1)
    to_row[rows] = np.arange(len(rows))
    r, c, v = to_row[sparse.spot_idx], codes[sparse.gene_idx], sparse.values
    keep = (r >= 0) & (v != 0)
    used = np.unique(c[keep])
    compact = np.full(len(names), -1)
    compact[used] = np.arange(len(used))
    dense = np.zeros((len(rows), len(used)), np.float32)
    np.add.at(dense, (r[keep], compact[c[keep]]), v[keep].astype(np.float32))
    if not np.array_equal(dense, np.round(dense)):
        log.warning("%s: counts are not integers (normalised values instead of raw counts?)", where)
    return pd.DataFrame(dense, index=spot_ids, columns=pd.Index(names[used], dtype=object), copy=False)


# ----------------------------------------------------------------------------- positions and images
def read_positions(path) -> pd.DataFrame:
    """Space Ranger's spot positions (either file version), indexed by barcode, in-tissue spots only."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: tissue positions file not found")
    with open(path, "rb") as f:
        has_header = f.readline().startswith(b"barcode")
    df = cohorts._read_table(path, "tissue positions", header=0 if has_header else None)
    if df.shape[1] != len(POSITION_COLUMNS) or (has_header and list(df.columns) != POSITION_COLUMNS):
        raise ValueError(f"{path}: expected the columns {','.join(POSITION_COLUMNS)}, got {list(df.columns)}")
    df.columns = POSITION_COLUMNS
    return in_tissue_positions(df.set_index(df["barcode"].astype(str)), path)


def is_positions_file(path) -> bool:
    """Whether a file is Space Ranger's spot positions, by its columns rather than its name: the
    header barcode,in_tissue,array_row,... (>= 2.0) or, without one, six fields per line: a barcode
    and five integers (in_tissue, array_row, array_col and the two pixel coordinates)."""
    try:
        with open(path, "rb") as f:
            first = f.readline().decode(errors="replace").strip().split(",")
    except OSError:
        return False
    if first == POSITION_COLUMNS:
        return True
    if len(first) != 6:
        return False
    try:
        [float(v) for v in first[1:]]
    except ValueError:
        return False
    return bool(first[0]) and not first[0].replace(".", "", 1).lstrip("-").isdigit()  # a barcode, not a number


def in_tissue_positions(df, where) -> pd.DataFrame:
    """Numeric position columns, in-tissue spots only, unique barcodes."""
    values = df[POSITION_COLUMNS[1:]].apply(pd.to_numeric, errors="coerce")
    if values.isna().to_numpy().any():
        raise ValueError(f"{where}: non-numeric or empty position in row {int(values.isna().any(axis=1).to_numpy().argmax()) + 1}")
    if values.index.duplicated().any():
        raise ValueError(f"{where}: duplicate barcode(s) {values.index[values.index.duplicated()].unique().tolist()[:5]}")
    return values[values["in_tissue"] == 1]


def check_image(path) -> tuple[int, int]:
    """(width, height) of an image PIL can decode whole or OpenSlide can read region by region
    (slide.reads_regions), or an error saying what to do instead."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: image not found")
    if slide.reads_regions(path):
        s = slide.open_slide(path)
        return s.width, s.height
    try:
        with Image.open(path) as im:  # the header only
            w, h, compression = im.width, im.height, getattr(im, "tag_v2", {}).get(259)
    except Image.DecompressionBombError as e:
        raise ValueError(f"{path}: too large for PIL to decode whole ({e}); save it as a tiled pyramidal TIFF, "
                         f"read region by region through OpenSlide (`vips tiffsave {path.name} out.tif --tile --pyramid "
                         f"--compression jpeg`), or downsample it (e.g. `vips resize {path.name} half.tif 0.5`) and set "
                         f"image_scale = 0.5 in the cohort table") from None
    except Exception as e:
        raise ValueError(f"{path}: not an image PIL can read ({type(e).__name__}: {e}); convert it to a plain "
                         f"TIFF or JPEG (e.g. `vips copy {path.name} out.tif[compression=jpeg]`)") from None
    if compression in UNDECODABLE_TIFF:
        raise ValueError(f"{path}: TIFF compressed with {UNDECODABLE_TIFF[compression]}, which PIL cannot decode; "
                         f"convert it (e.g. `vips copy {path.name} out.tif[compression=jpeg]`)")
    if w * h > 2 * Image.MAX_IMAGE_PIXELS:
        raise ValueError(f"{path}: {w}x{h} px ({w * h * 3 / 1e9:.1f} GB decoded) is above the {2 * Image.MAX_IMAGE_PIXELS / 1e6:.0f} Mpx "
                         f"PIL decodes whole; downsample it (e.g. `vips resize {path.name} half.tif 0.5`) and set "
                         f"image_scale = 0.5 in the cohort table")
    return w, h


def check_on_image(pixel_xy, ids, image, where) -> None:
    """Refuse spot centres (pixel_xy (N, 2): x, y) that lie off the image: their crops would be blank
    white, and predictions for them silently made up."""
    w, h = check_image(image)
    off = (pixel_xy[:, 0] < 0) | (pixel_xy[:, 0] >= w) | (pixel_xy[:, 1] < 0) | (pixel_xy[:, 1] >= h)
    if off.any():
        i = int(off.argmax())
        raise ValueError(f"{where}: {int(off.sum())} of {len(off)} spot centre(s) outside the {w}x{h} image "
                         f"{Path(image).name}, e.g. {ids[i]} at ({pixel_xy[i, 0]:.1f}, {pixel_xy[i, 1]:.1f})")


# ----------------------------------------------------------------------------- HEST-1k (.h5ad with h5py alone)
def _read_column(f, node) -> np.ndarray:
    """One anndata dataframe column: a dataset, a categorical group (codes + categories), a nullable
    group (values + mask), or an old-style dataset with a `categories` reference."""
    if hasattr(node, "keys"):  # a group
        kind = node.attrs.get("encoding-type", "")
        if kind == "categorical":
            codes, cats = node["codes"][:], np.asarray(_decoded(node["categories"][:]), dtype=object)
            return np.where(codes >= 0, cats[np.clip(codes, 0, None)], None)
        if kind.startswith("nullable"):
            values = node["values"][:].astype(object)
            values[node["mask"][:]] = None
            return values
        raise ValueError(f"unsupported column encoding {kind!r}")
    values = node[:]
    if "categories" in node.attrs:  # anndata < 0.8
        cats = np.asarray(_decoded(f[node.attrs["categories"]][:]), dtype=object)
        return np.where(values >= 0, cats[np.clip(values, 0, None)], None)
    return np.asarray(_decoded(values))


def _decoded(a):
    return _strings(a) if np.asarray(a).dtype.kind in "OS" else a


def read_h5ad(path) -> tuple[pd.DataFrame, Sparse]:
    """obs (indexed by obs names) and the counts X of an .h5ad file, with h5py alone."""
    path = Path(path)
    h5py = _h5py(path)
    try:
        with h5py.File(path, "r") as f:
            frames = {}
            for part in ("obs", "var"):
                g = f[part]
                index = g.attrs.get("_index", "_index")
                cols = [c for c in _strings(g.attrs.get("column-order", [])) if c in g] if "column-order" in g.attrs \
                    else [c for c in g if c not in (index, "__categories")]
                frames[part] = pd.DataFrame({c: _read_column(f, g[c]) for c in cols},
                                            index=pd.Index(_strings(g[index][:]), dtype=object))
            X = f["X"]
            n_obs, n_var = len(frames["obs"]), len(frames["var"])
            if isinstance(X, h5py.Dataset):  # dense
                dense = X[:]
                spot_idx, gene_idx = np.nonzero(dense)
                values = dense[spot_idx, gene_idx].astype(np.float64)
            else:
                kind = X.attrs.get("encoding-type", X.attrs.get("h5sparse_format", ""))
                kind = {"csr": "csr_matrix", "csc": "csc_matrix"}.get(kind, kind)
                indptr, indices = X["indptr"][:].astype(np.int64), X["indices"][:].astype(np.int64)
                values = X["data"][:].astype(np.float64)
                if kind not in ("csr_matrix", "csc_matrix"):
                    raise ValueError(f"X has encoding {kind!r}, expected a dense array, csr_matrix or csc_matrix")
                major = n_obs if kind == "csr_matrix" else n_var
                if len(indptr) != major + 1 or indptr[-1] != len(values) or len(indices) != len(values):
                    raise ValueError(f"X ({kind}) is truncated: indptr does not match its {major} rows/columns")
                outer = np.repeat(np.arange(major), np.diff(indptr))
                spot_idx, gene_idx = (outer, indices) if kind == "csr_matrix" else (indices, outer)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    except Exception as e:  # not HDF5, a missing group, a truncated file
        raise ValueError(f"{path}: not a readable .h5ad ({type(e).__name__}: {e})") from e
    if len(values) and (spot_idx.max() >= n_obs or gene_idx.max() >= n_var):
        raise ValueError(f"{path}: X does not match obs ({n_obs}) x var ({n_var})")
    return frames["obs"], Sparse(frames["obs"].index.tolist(), frames["var"].index.tolist(), spot_idx, gene_idx, values)
