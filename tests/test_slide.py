"""Whole slides (slide.py): a tiled pyramidal TIFF written here with tissue painted at known places
on white glass, at a known µm/px; the tissue search, the virtual grid, region reads, grid windows.

tifffile writes the slide and OpenSlide reads it; both are optional extras, so these tests skip
cleanly without them. The painted tissue is flat colour, so a crop whose colour is the colour
painted where its spot lies was cut from the right place at the right scale.
"""
import pickle

import numpy as np
import pytest
from PIL import Image

from genedml import cohorts
import data
from genedml import slide
from genedml.cache import ArrayCache
from genedml.crops import section_crops

UM_PER_PX = 1.0
W, H = 2400, 1800
# (x0, y0, x1, y1) px and colour of each painted piece: two tissue pieces and a speck of dust
PIECES = {"a": ((300, 200, 1100, 900), (180, 60, 140)), "b": ((1400, 800, 2200, 1600), (90, 40, 160))}
SPECK = ((1800, 200, 1900, 300), (120, 30, 90))  # 100 x 100 µm = 0.01 mm², below MIN_PIECE_MM2


def painted():
    img = np.full((H, W, 3), 255, np.uint8)
    for (x0, y0, x1, y1), c in [*PIECES.values(), SPECK]:
        img[y0:y1, x0:x1] = c
    return img


