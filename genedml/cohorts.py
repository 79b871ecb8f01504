"""The three published cohorts (her2st, cSCC, STNet) and the demo: patients, folds, files, and one `Section`.

A cohort is a small dict of facts in `COHORTS` (layout on disk, patients and their sections, folds,
defaults), not a class. Every layout is read into the same `Section` (spot ids, array and pixel
coordinates, raw counts); data.py turns sections into labels, crops and a dataset. Cohorts of your
own slides (10x Visium, HEST-1k) are registered here by visium.py through two hooks, `load` and
`check`; this module never imports visium.py (imports run one way).

On-disk layouts (`root` = the cohort's folder):
  her2st (Andersson et al. 2021, github almaan/her2st; also "demo", written by genedml/demo.py)
    ST-cnts/<s>.tsv.gz                  raw counts: rows spot ids "XxY", columns genes
    ST-spotfiles/<s>_selection.tsv      columns x y new_x new_y pixel_x pixel_y selected
    ST-imgs/<patient>/<s>/<one>.jpg     the H&E image; its file name does not follow the section's
  cscc (Ji et al. 2020, GEO GSE144240 raw files, all in root, names prefixed with GSM ids)
    *<P>_ST_<rep>.jpg, *<P>_ST_<rep>_stdata.tsv[.gz] (rows "XxY", columns genes),
    *spot*<P>_ST_<rep>.tsv[.gz] (columns x y pixel_x pixel_y)
  stnet (He et al. 2020, Mendeley 29ntw7sh4r)
    <subtype>/<patient>/<patient>_<s>.jpg, <patient>_<s>.tsv.gz, <patient>_<s>.spots.txt
Counts and spot file are joined on the id built from the rounded array x, y ("{x}x{y}"); the crop
centre is (pixel_x, pixel_y). Spots present in only one of the two files are dropped and logged.
"""
import gzip
import io
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

log = logging.getLogger(__name__)
Image.MAX_IMAGE_PIXELS = 400_000_000  # her2st images are ~9k x 10k px, above PIL's bomb guard


# ----------------------------------------------------------------------------- cohorts
_HER2ST = {p: [f"{p}{i}" for i in range(1, n + 1)] for p, n in zip("ABCDEFGH", [6, 6, 6, 6, 3, 3, 3, 3])}
_STNET_FOLDS = [["BC23508", "BC23277", "BC23287"], ["BC24220", "BC24105", "BC24223"],
                ["BC23377", "BC23803", "BC23895"], ["BC23288", "BC23903", "BC23272"],
                ["BC23268", "BC23270", "BC23567"], ["BC23810", "BC23269", "BC23901"],
                ["BC23450", "BC23506", "BC23209"], ["BC24044", "BC23944"]]
PITCH_UM = {"hex": 100.0, "square": 200.0}  # centre-to-centre spot distance: Visium; ST (her2st, cSCC, STNet)
COHORTS: dict[str, dict] = {
    "her2st": dict(layout="her2st", patients=_HER2ST, folds=[[p] for p in _HER2ST],
                   k=18, crop=224, genes=250, root="data/her2st",
                   fetch="python data.py download her2st --root {root}",
                   citation="Andersson et al., Nature Communications 12, 6012 (2021)"),
    "cscc": dict(layout="cscc", patients={p: [f"{p}_ST_rep{r}" for r in (1, 2, 3)] for p in ("P2", "P5", "P9", "P10")},
                 folds=[["P2"], ["P5"], ["P9"], ["P10"]], k=25, crop=224, genes=250, root="data/cscc",
                 fetch="download GSE144240_RAW.tar from GEO (GSE144240) and untar it into {root}",
                 citation="Ji et al., Cell 182, 497-514 (2020)"),
    # stnet sections are discovered on disk (sections_of(..., root=...)); the folds are fixed
    "stnet": dict(layout="stnet", patients={p: None for fold in _STNET_FOLDS for p in fold}, folds=_STNET_FOLDS,
                  k=90, crop=224, genes=250, root="data/stnet",
                  fetch="download Mendeley dataset 29ntw7sh4r (He et al.) and unpack it into {root}",
                  citation="He et al., Nature Biomedical Engineering 4, 827-834 (2020)"),
    "demo": dict(layout="her2st", patients={p: [f"{p}{i}" for i in (1, 2, 3)] for p in "ABCDEFGH"},
                 folds=[[p] for p in "ABCDEFGH"],
                 k=8, crop=64, genes=50, root="data/demo",
                 fetch="python data.py demo --root {root}",
                 citation="synthetic (genedml/demo.py)"),
}


