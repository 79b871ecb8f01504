"""Your own slides (visium.py): synthetic Space Ranger folders and HEST-1k samples, written here with
spots at known pixels of a generated image; cohort tables; one fold trained and evaluated end to end.

Each spot paints a square of its own colour on the H&E stand-in, so a crop whose centre shows the
spot's colour landed on the spot: a swap of x and y (pxl_col / pxl_row) would not. The image is
wider than high for the same reason. h5py paths run only where h5py is installed and skip otherwise.
"""
import gzip
import math

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from genedml import cohorts
import data
import evaluate
from genedml import metrics
import train
from genedml import visium
from genedml import visium_files
from genedml.cache import ArrayCache
from genedml.crops import section_crops

NO_H5PY = "h5py is an optional extra: pip install -r requirements-extras.txt (or pip install h5py)"

GENES = [f"G{i}" for i in range(12)]
PITCH_PX = 24.0  # centre-to-centre spot distance in pixels: 100 µm / 24 px = 4.17 µm/px
X0, Y0, W, H = 60, 50, 280, 200


def hex_layout(rows=6, per_row=6):
    """Visium array coordinates and full-res pixels of a rows x per_row patch of spots."""
    row = np.repeat(np.arange(rows), per_row)
    col = 2 * np.tile(np.arange(per_row), rows) + row % 2  # row + col even: the hexagonal array
    px_col = X0 + col * PITCH_PX / 2
    px_row = Y0 + row * PITCH_PX * math.sqrt(3) / 2
    return row, col, px_col, px_row


def colour(i):
    return (30 + (i * 53) % 200, 30 + (i * 97) % 200, 30 + (i * 31) % 200)


def write_slide(folder, seed=0, version=2, genes=GENES, mex=True, h5=False, drop=(), rows=6, per_row=6):
    """A Space Ranger outs/ folder and its image. Returns the truth: in-tissue barcodes (sorted, as read),
    their counts (dict gene -> array), array row/col and pixel x/y."""
    rng = np.random.default_rng(seed)
    row, col, px_col, px_row = hex_layout(rows, per_row)
    n = len(row)
    barcodes = np.array([f"AC{seed}{i:03d}-1" for i in range(n)])
    in_tissue = np.ones(n, int)
    in_tissue[list(drop)] = 0
    outs = folder / "outs"
    (outs / "spatial").mkdir(parents=True, exist_ok=True)
    pos = pd.DataFrame({"barcode": barcodes, "in_tissue": in_tissue, "array_row": row, "array_col": col,
                        "pxl_row_in_fullres": px_row, "pxl_col_in_fullres": px_col})
    off = pd.DataFrame({"barcode": [f"OFF{seed}-1"], "in_tissue": [0], "array_row": [20], "array_col": [0],
                        "pxl_row_in_fullres": [5.0], "pxl_col_in_fullres": [5.0]})  # not under the tissue
    pos = pd.concat([pos, off])
    if version == 2:
        pos.to_csv(outs / "spatial" / "tissue_positions.csv", index=False)
    else:
        pos.to_csv(outs / "spatial" / "tissue_positions_list.csv", index=False, header=False)
    keep = np.flatnonzero(in_tissue == 1)[::-1]  # the matrix lists barcodes in another order than the positions
    counts = rng.poisson(rng.uniform(0.5, 20, (len(keep), len(genes)))).astype(np.float32)
    counts[:, 0] += 1  # every spot has counts
    features = [(f"ENSG{j}", g, "Gene Expression") for j, g in enumerate(genes)] + [("AB1", "CD3", "Antibody Capture")]
    dense = np.concatenate([counts, np.full((len(keep), 1), 7.0)], axis=1)  # (spots, features)
    if mex:
        m = outs / "filtered_feature_bc_matrix"
        m.mkdir(exist_ok=True)
        with gzip.open(m / "barcodes.tsv.gz", "wt") as f:
            f.write("".join(b + "\n" for b in barcodes[keep]))
        with gzip.open(m / "features.tsv.gz", "wt") as f:
            f.write("".join("\t".join(ft) + "\n" for ft in features))
        s, g = np.nonzero(dense)
        with gzip.open(m / "matrix.mtx.gz", "wt") as f:
            f.write(f"%%MatrixMarket matrix coordinate integer general\n%metadata_json: {{}}\n"
                    f"{len(features)} {len(keep)} {len(s)}\n")
            f.write("".join(f"{gi + 1} {si + 1} {int(dense[si, gi])}\n" for si, gi in zip(s, g)))
    if h5:
        import h5py
        with h5py.File(outs / "filtered_feature_bc_matrix.h5", "w") as f:
            mat = f.create_group("matrix")
            csc = dense.T  # (features, barcodes): columns are barcodes
            nz = [np.flatnonzero(csc[:, j]) for j in range(csc.shape[1])]
            mat["barcodes"] = np.array(barcodes[keep], dtype="S")
            mat["indptr"] = np.concatenate([[0], np.cumsum([len(z) for z in nz])])
            mat["indices"] = np.concatenate(nz)
            mat["data"] = np.concatenate([csc[z, j] for j, z in enumerate(nz)]).astype(np.int32)
            mat["shape"] = np.array(csc.shape)
            mat["features/id"] = np.array([f[0] for f in features], dtype="S")
            mat["features/name"] = np.array([f[1] for f in features], dtype="S")
            mat["features/feature_type"] = np.array([f[2] for f in features], dtype="S")
    image = Image.new("RGB", (W, H), "white")
    for i in range(n):  # each spot's own colour, a 13 px square centred on its pixel
        x, y = round(px_col[i]), round(px_row[i])
        image.paste(colour(i), (x - 6, y - 6, x + 7, y + 7))
    image.save(folder / "fullres.png")
    order = np.argsort(barcodes[keep])  # the readers' order: by barcode, whatever order the files use
    counts, keep = counts[order], keep[order]
    return {"barcodes": barcodes[keep].tolist(), "counts": dict(zip(genes, counts.T)), "row": row[keep], "col": col[keep],
            "x": px_col[keep], "y": px_row[keep], "index": keep, "outs": outs, "image": folder / "fullres.png"}


