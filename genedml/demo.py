"""The demo cohort: a small synthetic spatial-transcriptomics cohort in the exact her2st layout.

`make_demo_cohort(root, seed)` writes, in a few seconds and with no download, 8 patients (A-H) x 3
sections (A1, A2, A3, ..., H3) of 40-90 spots each, read by the same code as the real her2st data.
Many small slides rather than a few large ones, so that a slide-level effect is seen on enough
slides (18 in a fold's training set) to be learnt:

    root/ST-cnts/<s>.tsv.gz               raw counts, rows "XxY" (array x, y), 80 gene columns
    root/ST-spotfiles/<s>_selection.tsv   x y new_x new_y pixel_x pixel_y selected
    root/ST-imgs/<patient>/<s>/SYN_HE_BT_<s>.jpg   ~800x700 px H&E-like image
    root/rates/<s>.tsv.gz                 noise-free expected counts (same rows/columns as ST-cnts)
    root/truth/<s>.tsv.gz                 per spot: tissue fractions of its own crop (own_<type>)
                                          and of its 5x5 window without the centre tile (ring_<type>)
    root/DEMO.json                        seed, parameters, gene groups, per-section facts

Each slide is a tissue blob on white background, tiled into smooth random regions of four tissue
types, distinguishable by colour and by texture: tumour (dense large purple nuclei), stroma (pink
fibrous stripes), immune (many small dark dots), fat (white bubbles with thin pink borders). Spots
sit on a square array grid, 73 px apart, so a 64-px crop covers one spot and the 5x5 neighbour
window of 64-px tiles covers 320 px. Like the real files, each spot file has 2 rows (selected=0,
off tissue) that have no counts.

Counts are Gamma-Poisson (negative binomial) draws around rates = library size x exp(eta), where
eta adds, on top of a per-gene base level, one term per image level (so each level carries signal):
  local      TUM01-10, STR01-10, IMM01-10, FAT01-10: marker genes of one tissue type, weighted by the
             fraction of that type inside the spot's own 64-px crop.
  neighbour  NBR01-06 "interface": high where the 5x5 window around the spot (its centre tile left
             out) mixes tumour and immune cells; NBR07-11 follow the window's tumour fraction and
             NBR12-16 its fat fraction, whatever the spot itself is.
  global     SLD01-08 depend on the slide's tumour burden z (its mean tumour fraction over all
             spots, centred and scaled; patients differ in burden and so do their sections, so z
             covers about -2..2 within every fold's training slides), visible only at the slide
             level: a shift z, and a switch
             z x (own stroma - own tumour), so they are stromal in tumour-rich slides and tumoural
             in tumour-poor ones; without the slide, a model cannot tell the two patterns apart.
  none       HK01-16: base level only (house-keeping genes; their labels carry no signal).

`data.ceiling(root)` measures the best PCC(M) a perfect predictor of the expected expression can
reach: per section, the Pearson r per gene between labels made from the noise-free rates and from
the noisy counts (the same normalisation as training), averaged over genes. `python data.py demo`
writes the cohort and prints it.
"""

import gzip
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image


log = logging.getLogger(__name__)

PATIENTS = {p: [f"{p}{i}" for i in (1, 2, 3)] for p in "ABCDEFGH"}
TISSUES = ("tumour", "stroma", "immune", "fat")
GENES = {  # group -> gene names; the groups are documented in the module docstring
    **{t: [f"{t[:3].upper()}{i:02d}" for i in range(1, 11)] for t in TISSUES},
    "interface": [f"NBR{i:02d}" for i in range(1, 7)],
    "near_tumour": [f"NBR{i:02d}" for i in range(7, 12)],
    "near_fat": [f"NBR{i:02d}" for i in range(12, 17)],
    "slide": [f"SLD{i:02d}" for i in range(1, 9)],
    "housekeeping": [f"HK{i:02d}" for i in range(1, 17)],
}
PARAMS = {  # besides the seed, what the files depend on; DEMO.json records it and a change regenerates
    # the cohort (so bump "version" whenever the generating code changes)
    "version": 2, "width": 800, "height": 700, "render_scale": 2, "spacing": 73.0, "jitter_px": 1.5,
    "crop": 64, "grid": 5, "region_px": 220, "base_counts": [1.0, 20.0], "library_sd": 0.35, "nb_theta": 5.0,
    "tumour_bias": [-0.6, -0.43, -0.26, -0.09, 0.09, 0.26, 0.43, 0.6], "section_bias_sd": 0.3,
    "burden_mid": 0.3, "burden_scale": 0.15,
}
COLOURS = {  # RGB
    "background": (243, 241, 243), "tumour": (214, 160, 200), "nucleus": (95, 55, 145),
    "stroma": (238, 172, 192), "fibre": (200, 105, 148), "immune": (226, 178, 206),
    "dot": (58, 36, 108), "fat": (249, 247, 249), "membrane": (222, 146, 178),
}


