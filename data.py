"""From sections to what Gene-DML trains on: genes, labels, image crops and the spot dataset.

A `Section` (cohorts.py: the published cohorts; visium.py: your own slides) holds spot ids, array and
pixel coordinates and raw counts. Here: the genes predicted (`select_genes`), the labels, the crops
of each spot and of its 5x5 neighbourhood, cached once per section (`section_crops`), and
`SpotDataset`, which serves any cohort and split with fixed keys. `python data.py download | info |
folds` fetches, lists and splits a published cohort.

Labels (README: The method in one page): counts over the selected genes, library size normalised to 1e4 per spot,
log10(1 + x), then each spot replaced by the mean over itself and its array-grid neighbours (3x3;
on a Visium slide's hexagonal grid, the 6 neighbours). Your own Visium / HEST-1k slides: visium.py.
"""

import argparse
import hashlib
import logging
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from tqdm import tqdm

from genedml import slide
from genedml.cache import ArrayCache, fingerprint
from genedml.cohorts import COHORTS, Section, fold_split, load_section, sections_of

log = logging.getLogger(__name__)
CROP_VERSION = 1  # bump when the way crops are cut changes, so cached crops are rebuilt (PIL's bomb guard: cohorts.py)


# ----------------------------------------------------------------------------- genes and labels
def select_genes(sections: list[Section], n: int = 250) -> list[str]:
    """The n genes with the highest total raw count over these sections; ties by name."""
    names = ", ".join(s.name for s in sections[:5]) + (", ..." if len(sections) > 5 else "")
    return top_genes([s.counts.sum(axis=0) for s in sections], n, where=f"{sections[0].cohort} sections {names}")


def top_genes(totals: list[pd.Series], n: int, where: str = "the sections") -> list[str]:
    """The n genes with the highest sum over these per-section totals (gene -> count); ties by name."""
    total = pd.concat(totals, axis=1).fillna(0).sum(axis=1)
    if n > len(total):  # a small gene panel, say: a clear error before any image is read
        raise ValueError(f"asked for the top {n} genes, but {where} hold only {len(total)} genes: "
                         f"ask for at most {len(total)} (--n-genes {len(total)})")
    return total.sort_index().sort_values(ascending=False, kind="stable").index[:n].tolist()