def write_table(path, rows):
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


# ----------------------------------------------------------------------------- reading Space Ranger output
@pytest.mark.parametrize("version", [1, 2])
def test_mex_and_both_position_files(tmp_path, version):
    truth = write_slide(tmp_path, version=version, drop=[3])
    s = visium.load_spaceranger("mine", "S1", "P1", tmp_path, truth["image"])  # the folder above outs/ works too
    assert s.spot_ids == truth["barcodes"]  # in tissue only, by barcode; the off-tissue spot is gone
    assert "CD3" not in s.counts.columns, "antibody captures are not genes"
    for g, v in truth["counts"].items():
        np.testing.assert_array_equal(s.counts[g].to_numpy(), v)
    np.testing.assert_allclose(s.pixel_xy, np.stack([truth["x"], truth["y"]], 1))  # x = pxl_col, y = pxl_row
    np.testing.assert_array_equal(s.array_xy, np.stack([(truth["col"] - truth["row"]) // 2, truth["row"]], 1))
    assert s.geometry == "hex" and s.um_per_px == pytest.approx(100 / PITCH_PX, rel=1e-6)


def test_h5_matrix_equals_mex(tmp_path):
    pytest.importorskip("h5py", reason=NO_H5PY)
    truth = write_slide(tmp_path / "a", mex=False, h5=True)
    s = visium.load_spaceranger("mine", "S1", "P1", truth["outs"], truth["image"])
    assert s.files["counts"].name == "filtered_feature_bc_matrix.h5"
    mex = visium.load_spaceranger("mine", "S1", "P1", write_slide(tmp_path / "b")["outs"], truth["image"])
    pd.testing.assert_frame_equal(s.counts, mex.counts)


def test_h5_without_h5py_says_what_to_install(tmp_path, monkeypatch):
    truth = write_slide(tmp_path, mex=False)
    (truth["outs"] / "filtered_feature_bc_matrix.h5").write_bytes(b"not read")
    monkeypatch.setitem(__import__("sys").modules, "h5py", None)  # import h5py now raises ImportError
    with pytest.raises(ValueError, match=r"filtered_feature_bc_matrix\.h5.*pip install h5py"):
        visium.load_spaceranger("mine", "S1", "P1", truth["outs"], truth["image"])


# ----------------------------------------------------------------------------- geometry, scale, crops
def test_crops_land_on_their_spots_at_native_and_resampled_resolution(tmp_path):
    truth = write_slide(tmp_path)
    s = visium.load_spaceranger("mine", "S1", "P1", truth["outs"], truth["image"])
    palette = np.array([colour(i) for i in range(36)], float)
    for crop_um, size in [(32 * s.um_per_px, 32), (64 * s.um_per_px, 32)]:  # scale 1, then 0.5
        s.crop_um = crop_um
        crops = section_crops(s, ArrayCache(tmp_path / f"cache{size}{round(crop_um)}"), size, progress=False)
        centre = crops.local[:, size // 2, size // 2].astype(float)  # (N, 3)
        nearest = np.argmin(((centre[:, None] - palette[None]) ** 2).sum(-1), axis=1)
        np.testing.assert_array_equal(nearest, truth["index"])
    assert crops.image.shape[:2] == (H // 2, W // 2), "resampled to crop_um / crop px"


def test_hex_labels_follow_the_formula(tmp_path):
    truth = write_slide(tmp_path, drop=[7, 14])  # holes: their neighbours average over fewer spots
    s = visium.load_spaceranger("mine", "S1", "P1", truth["outs"], truth["image"])
    counts = s.counts[GENES].to_numpy(np.float64)
    y = np.log10(1 + counts / counts.sum(1, keepdims=True) * 1e4)
    row, col = truth["row"], truth["col"]
    expected = np.zeros_like(y)
    for i in range(len(y)):  # Δcol = ±2 in a row, Δrow = ±1 and Δcol = ±1 between rows, and the spot itself
        dr, dc = np.abs(row - row[i]), np.abs(col - col[i])
        near = ((dr == 0) & (dc <= 2)) | ((dr == 1) & (dc == 1))
        expected[i] = y[near].mean(0)
    got = data.expression_labels(counts, s.array_xy, smooth=True, geometry=s.geometry)
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    # the square 3x3 rule on the raw (col, row) grid would differ: it is not the hexagonal neighbourhood
    square = data.expression_labels(counts, np.stack([col, row], 1), smooth=True)
    assert not np.allclose(square, expected, rtol=1e-3)


def test_axial_grid_holds_the_six_neighbours_in_the_peg_window():
    row, col, _, _ = hex_layout(8, 8)
    xy = visium.hex_axial(row, col)
    for i in range(len(row)):
        dr, dc = row - row[i], col - col[i]
        hex_nbr = ((dr == 0) & (np.abs(dc) == 2)) | ((np.abs(dr) == 1) & (np.abs(dc) == 1))
        in_3x3 = (np.abs(xy - xy[i]).max(1) == 1)
        assert (in_3x3 >= hex_nbr).all(), "every hexagonal neighbour is inside the 3x3 PEG window"
        extra = in_3x3 & ~hex_nbr  # the two second-ring spots on one diagonal, Δcol = ±3
        assert set(zip(dr[extra], dc[extra])) <= {(1, 3), (-1, -3)}
    with pytest.raises(ValueError, match="odd"):
        visium.hex_axial([0, 1], [0, 0], "square.csv")


# ----------------------------------------------------------------------------- bad input
def test_bad_spaceranger_input_names_the_file(tmp_path):
    truth = write_slide(tmp_path / "ok")
    img = truth["image"]
    t = write_slide(tmp_path / "nomatrix", mex=False)  # no matrix at all
    with pytest.raises(FileNotFoundError, match="filtered_feature_bc_matrix"):
        visium.load_spaceranger("m", "S", "P", t["outs"], img)
    t = write_slide(tmp_path / "mismatch")
    pos = pd.read_csv(t["outs"] / "spatial" / "tissue_positions.csv")
    pos.assign(barcode="X" + pos["barcode"]).to_csv(t["outs"] / "spatial" / "tissue_positions.csv", index=False)
    with pytest.raises(ValueError, match="tissue_positions.csv: no barcode in common"):
        visium.load_spaceranger("m", "S", "P", t["outs"], img)
    t = write_slide(tmp_path / "offimage")
    pos = pd.read_csv(t["outs"] / "spatial" / "tissue_positions.csv")
    pos.loc[0, "pxl_col_in_fullres"] = W + 10
    pos.to_csv(t["outs"] / "spatial" / "tissue_positions.csv", index=False)
    with pytest.raises(ValueError, match=r"tissue_positions.csv: 1 of 36 spot centre\(s\) outside the 280x200 image"):
        visium.load_spaceranger("m", "S", "P", t["outs"], img)
    t = write_slide(tmp_path / "short")  # the header promises more entries than the file holds
    mtx = t["outs"] / "filtered_feature_bc_matrix" / "matrix.mtx.gz"
    lines = gzip.decompress(mtx.read_bytes()).decode().splitlines(keepends=True)
    mtx.write_bytes(gzip.compress("".join(lines[:-5]).encode()))
    with pytest.raises(ValueError, match=r"matrix.mtx.gz: truncated"):
        visium.load_spaceranger("m", "S", "P", t["outs"], img)
    mtx.write_bytes(gzip.compress("".join(lines).encode())[:-40])  # a cut gzip stream
    with pytest.raises(ValueError, match=r"matrix.mtx.gz: cannot read matrix"):
        visium.load_spaceranger("m", "S", "P", t["outs"], img)


def test_images_pil_cannot_decode_whole_are_refused_up_front(tmp_path, monkeypatch):
    truth = write_slide(tmp_path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ValueError, match="fullres.png.*downsample it.*image_scale"):
        visium_files.check_image(truth["image"])
    (tmp_path / "broken.tif").write_bytes(b"II*\x00 not a tiff")
    with pytest.raises(ValueError, match="broken.tif: not an image PIL can read"):
        visium_files.check_image(tmp_path / "broken.tif")


def test_cohort_table_folds_and_bad_tables(tmp_path):
    rows = [{"sample": f"S{i}", "patient": p, "spaceranger": f"s{i}", "image": f"s{i}/fullres.png"}
            for i, p in enumerate(["P1", "P1", "P2", "P3"])]
    name = visium.register_cohort(write_table(tmp_path / "mine.csv", rows))
    spec = cohorts.COHORTS[name]
    assert name == "mine" and spec["patients"] == {"P1": ["S0", "S1"], "P2": ["S2"], "P3": ["S3"]}
    assert spec["folds"] == [["P1"], ["P2"], ["P3"]] and spec["crop_um"] == visium.DEFAULT_CROP_UM
    assert cohorts.fold_split(name, 0) == {"test": ["P1"], "val": ["P2"], "train": ["P3"]}
    with pytest.raises(FileNotFoundError, match=r"6 file\(s\) missing:\n  .*s0/filtered_feature_bc_matrix/ \(or .h5\)"):
        cohorts.check_cohort(name, None, ["S0", "S1"])
    grouped = [dict(r, fold=f) for r, f in zip(rows, ["a", "a", "b", "a"])]
    visium.register_cohort(write_table(tmp_path / "grouped.csv", grouped))
    assert cohorts.COHORTS["grouped"]["folds"] == [["P1", "P3"], ["P2"]]
    for bad, match in [([{**rows[0], "spaceranger": ""}], "exactly one of spaceranger / h5ad"),
                       ([rows[0], rows[0]], "duplicate sample"),
                       ([{k: v for k, v in rows[0].items() if k != "image"}], "needs the columns"),
                       ([dict(rows[0], fold="a"), dict(rows[1], fold="b")], "exactly one fold")]:
        with pytest.raises(ValueError, match=match):
            visium.register_cohort(write_table(tmp_path / "bad.csv", bad))
    with pytest.raises(ValueError, match="built-in cohort"):
        visium.register_cohort(write_table(tmp_path / "her2st.csv", rows))


# ----------------------------------------------------------------------------- a fold end to end
@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """Four slides of three patients (P1 has two, so pooled and per-slide PCC differ), and a table.
    4 x 5 spots a slide: the frozen features (the slow part on a CPU) are few."""
    root = tmp_path_factory.mktemp("visium")
    rows = []
    for i, (p, version) in enumerate([("P1", 2), ("P1", 1), ("P2", 2), ("P3", 1)]):
        write_slide(root / f"s{i}", seed=i, version=version, rows=4, per_row=5)
        rows.append({"sample": f"S{i}", "patient": p, "spaceranger": f"s{i}", "image": f"s{i}/fullres.png"})
    return write_table(root / "mine.csv", rows), root


@pytest.fixture(scope="module")
def trained(cohort, tmp_path_factory):
    table, root = cohort
    out, cache = tmp_path_factory.mktemp("run"), tmp_path_factory.mktemp("cache")
    best = train.main(["--data", str(table), "--crop-size", "32", "--dim", "32", "--batch-size", "32",
                       "--epochs", "2", "--n-genes", "8", "--weights", "none", "--cache-dir", str(cache),
                       "--out", str(out), "--workers", "0", "--device", "cpu"])
    return best, cache


def test_a_fold_trains_and_evaluates_with_pooled_and_per_slide_pcc(trained, tmp_path, monkeypatch):
    best, cache = trained
    ckpt = torch.load(best, map_location="cpu", weights_only=True)
    assert ckpt["data"]["sections"] == {"train": ["S3"], "val": ["S2"], "test": ["S0", "S1"]}
    assert ckpt["data"]["crop_um"] == visium.DEFAULT_CROP_UM and "hexagonal" in ckpt["data"]["normalisation"]
    cohorts.COHORTS.pop("mine")  # evaluate must register the table again from the checkpoint alone
    seen = []
    real = metrics.pooled_pcc
    monkeypatch.setattr(evaluate, "pooled_pcc", lambda p, l: seen.append((p, l)) or real(p, l))
    assert evaluate.main(["--ckpt", str(best), "--out", str(tmp_path), "--cache-dir", str(cache),
                          "--device", "cpu", "--maps", "1"]) == 0
    folds = pd.read_csv(tmp_path / "folds.csv")
    assert {"pcc_m", "pcc_m_pooled"} <= set(folds.columns)
    # pooling gets both test slides: their predictions (as in predictions.csv) and their hexagonal labels
    (preds, labels), = seen
    genes = ckpt["genes"]
    csv = pd.read_csv(tmp_path / "predictions.csv")
    np.testing.assert_allclose(np.concatenate(preds), csv[genes].to_numpy(), rtol=1e-4, atol=1e-6)
    for n, lab in zip(("S0", "S1"), labels):
        s = cohorts.load_section("mine", None, n)
        np.testing.assert_allclose(lab, data.expression_labels(data.gene_counts(s, genes), s.array_xy, True, "hex"), rtol=1e-6)
    # the pooled PCC, independently: np.corrcoef per gene over both slides' spots together
    p, y = np.concatenate(preds), np.concatenate(labels)
    r = [np.corrcoef(p[:, j], y[:, j])[0, 1] for j in range(len(genes))]
    assert folds["pcc_m_pooled"][0] == pytest.approx(np.nanmean(r), abs=1e-5)
    per_slide = pd.read_csv(tmp_path / "per_gene.csv").groupby("slide")["pcc"].mean()
    assert folds["pcc_m"][0] == pytest.approx(per_slide.mean(), abs=1e-4)
    assert folds["pcc_m"][0] != pytest.approx(folds["pcc_m_pooled"][0], abs=1e-6)
    assert len(list((tmp_path / "maps").glob("S0_*.png"))) == 1


def test_external_test_matches_genes_by_name(trained, cohort, tmp_path, capsys):
    best, cache = trained
    genes = torch.load(best, map_location="cpu", weights_only=True)["genes"]
    lacking = [g for g in GENES if g not in genes[:2]]  # the external slide lacks two of the model's genes
    write_slide(tmp_path / "ext", seed=9, genes=lacking, rows=4, per_row=5)
    table = write_table(tmp_path / "external.csv", [{"sample": "E1", "patient": "X", "spaceranger": "ext",
                                                     "image": "ext/fullres.png"}])
    assert evaluate.main(["--ckpt", str(best), "--external", str(table), "--out", str(tmp_path / "eval"),
                          "--cache-dir", str(cache), "--device", "cpu", "--maps", "1"]) == 0
    said = capsys.readouterr().out
    assert f"{len(genes) - 2} of the checkpoint's {len(genes)} genes present, 2 missing: {genes[0]}, {genes[1]}" in said
    per_gene = pd.read_csv(tmp_path / "eval" / "per_gene.csv")
    assert per_gene["gene"].tolist() == genes[2:] and (per_gene["slide"] == "E1").all()
    folds = pd.read_csv(tmp_path / "eval" / "folds.csv")
    assert folds["pcc_m"][0] == pytest.approx(per_gene["pcc"].mean(), abs=1e-4)
    assert len(pd.read_csv(tmp_path / "eval" / "predictions.csv")) == 20
    assert evaluate.main(["--ckpt", str(best), "--external", str(tmp_path / "none.csv"), "--out", str(tmp_path / "x"),
                          "--cache-dir", str(cache), "--device", "cpu"]) == 2


def test_predict_a_visium_slide_from_its_positions(trained, cohort, tmp_path):
    best, cache = trained
    _, root = cohort
    spatial = root / "s0" / "outs" / "spatial" / "tissue_positions.csv"
    assert evaluate.main(["--ckpt", str(best), "--predict", str(root / "s0" / "fullres.png"), str(spatial),
                          "--out", str(tmp_path), "--cache-dir", str(cache), "--device", "cpu", "--maps", "1"]) == 0
    pred = pd.read_csv(tmp_path / "predictions.csv")
    assert len(pred) == 20 and pred["spot_id"].str.startswith("AC0").all()


def test_predict_knows_positions_by_columns_and_reuses_the_cache(trained, cohort, tmp_path, monkeypatch):
    """A renamed copy of S0's positions file is still a positions file, and S0, a test slide of the
    checkpoint, is neither resampled nor cropped nor run through the frozen trunk again."""
    from genedml import crops, features
    best, cache = trained
    _, root = cohort
    renamed = tmp_path / "s0_spots.csv"
    renamed.write_bytes((root / "s0" / "outs" / "spatial" / "tissue_positions.csv").read_bytes())

    def rebuilt(*a, **kw):
        raise AssertionError("rebuilt what the cache already holds")
    for module, name in [(crops, "_decode"), (crops, "crop_image"), (features, "extract_features")]:
        monkeypatch.setattr(module, name, rebuilt)
    assert evaluate.main(["--ckpt", str(best), "--predict", str(root / "s0" / "fullres.png"), str(renamed),
                          "--out", str(tmp_path), "--cache-dir", str(cache), "--device", "cpu", "--maps", "1"]) == 0
    assert len(pd.read_csv(tmp_path / "predictions.csv")) == 20


def test_maps_decode_each_image_once(trained, cohort, tmp_path, monkeypatch):
    """However many maps a slide gets, its image is opened as often: for its header (checks, reading
    the slide) and once for the thumbnail every map is drawn on."""
    best, cache = trained
    _, root = cohort
    opened, real = [], Image.open
    monkeypatch.setattr(Image, "open", lambda fp, *a, **kw: opened.append(str(fp)) or real(fp, *a, **kw))
    counts = []
    for maps in (1, 3):
        opened.clear()
        assert evaluate.main(["--ckpt", str(best), "--out", str(tmp_path / str(maps)), "--cache-dir", str(cache),
                              "--device", "cpu", "--maps", str(maps)]) == 0
        assert len(list((tmp_path / str(maps) / "maps").glob("S0_*.png"))) == maps
        counts.append(opened.count(str(root / "s0" / "fullres.png")))
    assert counts[0] == counts[1], f"S0's image opened {counts[0]} times for 1 map, {counts[1]} for 3"


# ----------------------------------------------------------------------------- HEST-1k
def write_h5ad(path, truth, layout="csr"):
    """An AnnData file as anndata writes it (encoding-type attributes, _index, a categorical column)."""
    import h5py
    genes = list(truth["counts"])
    X = np.stack([truth["counts"][g] for g in genes], 1)  # (spots, genes)
    str_dt = h5py.string_dtype()
    with h5py.File(path, "w") as f:
        f.attrs.update({"encoding-type": "anndata", "encoding-version": "0.1.0"})
        if layout == "dense":
            f["X"] = X
        else:
            m = X if layout == "csr" else X.T  # CSR: rows = spots; CSC: stored by gene
            nz = [np.flatnonzero(r) for r in m]
            g = f.create_group("X")
            g.attrs.update({"encoding-type": f"{layout}_matrix", "encoding-version": "0.1.0", "shape": X.shape})
            g["indptr"] = np.concatenate([[0], np.cumsum([len(z) for z in nz])])
            g["indices"] = np.concatenate(nz)
            g["data"] = np.concatenate([r[z] for r, z in zip(m, nz)])
        obs = f.create_group("obs")
        cols = ["in_tissue", "array_row", "array_col", "pxl_col_in_fullres", "pxl_row_in_fullres", "region"]
        obs.attrs.update({"_index": "_index", "column-order": cols, "encoding-type": "dataframe"})
        obs.create_dataset("_index", data=np.array(truth["barcodes"], dtype=object), dtype=str_dt)
        obs["in_tissue"] = np.ones(len(X), np.int64)
        obs["array_row"], obs["array_col"] = truth["row"], truth["col"]
        obs["pxl_col_in_fullres"], obs["pxl_row_in_fullres"] = truth["x"], truth["y"]
        region = obs.create_group("region")
        region.attrs.update({"encoding-type": "categorical", "ordered": False})
        region["codes"] = (np.arange(len(X)) % 2).astype(np.int8)
        region.create_dataset("categories", data=np.array(["tumour", "stroma"], dtype=object), dtype=str_dt)
        var = f.create_group("var")
        var.attrs.update({"_index": "_index", "column-order": [], "encoding-type": "dataframe"})
        var.create_dataset("_index", data=np.array(genes, dtype=object), dtype=str_dt)


@pytest.mark.parametrize("layout", ["csr", "csc", "dense"])
def test_hest_sample_read_with_h5py_alone(tmp_path, layout):
    pytest.importorskip("h5py", reason=NO_H5PY)
    truth = write_slide(tmp_path)
    Image.open(truth["image"]).save(tmp_path / "S.tif")  # HEST's wsis/<id>.tif
    write_h5ad(tmp_path / "S.h5ad", truth, layout)
    obs, _ = visium_files.read_h5ad(tmp_path / "S.h5ad")
    assert obs["region"].tolist()[:3] == ["tumour", "stroma", "tumour"]
    s = visium.load_hest("hest", "S", "P", tmp_path / "S.h5ad", tmp_path / "S.tif")
    mex = visium.load_spaceranger("hest", "S", "P", truth["outs"], truth["image"])
    assert s.geometry == "hex" and s.spot_ids == mex.spot_ids
    pd.testing.assert_frame_equal(s.counts, mex.counts)
    np.testing.assert_array_equal(s.array_xy, mex.array_xy)
    np.testing.assert_allclose(s.pixel_xy, mex.pixel_xy)


def test_truncated_h5ad_names_the_file(tmp_path):
    pytest.importorskip("h5py", reason=NO_H5PY)
    truth = write_slide(tmp_path)
    write_h5ad(tmp_path / "S.h5ad", truth)
    import h5py
    with h5py.File(tmp_path / "S.h5ad", "a") as f:
        del f["X/data"]
        f["X/data"] = np.ones(3)
    with pytest.raises(ValueError, match=r"S.h5ad: X \(csr_matrix\) is truncated"):
        visium_files.read_h5ad(tmp_path / "S.h5ad")


def test_hest_cohort_table_from_hest_metadata(tmp_path, capsys):
    ids = [f"NCBI{i}" for i in range(759, 771)]
    patients = [p for p in ("P2", "P5", "P9", "P10") for _ in range(3)]
    meta = pd.DataFrame({"id": ids + ["TENX1"], "patient": patients + ["x"], "dataset_title": "cSCC",
                         "st_technology": ["Spatial Transcriptomics"] * 12 + ["Visium"]})
    meta.to_csv(tmp_path / "HEST_v1_1_0.csv", index=False)
    assert visium.main(["hest-cohort", "cscc", "--meta", str(tmp_path / "HEST_v1_1_0.csv"), "--hest-root",
                        str(tmp_path / "hest"), "--out", str(tmp_path / "hest-cscc.csv")]) == 0
    table = pd.read_csv(tmp_path / "hest-cscc.csv")
    assert table["sample"].tolist() == ids and table["patient"].tolist() == patients
    assert table["h5ad"][0] == "hest/st/NCBI759.h5ad" and table["image"][0] == "hest/wsis/NCBI759.tif"
    assert (table["geometry"] == "square").all() and table["fold"].tolist() == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3
    name = visium.register_cohort(tmp_path / "hest-cscc.csv")
    assert cohorts.COHORTS[name]["folds"] == [["P2"], ["P5"], ["P9"], ["P10"]]
    meta.drop(columns="patient").to_csv(tmp_path / "no_patient.csv", index=False)
    assert visium.main(["hest-cohort", "cscc", "--meta", str(tmp_path / "no_patient.csv"), "--hest-root", "h"]) == 2
    assert "lacks column(s) ['patient']" in capsys.readouterr().err


def test_info_lists_every_slide(cohort, capsys):
    table, _ = cohort
    assert visium.main(["info", str(table)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 5 and all(" 20 " in l and "4.167" in l and " hex " in l for l in lines[1:])


def test_info_exits_non_zero_when_a_slide_fails(cohort, tmp_path, capsys):
    """A pre-flight check: the readable slides are listed, the broken one says why, and the exit is 1."""
    _, root = cohort
    rows = [{"sample": f"S{i}", "patient": f"P{i}", "spaceranger": str(root / f"s{i}"), "image": str(root / f"s{i}/fullres.png")}
            for i in range(2)]
    broken = tmp_path / "fullres.png"
    broken.write_bytes(b"not an image")
    rows[1]["image"] = str(broken)
    table = write_table(tmp_path / "broken.csv", rows)
    assert visium.main(["info", str(table)]) == 1
    captured = capsys.readouterr()
    out = captured.out.splitlines()
    assert len(out) == 3 and " hex " in out[1] and out[2].startswith("S1") and "fullres.png: not an image" in out[2]
    assert "1 of 2 slides" in captured.err and "S1" in captured.err


@pytest.mark.parametrize("change, says", [
    ("no rows", "a cohort table without slides"),
    ({"image_scale": "abc"}, "row 1: image_scale must be a positive number (or empty), got 'abc'"),
    ({"um_per_px": "0"}, "row 1: um_per_px must be a positive number (or empty), got '0'"),
    ({"um_per_px": "-1"}, "row 1: um_per_px must be a positive number (or empty), got '-1'"),
    ({"image_scale": "-0.5"}, "image_scale must be a positive number"),
])
def test_info_refuses_a_table_that_would_mislead(cohort, tmp_path, capsys, change, says):
    """visium.py info exits non-zero, naming the table, the row and the column, rather than listing a
    table without slides, or a scale it cannot use (ignored, or shown as -1.000 µm/px)."""
    _, root = cohort
    rows = [{"sample": "S0", "patient": "P1", "spaceranger": str(root / "s0"), "image": str(root / "s0/fullres.png"),
             "image_scale": "", "um_per_px": ""}]
    table = tmp_path / "mine.csv"
    if change == "no rows":
        pd.DataFrame(columns=list(rows[0])).to_csv(table, index=False)
    else:
        write_table(table, [{**rows[0], **change}])
    assert visium.main(["info", str(table)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {table}: ") and says in err