def _field(rng, h, w, cell):
    """(h, w) float32 smooth random field: one N(0, 1) value per ~cell px, bicubic-upsampled."""
    gh, gw = h // cell + 3, w // cell + 3
    coarse = Image.fromarray(rng.standard_normal((gh, gw)).astype(np.float32))
    fine = np.asarray(coarse.resize((gw * cell, gh * cell), Image.Resampling.BICUBIC))
    return fine[cell:cell + h, cell:cell + w]


def _discs(rng, h, w, cell, radius, p):
    """(h, w) bool: at most one disc per cell x cell square (probability p), radius drawn from
    `radius`, placed so that it stays inside its square: a dense, irregular field of round blobs."""
    gh, gw = -(-h // cell), -(-w // cell)
    r = rng.uniform(*radius, (gh, gw)) * (rng.random((gh, gw)) < p)
    cy, cx = rng.uniform(r, cell - r), rng.uniform(r, cell - r)
    iy, ix = np.arange(h) // cell, np.arange(w) // cell
    dy = (np.arange(h) % cell)[:, None] - cy[iy][:, ix]
    dx = (np.arange(w) % cell)[None, :] - cx[iy][:, ix]
    return dy * dy + dx * dx < r[iy][:, ix] ** 2


def _tissue_map(rng, h, w, tumour_bias, region):
    """(h, w) int8 tissue type per pixel: -1 background, else an index into TISSUES."""
    yy, xx = np.ogrid[0:h, 0:w]
    radial = ((xx - w / 2) / (0.44 * w)) ** 2 + ((yy - h / 2) / (0.44 * h)) ** 2
    inside = 1 - radial + 0.25 * _field(rng, h, w, region * 3 // 2) > 0  # a blob with a wobbly outline
    scores = np.stack([_field(rng, h, w, region) for _ in TISSUES])  # (4, h, w)
    scores[0] += tumour_bias  # the slide's tumour burden
    scores[3] -= 0.3  # fat a little rarer
    tissue = scores.argmax(0).astype(np.int8)
    tissue[~inside] = -1
    return tissue


def _paint(rng, tissue):
    """(h, w, 3) uint8 H&E-like image of a tissue map. Each tissue type blends two colours by its
    own texture s in [0, 1]: nuclei, fibres, dots, bubble membranes."""
    h, w = tissue.shape
    yy, xx = np.ogrid[0:h, 0:w]
    angle = 1.2 * _field(rng, h, w, 125)  # fibres bend slowly
    phase = (xx * np.cos(angle) + yy * np.sin(angle)) * (2 * np.pi / 6) + 3 * _field(rng, h, w, 20)
    textures = [  # s per tissue type, in TISSUES order; sizes in pixels of the rendered map
        _discs(rng, h, w, 8, (2.2, 3.5), 0.9),  # tumour: dense large nuclei
        (0.5 + 0.5 * np.sin(phase)) ** 3,  # stroma: wavy fibres
        _discs(rng, h, w, 4, (0.9, 1.5), 0.8),  # immune: many small dark dots
        ~_discs(rng, h, w, 13, (5.0, 6.2), 1.0),  # fat: the membranes between white bubbles
    ]
    s = np.zeros((h, w), np.float32)
    for t, texture in enumerate(textures):
        s = np.where(tissue == t, texture, s)
    pairs = [COLOURS[k] for k in ("tumour", "nucleus", "stroma", "fibre", "immune", "dot", "fat",
                                  "membrane", "background", "background")]
    c0, c1 = np.array(pairs[0::2], np.float32), np.array(pairs[1::2], np.float32)  # (5, 3) each
    grain = rng.standard_normal((h, w), dtype=np.float32) * 8  # background = row -1
    img = c0[tissue] + s[..., None] * (c1 - c0)[tissue] + grain[..., None]
    return np.clip(img, 0, 255).astype(np.uint8)


def _box_fractions(integral, centres, size):
    """(N, T) fraction of each tissue type in the size x size box centred on each spot, from the
    (T, h+1, w+1) integral images; the part of a box off the image counts as background."""
    _, h, w = integral.shape
    x0 = np.round(centres[:, 0]).astype(int) - size // 2
    y0 = np.round(centres[:, 1]).astype(int) - size // 2
    x0, x1 = np.clip(x0, 0, w - 1), np.clip(x0 + size, 0, w - 1)
    y0, y1 = np.clip(y0, 0, h - 1), np.clip(y0 + size, 0, h - 1)
    sums = integral[:, y1, x1] - integral[:, y0, x1] - integral[:, y1, x0] + integral[:, y0, x0]
    return (sums / size**2).T.astype(np.float64)  # (N, T)


def _effects(rng, genes):
    """Per-gene log-scale effects, shared by all sections: base (G,), local (4, G), neighbour (3, G),
    slide shift (G,) and slide switch (G,)."""
    g = {name: i for i, name in enumerate(genes)}
    lo, hi = PARAMS["base_counts"]
    base = rng.uniform(np.log(lo), np.log(hi), len(genes))
    local, neighbour = np.zeros((len(TISSUES), len(genes))), np.zeros((3, len(genes)))
    for t, tissue in enumerate(TISSUES):
        local[t, [g[n] for n in GENES[tissue]]] = rng.uniform(1.2, 2.2, 10)
    for k, group in enumerate(["interface", "near_tumour", "near_fat"]):
        neighbour[k, [g[n] for n in GENES[group]]] = rng.uniform(2.0, 3.0, len(GENES[group]))
    shift, switch = np.zeros(len(genes)), np.zeros(len(genes))
    idx = [g[n] for n in GENES["slide"]]
    shift[idx], switch[idx] = rng.uniform(0.3, 0.6, len(idx)), rng.uniform(1.2, 2.0, len(idx))
    return base, local, neighbour, shift, switch


def _section(rng, tumour_bias, effects, genes):
    """Generate one section: image (h, w, 3), spot table, counts (N, G), rates (N, G), truth (N, 8)
    and a dict of facts for DEMO.json."""
    h, w, spacing, crop = PARAMS["height"], PARAMS["width"], PARAMS["spacing"], PARAMS["crop"]
    k = PARAMS["render_scale"]  # the tissue map and texture are drawn at 1/k size, then upsampled
    tissue = _tissue_map(rng, h // k, w // k, tumour_bias, PARAMS["region_px"] // k)
    image = np.asarray(Image.fromarray(_paint(rng, tissue)).resize((w, h), Image.Resampling.BILINEAR))
    integral = np.zeros((len(TISSUES), h // k + 1, w // k + 1), np.int32)
    for t in range(len(TISSUES)):
        integral[t, 1:, 1:] = (tissue == t).cumsum(0, dtype=np.int32).cumsum(1, dtype=np.int32)

    # spots: a square array grid, slightly rotated, with pixel jitter; keep those on tissue
    cols, rows = int((w - 100) // spacing) + 1, int((h - 100) // spacing) + 1
    gx, gy = np.meshgrid(np.arange(cols), np.arange(rows))
    grid = np.stack([gx.ravel(), gy.ravel()], 1).astype(np.float64)  # (cols*rows, 2)
    a = rng.uniform(-0.01, 0.01)
    affine = spacing * np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    centre = (grid.max(0) / 2) @ affine.T
    pixel = np.array([w / 2, h / 2]) + (grid @ affine.T - centre)
    pixel += rng.normal(0, PARAMS["jitter_px"], pixel.shape)
    own = _box_fractions(integral, pixel / k, crop // k)  # (M, 4) tissue fractions of the spot's own crop
    keep = np.flatnonzero(own.sum(1) >= 0.5)  # at least half the crop on tissue
    off = rng.choice(np.flatnonzero(own.sum(1) == 0), 2, replace=False)  # 2 unselected rows
    array_xy = grid.astype(np.int64) + 2  # her2st's array coordinates start at a small positive number

    # the three levels' inputs: own crop, the 5x5 window without its centre tile, the slide
    own = own[keep]
    window = _box_fractions(integral, pixel[keep] / k, crop * PARAMS["grid"] // k)
    ring = (window * PARAMS["grid"] ** 2 - own) / (PARAMS["grid"] ** 2 - 1)  # (N, 4)
    neighbourhood = np.stack([4 * ring[:, 0] * ring[:, 2], ring[:, 0], ring[:, 3]], 1)  # (N, 3)
    burden = own[:, 0].mean()
    z = float(np.clip((burden - PARAMS["burden_mid"]) / PARAMS["burden_scale"], -2, 2))
    base, local, neighbour, shift, switch = effects
    eta = base + own @ local + neighbourhood @ neighbour + z * shift
    eta += z * (own[:, 1] - own[:, 0])[:, None] * switch
    library = rng.lognormal(-PARAMS["library_sd"] ** 2 / 2, PARAMS["library_sd"], (len(keep), 1))
    rates = library * np.exp(eta)  # (N, G) expected counts
    theta = PARAMS["nb_theta"]  # negative binomial = Poisson with a Gamma(theta, 1/theta) mean factor
    counts = rng.poisson(rates * rng.gamma(theta, 1 / theta, rates.shape))

    rows_ = np.concatenate([keep, off])
    spots = pd.DataFrame({
        "x": array_xy[rows_, 0], "y": array_xy[rows_, 1],
        "new_x": np.round(array_xy[rows_, 0] + rng.normal(0, 0.05, len(rows_)), 3),
        "new_y": np.round(array_xy[rows_, 1] + rng.normal(0, 0.05, len(rows_)), 3),
        "pixel_x": np.round(pixel[rows_, 0], 2), "pixel_y": np.round(pixel[rows_, 1], 2),
        "selected": np.r_[np.ones(len(keep), int), np.zeros(2, int)],
    }).iloc[rng.permutation(len(rows_))]  # the real spot files are not in grid order either
    ids = [f"{x}x{y}" for x, y in array_xy[keep]]
    truth = pd.DataFrame(np.round(np.c_[own, ring], 4), ids,
                         [f"{p}_{t}" for p in ("own", "ring") for t in TISSUES])
    facts = {"spots": len(keep), "tumour_burden": round(float(burden), 4), "slide_factor": round(z, 4),
             "tissue_fractions": dict(zip(TISSUES, np.round(own.mean(0), 4).tolist()))}
    return image, spots, pd.DataFrame(counts, ids, genes), pd.DataFrame(rates, ids, genes), truth, facts


def _write_tsv_gz(df, path, **kw):
    """gzip without a timestamp in its header, so the same seed gives byte-identical files."""
    path.write_bytes(gzip.compress(df.to_csv(sep="\t", **kw).encode(), mtime=0))


def _expected(root):
    """The files a complete demo cohort holds besides DEMO.json."""
    return [root / f for p, sections in PATIENTS.items() for s in sections
            for f in (f"ST-imgs/{p}/{s}/SYN_HE_BT_{s}.jpg", f"ST-spotfiles/{s}_selection.tsv",
                      f"ST-cnts/{s}.tsv.gz", f"rates/{s}.tsv.gz", f"truth/{s}.tsv.gz")]


def make_demo_cohort(root, seed: int = 0) -> Path:
    """Write the demo cohort into `root` (see the module docstring) and return root as a Path.
    Idempotent: returns at once when root/DEMO.json records the same seed and parameters and every
    file is there. Atomic: everything is generated in a temporary folder beside root, then renamed
    into place, so an interrupted run leaves nothing behind. A non-empty root without DEMO.json is
    never overwritten (ValueError)."""
    root = Path(root)
    meta = {"seed": int(seed), "params": PARAMS, "tissues": list(TISSUES), "genes": GENES}
    meta = json.loads(json.dumps(meta))  # the form it takes on disk, for the comparison below
    if (root / "DEMO.json").is_file():
        old = json.loads((root / "DEMO.json").read_text())
        if {k: old.get(k) for k in meta} == meta and all(f.is_file() for f in _expected(root)):
            return root
    elif root.exists() and not root.is_dir():
        raise ValueError(f"{root}: a file, not a folder; the demo cohort is written into a folder")
    elif root.exists() and any(root.iterdir()):
        raise ValueError(f"{root} exists, is not empty and holds no DEMO.json: refusing to overwrite it")

    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        rng = np.random.default_rng(seed)
        genes = [g for group in GENES.values() for g in group]
        effects = _effects(rng, genes)
        bias = rng.permutation(PARAMS["tumour_bias"])  # patients differ in tumour burden
        meta["sections"] = {}
        for p, (patient, sections) in enumerate(PATIENTS.items()):
            for name in sections:
                image, spots, counts, rates, truth, facts = _section(
                    rng, bias[p] + rng.normal(0, PARAMS["section_bias_sd"]), effects, genes)
                folder = tmp / "ST-imgs" / patient / name
                for d in (folder, tmp / "ST-cnts", tmp / "ST-spotfiles", tmp / "rates", tmp / "truth"):
                    d.mkdir(parents=True, exist_ok=True)
                Image.fromarray(image).save(folder / f"SYN_HE_BT_{name}.jpg", quality=90)
                spots.to_csv(tmp / "ST-spotfiles" / f"{name}_selection.tsv", sep="\t", index=False)
                _write_tsv_gz(counts, tmp / "ST-cnts" / f"{name}.tsv.gz")
                _write_tsv_gz(rates, tmp / "rates" / f"{name}.tsv.gz", float_format="%.4f")
                _write_tsv_gz(truth, tmp / "truth" / f"{name}.tsv.gz")
                meta["sections"][name] = {"patient": patient, **facts}
        (tmp / "DEMO.json").write_text(json.dumps(meta, indent=1) + "\n")
        old = None
        if root.exists():  # an older demo (other seed or parameters), or an empty folder
            old = root.parent / f".{root.name}.old-{os.getpid()}"
            os.rename(root, old)
        os.rename(tmp, root)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("wrote the demo cohort (seed %d) to %s", seed, root)
    return root