def fold_split(cohort: str, fold: int, select_on_test: bool = False) -> dict:
    """Patients of one fold: test = the fold's held-out patient(s); val = the first patient of the next
    fold (cyclic), a deterministic draw from the training patients; train = everyone else.
    select_on_test (the published protocol): no validation patient, every non-test patient trains,
    and the epoch is chosen on the test patient itself."""
    folds = COHORTS[cohort]["folds"]
    assert 0 <= fold < len(folds), f"{cohort} has folds 0..{len(folds) - 1}, got {fold}"
    test = list(folds[fold])
    val = [] if select_on_test else [folds[(fold + 1) % len(folds)][0]]
    train = [p for p in COHORTS[cohort]["patients"] if p not in test and p not in val]
    return {"test": test, "val": val, "train": train}


def sections_of(cohort: str, patients, root=None) -> list[str]:
    """Section names of these patients, in table order (stnet: discovered under `root`)."""
    table = COHORTS[cohort]["patients"]
    out = []
    for p in patients:
        assert p in table, f"{cohort} has no patient {p!r} (patients: {list(table)})"
        if table[p] is not None:
            out += table[p]
        else:
            assert root is not None, f"{cohort} sections are found on disk: pass root="
            out += sorted(f.name[: -len(".tsv.gz")] for f in Path(root).glob(f"*/{p}/{p}_*.tsv.gz"))
    return out


def _patient_of(cohort: str, name: str) -> str:
    for p, secs in COHORTS[cohort]["patients"].items():
        if (secs is not None and name in secs) or (secs is None and name.startswith(p + "_")):
            return p
    raise ValueError(f"{cohort} has no section {name!r}")


def _one(root: Path, patterns: list[str], name: str) -> Path | None:
    """The single file in root matching one of the globs whose name holds `name` as a whole token."""
    hits = sorted({f for pat in patterns for f in root.glob(pat)
                   if not f.name.split(name)[0][-1:].isalnum()})  # P2_... must not match P12_...
    if len(hits) > 1:
        raise ValueError(f"{root}: several files match section {name}: {[h.name for h in hits]}")
    return hits[0] if hits else None


def _files(cohort: str, root, name: str) -> dict:
    """Paths of a section's counts, spot file and image (None where absent; the image may be)."""
    root, layout, patient = Path(root), COHORTS[cohort]["layout"], _patient_of(cohort, name)
    if layout == "her2st":
        folder = root / "ST-imgs" / patient / name
        jpgs = sorted(folder.glob("*.jpg"))
        if len(jpgs) > 1:
            raise ValueError(f"{folder}: expected one .jpg, found {[j.name for j in jpgs]}")
        return {"counts": root / "ST-cnts" / f"{name}.tsv.gz", "spots": root / "ST-spotfiles" / f"{name}_selection.tsv",
                "image": jpgs[0] if jpgs else None, "image_where": folder / "*.jpg"}
    if layout == "cscc":  # GEO raw files, all in root, found by their endings
        counts = _one(root, [f"*{name}_stdata.tsv", f"*{name}_stdata.tsv.gz"], name)
        spots = _one(root, [f"*spot*{name}.tsv", f"*spot*{name}.tsv.gz"], name)
        return {"counts": counts or root / f"*{name}_stdata.tsv[.gz]", "spots": spots or root / f"*spot*{name}.tsv[.gz]",
                "image": _one(root, [f"*{name}.jpg"], name), "image_where": root / f"*{name}.jpg"}
    assert layout == "stnet", f"unknown layout {layout!r}"
    folder = next(iter(sorted(root.glob(f"*/{patient}"))), root / "<subtype>" / patient)
    image = folder / f"{name}.jpg"
    return {"counts": folder / f"{name}.tsv.gz", "spots": folder / f"{name}.spots.txt",
            "image": image if image.is_file() else None, "image_where": image}


