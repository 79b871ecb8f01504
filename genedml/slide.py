"""Whole slides: reading them region by region, finding the tissue, laying a virtual spot grid on it.

A slide to predict has no spot file: the spots are made up here, with the geometry the model was
trained on, over the tissue found on a thumbnail. Three steps, plain numpy and PIL:

  read     `open_slide(path)`: pathology formats (.svs, .ndpi, .mrxs, .scn, tiled pyramidal .tif)
           through OpenSlide (optional: pip install openslide-python openslide-bin), which reads
           only the regions asked for, from the pyramid level nearest the resolution needed; any
           other image through PIL. `SlideView` is a whole slide at a chosen scale that
           crops.crop_image slices like the decoded image: the training cohorts' slides too large
           for PIL go through it as well (crops.section_crops). µm per pixel comes from the slide's
           metadata (openslide.mpp-x / mpp-y) or from the caller; without either we refuse.
  tissue   `tissue_mask(thumbnail)`: HSV saturation (stain is coloured, glass is not), a median
           blur, Otsu's threshold (never below MIN_SATURATION, so a blank slide stays blank), a
           morphological close, then pieces smaller than MIN_PIECE_MM2 dropped (dust, debris).
  grid     `spot_grid`: the training cohort's lattice (ST: square, 200 µm centre to centre;
           Visium: hexagonal, 100 µm; PITCH_UM) over the tissue's bounding box; a spot is kept
           when at least MIN_TISSUE of its tile is tissue and the tile is not near-white (mean RGB
           above WHITE_MEAN, as DeepSpot drops tiles). Array coordinates follow visium.py (square:
           x = column, y = row; hexagonal: axial, x = (col - row) / 2, y = row).

The global level attends over every spot of a slide at once, which grows quadratically; a grid of
a whole slide can hold tens of thousands of spots. `grid_windows` cuts a large grid into square
windows of the array, each seen with a margin of context around it (docs/data.md, "Predict a slide").
"""
import logging
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from genedml.cohorts import PITCH_UM  # the spot lattices' centre-to-centre distance

log = logging.getLogger(__name__)

WSI_SUFFIXES = {".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide"}
THUMB_UM = 8.0          # thumbnail resolution for the tissue search: a 100 µm Visium spot is 12.5 px
MIN_SATURATION = 20     # HSV saturation (0-255) below which a pixel is glass, whatever Otsu says
MIN_PIECE_MM2 = 0.05    # tissue pieces smaller than this are dropped (about 1 ST spot, 5 Visium spots)
MIN_TISSUE = 0.5        # share of a spot's tile that must be tissue
WHITE_MEAN = 200.0      # a tile whose mean RGB is above this is background (DeepSpot's rule)
MAX_GLOBAL_SPOTS = 5000  # spots per global-level pass: a full Visium array (4,992) still runs whole


# ----------------------------------------------------------------------------- reading
def _openslide(path):
    try:
        import openslide  # optional: only whole-slide formats need it
    except ImportError:
        raise ValueError(f"{path}: reading this whole-slide image needs OpenSlide, which is not installed "
                         f"(pip install openslide-python openslide-bin)") from None
    return openslide


def _openslide_format(path) -> str | None:
    """OpenSlide's vendor name for the file, None if OpenSlide is missing or does not know it."""
    try:
        import openslide
    except ImportError:
        return None
    try:
        return openslide.OpenSlide.detect_format(str(path))
    except Exception:  # unreadable file: PIL gets to say what is wrong with it
        return None


JPEG_2000 = (33003, 33005, 34712)  # TIFF compressions PIL cannot decode


def _tiff_header(path) -> dict | None:
    """What PIL's header read says of a TIFF: tiled and pyramidal? decodable whole? None if unreadable."""
    try:
        with Image.open(path) as im:  # the header only
            tags = getattr(im, "tag_v2", {})
            w, h = im.size
            return {"pyramidal": 322 in tags and getattr(im, "n_frames", 1) > 1,  # 322: TileWidth
                    "decodable": tags.get(259) not in JPEG_2000 and w * h <= 2 * Image.MAX_IMAGE_PIXELS}
    except Image.DecompressionBombError:
        return {"pyramidal": False, "decodable": False}
    except Exception:
        return None


