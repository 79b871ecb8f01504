"""cohorts.py and data.py: cohort readers, folds, genes, labels, crops, dataset, bad input.

Real-file tests use the her2st copy (fixture her2st_root) and compute what they expect independently
(pandas / gzip / PIL / numpy loops). Everything else runs on tiny synthetic cohorts in tmp_path.
"""

import gzip
import logging

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from genedml import cohorts
from genedml import download
import data
from genedml.cache import ArrayCache
from genedml.crops import crop_image, neighbour_window, section_crops


# ----------------------------------------------------------------------------- synthetic cohorts
def _image(path, w=100, h=80, seed=0):
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 200, (h, w, 3), dtype=np.uint8)).save(path, quality=95)  # no white pixel


def _spots(n_x=4, n_y=3, selected=True):
    rows = [dict(x=x, y=y, new_x=x + 0.1, new_y=y - 0.1, pixel_x=0.3 + 20 * x, pixel_y=20 * y - 5.0, selected=1)
            for x in range(1, n_x + 1) for y in range(1, n_y + 1)]
    df = pd.DataFrame(rows)
    return df if selected else df.drop(columns=["selected"])


def _counts(ids, genes=("G1", "G2", "G3", "G4"), seed=0):
    rng = np.random.default_rng(seed)
    return pd.DataFrame(rng.integers(0, 20, (len(ids), len(genes))), index=ids, columns=list(genes))


def _ids(spots):
    return [f"{x}x{y}" for x, y in zip(spots.x, spots.y)]


def write_her2st(root, name="A1", spots=None, counts=None, image=True):
    spots = _spots() if spots is None else spots
    counts = _counts(_ids(spots)) if counts is None else counts
    (root / "ST-cnts").mkdir(parents=True, exist_ok=True)
    (root / "ST-spotfiles").mkdir(parents=True, exist_ok=True)
    counts.to_csv(root / "ST-cnts" / f"{name}.tsv.gz", sep="\t")
    spots.to_csv(root / "ST-spotfiles" / f"{name}_selection.tsv", sep="\t", index=False)
    if image:
        _image(root / "ST-imgs" / name[0] / name / "HE_unrelated_name.jpg")
    return spots, counts


@pytest.fixture
def her2st_tiny(tmp_path):
    root = tmp_path / "her2st"
    write_her2st(root)
    return root


# ----------------------------------------------------------------------------- cohort table and folds
@pytest.mark.parametrize("cohort", list(cohorts.COHORTS))
def test_folds_hold_out_every_patient_once(cohort):
    c = cohorts.COHORTS[cohort]
    patients = set(c["patients"])
    held = []
    for f in range(len(c["folds"])):
        s = cohorts.fold_split(cohort, f)
        held += s["test"]
        assert not set(s["test"]) & set(s["val"]) and not set(s["train"]) & (set(s["test"]) | set(s["val"]))
        assert len(s["val"]) == 1 and set(s["val"]) <= patients - set(s["test"])  # drawn from the training side
        assert set(s["train"]) | set(s["val"]) | set(s["test"]) == patients
        assert s == cohorts.fold_split(cohort, f)  # deterministic
    assert sorted(held) == sorted(patients)


def test_cohort_facts():
    assert [cohorts.COHORTS[c]["k"] for c in ("her2st", "cscc", "stnet", "demo")] == [18, 25, 90, 8]
    assert cohorts.COHORTS["demo"]["crop"] == 64 and cohorts.COHORTS["demo"]["genes"] == 50
    assert len(cohorts.sections_of("her2st", "ABCDEFGH")) == 36
    assert len(cohorts.sections_of("cscc", ["P2", "P5", "P9", "P10"])) == 12
    assert len(cohorts.COHORTS["stnet"]["patients"]) == 23
    assert cohorts.sections_of("demo", "AB") == ["A1", "A2", "A3", "B1", "B2", "B3"]
    assert cohorts.fold_split("her2st", 3)["test"] == ["D"]


