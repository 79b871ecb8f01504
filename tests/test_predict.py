"""evaluate.py --predict SLIDE: a slide with no spot file, end to end on a tiny demo checkpoint;
predictions.h5ad read back with h5py alone, for --predict and for an evaluation (tests/test_h5ad_anndata.py
and test_h5ad_scanpy.py read what h5ad.py writes with anndata, scanpy and squidpy); one transform of
the frozen tokens at inference, and the cache entries of a spot file and of a grid side by side; bad input. The demo slide is a JPEG at 200 µm / 73 px (its spot pitch), its tissue a blob on white."""
import re

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from genedml import demo
import evaluate
from genedml import features
from genedml import slide
import train
from genedml import visium_files

UM_PER_PX = 200 / 73  # the demo's spot pitch over its spot spacing in pixels


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = demo.make_demo_cohort(tmp_path_factory.mktemp("demo"))
    for f in (root / "ST-spotfiles").glob("*_selection.tsv"):  # a block of spots a slide: few features to extract
        spots = pd.read_csv(f, sep="\t")
        spots[(spots["x"].between(4, 8) & spots["y"].between(4, 8)) | (spots["selected"] == 0)].to_csv(f, sep="\t", index=False)
    out, cache = tmp_path_factory.mktemp("run"), tmp_path_factory.mktemp("cache")
    best = train.main(["--data", "demo", "--root", str(root), "--sections", "A1,B1,C1", "--crop-size", "32",
                       "--dim", "32", "--local-encoder", "frozen", "--batch-size", "32", "--epochs", "1",
                       "--cache-dir", str(cache), "--out", str(out), "--workers", "0", "--device", "cpu"])
    (image,) = (root / "ST-imgs" / "D" / "D1").glob("*.jpg")
    return best, cache, image


def run(ckpt, out, *extra):
    best, cache, _ = ckpt
    return evaluate.main(["--ckpt", str(best), "--out", str(out), "--cache-dir", str(cache), "--device", "cpu",
                          "--batch-size", "16", "--maps", "2", "--predict", *map(str, extra)])


def test_a_slide_alone_gives_predictions_maps_and_an_anndata(ckpt, tmp_path, capsys):
    h5py = pytest.importorskip("h5py")
    best, _, image = ckpt
    c = torch.load(best, map_location="cpu", weights_only=True)
    genes, crop_um = c["genes"], c["data"]["crop_um"]
    assert c["data"]["geometry"] == "square"
    assert run(ckpt, tmp_path, image, "--mpp", UM_PER_PX) == 0
    assert "on a square grid of 200 µm" in capsys.readouterr().out
    pred = pd.read_csv(tmp_path / "predictions.csv")
    n = len(pred)
    assert n >= 20 and np.isfinite(pred[genes].to_numpy()).all()
    xy = pred[["pixel_x", "pixel_y"]].to_numpy()
    # the grid: 200 µm between array neighbours, on the tissue (the demo's background is near-white)
    where = {(a, b): p for a, b, p in zip(pred["array_x"], pred["array_y"], xy)}
    steps = [np.hypot(*(where[(a + 1, b)] - p)) for (a, b), p in where.items() if (a + 1, b) in where]
    assert steps and np.allclose(steps, 200 / UM_PER_PX)
    with Image.open(image) as im:
        rgb = np.asarray(im.convert("RGB"), float)
    centre = rgb[np.rint(xy[:, 1]).astype(int), np.rint(xy[:, 0]).astype(int)].mean(1)
    assert (centre < 235).mean() > 0.8, "spots sit on stained tissue, not on the white glass"
    assert len(list((tmp_path / "maps").glob("*.png"))) == 2

    with h5py.File(tmp_path / "predictions.h5ad", "r") as f:  # AnnData's layout, read with h5py alone
        assert f.attrs["encoding-type"] == "anndata"
        X = f["X"][:]
        assert X.dtype == np.float32 and X.shape == (n, len(genes))
        np.testing.assert_allclose(X, pred[genes].to_numpy(), rtol=1e-4, atol=1e-5)
        assert [g.decode() for g in f["var/_index"][:]] == genes
        np.testing.assert_allclose(f["obsm/spatial"][:], xy, rtol=1e-6)
        tissue = f["obs/tissue_fraction"][:]
        assert tissue.shape == (n,) and (tissue >= slide.MIN_TISSUE).all()
        assert f["obs/in_tissue"].dtype == np.int64 and (f["obs/in_tissue"][:] == 1).all()
        row, col = f["obs/array_row"][:], f["obs/array_col"][:]  # a square grid: row = array y, col = array x
        assert row.dtype == col.dtype == np.int64 and (row == pred["array_y"]).all() and (col == pred["array_x"]).all()
        assert [v.decode() for v in f["obs/_index"][:]] == [f"{image.stem}_{i}" for i in pred["spot_id"]]
        assert f["uns/log1p/base"][()] == 10
        about = f["uns/gene_dml"]
        assert "log10(1+x)" in about["units"][()].decode() and about["crop_um"][()] == pytest.approx(crop_um)
        s = about["slides"][image.stem]
        assert s["pitch_um"][()] == 200 and s["lattice"][()].decode() == "square"
        assert s["um_per_px"][()] == pytest.approx(UM_PER_PX)
        lib = f[f"uns/spatial/{image.stem}"]
        hires, lowres = lib["images/hires"][:], lib["images/lowres"][:]
        sizes = {k: v[()] for k, v in lib["scalefactors"].items()}
    # the 800 x 700 px slide is under Space Ranger's 2,000 px: hires is the slide itself, not the 8 µm/px thumbnail
    assert hires.dtype == np.uint8 and hires.shape == rgb.shape and sizes["tissue_hires_scalef"] == 1.0
    assert np.abs(hires - rgb).mean() < 2
    assert lowres.shape == (525, 600, 3) and sizes["tissue_lowres_scalef"] == pytest.approx(600 / 800)
    # a virtual spot covers its crop's field of view
    assert sizes["spot_diameter_fullres"] == pytest.approx(crop_um / UM_PER_PX)
    assert sizes["fiducial_diameter_fullres"] > sizes["spot_diameter_fullres"]
    obs, X2 = visium_files.read_h5ad(tmp_path / "predictions.h5ad")  # the project's own reader agrees
    assert obs["spot_id"].tolist() == pred["spot_id"].tolist() and X2.genes == genes