def write_pyramid(path, img, um_per_px=UM_PER_PX, levels=3):
    """A tiled TIFF with `levels` pages, each half the size of the last (what scanners write)."""
    tifffile = pytest.importorskip("tifffile")
    pil = Image.fromarray(img)
    with tifffile.TiffWriter(path) as tw:
        for lvl in range(levels):
            d = 2 ** lvl
            a = np.asarray(pil.resize((W // d, H // d), Image.Resampling.BOX)) if d > 1 else img
            res = {} if um_per_px is None else dict(resolution=(1e4 / (um_per_px * d),) * 2, resolutionunit="CENTIMETER")
            tw.write(a, tile=(256, 256), photometric="rgb", compression="zlib", subfiletype=int(lvl > 0), **res)
    return path


@pytest.fixture(scope="module")
def wsi(tmp_path_factory):
    pytest.importorskip("openslide")
    return write_pyramid(tmp_path_factory.mktemp("wsi") / "slide.tif", painted())


def colour_at(x, y):
    for (x0, y0, x1, y1), c in PIECES.values():
        if x0 <= x < x1 and y0 <= y < y1:
            return c
    return None


# ----------------------------------------------------------------------------- reading
def test_openslide_reads_regions_equal_to_the_full_image(wsi):
    img = painted()
    s = slide.open_slide(wsi)
    assert s.reader == "openslide" and (s.width, s.height) == (W, H) and s.um_per_px == pytest.approx(UM_PER_PX)
    full = s.view(1.0)
    assert full.shape == (H, W, 3) and full.level == 0
    for x0, y0, x1, y1 in [(250, 150, 480, 390), (1090, 890, 1410, 1130), (0, 0, 64, 64), (W - 50, H - 40, W, H)]:
        np.testing.assert_array_equal(full[y0:y1, x0:x1], img[y0:y1, x0:x1])
    quarter = s.view(0.25)  # exactly the third page: read as it is
    assert quarter.level == 2 and quarter.shape == (H // 4, W // 4, 3)
    np.testing.assert_array_equal(quarter[20:200, 30:300], np.asarray(Image.fromarray(img).resize((W // 4, H // 4), Image.Resampling.BOX))[20:200, 30:300])
    # between pages: the finer page, resampled like the whole image would be (away from the painted edges)
    third = s.view(1 / 3)
    assert third.level == 1 and third.shape == (H // 3, W // 3, 3)
    whole = np.asarray(Image.fromarray(img).resize((W // 3, H // 3), Image.Resampling.LANCZOS)).astype(int)
    region = third[100:280, 120:350].astype(int)
    assert np.abs(region - whole[100:280, 120:350]).mean() < 3
    np.testing.assert_array_equal(third[150:250, 150:300], np.broadcast_to(PIECES["a"][1], (100, 150, 3)))
    again = pickle.loads(pickle.dumps(third))  # DataLoader workers get a copy and reopen the slide
    np.testing.assert_array_equal(again[0:50, 0:50], third[0:50, 0:50])


def test_which_images_are_read_region_by_region(wsi, tmp_path):
    assert slide.reads_regions(wsi)
    from genedml import visium_files  # a training cohort's whole-slide image passes the up-front check, through OpenSlide
    assert visium_files.check_image(wsi) == (W, H)
    Image.fromarray(painted()[:200, :300]).save(tmp_path / "small.jpg")
    Image.fromarray(painted()[:200, :300]).save(tmp_path / "flat.tif")  # one page, not tiled: PIL decodes it
    assert not slide.reads_regions(tmp_path / "small.jpg") and not slide.reads_regions(tmp_path / "flat.tif")
    s = slide.open_slide(tmp_path / "small.jpg")
    assert s.reader == "pil" and s.um_per_px is None
    with pytest.raises(ValueError, match=r"small.jpg: the slide does not say its resolution.*--um-per-px"):
        s.resolution()
    assert slide.open_slide(tmp_path / "small.jpg", um_per_px=0.5).resolution() == 0.5


def test_a_whole_slide_format_without_openslide_says_what_to_install(tmp_path, monkeypatch):
    import builtins
    real = builtins.__import__
    monkeypatch.setattr(builtins, "__import__", lambda name, *a, **kw: (_ for _ in ()).throw(ImportError(name))
                        if name == "openslide" else real(name, *a, **kw))
    (tmp_path / "scan.svs").write_bytes(b"not really")
    with pytest.raises(ValueError, match=r"scan.svs: .*needs OpenSlide.*pip install openslide-python openslide-bin"):
        slide.open_slide(tmp_path / "scan.svs")


def test_a_slide_without_resolution_metadata(tmp_path):
    pytest.importorskip("openslide")
    s = slide.open_slide(write_pyramid(tmp_path / "bare.tif", painted(), um_per_px=None))
    assert s.reader == "openslide" and s.um_per_px is None
    with pytest.raises(ValueError, match="bare.tif: the slide does not say its resolution"):
        s.resolution()


# ----------------------------------------------------------------------------- tissue and grid
def test_otsu_splits_two_modes():
    rng = np.random.default_rng(0)
    values = np.clip(np.concatenate([rng.normal(10, 3, 5000), rng.normal(120, 10, 2000)]), 0, 255).astype(np.uint8)
    assert 25 < slide.otsu(values) < 95


def test_components_match_a_flood_fill():
    rng = np.random.default_rng(1)
    mask = rng.random((40, 50)) < 0.45
    labels, sizes = slide.components(mask)
    seen = np.zeros_like(mask)
    flood_sizes = []
    for y, x in zip(*np.nonzero(mask)):  # independent: a plain breadth-first flood fill, 4-connected
        if seen[y, x]:
            continue
        queue, n, label = [(y, x)], 0, labels[y, x]
        seen[y, x] = True
        while queue:
            cy, cx = queue.pop()
            n += 1
            assert labels[cy, cx] == label, "one 4-connected piece, one label"
            for ny, nx in ((cy + 1, cx), (cy - 1, cx), (cy, cx + 1), (cy, cx - 1)):
                if 0 <= ny < 40 and 0 <= nx < 50 and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        flood_sizes.append(n)
        assert sizes[label] == n
    assert (labels > 0).sum() == mask.sum() and len(np.unique(labels[mask])) == len(flood_sizes)


@pytest.mark.parametrize("lattice", ["square", "hex"])
def test_grid_lands_on_the_tissue_at_the_pitch_and_crops_show_its_colour(wsi, lattice, tmp_path):
    s = slide.open_slide(wsi)
    scale = UM_PER_PX / slide.THUMB_UM
    thumb = s.thumbnail(scale)
    mask, how = slide.tissue_mask(thumb, slide.THUMB_UM)
    assert how["pieces"] == 2 and how["pieces_dropped"] == 1  # the speck of dust is gone
    pitch_um, crop_um = slide.PITCH_UM[lattice], 80.0
    grid = slide.spot_grid(mask, thumb, scale, pitch_um / UM_PER_PX, lattice, crop_um / UM_PER_PX)
    xy, array_xy = grid["pixel_xy"], grid["array_xy"]
    assert len(xy) > 20 and len(np.unique(array_xy, axis=0)) == len(xy)
    assert all(colour_at(x, y) is not None for x, y in xy), "every spot lies on painted tissue"
    for name, ((x0, y0, x1, y1), _) in PIECES.items():  # both pieces are covered
        assert ((xy[:, 0] > x0) & (xy[:, 0] < x1) & (xy[:, 1] > y0) & (xy[:, 1] < y1)).sum() >= 8, name
    # array neighbours are one pitch apart (square: 4 of them; hexagonal, axial: 6)
    offsets = data.SMOOTH_OFFSETS[lattice][1:] if lattice == "hex" else [(1, 0), (0, 1), (-1, 0), (0, -1)]
    where = {tuple(a): p for a, p in zip(array_xy.tolist(), xy)}
    dist = [np.hypot(*(where[(a + dx, b + dy)] - p)) for (a, b), p in where.items()
            for dx, dy in offsets if (a + dx, b + dy) in where]
    assert len(dist) > len(xy) and np.allclose(dist, pitch_um / UM_PER_PX)
    assert (grid["tissue"] >= slide.MIN_TISSUE).all() and (grid["mean_rgb"] <= slide.WHITE_MEAN).all()
    # the crops, cut as in training (crop_size px spanning crop_um µm), are the colour painted there
    ids = [f"{a}x{b}" for a, b in array_xy]
    import pandas as pd
    section = cohorts.Section("predict", "slide", "new", wsi, ids, array_xy, xy, pd.DataFrame(index=ids),
                           geometry=lattice, um_per_px=UM_PER_PX, crop_um=crop_um)
    crops = section_crops(section, ArrayCache(tmp_path / "cache"), 16, progress=False)
    assert isinstance(crops.image, slide.SlideView) and crops.image.scale == pytest.approx(16 * UM_PER_PX / crop_um)
    inner = [i for i, (x, y) in enumerate(xy) if colour_at(x - 25, y - 25) == colour_at(x + 25, y + 25) == colour_at(x, y)]
    assert len(inner) >= 0.7 * len(xy)  # spots whose middle 8 x 8 px (± 20 µm) lie inside one piece
    for i in inner:
        centre = crops.local[i][4:12, 4:12].reshape(-1, 3).astype(int)
        assert np.abs(centre - colour_at(*xy[i])).max() <= 2, xy[i]
    tiles, mask5 = crops.tiles(0)
    np.testing.assert_array_equal(tiles[12], crops.local[0])  # the window's centre tile is the local crop


def test_no_tissue_on_blank_glass(tmp_path):
    blank = Image.new("RGB", (400, 300), (250, 250, 248))
    mask, how = slide.tissue_mask(blank, 8.0)
    assert not mask.any() and how["saturation_threshold"] >= slide.MIN_SATURATION
    grid = slide.spot_grid(mask, blank, 1.0, 25, "square", 10)
    assert len(grid["pixel_xy"]) == 0


def test_near_white_tiles_are_dropped():
    pale = np.full((100, 100, 3), 255, np.uint8)
    pale[:, :50] = (150, 80, 150)   # stained
    pale[:, 50:] = (230, 215, 230)  # tissue by the mask, but near-white
    grid = slide.spot_grid(np.ones((100, 100), bool), Image.fromarray(pale), 1.0, 20, "square", 10)
    assert len(grid["pixel_xy"]) and (grid["pixel_xy"][:, 0] <= 50).all()  # tiles at most half pale


# ----------------------------------------------------------------------------- the global level on a big grid
def test_grid_windows_predict_every_spot_once_within_the_bound():
    xy = np.stack(np.meshgrid(np.arange(60), np.arange(45)), -1).reshape(-1, 2)
    xy = xy[(xy[:, 0] - 30) ** 2 + (xy[:, 1] - 22) ** 2 < 22 ** 2]  # a round piece of tissue
    windows = slide.grid_windows(xy, max_spots=400, margin=3)
    assert len(windows) > 1
    cores = np.concatenate([core for _, core in windows])
    assert sorted(cores.tolist()) == list(range(len(xy))), "every spot predicted exactly once"
    for members, core in windows:
        assert len(members) <= 400 and set(core) <= set(members) and np.all(np.diff(members) > 0)
        for j in core:  # a predicted spot sees every spot within the margin around it
            near = np.flatnonzero(np.abs(xy - xy[j]).max(1) <= 3)
            assert set(near) <= set(members)
    (members, core), = slide.grid_windows(xy, max_spots=len(xy))  # small enough: one window, the full pass
    assert len(members) == len(core) == len(xy)