def reads_regions(path) -> bool:
    """Whether an image is read region by region through OpenSlide rather than decoded whole by PIL:
    a pathology format, or a TIFF that is tiled and pyramidal or that PIL cannot decode whole. Without
    OpenSlide installed, a pyramidal TIFF that PIL can decode is decoded whole, as before."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in WSI_SUFFIXES:
        return True
    if suffix not in (".tif", ".tiff"):
        return False
    vendor, header = _openslide_format(path), _tiff_header(path)
    if header is None:
        return vendor is not None
    if vendor is not None:
        return vendor != "generic-tiff" or header["pyramidal"] or not header["decodable"]
    return not header["decodable"]  # then Slide says to install OpenSlide


class Slide:
    """A slide's size (level 0 px), resolution and reader: "openslide" (regions on demand) or "pil"."""

    def __init__(self, path, um_per_px=None):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: slide not found")
        self.osr = None
        if reads_regions(self.path):
            openslide = _openslide(self.path)
            try:
                self.osr = openslide.OpenSlide(str(self.path))
            except Exception as e:
                raise ValueError(f"{self.path}: OpenSlide cannot read it ({type(e).__name__}: {e})") from None
            self.width, self.height = self.osr.dimensions
            props = self.osr.properties
            mpp = [props.get(f"openslide.mpp-{a}") for a in "xy"]
            metadata = float(mpp[0]) if all(mpp) else None
            if all(mpp) and abs(float(mpp[0]) - float(mpp[1])) > 0.01 * float(mpp[0]):
                log.warning("%s: pixels are not square (mpp-x %s, mpp-y %s); using mpp-x", self.path, *mpp)
        else:
            try:
                with Image.open(self.path) as im:  # the header only
                    self.width, self.height = im.size
            except Exception as e:
                raise ValueError(f"{self.path}: not an image PIL or OpenSlide can read ({type(e).__name__}: {e})") from None
            metadata = None  # JPEG/PNG dpi fields are not a microscope's resolution
        self.reader = "pil" if self.osr is None else "openslide"
        self.um_per_px = float(um_per_px) if um_per_px else metadata  # None: unknown

    def resolution(self) -> float:
        """µm per level-0 px, or an error saying how to give it."""
        if not self.um_per_px or self.um_per_px <= 0:
            raise ValueError(f"{self.path}: the slide does not say its resolution (no openslide.mpp-x in its "
                             f"metadata); pass --um-per-px (e.g. 0.25 for a 40x scan, 0.5 for 20x)")
        return self.um_per_px

    def __getstate__(self):  # DataLoader workers get a copy: OpenSlide handles do not pickle, reopen there
        return {k: v for k, v in self.__dict__.items() if k != "osr"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.osr = _openslide(self.path).OpenSlide(str(self.path)) if self.reader == "openslide" else None

    def thumbnail(self, scale) -> Image.Image:
        """The whole slide at `scale` thumbnail px per slide px (RGB, glass white), without decoding
        more than the pyramid level (OpenSlide) or the JPEG scale (PIL's draft) it needs."""
        size = (max(1, round(self.width * scale)), max(1, round(self.height * scale)))
        if self.osr is not None:
            level = self.osr.get_best_level_for_downsample(1 / scale)
            region = self.osr.read_region((0, 0), level, self.osr.level_dimensions[level])
            return _on_white(region).resize(size, Image.Resampling.BOX)
        with Image.open(self.path) as im:
            im.draft("RGB", size)  # JPEG: decode at 1/2, 1/4 or 1/8 scale directly
            return im.convert("RGB").resize(size, Image.Resampling.BOX)

    def view(self, scale) -> "SlideView":
        assert self.osr is not None, "a slide PIL decodes whole is decoded (crops.section_crops), not viewed"
        return SlideView(self, scale)


def _on_white(rgba: Image.Image) -> Image.Image:
    """OpenSlide returns transparent pixels where the slide has no data: make them white glass."""
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


class SlideView:
    """A whole slide resampled by `scale` (new px per level-0 px), as a read-only (H, W, 3) uint8
    array whose [y0:y1, x0:x1] slices read that region alone, from the coarsest pyramid level still
    at least as fine as needed, and resample it (Lanczos) to exactly the pixels asked for. Pixel p
    covers [p, p + 1) here and [p / scale, (p + 1) / scale) on level 0, as crops.section_crops
    maps the spot centres."""

    def __init__(self, slide: Slide, scale: float):
        self.slide, self.scale, self.dtype = slide, float(scale), np.dtype(np.uint8)
        self.shape = (max(1, round(slide.height * scale)), max(1, round(slide.width * scale)), 3)
        osr = slide.osr
        fine = [l for l, d in enumerate(osr.level_downsamples) if d * self.scale <= 1 + 1e-6]
        self.level = max(fine, key=lambda l: osr.level_downsamples[l]) if fine else 0
        self.down = osr.level_downsamples[self.level]  # level-0 px per level px

    def __getitem__(self, key) -> np.ndarray:
        ys, xs = key
        assert isinstance(ys, slice) and isinstance(xs, slice) and ys.step is None and xs.step is None, \
            "a SlideView reads rectangular regions: view[y0:y1, x0:x1]"
        y0, y1, _ = ys.indices(self.shape[0])
        x0, x1, _ = xs.indices(self.shape[1])
        return self.read(x0, y0, max(x1 - x0, 0), max(y1 - y0, 0))

    def read(self, x0, y0, w, h) -> np.ndarray:
        """(h, w, 3) uint8: the region whose top-left pixel is (x0, y0) in this view's pixels."""
        if w == 0 or h == 0:
            return np.zeros((h, w, 3), np.uint8)
        f = 1 / (self.scale * self.down)  # level px per view px (>= 1: the level is at least as fine)
        lx0, ly0 = x0 * f, y0 * f         # the region's corner on the level, continuous
        margin = 0 if abs(f - 1) < 1e-9 else math.ceil(3 * f) + 1  # the Lanczos kernel's reach
        ix0, iy0 = math.floor(lx0) - margin, math.floor(ly0) - margin
        iw, ih = math.ceil(lx0 + w * f) + margin - ix0, math.ceil(ly0 + h * f) + margin - iy0
        region = _on_white(self.slide.osr.read_region((round(ix0 * self.down), round(iy0 * self.down)),
                                                      self.level, (iw, ih)))
        if margin == 0 and lx0 == ix0 and ly0 == iy0:  # same pixels: no resampling at all
            return np.asarray(region)[:h, :w]
        box = (lx0 - ix0, ly0 - iy0, lx0 - ix0 + w * f, ly0 - iy0 + h * f)
        return np.asarray(region.resize((w, h), Image.Resampling.LANCZOS, box=box))


def open_slide(path, um_per_px=None) -> Slide:
    return Slide(path, um_per_px)


# ----------------------------------------------------------------------------- tissue
def otsu(values: np.ndarray) -> float:
    """Otsu's threshold of uint8 values: the cut that maximises the between-class variance (values
    above it are the second class). Every cut in an empty gap between two modes splits alike: the
    middle of the gap is returned."""
    hist = np.bincount(np.asarray(values, np.uint8).reshape(-1), minlength=256).astype(np.float64)
    w0 = np.cumsum(hist)                       # pixels at or below each level
    m0 = np.cumsum(hist * np.arange(256))
    w1, total = w0[-1] - w0, m0[-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (m0 / w0 - (total - m0) / w1) ** 2 * w0 * w1
    between = np.where(np.isfinite(between), between, -1.0)
    if between.max() < 0:  # a single value: nothing to split
        return 0.0
    return float(np.flatnonzero(between >= between.max() * (1 - 1e-9)).mean())  # the middle of a flat optimum


def components(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """4-connected pieces of a bool mask: (labels (h, w) int64, 0 = background; sizes (n + 1,) px).

    Runs of True along each row are joined to the overlapping runs of the row above (union-find
    over runs), so the cost follows the number of runs, not of pixels."""
    h, w = mask.shape
    edges = np.diff(np.pad(mask.astype(np.int8), ((0, 0), (1, 1))), axis=1)  # +1 run start, -1 run end
    rows, starts = np.nonzero(edges == 1)
    _, ends = np.nonzero(edges == -1)          # same order: row-major, one end per start
    parent = list(range(len(starts)))

    def root(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first = np.searchsorted(rows, np.arange(h + 1))  # runs of row y: first[y]:first[y + 1]
    for y in range(1, h):
        a, b, pa = first[y], first[y + 1], first[y - 1]
        if a == b or pa == a:
            continue
        prev_s, prev_e = starts[pa:a], ends[pa:a]
        for i in range(a, b):  # runs above that overlap [starts[i], ends[i])
            lo, hi = np.searchsorted(prev_e, starts[i], "right"), np.searchsorted(prev_s, ends[i], "left")
            for j in range(pa + lo, pa + hi):
                ri, rj = root(i), root(j)
                if ri != rj:
                    parent[max(ri, rj)] = min(ri, rj)
    roots = np.array([root(i) for i in range(len(starts))], np.int64)
    _, label = np.unique(roots, return_inverse=True)
    labels = np.zeros((h, w), np.int64)
    sizes = np.zeros(label.max() + 2 if len(label) else 1, np.int64)
    for r, s, e, l in zip(rows, starts, ends, label + 1):
        labels[r, s:e] = l
        sizes[l] += e - s
    return labels, sizes


def tissue_mask(thumb: Image.Image, um_per_px: float, min_piece_mm2=MIN_PIECE_MM2) -> tuple[np.ndarray, dict]:
    """(h, w) bool tissue mask of an RGB thumbnail at um_per_px µm per thumbnail px, and how it was found."""
    k = max(3, 2 * round(25 / um_per_px / 2) + 1)  # odd filter size of ~25 µm or more (5 px at 8 µm/px)
    sat = thumb.convert("HSV").getchannel("S").filter(ImageFilter.MedianFilter(k))
    s = np.asarray(sat)
    t = max(otsu(s), MIN_SATURATION)
    closed = Image.fromarray(((s > t) * 255).astype(np.uint8)).filter(ImageFilter.MaxFilter(k)).filter(ImageFilter.MinFilter(k))
    mask = np.asarray(closed) > 0
    labels, sizes = components(mask)
    min_px = min_piece_mm2 * 1e6 / um_per_px ** 2
    keep = sizes >= min_px
    keep[0] = False
    return keep[labels], {"method": "thumbnail: HSV saturation, median blur, Otsu threshold, close, small pieces dropped",
                          "saturation_threshold": float(t), "filter_px": k, "thumbnail_um_per_px": um_per_px,
                          "pieces": int(keep.sum()), "pieces_dropped": int((~keep[1:] & (sizes[1:] > 0)).sum()),
                          "min_piece_mm2": min_piece_mm2}


def read_mask(path, size) -> np.ndarray:
    """A user's tissue mask (any image; nonzero = tissue), stretched to the thumbnail's (w, h)."""
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("L").resize(size, Image.Resampling.NEAREST)) > 0
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: tissue mask not found") from None
    except Exception as e:
        raise ValueError(f"{path}: not a readable mask image ({type(e).__name__}: {e})") from None


# ----------------------------------------------------------------------------- grid
def _box_means(integral, cx, cy, half):
    """Mean of an image over the boxes [c - half, c + half) (thumbnail px; at least 1 px, clipped)."""
    h, w = integral.shape[0] - 1, integral.shape[1] - 1
    xa = np.clip(np.rint(cx - half), 0, w - 1).astype(np.int64)
    ya = np.clip(np.rint(cy - half), 0, h - 1).astype(np.int64)
    xb = np.clip(np.maximum(np.rint(cx + half), xa + 1), 1, w).astype(np.int64)
    yb = np.clip(np.maximum(np.rint(cy + half), ya + 1), 1, h).astype(np.int64)
    total = integral[yb, xb] - integral[ya, xb] - integral[yb, xa] + integral[ya, xa]
    return total / ((xb - xa) * (yb - ya))[(...,) + (None,) * (integral.ndim - 2)]


def _integral(a):
    return np.pad(np.asarray(a, np.float64).cumsum(0).cumsum(1), [(1, 0), (1, 0)] + [(0, 0)] * (a.ndim - 2))


def spot_grid(mask, thumb, thumb_scale, pitch_px, lattice, tile_px, min_tissue=MIN_TISSUE,
              white=WHITE_MEAN) -> dict:
    """Virtual spots on the tissue: the lattice with pitch_px slide px between neighbours, centred on
    the tissue's bounding box. thumb_scale = thumbnail px per slide px; tile_px = the side of
    a spot's tile (the crop) in slide px. Returns array_xy (N, 2) int64, array_row / array_col (N,),
    pixel_xy (N, 2) float64 slide px, tissue (N,) share of the tile on tissue, mean_rgb (N,)."""
    assert lattice in PITCH_UM, f"lattice must be one of {list(PITCH_UM)}, got {lattice!r}"
    ys, xs = np.nonzero(mask)
    empty = {"array_xy": np.zeros((0, 2), np.int64), "array_row": np.zeros(0, np.int64),
             "array_col": np.zeros(0, np.int64), "pixel_xy": np.zeros((0, 2)), "tissue": np.zeros(0), "mean_rgb": np.zeros(0)}
    if not len(xs):
        return empty
    x0, y0 = xs.min() / thumb_scale, ys.min() / thumb_scale  # the tissue's bounding box, slide px
    x1, y1 = (xs.max() + 1) / thumb_scale, (ys.max() + 1) / thumb_scale

    def axis(lo, hi, step):  # positions `step` apart, centred in [lo, hi): equal margins at both ends
        n = max(1, int((hi - lo) // step))
        return lo + (hi - lo - (n - 1) * step) / 2 + step * np.arange(n)

    if lattice == "square":
        px, py = np.meshgrid(axis(x0, x1, pitch_px), axis(y0, y1, pitch_px))
        col, row = np.meshgrid(np.arange(px.shape[1]), np.arange(px.shape[0]))
        array_xy = np.stack([col.reshape(-1), row.reshape(-1)], 1)
    else:  # Visium: rows sqrt(3)/2 pitch apart, a column every half pitch, row + col even
        px, py = np.meshgrid(axis(x0, x1, pitch_px / 2), axis(y0, y1, pitch_px * math.sqrt(3) / 2))
        col, row = np.meshgrid(np.arange(px.shape[1]), np.arange(px.shape[0]))
        even = ((col + row) % 2 == 0).reshape(-1)
        px, py, col, row = (a.reshape(-1)[even] for a in (px, py, col, row))
        array_xy = np.stack([(col - row) // 2, row], 1)
    px, py, col, row = (a.reshape(-1) for a in (px, py, col, row))
    half = tile_px * thumb_scale / 2
    tissue = _box_means(_integral(mask), px * thumb_scale, py * thumb_scale, half)
    rgb = _box_means(_integral(np.asarray(thumb.convert("RGB"))), px * thumb_scale, py * thumb_scale, half).mean(1)
    keep = (tissue >= min_tissue) & (rgb <= white)
    if not keep.any():
        return empty
    return {"array_xy": array_xy[keep].astype(np.int64), "array_row": row[keep].astype(np.int64),
            "array_col": col[keep].astype(np.int64), "pixel_xy": np.stack([px, py], 1)[keep],
            "tissue": tissue[keep], "mean_rgb": rgb[keep]}


# ----------------------------------------------------------------------------- the global level on a big grid
def grid_windows(array_xy, max_spots=MAX_GLOBAL_SPOTS, margin=5) -> list[tuple[np.ndarray, np.ndarray]]:
    """Cut a grid into square windows of the array for the global level: [(members, core)], index
    arrays into the spots. Every spot is in exactly one window's core, where it is predicted; the
    window's members are its core and every spot within `margin` array cells of it, the context the
    global level attends over. At most max_spots members a window, so the cost of a pass is bounded
    and the total grows linearly with the spots. A grid of at most max_spots is one window."""
    xy = np.asarray(array_xy, np.int64)
    if len(xy) <= max_spots:
        everything = np.arange(len(xy))
        return [(everything, everything)]
    margin = min(margin, math.isqrt(max_spots) // 4)  # a small window keeps at least half its side as core
    side = math.isqrt(max_spots) - 2 * margin  # core side in array cells: (side + 2 margin)² <= max_spots
    xy = xy - xy.min(0)
    cell = xy // side
    out = []
    for cx, cy in np.unique(cell, axis=0):  # sorted: row by row of windows, deterministic
        core = np.flatnonzero((cell[:, 0] == cx) & (cell[:, 1] == cy))
        lo, hi = np.array([cx, cy]) * side - margin, np.array([cx + 1, cy + 1]) * side + margin
        members = np.flatnonzero(((xy >= lo) & (xy < hi)).all(1))
        out.append((members, core))
    return out


def overview(path, max_side=2000) -> tuple[Image.Image, float]:
    """A slide's overview image, at most max_side px a side, and its scale (image px per slide px):
    one reduced decode (JPEG draft, or a pyramid level) for all of a slide's maps and its .h5ad."""
    if reads_regions(path):
        s = Slide(path)
        scale = min(1.0, max_side / max(s.width, s.height))
        return s.thumbnail(scale), scale
    with Image.open(path) as im:
        w, h = im.size
        scale = min(1.0, max_side / max(w, h))
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        im.draft("RGB", size)
        return im.convert("RGB").resize(size, Image.Resampling.BOX), size[0] / w


def spot_spacing(pixel_xy, sample=500) -> float:
    """Median distance from a spot to its nearest neighbour, in pixels: over every spot, or over every
    len // sample-th one on a big grid (the distances to all spots of `sample` spots, not N²)."""
    xy = np.asarray(pixel_xy, np.float64)
    if len(xy) < 2:
        return 20.0
    queries = xy[::max(1, len(xy) // sample)]
    d = np.sqrt(((queries[:, None, :] - xy[None]) ** 2).sum(-1))  # (q, N)
    d[d == 0] = np.inf  # the spot itself
    return float(np.median(d.min(1)))