def test_an_evaluation_writes_the_same_anndata_fields(ckpt, tmp_path):
    h5py = pytest.importorskip("h5py")
    best, cache, _ = ckpt
    assert evaluate.main(["--ckpt", str(best), "--out", str(tmp_path), "--cache-dir", str(cache), "--device", "cpu",
                          "--batch-size", "16", "--maps", "0"]) == 0
    pred = pd.read_csv(tmp_path / "predictions.csv")
    (name,) = pred["section"].unique()
    with h5py.File(tmp_path / "predictions.h5ad", "r") as f:
        assert [v.decode() for v in f["obs/_index"][:]] == [f"{name}_{i}" for i in pred["spot_id"]]
        assert (f["obs/array_row"][:] == pred["array_y"]).all() and (f["obs/array_col"][:] == pred["array_x"]).all()
        assert f["obs/array_row"].dtype == np.int64 and (f["obs/in_tissue"][:] == 1).all()
        assert f["layers/measured"].shape == (len(pred), f["X"].shape[1]) and f["uns/log1p/base"][()] == 10
        lib = f[f"uns/spatial/{name}"]
        hires, lowres = lib["images/hires"].shape, lib["images/lowres"].shape
        sizes = {k: v[()] for k, v in lib["scalefactors"].items()}
    assert hires == (700, 800, 3) and lowres == (525, 600, 3) and sizes["tissue_lowres_scalef"] == pytest.approx(0.75)
    # an ST spot is 100 µm across at a 200 µm pitch; the demo's pitch is 73 px
    assert sizes["spot_diameter_fullres"] == pytest.approx(73 / 2, rel=0.05)


def test_a_spot_file_and_a_grid_keep_their_own_cache_entries_with_one_token_transform(ckpt, tmp_path, monkeypatch):
    best, _, image = ckpt
    spots = image.parents[3] / "ST-spotfiles" / f"{image.parent.name}_selection.tsv"
    cache = tmp_path / "cache"

    def predict(out, *paths):
        return evaluate.main(["--ckpt", str(best), "--out", str(tmp_path / out), "--cache-dir", str(cache), "--device", "cpu",
                              "--batch-size", "16", "--maps", "0", "--predict", *map(str, paths)])

    assert predict("spots", image, spots) == 0
    assert predict("grid", image, "--um-per-px", UM_PER_PX) == 0
    # name -> folder; a resampled slide's crops carry their scale ("-x0.9965-crops32"): left out of the name here
    entries = {re.sub(r"-x[0-9.]+-", "-", p.name.rsplit("-", 1)[0]): p for p in cache.iterdir() if p.is_dir()}
    for kind in ("crops32", "features", "tokens-identity"):  # predicting one way left the other's entries
        assert f"predict-{image.stem}-{kind}" in entries and f"predict-grid-{image.stem}-{kind}" in entries, kind
    assert not [e for e in entries if e.endswith("-tokens")], "no 8-transform tokens for inference"
    for way in ("predict", "predict-grid"):
        tokens = np.load(entries[f"{way}-{image.stem}-tokens-identity"] / "tokens.npy", mmap_mode="r")
        assert tokens.shape[1] == 1  # the crop as it is: the one map inference reads

    def extracted(*a, **kw):
        raise AssertionError("extracted again")
    monkeypatch.setattr(features, "extract_features", extracted)
    monkeypatch.setattr(features, "extract_tokens", extracted)
    assert predict("spots2", image, spots) == 0 and predict("grid2", image, "--um-per-px", UM_PER_PX) == 0
    for way in ("spots", "grid"):
        assert (tmp_path / way / "predictions.csv").read_text() == (tmp_path / f"{way}2" / "predictions.csv").read_text()