# ----------------------------------------------------------------------------- real her2st files
def test_real_her2st_all_sections_load(her2st_root):
    with_image = {"B4", "C2", "C3", "C4", "C5"}
    for name in cohorts.sections_of("her2st", "ABCDEFGH"):
        spots = pd.read_csv(her2st_root / "ST-spotfiles" / f"{name}_selection.tsv", sep="\t")
        spots = spots[spots.selected == 1]
        with gzip.open(her2st_root / "ST-cnts" / f"{name}.tsv.gz", "rt") as f:
            n_genes = len(f.readline().rstrip("\n").split("\t")) - 1
            count_ids = pd.DataFrame({"id": [line.split("\t", 1)[0] for line in f]})
        spots["id"] = spots.x.round().astype(int).astype(str) + "x" + spots.y.round().astype(int).astype(str)
        expected = spots.merge(count_ids, on="id")
        s = cohorts.load_section("her2st", her2st_root, name)
        assert s.spot_ids == expected.id.tolist(), name
        assert s.counts.shape == (len(expected), n_genes), name
        assert np.allclose(s.pixel_xy, expected[["pixel_x", "pixel_y"]].to_numpy()), name
        assert (s.image_path is not None) == (name in with_image), name
        assert s.patient == name[0]


def test_real_counts_and_labels_follow_the_formula(her2st_root):
    raw = pd.read_csv(her2st_root / "ST-cnts" / "C2.tsv.gz", sep="\t", index_col=0)
    s = cohorts.load_section("her2st", her2st_root, "C2")
    assert np.array_equal(s.counts.to_numpy(), raw.loc[s.spot_ids, s.counts.columns].to_numpy())
    # the documented rule, written out: highest total first, ties by name (C2 has one at rank 250/251)
    totals = raw.sum(axis=0)
    genes = sorted(totals.index, key=lambda g: (-totals[g], g))[:250]
    assert data.select_genes([s], 250) == genes
    x = raw.loc[s.spot_ids, genes].to_numpy(np.float64)
    lib = x.sum(1, keepdims=True)
    assert (lib == 0).sum() >= 1  # C2 has a spot with no count over these genes: its label is 0
    norm = np.log10(1 + x / np.where(lib > 0, lib, 1) * 1e4)
    where = {tuple(xy): i for i, xy in enumerate(s.array_xy.tolist())}
    smooth = np.zeros_like(norm)
    for i, (ax, ay) in enumerate(s.array_xy.tolist()):
        rows = [where[(ax + dx, ay + dy)] for dx in (-1, 0, 1) for dy in (-1, 0, 1) if (ax + dx, ay + dy) in where]
        smooth[i] = norm[rows].mean(axis=0)
    c = data.gene_counts(s, genes)
    assert np.allclose(data.expression_labels(c, s.array_xy, smooth=False), norm, atol=1e-5)
    assert np.allclose(data.expression_labels(c, s.array_xy), smooth, atol=1e-5)


def test_real_crops_are_the_image_pixels(her2st_root, tmp_path):
    s = cohorts.load_section("her2st", her2st_root, "C2")
    crops = section_crops(s, ArrayCache(tmp_path), 224, progress=False)
    image = np.asarray(Image.open(s.image_path).convert("RGB"))
    assert crops.image.shape == image.shape and crops.local.shape == (len(s.spot_ids), 224, 224, 3)
    for i in (0, 50, 186):
        px, py = s.pixel_xy[i]
        x0, y0 = int(round(px)) - 112, int(round(py)) - 112
        assert np.array_equal(crops.local[i], image[y0:y0 + 224, x0:x0 + 224]), i
        tiles, mask = crops.tiles(i)
        assert tiles.shape == (25, 224, 224, 3) and mask.all()
        assert np.array_equal(tiles[12], crops.local[i])
        # tile row 1 (y offset -1), column 4 (x offset +2)
        assert np.array_equal(tiles[1 * 5 + 4], image[y0 - 224:y0, x0 + 448:x0 + 672]), i
    assert np.array_equal(crops.image[::97, ::89], image[::97, ::89])


def test_real_gene_list(her2st_root):
    a = data.read_gene_list(her2st_root / "gene-lists" / "her_hvg_cut_1000.npy")
    b = data.read_gene_list(her2st_root / "gene-lists" / "her_hvg_cut_1000.txt")
    assert a == b and len(a) == 785