def check_cohort(cohort: str, root, sections=None) -> None:
    """Raise FileNotFoundError listing every missing counts/spot/image file and how to fetch them.
    (train.py writes the demo cohort before it checks; elsewhere a missing demo is missing files.)"""
    if "check" in COHORTS[cohort]:  # a cohort table registered by visium.py checks its own files
        return COHORTS[cohort]["check"](sections)
    if Path(root).exists() and not Path(root).is_dir():
        raise ValueError(f"{root}: a file, not a folder; --root names the {cohort} cohort's folder")
    sections = sections_of(cohort, COHORTS[cohort]["patients"], root) if sections is None else sections
    missing = [] if sections else [f"{root} (no sections found)"]
    for name in sections:
        files = _files(cohort, root, name)
        missing += [str(files[k]) for k in ("counts", "spots") if not files[k].is_file()]
        missing += [str(files["image_where"])] if files["image"] is None else []
    if missing:
        shown = "\n  ".join(missing[:20]) + (f"\n  ... and {len(missing) - 20} more" if len(missing) > 20 else "")
        raise FileNotFoundError(f"{cohort}: {len(missing)} file(s) missing under {root}:\n  {shown}\n"
                                f"fetch them with: {COHORTS[cohort]['fetch'].format(root=root)}")


# ----------------------------------------------------------------------------- reading a section
@dataclass
class Section:
    cohort: str
    name: str
    patient: str
    image_path: Path | None
    spot_ids: list[str]      # "XxY" (array coordinates)
    array_xy: np.ndarray     # (N, 2) int64 array x, y
    pixel_xy: np.ndarray     # (N, 2) float64 pixel_x, pixel_y (crop centre)
    counts: pd.DataFrame     # (N, all genes) raw counts (float32), index = spot_ids
    files: dict = field(default_factory=dict, repr=False)  # the source paths, for messages
    geometry: str = "square"  # array grid: "square" (ST) or "hex" (Visium; array_xy in axial coordinates)
    um_per_px: float | None = None  # image resolution; with crop_um set, crops are cut at crop_um µm (visium.py)
    crop_um: float | None = None    # None: crops are crop_size px of the image as it is (built-in cohorts)


def _read_table(path: Path, what: str, **kw) -> pd.DataFrame:
    """pandas.read_csv whose errors name the file and the problem."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: {what} file not found")
    try:
        return pd.read_csv(path, **kw)
    except Exception as e:  # truncated gzip (EOFError), bad bytes, parser errors: all bad input
        raise ValueError(f"{path}: cannot read {what} file ({type(e).__name__}: {e})") from e


def read_spots(path: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Spot ids, array xy (N,2) and pixel xy (N,2) of a spot file. When the file has a `selected`
    column (her2st), only spots with selected == 1 (under the tissue) are kept."""
    sep = "\t" if ".tsv" in path.name else None  # stnet .spots.txt: let pandas sniff the separator
    df = _read_table(path, "spot", sep=sep, engine="c" if sep else "python")
    df.columns = [str(c).strip().lower() for c in df.columns]
    need = ["x", "y", "pixel_x", "pixel_y"]
    if any(c not in df.columns for c in need):
        raise ValueError(f"{path}: spot file lacks column(s) {[c for c in need if c not in df.columns]}"
                         f" (has {list(df.columns)})")
    if "selected" in df.columns:
        df = df[pd.to_numeric(df["selected"], errors="coerce") == 1]
    values = df[need].apply(pd.to_numeric, errors="coerce")
    bad = ~np.isfinite(values.to_numpy(np.float64))  # NaN where not a number; "inf" parses as a number
    if bad.any():
        r, c = np.argwhere(bad)[0]
        raise ValueError(f"{path}: non-numeric, empty or infinite coordinate {str(df[need].iat[r, c])!r} in data row "
                         f"{df.index[r] + 1}, column {need[c]!r}")
    array_xy = np.rint(values[["x", "y"]].to_numpy(np.float64)).astype(np.int64)  # (N, 2)
    ids = [f"{x}x{y}" for x, y in array_xy]
    dups = pd.Index(ids)[pd.Index(ids).duplicated()].unique().tolist()
    if dups:
        raise ValueError(f"{path}: duplicate spot id(s) {dups[:5]} (rounded x, y)")
    return ids, array_xy, values[["pixel_x", "pixel_y"]].to_numpy(np.float64)