def test_a_pyramidal_tiff_says_its_own_resolution(ckpt, tmp_path):
    tifffile = pytest.importorskip("tifffile")
    pytest.importorskip("openslide")
    _, _, image = ckpt
    with Image.open(image) as im:
        rgb = np.asarray(im.convert("RGB"))
    with tifffile.TiffWriter(tmp_path / "he.tif") as tw:
        for lvl in range(2):
            a = rgb[::2 ** lvl, ::2 ** lvl]
            tw.write(a, tile=(128, 128), photometric="rgb", compression="zlib", subfiletype=int(lvl > 0),
                     resolution=(1e4 / (UM_PER_PX * 2 ** lvl),) * 2, resolutionunit="CENTIMETER")
    assert run(ckpt, tmp_path / "out", tmp_path / "he.tif") == 0  # no --um-per-px: the TIFF has it
    jpeg = tmp_path / "jpeg"
    assert run(ckpt, jpeg, image, "--mpp", UM_PER_PX) == 0
    a, b = pd.read_csv(tmp_path / "out" / "predictions.csv"), pd.read_csv(jpeg / "predictions.csv")
    shared = set(a["spot_id"]) & set(b["spot_id"])
    assert len(shared) >= 0.9 * max(len(a), len(b)), "the same tissue found in both copies"


def test_a_user_mask_and_windows_of_the_grid(ckpt, tmp_path, monkeypatch):
    _, _, image = ckpt
    with Image.open(image) as im:
        w, h = im.size
    mask = Image.new("L", (w // 4, h // 4), 0)
    mask.paste(255, (0, 0, w // 8, h // 4))  # the left half of the slide, at a quarter of its size
    mask.save(tmp_path / "mask.png")
    assert run(ckpt, tmp_path / "full", image, "--um-per-px", UM_PER_PX, "--tissue-mask", tmp_path / "mask.png") == 0
    full = pd.read_csv(tmp_path / "full" / "predictions.csv")
    assert len(full) >= 5 and (full["pixel_x"] < w / 2).all()
    # windows that each hold every spot must give the full pass exactly: the window bookkeeping is right
    every = np.arange(len(full))
    monkeypatch.setattr(slide, "grid_windows", lambda xy, *a, **kw: [(every, every[::2]), (every, every[1::2])])
    assert run(ckpt, tmp_path / "win", image, "--um-per-px", UM_PER_PX, "--tissue-mask", tmp_path / "mask.png") == 0
    win = pd.read_csv(tmp_path / "win" / "predictions.csv")
    genes = [c for c in full.columns if c not in ("section", "spot_id", "array_x", "array_y", "pixel_x", "pixel_y")]
    np.testing.assert_allclose(win[genes].to_numpy(), full[genes].to_numpy(), rtol=1e-5, atol=1e-6)


def test_bad_slides_are_clear_errors(ckpt, tmp_path, capsys):
    _, _, image = ckpt
    Image.new("RGB", (600, 500), (248, 247, 250)).save(tmp_path / "blank.jpg")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    (tmp_path / "broken.svs").write_bytes(b"not a slide")
    cases = [((tmp_path / "blank.jpg", "--um-per-px", 1), "blank.jpg: no tissue found"),
             ((image,), f"{image.name}: the slide does not say its resolution.*--um-per-px"),
             ((tmp_path / "broken.jpg", "--um-per-px", 1), "broken.jpg: not an image PIL or OpenSlide can read"),
             ((tmp_path / "none.jpg",), "none.jpg: slide not found"),
             ((tmp_path / "broken.svs", "--um-per-px", 1), "broken.svs: (OpenSlide cannot read it|.*needs OpenSlide)")]
    for args, message in cases:
        assert run(ckpt, tmp_path / "out", *args) == 2
        err = capsys.readouterr().err
        assert re.search(message, err), (message, err)
    assert not (tmp_path / "out").exists(), "nothing written for a slide that failed"
    with pytest.raises(SystemExit):
        evaluate.get_args(["--ckpt", "x.pt", "--predict", "a", "b", "c"])
    with pytest.raises(SystemExit):
        evaluate.get_args(["--ckpt", "x.pt", "--predict", "a", "b", "--tissue-mask", "m.png"])


@pytest.mark.parametrize("size", [(200, 150), (1, 1)])
def test_spots_off_the_image_are_refused(ckpt, tmp_path, capsys, size):
    """A her2st spot file against a smaller image (another slide's, a thumbnail): an error naming the spot
    file and how many spots lie off, as training gives, not predictions for blank white crops."""
    _, _, image = ckpt
    spots = image.parents[3] / "ST-spotfiles" / "D1_selection.tsv"
    with Image.open(image) as im:
        im.convert("RGB").crop((0, 0, *size)).save(tmp_path / "small.jpg")
    assert run(ckpt, tmp_path / "out", tmp_path / "small.jpg", spots) == 2
    err = capsys.readouterr().err
    assert re.search(rf"{spots.name}: \d+ of \d+ spot centre\(s\) outside the {size[0]}x{size[1]} image small.jpg", err), err
    assert not (tmp_path / "out").exists(), "nothing written"