# ----------------------------------------------------------------------------- readers per layout
def test_her2st_reader_selected_and_dropped(tmp_path, caplog):
    spots = _spots()
    spots.loc[0, "selected"] = 0  # not under tissue: dropped by the selection, silently by design
    counts = _counts(_ids(spots)[1:-1] + ["9x9"])  # last spot has no counts, 9x9 has no spot
    write_her2st(tmp_path, spots=spots, counts=counts)
    with caplog.at_level(logging.INFO, logger="genedml.cohorts"):
        s = cohorts.load_section("her2st", tmp_path, "A1")
    assert s.spot_ids == _ids(spots)[1:-1]
    assert "1 spot(s) in the counts but not the spot file, 1 in the spot file" in caplog.text
    assert s.image_path.name == "HE_unrelated_name.jpg"
    assert np.array_equal(s.counts.to_numpy(), counts.loc[s.spot_ids].to_numpy())
    assert s.array_xy.dtype == np.int64 and s.pixel_xy.dtype == np.float64


def test_cscc_reader(tmp_path):
    spots = _spots(selected=False)[["x", "y", "pixel_x", "pixel_y"]]
    spots["x"] = spots.x + 0.04  # array coordinates are rounded to build ids
    counts = _counts(_ids(spots.round().astype({"x": int})))
    counts.index = [f"{float(i.split('x')[0]) + 0.02}x{i.split('x')[1]}" for i in counts.index]
    counts.to_csv(tmp_path / "GSM1_P2_ST_rep1_stdata.tsv.gz", sep="\t")
    spots.to_csv(tmp_path / "GSM1_spot_data-selection-P2_ST_rep1.tsv", sep="\t", index=False)
    _image(tmp_path / "GSM1_P2_ST_rep1.jpg")
    _image(tmp_path / "GSM9_P12_ST_rep1.jpg")  # must not be taken for P2
    s = cohorts.load_section("cscc", tmp_path, "P2_ST_rep1")
    assert s.patient == "P2" and s.image_path.name == "GSM1_P2_ST_rep1.jpg"
    assert s.spot_ids == _ids(spots.round().astype({"x": int})) and len(s.counts) == len(spots)


def test_stnet_reader(tmp_path):
    folder = tmp_path / "Luminal_A" / "BC23209"
    folder.mkdir(parents=True)
    spots = _spots(selected=False)[["x", "y", "pixel_x", "pixel_y"]]
    for sec in ("BC23209_C1", "BC23209_C2"):
        _counts(_ids(spots)).to_csv(folder / f"{sec}.tsv.gz", sep="\t")
        spots.to_csv(folder / f"{sec}.spots.txt", sep="\t", index=False)
        _image(folder / f"{sec}.jpg")
    assert cohorts.sections_of("stnet", ["BC23209"], root=tmp_path) == ["BC23209_C1", "BC23209_C2"]
    s = cohorts.load_section("stnet", tmp_path, "BC23209_C2")
    assert s.patient == "BC23209" and len(s.spot_ids) == len(spots) and s.image_path == folder / "BC23209_C2.jpg"


# ----------------------------------------------------------------------------- bad input
def _counts_text(text):
    def spoil(root):
        with gzip.open(root / "ST-cnts" / "A1.tsv.gz", "wt") as f:
            f.write(text)
    return spoil


def _spot_table(make):
    return lambda root: make(_spots()).to_csv(root / "ST-spotfiles" / "A1_selection.tsv", sep="\t", index=False)


def _truncate(root):
    gz = root / "ST-cnts" / "A1.tsv.gz"
    gz.write_bytes(gz.read_bytes()[:60])