def _read_counts(path: Path) -> pd.DataFrame:
    """Raw counts (spots x genes) as float32, index normalised to "XxY" with rounded x, y.
    Parsed with numpy.loadtxt: several times faster than pandas on these 15k-column files."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: counts file not found")
    try:
        with (gzip.open(path) if path.name.endswith(".gz") else open(path, "rb")) as f:
            head, _, body = f.read().partition(b"\n")
        genes = head.decode().rstrip("\r").split("\t")[1:]
        index = [line.split(b"\t", 1)[0].decode() for line in body.splitlines() if line.strip()]
        try:  # integer parsing is 2x faster; counts that are not integers are parsed as floats
            values = np.loadtxt(io.BytesIO(body), delimiter="\t", dtype=np.int32, ndmin=2,
                                usecols=range(1, len(genes) + 1)).astype(np.float32)  # (N, genes)
        except ValueError:
            values = np.loadtxt(io.BytesIO(body), delimiter="\t", dtype=np.float32, ndmin=2,
                                usecols=range(1, len(genes) + 1))
    except Exception as e:  # truncated gzip (EOFError), bad bytes, ragged rows, non-numeric counts
        raise ValueError(f"{path}: cannot read counts file ({type(e).__name__}: {e})") from e
    if not genes or values.shape != (len(index), len(genes)):
        raise ValueError(f"{path}: expected a header of genes and one row per spot, got {values.shape} values")
    try:
        xy = np.rint([[float(v) for v in s.split("x")] for s in index]).astype(np.int64)
        assert xy.ndim == 2 and xy.shape[1] == 2
    except (ValueError, AssertionError):
        raise ValueError(f"{path}: spot ids must look like '12x34', got e.g. {index[:3]}") from None
    # "nan" and "inf" parse as floats, and so does a number too large for float32 (it becomes inf)
    for bad, problem in ((~np.isfinite(values), "not a finite number"), (values < 0, "negative")):
        if bad.any():
            r, c = np.argwhere(bad)[0]
            raise ValueError(f"{path}: count {values[r, c]:g} in data row {r + 1} (spot {index[r]}), column "
                             f"{genes[c]!r} is {problem} ({int(bad.sum())} such count(s) in the file)")
    df = pd.DataFrame(values, index=[f"{x}x{y}" for x, y in xy], columns=genes)
    if df.index.duplicated().any():
        raise ValueError(f"{path}: duplicate spot id(s) {df.index[df.index.duplicated()].unique().tolist()[:5]}")
    if df.columns.duplicated().any():
        log.warning("%s: gene column(s) %s appear more than once; their counts are summed", path,
                    df.columns[df.columns.duplicated()].unique().tolist()[:5])
        df = df.T.groupby(level=0, sort=False).sum().T
    return df


def load_section(cohort: str, root, name: str) -> Section:
    """Read one section: join counts and spot file on the spot id, check the centres lie on the image."""
    if "load" in COHORTS[cohort]:  # a cohort table registered by visium.py reads its own layouts
        return COHORTS[cohort]["load"](name)
    files = _files(cohort, root, name)
    ids, array_xy, pixel_xy = read_spots(files["spots"])
    counts = _read_counts(files["counts"])
    keep = counts.index.intersection(pd.Index(ids), sort=False)
    in_spots = pd.Index(ids).isin(keep)
    if len(keep) < len(counts) or len(keep) < len(ids):
        log.info("%s/%s: dropped %d spot(s) in the counts but not the spot file, %d in the spot file "
                 "but not the counts (%s, %s)", cohort, name, len(counts) - len(keep), len(ids) - len(keep),
                 files["counts"].name, files["spots"].name)
    if not len(keep):
        raise ValueError(f"{files['counts']} and {files['spots']}: no spot id in common")
    ids = [i for i, k in zip(ids, in_spots) if k]  # spot file order
    array_xy, pixel_xy = array_xy[in_spots], pixel_xy[in_spots]
    if files["image"] is not None:
        try:
            with Image.open(files["image"]) as im:  # reads the header only
                w, h = im.size
        except Exception as e:
            raise ValueError(f"{files['image']}: not a readable image ({type(e).__name__}: {e})") from e
        off = (pixel_xy[:, 0] < 0) | (pixel_xy[:, 0] >= w) | (pixel_xy[:, 1] < 0) | (pixel_xy[:, 1] >= h)
        if off.any():
            i = int(off.argmax())
            raise ValueError(f"{files['spots']}: {int(off.sum())} spot centre(s) outside the {w}x{h} image "
                             f"{files['image'].name}, e.g. {ids[i]} at ({pixel_xy[i, 0]:.1f}, {pixel_xy[i, 1]:.1f})")
    return Section(cohort, name, _patient_of(cohort, name), files["image"], ids, array_xy, pixel_xy,
                   counts.loc[ids], files)