def read_gene_list(path) -> list[str]:
    """A gene list: .txt (one gene per line) or .npy (an array of strings)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: gene list not found")
    if path.suffix == ".npy":
        genes = [str(g) for g in np.load(path, allow_pickle=False).reshape(-1)]
    elif path.suffix == ".txt":
        genes = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    else:
        raise ValueError(f"{path}: gene list must be .txt or .npy")
    if not genes or len(set(genes)) < len(genes):
        raise ValueError(f"{path}: gene list is empty or has duplicates")
    return genes


def gene_counts(section: Section, genes: list[str]) -> np.ndarray:
    """(N, G) float32 raw counts of these genes; a gene absent from the section counts as zero (logged)."""
    absent = [g for g in genes if g not in section.counts.columns]
    if absent:
        log.info("%s/%s: %d of %d genes absent, counted as zero: %s%s", section.cohort, section.name,
                 len(absent), len(genes), ", ".join(absent[:5]), " ..." if len(absent) > 5 else "")
    return section.counts.reindex(columns=genes, fill_value=0).to_numpy(np.float32)


# Array-grid neighbours (dx, dy) averaged by the label smoothing, the spot itself included. Square
# (ST): the 3x3 block. Hexagonal (Visium, array_xy in axial coordinates, see visium.py): the spot and
# its 6 neighbours at 100 µm, the hexagonal grid's first ring.
SMOOTH_OFFSETS = {"square": [(dx, dy) for dx in (-1, 0, 1) for dy in (-1, 0, 1)],
                  "hex": [(0, 0), (1, 0), (-1, 0), (0, 1), (0, -1), (1, -1), (-1, 1)]}


def expression_labels(counts: np.ndarray, array_xy: np.ndarray, smooth: bool = True, geometry: str = "square") -> np.ndarray:
    """(N, G) float32 labels: library size -> 1e4 over the given genes, log10(1 + x), then (smooth)
    the mean over the spot and those of its array-grid neighbours (SMOOTH_OFFSETS) that are spots of
    the section: 8 on the square grid, 6 on the hexagonal one."""
    counts = np.asarray(counts, np.float64)
    lib = counts.sum(axis=1, keepdims=True)  # (N, 1); a spot without counts stays all zero
    y = np.log10(1 + np.divide(counts * 1e4, lib, out=np.zeros_like(counts), where=lib > 0))
    if not smooth:
        return y.astype(np.float32)
    xy = np.asarray(array_xy, np.int64)
    xy = xy - xy.min(axis=0) + 1  # 1-based, so the neighbours of the border spots stay inside the grid
    assert len(np.unique(xy, axis=0)) == len(xy), "expression_labels: duplicate array coordinates"
    assert geometry in SMOOTH_OFFSETS, f"geometry must be one of {list(SMOOTH_OFFSETS)}, got {geometry!r}"
    W, H = xy.max(axis=0) + 2
    grid = np.zeros((W, H, y.shape[1]))  # dense array grid of labels
    have = np.zeros((W, H))  # 1 where a spot exists
    grid[xy[:, 0], xy[:, 1]] = y
    have[xy[:, 0], xy[:, 1]] = 1
    total, n = np.zeros_like(y), np.zeros(len(y))
    for dx, dy in SMOOTH_OFFSETS[geometry]:
        total += grid[xy[:, 0] + dx, xy[:, 1] + dy]
        n += have[xy[:, 0] + dx, xy[:, 1] + dy]
    return (total / n[:, None]).astype(np.float32)


# ----------------------------------------------------------------------------- crops
def _corner(centre_xy, size: int) -> tuple[int, int]:
    """Top-left pixel of the size x size crop centred on centre_xy (rounded half up)."""
    return int(np.floor(centre_xy[0] + 0.5)) - size // 2, int(np.floor(centre_xy[1] + 0.5)) - size // 2


def crop_image(image: np.ndarray, centre_xy, size: int) -> np.ndarray:
    """(size, size, 3) uint8 crop centred on the spot; what falls off the image is white (255), the
    crop is never shifted to fit."""
    H, W = image.shape[:2]
    x0, y0 = _corner(centre_xy, size)
    out = np.full((size, size, 3), 255, np.uint8)
    xa, xb, ya, yb = max(x0, 0), min(x0 + size, W), max(y0, 0), min(y0 + size, H)
    if xa < xb and ya < yb:
        out[ya - y0:yb - y0, xa - x0:xb - x0] = image[ya:yb, xa:xb]
    return out


def neighbour_mask(image_shape, centre_xy, size: int, grid: int = 5) -> np.ndarray:
    """(grid*grid,) bool, True where the tile's centre lies on the image (row-major, row = y offset)."""
    H, W = image_shape[:2]
    cx, cy = np.floor(np.asarray(centre_xy, np.float64) + 0.5)
    offsets = (np.arange(grid) - grid // 2) * size
    tx, ty = cx + offsets[None, :], cy + offsets[:, None]  # (1, g), (g, 1)
    return ((tx >= 0) & (tx < W) & (ty >= 0) & (ty < H)).reshape(-1)


def neighbour_window(image, centre_xy, size: int, grid: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """The grid x grid tiles of `size` px around the spot (a grid*size px window) and their mask."""
    assert grid % 2 == 1, f"grid must be odd so the spot's tile is the centre, got {grid}"
    window = crop_image(image, centre_xy, grid * size)  # (g*c, g*c, 3); centre tile == the local crop
    tiles = window.reshape(grid, size, grid, size, 3).transpose(0, 2, 1, 3, 4).reshape(grid * grid, size, size, 3)
    return tiles, neighbour_mask(image.shape, centre_xy, size, grid)


def _decode(path: Path, scale: float = 1.0) -> np.ndarray:
    """(H, W, 3) uint8 image, resampled by `scale` (new px per image px) when scale != 1."""
    try:
        with Image.open(path) as im:
            im.load()
            im = im if im.mode == "RGB" else im.convert("RGB")
            if scale != 1.0:  # resampled before numpy sees it: one full-size copy, not two
                im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))),
                               Image.Resampling.LANCZOS)
            return np.asarray(im)  # (H, W, 3) uint8
    except Exception as e:  # truncated or corrupt JPEG
        raise ValueError(f"{path}: cannot decode image ({type(e).__name__}: {e})") from e


