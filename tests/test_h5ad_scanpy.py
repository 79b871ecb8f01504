"""predictions.h5ad as scanpy and squidpy read it: sc.pl.spatial at both image sizes of each library
and squidpy's spatial_scatter over the lowres ones, squidpy's spatial neighbours per library on ST's
square and Visium's hexagonal arrays, scanpy's log fold changes in X's base 10, ad.concat of two
files. scanpy and squidpy need anndata, which caps pandas below 3: .ci/run runs this file in
anndata's environment of its own, and it skips elsewhere. The files are written by
h5ad.write_predictions, what evaluate.py calls (prediction.write_anndata), with the fields it passes;
tests/test_predict.py checks that evaluate.py passes them."""
import math

import numpy as np
import pytest

from genedml import h5ad

sc = pytest.importorskip("scanpy")
sq = pytest.importorskip("squidpy")
import anndata  # noqa: E402  (scanpy's and squidpy's dependency)
import matplotlib  # noqa: E402

matplotlib.use("Agg")
GENES = ["ERBB2", "KRT19", "MUC1"]


def st_slide(name, rows, cols, pitch, image_hw, scale, rng):
    """A slide dict as prediction.write_anndata makes it: spots on ST's square array, `pitch` slide px
    apart (100 µm spots at 200 µm: a diameter of pitch / 2), over an image at `scale` image px per slide px."""
    row, col = (a.reshape(-1) for a in np.mgrid[:rows, :cols])
    return {"name": name, "spot_ids": [f"{c}x{r}" for r, c in zip(row, col)], "X": rng.random((len(row), 3)),
            "pixel_xy": np.stack([200 + col * pitch, 150 + row * pitch], 1).astype(float),
            "array_row": row, "array_col": col, "image": rng.integers(0, 255, (*image_hw, 3), dtype=np.uint8),
            "scale": scale, "spot_diameter": pitch / 2, "image_path": f"{name}.jpg", "measured": None}


def visium_slide(name, rows, cols, pitch, rng):
    """The same on Visium's hexagonal array: array_row + array_col even, rows sqrt(3)/2 pitch apart."""
    row, col = (a.reshape(-1) for a in np.mgrid[:rows, :2 * cols])
    row, col = row[(row + col) % 2 == 0], col[(row + col) % 2 == 0]
    return {"name": name, "spot_ids": [f"{(c - r) // 2}x{r}" for r, c in zip(row, col)], "X": rng.random((len(row), 3)),
            "pixel_xy": np.stack([100 + col * pitch / 2, 100 + row * pitch * math.sqrt(3) / 2], 1),
            "array_row": row, "array_col": col, "image": rng.integers(0, 255, (700, 900, 3), dtype=np.uint8),
            "scale": 1.0, "spot_diameter": 0.65 * pitch, "image_path": f"{name}.tif", "measured": None}


def write(path, slides):
    h5ad.write_predictions(path, slides, GENES, {"gene_dml": {"units": "log10(1+x)"}, "log1p": {"base": 10}})
    return anndata.read_h5ad(path)


def circles(ax, n):
    """Centres (n, 2) and radii (n,) of the n circles sc.pl.spatial drew (a PatchCollection), in image px."""
    (patches,) = [c for c in ax.collections if len(c.get_paths()) == n]
    v = [p.vertices for p in patches.get_paths()]
    return np.array([(p.min(0) + p.max(0)) / 2 for p in v]), np.array([(p.max(0) - p.min(0))[0] / 2 for p in v])