SPOT, COUNTS = "A1_selection.tsv", "A1.tsv.gz"
BAD = {  # case: (spoil the tiny cohort, error type, file named in the message, problem named in the message)
    "missing counts": (lambda r: (r / "ST-cnts" / COUNTS).unlink(), FileNotFoundError, COUNTS, "not found"),
    "missing spot file": (lambda r: (r / "ST-spotfiles" / SPOT).unlink(), FileNotFoundError, SPOT, "not found"),
    "truncated gzip": (_truncate, ValueError, COUNTS, "cannot read"),
    "non-numeric counts": (_counts_text("\tG1\tG2\n1x1\t3\tfoo\n1x2\t1\t2\n"), ValueError, COUNTS, "'foo'"),
    "empty count": (_counts_text("\tG1\tG2\n1x1\t3\t\n1x2\t1\t2\n"), ValueError, COUNTS, "''"),
    "negative counts": (_counts_text("\tG1\tG2\n1x1\t3\t-1\n1x2\t1\t2\n"), ValueError, COUNTS, "negative"),
    # "inf", "nan" and a number beyond float32 all parse: refused at reading, not as a non-finite loss later
    "infinite count": (_counts_text("\tG1\tG2\n1x1\t3\t1\n1x2\tinf\t2\n"), ValueError, COUNTS,
                       "count inf in data row 2 (spot 1x2), column 'G1' is not a finite number"),
    "NaN count": (_counts_text("\tG1\tG2\n1x1\t3\tnan\n1x2\t1\t2\n"), ValueError, COUNTS,
                  "data row 1 (spot 1x1), column 'G2' is not a finite number"),
    "count beyond float32": (_counts_text("\tG1\tG2\n1x1\t3\t1\n1x2\t1\t1e40\n"), ValueError, COUNTS,
                             "data row 2 (spot 1x2), column 'G2' is not a finite number"),
    "duplicate ids in counts": (_counts_text("\tG1\tG2\n1x1\t3\t1\n1x1\t1\t2\n"), ValueError, COUNTS, "duplicate"),
    "bad spot id": (_counts_text("\tG1\tG2\nspotA\t3\t1\n"), ValueError, COUNTS, "12x34"),
    "spot file lacks a column": (_spot_table(lambda d: d.drop(columns=["pixel_y"])), ValueError, SPOT, "pixel_y"),
    "duplicate spot ids": (_spot_table(lambda d: pd.concat([d, d.iloc[:1]])), ValueError, SPOT, "duplicate"),
    "non-numeric coordinate": (_spot_table(lambda d: d.astype({"pixel_x": object}).assign(pixel_x="abc")),
                               ValueError, SPOT, "non-numeric"),
    "infinite coordinate": (_spot_table(lambda d: d.assign(pixel_y=np.where(d.index == 1, np.inf, d.pixel_y))),
                            ValueError, SPOT, "infinite coordinate 'inf' in data row 2, column 'pixel_y'"),
    "centre outside the image": (_spot_table(lambda d: d.assign(pixel_x=d.pixel_x * 10)), ValueError, SPOT, "outside"),
    "unreadable image": (lambda r: next((r / "ST-imgs").rglob("*.jpg")).write_bytes(b"not a jpeg"), ValueError,
                         "HE_unrelated_name.jpg", "image"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_names_file_and_problem(her2st_tiny, case):
    spoil, error, filename, problem = BAD[case]
    spoil(her2st_tiny)
    with pytest.raises(error) as e:
        cohorts.load_section("her2st", her2st_tiny, "A1")
    assert filename in str(e.value) and problem in str(e.value), str(e.value)


def test_corrupt_jpeg_leaves_nothing_in_cache(her2st_tiny, tmp_path):
    s = cohorts.load_section("her2st", her2st_tiny, "A1")
    jpg = s.image_path.read_bytes()
    s.image_path.write_bytes(jpg[: len(jpg) // 2])  # header intact, scan data truncated
    cache_root = tmp_path / "cache"
    with pytest.raises(ValueError, match="HE_unrelated_name.jpg.*cannot decode"):
        section_crops(s, ArrayCache(cache_root), 16, progress=False)
    assert not cache_root.exists() or not list(cache_root.iterdir())


def test_check_cohort(her2st_tiny, her2st_root):
    cohorts.check_cohort("her2st", her2st_tiny, ["A1"])
    with pytest.raises(FileNotFoundError) as e:
        cohorts.check_cohort("her2st", her2st_tiny, ["A1", "A2"])
    msg = str(e.value)
    assert "A2.tsv.gz" in msg and "A2_selection.tsv" in msg and "ST-imgs/A/A2/*.jpg" in msg
    assert "A1" not in msg.split("fetch")[0].replace(str(her2st_tiny), "")  # A1 is complete
    assert f"python data.py download her2st --root {her2st_tiny}" in msg
    cohorts.check_cohort("her2st", her2st_root, ["C2", "C3"])
    with pytest.raises(FileNotFoundError, match="31 file"):
        cohorts.check_cohort("her2st", her2st_root)  # 31 sections lack their image in the copy
    with pytest.raises(FileNotFoundError, match="python data.py demo --root somewhere"):
        cohorts.check_cohort("demo", "somewhere")  # data.py never writes the demo: train.py does


# ----------------------------------------------------------------------------- genes and labels
def test_select_genes_and_absent_genes(tmp_path, caplog):
    a = pd.DataFrame([[5, 1, 0], [5, 1, 0]], index=["1x1", "1x2"], columns=["X", "Y", "Z"])
    b = pd.DataFrame([[0, 30]], index=["1x1"], columns=["X", "W"])
    write_her2st(tmp_path / "a", "A1", _spots(1, 2), a, image=False)
    write_her2st(tmp_path / "b", "A1", _spots(1, 1), b, image=False)
    sa, sb = cohorts.load_section("her2st", tmp_path / "a", "A1"), cohorts.load_section("her2st", tmp_path / "b", "A1")
    assert data.select_genes([sa, sb], 3) == ["W", "X", "Y"]  # totals W 30, X 10, Y 2, Z 0
    with caplog.at_level(logging.INFO, logger="data"):
        c = data.gene_counts(sb, ["W", "Y", "X"])
    assert c.dtype == np.float32 and c.tolist() == [[30, 0, 0]]
    assert "A1: 1 of 3 genes absent" in caplog.text and "Y" in caplog.text


def test_labels_smooth_over_existing_neighbours_only():
    counts = np.array([[1, 1], [3, 1], [0, 0], [2, 2]], np.float32)
    xy = np.array([[0, 0], [1, 0], [5, 5], [1, 1]])  # spot 2 is alone; spot 0, 1, 3 are neighbours
    y = data.expression_labels(counts, xy, smooth=False)
    assert np.allclose(y[0], np.log10(1 + 5000)) and np.allclose(y[2], 0)  # zero library stays zero
    ys = data.expression_labels(counts, xy)
    assert np.allclose(ys[0], y[[0, 1, 3]].mean(0)) and np.allclose(ys[2], y[2])
    assert ys.dtype == np.float32 and ys.shape == (4, 2)


# ----------------------------------------------------------------------------- crops and tiles
def test_crop_pads_white_and_never_shifts():
    image = np.random.default_rng(0).integers(0, 200, (30, 40, 3), dtype=np.uint8)
    c = crop_image(image, (2.2, 28.0), 8)  # top-left (-2, 24): 2 columns left and 2 rows below off
    assert c.shape == (8, 8, 3) and c.dtype == np.uint8
    assert (c[:, :2] == 255).all() and (c[6:] == 255).all()
    assert np.array_equal(c[:6, 2:], image[24:30, 0:6])


def test_neighbour_window_order_and_mask():
    image = np.random.default_rng(0).integers(0, 200, (50, 60, 3), dtype=np.uint8)
    tiles, mask = neighbour_window(image, (12, 30), 10)  # centre tile x 7..17, y 25..35
    assert tiles.shape == (25, 10, 10, 3) and mask.shape == (25,) and mask.dtype == bool
    assert np.array_equal(tiles[12], crop_image(image, (12, 30), 10))
    assert np.array_equal(tiles[2 * 5 + 3], image[25:35, 17:27])  # row 2 (dy 0), column 3 (dx +1)
    assert np.array_equal(tiles[1 * 5 + 2], image[15:25, 7:17])  # row 1 (dy -1)
    # tile centres x: -8, 2, 12, 22, 32 (all on but the first); y: 10, 20, 30, 40, 50 (50 is off)
    expected = np.array([[cx >= 0 and cy < 50 for cx in (-8, 2, 12, 22, 32)] for cy in (10, 20, 30, 40, 50)])
    assert np.array_equal(mask, expected.reshape(-1))


# ----------------------------------------------------------------------------- dataset
def _dataset(root, cache_root, **kw):
    s = cohorts.load_section("her2st", root, "A1")
    crops = section_crops(s, ArrayCache(cache_root), 16, progress=False)
    feats = [{"tiles": np.random.default_rng(0).random((len(s.spot_ids), 25, 7)).astype(np.float32)}] * 2
    return s, crops, feats, data.SpotDataset([s, s], [crops, crops], ["G3", "G1", "nope"], feats, **kw)


def test_dataset_keys_and_shapes(her2st_tiny, tmp_path):
    s, crops, feats, ds = _dataset(her2st_tiny, tmp_path / "cache")
    assert len(ds) == 2 * len(s.spot_ids) and len(ds.labels) == 2 and ds.labels[0].shape == (len(s.spot_ids), 3)
    item = ds[len(s.spot_ids) + 1]
    assert item["section"] == 1 and item["index"] == 1  # the spot is ds.sections[1].spot_ids[1]
    shapes = {k: (tuple(v.shape), v.dtype) for k, v in item.items() if torch.is_tensor(v)}
    assert shapes == {"local": ((3, 16, 16), torch.uint8), "neighbour_feats": ((25, 7), torch.float32),
                      "neighbour_mask": ((25,), torch.bool), "label": ((3,), torch.float32)}  # what a step reads
    assert set(item) == set(shapes) | {"section", "index"}
    assert np.array_equal(item["local"].permute(1, 2, 0).numpy(), crops.local[1])
    assert data.gene_counts(s, ds.genes)[1].tolist() == [s.counts.loc[s.spot_ids[1], "G3"], s.counts.loc[s.spot_ids[1], "G1"], 0]
    assert torch.equal(ds[3]["neighbour_feats"], torch.from_numpy(feats[0]["tiles"][3]))
    assert torch.equal(ds[3]["neighbour_mask"], torch.from_numpy(crops.tiles(3)[1]))


def test_augmentation_is_a_dihedral_transform_of_the_crop(her2st_tiny, tmp_path):
    s, crops, feats, ds = _dataset(her2st_tiny, tmp_path / "cache", augment=True)
    plain = crops.local[0]  # spot at (20.3, 15): tiles above and left of it are partly / wholly off
    seen = set()
    torch.manual_seed(0)
    for _ in range(64):
        item = ds[0]
        local = item["local"].permute(1, 2, 0).numpy()
        variants = [np.rot90(plain, k) for k in range(4)] + [np.rot90(plain, k)[:, ::-1] for k in range(4)]
        match = [v for v, a in enumerate(variants) if np.array_equal(local, a)]
        assert match, "augmented crop is not a flip/rotation of the crop"
        seen.add(match[0])
        # the frozen tile features describe the unaugmented tiles: they and their mask stay as they are
        assert torch.equal(item["neighbour_feats"], torch.from_numpy(feats[0]["tiles"][0]))
        assert torch.equal(item["neighbour_mask"], torch.from_numpy(crops.mask(0)))
    assert len(seen) == 8  # all four rotations, with and without the flip
    unaugmented = data.SpotDataset([s], [crops], ["G1"], feats[:1])[0]["local"]
    assert torch.equal(unaugmented.permute(1, 2, 0), torch.from_numpy(plain.copy()))


# ----------------------------------------------------------------------------- command line
def test_cli_info_and_download_dispatch(her2st_tiny, capsys, monkeypatch):
    assert data.main(["info", "her2st", "--root", str(her2st_tiny)]) == 0
    out = capsys.readouterr().out
    assert "A1" in out and "100x80" in out and "A2" in out  # A2 absent: reported as an error line
    calls = []
    monkeypatch.setattr(download, "main", lambda argv: calls.append(argv) or 0)
    assert data.main(["download", "her2st", "--root", "x"]) == 0 and calls == [["her2st", "--root", "x"]]


def test_tiles_off_image_shares():
    # 1000x1000 image, 100-px tiles: tile centres at x - 200 ... x + 200
    assert data._tiles_off_image([[50, 500]], (1000, 1000), 100) == (0.4, 0.0)  # two columns off, one flush
    assert data._tiles_off_image([[30, 500]], (1000, 1000), 100) == (0.4, 0.2)  # and one partly off
    assert data._tiles_off_image([[500, 500]], (1000, 1000), 100) == (0.0, 0.0)


def test_a_root_that_is_a_file_is_named(tmp_path):
    file = tmp_path / "her2st.zip"
    file.write_bytes(b"not a folder")
    with pytest.raises(ValueError, match=f"{file}: a file, not a folder"):
        cohorts.check_cohort("her2st", file, ["A1"])