@dataclass
class SectionCrops:
    local: np.ndarray    # (N, c, c, 3) uint8, memory-mapped from the cache
    image: np.ndarray    # (H, W, 3) uint8 decoded image, memory-mapped from the cache (or a slide.SlideView)
    crop_size: int
    key: dict            # what the crops were built from (source fingerprints + sizes), for feature keys
    centres: np.ndarray  # (N, 2) float64 pixel centres
    grid: int = 5

    def tiles(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        return neighbour_window(self.image, self.centres[i], self.crop_size, self.grid)

    def mask(self, i: int) -> np.ndarray:
        return neighbour_mask(self.image.shape, self.centres[i], self.crop_size, self.grid)


def section_crops(section: Section, cache: ArrayCache, crop_size: int, progress=True) -> SectionCrops:
    """Decode the section's JPEG once (cached as a uint8 .npy) and cut every spot's local crop (cached).
    A whole-slide image (slide.reads_regions) is never decoded whole: each crop and window is read
    from the slide's pyramid on demand (slide.SlideView), and only the crops are cached."""
    if section.image_path is None:
        raise FileNotFoundError(f"{section.cohort}/{section.name}: no image found; "
                                f"fetch it with: {COHORTS[section.cohort]['fetch'].format(root='<root>')}")
    # A section with a field of view in µm (visium.py) is resampled so crop_size px span crop_um µm.
    scale = 1.0 if section.crop_um is None else crop_size * section.um_per_px / section.crop_um
    image_key = {"image": fingerprint(section.image_path), "version": CROP_VERSION,
                 **({"scale": round(scale, 9)} if scale != 1.0 else {})}
    tag = re.sub(r"[^A-Za-z0-9_.\-]", "_", f"{section.cohort}-{section.name}")  # a plain file name
    if slide.reads_regions(section.image_path):  # a whole-slide image: only the regions cut are read
        image = slide.open_slide(section.image_path).view(scale)
    else:
        image = cache.get(f"{tag}-image" + (f"-x{scale:.4g}" if scale != 1.0 else ""), image_key,
                          lambda: {"image": _decode(section.image_path, scale)})["image"]
    # pixel p's centre sits at p + 0.5 in continuous coordinates, which resampling multiplies by scale
    centres = np.ascontiguousarray((section.pixel_xy + 0.5) * scale - 0.5, np.float64)  # (N, 2) resampled px
    key = dict(image_key, centres=hashlib.sha1(centres.tobytes()).hexdigest(), spots=len(centres), crop=crop_size)

    def build():
        spots = tqdm(centres, desc=f"crops {tag}", disable=not progress, leave=False)
        return {"local": np.stack([crop_image(image, c, crop_size) for c in spots])}  # (N, c, c, 3)

    local = cache.get(f"{tag}-crops{crop_size}", key, build)["local"]
    return SectionCrops(local, image, crop_size, key, centres)


def cohort_crops(sections: list[Section], cache: ArrayCache, crop_size: int, progress=True) -> list[SectionCrops]:
    """section_crops for every section, with a progress bar over the sections."""
    one = len(sections) == 1  # one slide (evaluate.py --predict): a bar over its spots instead
    bar = tqdm(sections, desc=f"caching crops ({crop_size} px)", disable=not progress or one)
    return [section_crops(s, cache, crop_size, progress=progress and one) for s in bar]


# ----------------------------------------------------------------------------- dataset
N_DIHEDRAL = 8  # the flips and 90-degree rotations of a square: the crop augmentation's transforms


def dihedral(a: np.ndarray, t: int, axes=(0, 1)) -> np.ndarray:
    """Transform t in 0..7 of the square's symmetries on two axes (rows, columns): rotate by
    (t // 2) * 90 degrees, then mirror left-right if t is odd. t = 0 leaves the array as it is."""
    assert 0 <= t < N_DIHEDRAL, f"transform must be in 0..{N_DIHEDRAL - 1}, got {t}"
    a = np.rot90(a, t // 2, axes=axes)
    return np.flip(a, axis=axes[1]) if t % 2 else a


class SpotDataset(torch.utils.data.Dataset):
    """Every spot of the given sections: its local crop (or, given tokens, the frozen trunk's token map
    of it), its neighbour tiles (or their frozen features) and its label, with its section and row.
    With augment=True the local crop gets a random flip / 90-degree rotation (one of 8, data.dihedral);
    token maps are served for that same transform of the crop (features.extract_tokens caches all 8);
    served tiles get the same transform as a whole window (the tile grid is rotated with them); frozen
    tile features describe the unaugmented tiles and are left as they are. An item holds only what a
    step reads; the raw counts, coordinates and spot ids stay on the dataset's sections."""

    def __init__(self, sections: list[Section], crops: list[SectionCrops], genes: list[str],
                 smooth: bool = True, augment: bool = False, features: list[dict] | None = None,
                 tokens: list[np.ndarray] | None = None):
        assert len(crops) == len(sections), f"{len(sections)} sections but {len(crops)} crops"
        assert features is None or len(features) == len(sections), "one features dict per section"
        assert tokens is None or len(tokens) == len(sections), "one token array (N, 8, h, w, C) per section"
        self.sections, self.crops, self.genes = sections, crops, list(genes)
        self.augment, self.features, self.tokens = augment, features, tokens
        self.labels = [expression_labels(gene_counts(s, self.genes), s.array_xy, smooth, s.geometry)
                       for s in sections]  # per section (N_s, G); the raw counts stay on each Section
        for s, c in zip(sections, crops):
            assert len(c.local) == len(s.spot_ids), f"{s.name}: {len(c.local)} crops for {len(s.spot_ids)} spots"
        for s, t in zip(sections, tokens or []):
            assert t.ndim == 5 and t.shape[:2] == (len(s.spot_ids), N_DIHEDRAL), \
                f"{s.name}: tokens {t.shape}, expected ({len(s.spot_ids)}, {N_DIHEDRAL}, h, w, F)"
        # (total spots, 2): section index, row within the section
        self.rows = np.concatenate([np.stack([np.full(len(s.spot_ids), k), np.arange(len(s.spot_ids))], 1)
                                    for k, s in enumerate(sections)]).astype(np.int64)

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i) -> dict:
        s, j = (int(v) for v in self.rows[i])
        crops = self.crops[s]
        t = int(torch.randint(N_DIHEDRAL, ())) if self.augment else 0  # which flip / rotation
        if self.tokens is None:
            local = dihedral(np.asarray(crops.local[j]), t)  # (c, c, 3)
            item = {"local": torch.from_numpy(np.ascontiguousarray(local.transpose(2, 0, 1)))}  # (3, c, c) uint8
        else:  # the trunk's tokens of the transformed crop, copied out of the read-only cache
            local = self.tokens[s][j, t]  # (h, w, F)
            item = {"local": torch.from_numpy(np.array(local).reshape(-1, local.shape[-1]))}  # (h*w, F) float16
        if self.features is None:
            tiles, mask = crops.tiles(j)  # (25, c, c, 3), (25,)
            if t:
                g, c = crops.grid, crops.crop_size
                window = tiles.reshape(g, g, c, c, 3).transpose(0, 2, 1, 3, 4).reshape(g * c, g * c, 3)
                window = dihedral(window, t)
                tiles = window.reshape(g, c, g, c, 3).transpose(0, 2, 1, 3, 4).reshape(g * g, c, c, 3)
                mask = dihedral(mask.reshape(g, g), t).reshape(-1)
            item["neighbour_tiles"] = torch.from_numpy(np.ascontiguousarray(tiles.transpose(0, 3, 1, 2)))  # (25, 3, c, c)
        else:
            feats, mask = self.features[s]["tiles"][j], crops.mask(j)  # (25, F), (25,)
            item["neighbour_feats"] = torch.tensor(np.asarray(feats), dtype=torch.float32)  # (25, F)
        item.update(neighbour_mask=torch.from_numpy(np.ascontiguousarray(mask)),
                    label=torch.tensor(self.labels[s][j]), section=s, index=j)
        return item


# ----------------------------------------------------------------------------- command line
def _tiles_off_image(pixel_xy, size, crop, grid=5) -> tuple[float, float]:
    """Shares of the 5x5 neighbour tiles whose centre is off the image (masked, here and in the
    reference) and that are on it but partly off (kept and padded white here, masked in the reference)."""
    W, H = size
    on = np.stack([neighbour_mask((H, W), c, crop, grid).reshape(grid, grid) for c in pixel_xy])  # (N, g, g)
    offsets = (np.arange(grid) - grid // 2) * crop
    c = np.floor(np.asarray(pixel_xy, np.float64) + 0.5)
    tx = (c[:, 0, None] + offsets)[:, None, :]  # (N, 1, g) tile centres
    ty = (c[:, 1, None] + offsets)[:, :, None]  # (N, g, 1)
    inside = (tx - crop // 2 >= 0) & (tx - crop // 2 + crop <= W) & (ty - crop // 2 >= 0) & (ty - crop // 2 + crop <= H)
    return float((~on).mean()), float((on & ~inside).mean())


def _info(argv) -> int:
    p = argparse.ArgumentParser(prog="python data.py info", description="what is on disk for a cohort")
    p.add_argument("cohort", choices=list(COHORTS))
    p.add_argument("--root", default=None, help="cohort folder (default: data/<cohort>)")
    args = p.parse_args(argv)
    root = Path(args.root or COHORTS[args.cohort]["root"])
    crop = COHORTS[args.cohort]["crop"]
    print(f"{'section':<14}{'patient':<10}{'spots':>6}{'genes':>7}  {'image':<11}  neighbour tiles: centre off / partly off")
    for name in sections_of(args.cohort, COHORTS[args.cohort]["patients"], root):
        try:
            s = load_section(args.cohort, root, name)
            image, tiles = "absent", ""
            if s.image_path is not None:
                with Image.open(s.image_path) as im:  # header only
                    image = "%dx%d" % im.size
                    off, partly = _tiles_off_image(s.pixel_xy, im.size, crop)
                tiles = f"{off:.1%} / {partly:.1%}"
            print(f"{name:<14}{s.patient:<10}{len(s.spot_ids):>6}{s.counts.shape[1]:>7}  {image:<11}  {tiles}")
        except (FileNotFoundError, ValueError) as e:
            print(f"{name:<14}error: {e}")
    return 0


def _folds(argv) -> int:
    p = argparse.ArgumentParser(prog="python data.py folds",
                                description="spots per fold in both protocols (needs counts and spot files only)")
    p.add_argument("cohort", choices=list(COHORTS))
    p.add_argument("--root", default=None, help="cohort folder (default: data/<cohort>)")
    args = p.parse_args(argv)
    root = Path(args.root or COHORTS[args.cohort]["root"])
    spots, totals = {}, {}  # per patient: spots, and per-section gene totals
    for name in tqdm(sections_of(args.cohort, COHORTS[args.cohort]["patients"], root), desc="reading sections"):
        s = load_section(args.cohort, root, name)
        spots[s.patient] = spots.get(s.patient, 0) + len(s.spot_ids)
        totals.setdefault(s.patient, []).append(s.counts.sum(axis=0))
    n_genes = COHORTS[args.cohort]["genes"]
    cohort_list = set(top_genes(sum(totals.values(), []), n_genes))
    print(f"{'fold':>4} {'test':>8} {'val':>8} {'test spots':>11} {'val spots':>10} {'train (validation)':>19} "
          f"{'train (--select-on-test)':>25} {'fewer':>6} {'per-fold genes in the cohort list':>34}")
    for fold in range(len(COHORTS[args.cohort]["folds"])):
        honest, published = fold_split(args.cohort, fold), fold_split(args.cohort, fold, select_on_test=True)
        n = {part: sum(spots.get(p, 0) for p in patients) for part, patients in honest.items()}
        n_pub = sum(spots.get(p, 0) for p in published["train"])
        own = top_genes(sum((totals.get(p, []) for p in honest["train"]), []), n_genes)  # --genes-from train
        print(f"{fold:>4} {','.join(honest['test']):>8} {','.join(honest['val']):>8} {n['test']:>11} {n['val']:>10} "
              f"{n['train']:>19} {n_pub:>25} {1 - n['train'] / max(n_pub, 1):>6.1%} "
              f"{f'{len(cohort_list.intersection(own))}/{n_genes}':>34}")
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "download":
        from genedml import download  # lazily: only the download command needs it
        return download.main(argv[1:])
    if argv and argv[0] in ("info", "folds"):
        logging.basicConfig(level=logging.WARNING)
        return (_info if argv[0] == "info" else _folds)(argv[1:])
    print("usage: python data.py download <cohort> --root R [...]  |  python data.py info|folds <cohort> --root R")
    return 2


if __name__ == "__main__":
    sys.exit(main())