def test_scanpy_draws_each_library_over_its_hires_and_lowres_image(tmp_path):
    rng = np.random.default_rng(0)
    # B1: a full-resolution image larger than Space Ranger's hires; C2: an overview at half the slide's px
    a = write(tmp_path / "p.h5ad", [st_slide("B1", 5, 6, 300.0, (2200, 2500), 1.0, rng),
                                    st_slide("C2", 4, 4, 150.0, (700, 800), 0.5, rng)])
    assert a.obs_names.is_unique and a.obs_names[0] == "B1_0x0" and a.obs["library_id"].dtype.name == "category"
    assert a.obs["array_row"].dtype == np.int64 and a.obs["array_col"].dtype == np.int64
    assert a.obs["in_tissue"].dtype == np.int64 and (a.obs["in_tissue"] == 1).all()
    assert a.uns["log1p"]["base"] == 10
    for name, longest in (("B1", {"hires": 2000, "lowres": 600}), ("C2", {"hires": 800, "lowres": 600})):
        lib = a.uns["spatial"][name]
        one = a[a.obs["library_id"] == name]
        for key in ("hires", "lowres"):
            image, f = lib["images"][key], lib["scalefactors"][f"tissue_{key}_scalef"]
            assert max(image.shape[:2]) == longest[key] and image.dtype == np.uint8
            axes = sc.pl.spatial(one, img_key=key, library_id=name, color="ERBB2", show=False)
            drawn = axes[0].get_images()[0].get_array()
            assert drawn.shape[:2] == image.shape[:2]  # the library's own image at this size
            centres, radii = circles(axes[0], len(one))
            order = lambda xy: xy[np.lexsort(xy.T)]  # scanpy draws the spots in order of their value
            np.testing.assert_allclose(order(centres), order(one.obsm["spatial"] * f), atol=1e-6)  # where the image shows them
            np.testing.assert_allclose(radii, lib["scalefactors"]["spot_diameter_fullres"] * f / 2, rtol=1e-6)
            matplotlib.pyplot.close("all")
        assert lib["scalefactors"]["fiducial_diameter_fullres"] > lib["scalefactors"]["spot_diameter_fullres"]
    # squidpy: one panel a library, each over its own lowres image (a KeyError while no lowres was written)
    axes = sq.pl.spatial_scatter(a, library_key="library_id", img_res_key="lowres", color="ERBB2", return_ax=True)
    assert [ax.get_images()[0].get_array().shape for ax in axes] == [a.uns["spatial"][n]["images"]["lowres"].shape
                                                                    for n in ("B1", "C2")]
    matplotlib.pyplot.close("all")
    b1, c2 = (a.uns["spatial"][name]["scalefactors"] for name in ("B1", "C2"))
    assert b1["tissue_hires_scalef"] == pytest.approx(2000 / 2500) and b1["tissue_lowres_scalef"] == pytest.approx(600 / 2500)
    assert c2["tissue_hires_scalef"] == 0.5 and c2["tissue_lowres_scalef"] == pytest.approx(0.5 * 600 / 800)


def test_squidpy_neighbours_are_the_array_neighbours_of_each_library(tmp_path):
    rng = np.random.default_rng(1)
    a = write(tmp_path / "st.h5ad", [st_slide("B1", 5, 6, 300.0, (300, 300), 0.1, rng),
                                     st_slide("C2", 4, 4, 150.0, (300, 300), 0.1, rng)])
    v = write(tmp_path / "visium.h5ad", [visium_slide("V1", 6, 5, 180.0, rng)])
    for adata, n_neighs, steps in ((a, 4, {(0, 1), (1, 0)}), (v, 6, {(0, 2), (1, 1)})):
        sq.gr.spatial_neighbors(adata, library_key="library_id", coord_type="grid", n_neighs=n_neighs)
        i, j = adata.obsp["spatial_connectivities"].nonzero()
        lib, r, c = (adata.obs[k].to_numpy() for k in ("library_id", "array_row", "array_col"))
        n = len(lib)
        neighbours = {(k, m) for k in range(n) for m in range(n)  # the array's: same slide, one step apart
                      if lib[k] == lib[m] and (abs(r[k] - r[m]), abs(c[k] - c[m])) in steps}
        assert len(neighbours) > 2 * n and set(zip(i.tolist(), j.tolist())) == neighbours

def test_scanpy_reads_x_as_log10(tmp_path):
    rng = np.random.default_rng(2)
    a = write(tmp_path / "p.h5ad", [st_slide("B1", 5, 6, 300.0, (300, 300), 0.1, rng),
                                    st_slide("C2", 4, 4, 150.0, (300, 300), 0.1, rng)])
    sc.tl.rank_genes_groups(a, "library_id", method="t-test")
    lfc = {g: v for g, v in zip(a.uns["rank_genes_groups"]["names"]["B1"], a.uns["rank_genes_groups"]["logfoldchanges"]["B1"])}
    inside, rest = a[a.obs["library_id"] == "B1"].X.mean(0), a[a.obs["library_id"] != "B1"].X.mean(0)
    expected = np.log2((10 ** inside - 1 + 1e-9) / (10 ** rest - 1 + 1e-9))
    natural = np.log2((np.expm1(inside) + 1e-9) / (np.expm1(rest) + 1e-9))  # what scanpy reads without uns["log1p"]
    assert not np.allclose(expected, natural, rtol=1e-3)
    np.testing.assert_allclose([lfc[g] for g in GENES], expected, rtol=1e-4)


def test_two_predictions_concatenate(tmp_path):
    rng = np.random.default_rng(3)
    one = write(tmp_path / "a.h5ad", [st_slide("A1", 3, 3, 200.0, (300, 300), 0.1, rng)])
    two = write(tmp_path / "b.h5ad", [st_slide("A2", 3, 3, 200.0, (300, 300), 0.1, rng)])
    both = anndata.concat([one, two], uns_merge="unique")
    assert both.obs_names.is_unique and len(both) == 18 and set(both.uns["spatial"]) == {"A1", "A2"}
    axes = sc.pl.spatial(both[both.obs["library_id"] == "A2"], img_key="lowres", library_id="A2", show=False)
    assert axes[0].get_images()[0].get_array().shape[:2] == (300, 300)
