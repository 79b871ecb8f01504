"""Image crops of every spot: decoded once per slide, cut once, cached (cache.py); and the square's symmetries.

`section_crops` decodes a section's image once (or, for a whole-slide image, reads regions from its
pyramid: slide.py) and cuts each spot's local crop, cached as one memory-mapped uint8 array; the 5x5
neighbour window of a spot is cut from the image on demand. A section with a field of view in µm
(`at_field_of_view`: a cohort table's, or a foundation encoder's) is resampled first, so that
crop_size px span it. `dihedral` is the crop augmentation's
transform: one of the 8 flips and 90-degree rotations of a square.
"""
import dataclasses
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from genedml.cache import ArrayCache, fingerprint
from genedml.cohorts import COHORTS, PITCH_UM, Section

CROP_VERSION = 1  # bump when the way crops are cut changes, so cached crops are rebuilt (PIL's bomb guard: cohorts.py)


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
    from genedml import slide  # lazily: the whole-slide reader, for every format PIL cannot decode whole
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

    # the scale in the name too: crops of one slide at its own and at an encoder's resolution coexist
    local = cache.get(f"{tag}" + (f"-x{scale:.4g}" if scale != 1.0 else "") + f"-crops{crop_size}", key, build)["local"]
    return SectionCrops(local, image, crop_size, key, centres)


def cohort_crops(sections: list[Section], cache: ArrayCache, crop_size: int, progress=True) -> list[SectionCrops]:
    """section_crops for every section, with a progress bar over the sections."""
    one = len(sections) == 1  # one slide (evaluate.py --predict): a bar over its spots instead
    bar = tqdm(sections, desc=f"caching crops ({crop_size} px)", disable=not progress or one)
    return [section_crops(s, cache, crop_size, progress=progress and one) for s in bar]


N_DIHEDRAL = 8  # the flips and 90-degree rotations of a square: the crop augmentation's transforms


def dihedral(a: np.ndarray, t: int, axes=(0, 1)) -> np.ndarray:
    """Transform t in 0..7 of the square's symmetries on two axes (rows, columns): rotate by
    (t // 2) * 90 degrees, then mirror left-right if t is odd. t = 0 leaves the array as it is."""
    assert 0 <= t < N_DIHEDRAL, f"transform must be in 0..{N_DIHEDRAL - 1}, got {t}"
    a = np.rot90(a, t // 2, axes=axes)
    return np.flip(a, axis=axes[1]) if t % 2 else a


# ----------------------------------------------------------------------------- a crop's field of view
def um_per_px(array_xy, pixel_xy, geometry, where="") -> float:
    """Image resolution from the spot pitch: PITCH_UM / the median pixel distance between array neighbours."""
    df = pd.DataFrame({"x": array_xy[:, 0], "y": array_xy[:, 1], "px": pixel_xy[:, 0], "py": pixel_xy[:, 1]})
    steps = [(1, 0), (0, 1)] + ([(1, -1)] if geometry == "hex" else [])  # one direction of each axis
    dist = []
    for dx, dy in steps:
        pairs = df.merge(df.assign(x=df.x - dx, y=df.y - dy), on=["x", "y"])  # spot and its +(dx, dy) neighbour
        dist.append(np.hypot(pairs.px_x - pairs.px_y, pairs.py_x - pairs.py_y).to_numpy())
    dist = np.concatenate(dist)
    if not len(dist) or np.median(dist) <= 0:
        raise ValueError(f"{where}: cannot derive µm per pixel: no two spots are array neighbours "
                         f"(give the cohort table a um_per_px column)")
    return PITCH_UM[geometry] / float(np.median(dist))


def native_crop_um(sections, crop_size) -> float | None:
    """Field of view (µm) of a crop_size-px crop at the sections' own resolution: what a checkpoint of
    a built-in cohort saw, so an external test can cut crops of the same width. None if unknown."""
    try:
        res = [s.um_per_px or um_per_px(s.array_xy, s.pixel_xy, s.geometry, s.name) for s in sections]
    except ValueError:
        return None
    return float(crop_size * np.median(res))


def at_field_of_view(section: Section, crop_um: float | None) -> Section:
    """The section with its crops cut at crop_um µm (crop_size px span it; section_crops resamples), its
    µm/px read off its spot pitch where unknown. None: the section as it is (a built-in cohort's crops at
    the image's own resolution, a cohort table's at the field of view it was registered with)."""
    if crop_um is None:
        return section
    res = section.um_per_px or um_per_px(section.array_xy, section.pixel_xy, section.geometry,
                                         str(section.files.get("spots", section.name)))
    return dataclasses.replace(section, um_per_px=res, crop_um=float(crop_um))
