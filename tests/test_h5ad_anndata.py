"""predictions.h5ad read back with anndata itself. anndata caps pandas below 3, so it is not in the
main environment: .ci/run runs this file in a second virtual environment (numpy, h5py, anndata,
scanpy, squidpy, pytest; tests/test_h5ad_scanpy.py beside it), and it skips where anndata is absent. h5ad.py needs numpy and h5py only."""
import numpy as np
import pytest

from genedml import h5ad

anndata = pytest.importorskip("anndata")


def test_anndata_reads_the_predictions(tmp_path):
    rng = np.random.default_rng(0)
    genes = ["ERBB2", "KRT19", "MUC1"]
    slides = []
    for name, n, measured in (("B1", 5, True), ("C2", 4, True)):
        slides.append({"name": name, "spot_ids": [f"{i}x{i + 1}" for i in range(n)], "X": rng.random((n, 3)),
                       "pixel_xy": rng.random((n, 2)) * 1000, "array_row": np.arange(n) + 1, "array_col": np.arange(n),
                       "image": rng.integers(0, 255, (30, 40, 3), dtype=np.uint8), "scale": 0.04, "spot_diameter": 58.4,
                       "obs": {"tissue_fraction": rng.random(n)} if name == "B1" else {}, "image_path": f"{name}.jpg",
                       "measured": rng.random((n, 3)) if measured else None})
    units = "counts of the selected genes scaled to 1e4 per spot, log10(1+x), 3x3 array-grid mean"
    h5ad.write_predictions(tmp_path / "p.h5ad", slides, genes,
                           {"gene_dml": {"units": units, "crop_um": 112.0, "genes": genes, "fold": 0,
                                         "slides": {"B1": {"pitch_um": 200.0, "tissue": {"method": "thumbnail"}}}}})
    a = anndata.read_h5ad(tmp_path / "p.h5ad")
    assert a.shape == (9, 3) and a.X.dtype == np.float32 and list(a.var_names) == genes
    np.testing.assert_allclose(a.X, np.concatenate([s["X"] for s in slides]), rtol=1e-6)
    assert list(a.obs_names[:2]) == ["B1_0x1", "B1_1x2"] and a.obs["library_id"].dtype.name == "category"
    assert list(a.obs["library_id"].cat.categories) == ["B1", "C2"] and list(a.obs["spot_id"][:1]) == ["0x1"]
    assert a.obs["array_row"].tolist() == [1, 2, 3, 4, 5, 1, 2, 3, 4] and a.obs["array_col"].dtype == np.int64
    assert a.obs["in_tissue"].tolist() == [1] * 9
    frac = a.obs["tissue_fraction"].to_numpy()
    assert np.isnan(frac[5:]).all() and np.isfinite(frac[:5]).all()
    np.testing.assert_allclose(a.obsm["spatial"], np.concatenate([s["pixel_xy"] for s in slides]))
    np.testing.assert_allclose(a.layers["measured"], np.concatenate([s["measured"] for s in slides]), rtol=1e-6)
    about = a.uns["gene_dml"]
    assert about["units"] == units and about["crop_um"] == 112.0 and list(about["genes"]) == genes
    assert about["slides"]["B1"]["tissue"]["method"] == "thumbnail"
    lib = a.uns["spatial"]["C2"]  # what scanpy and squidpy read (tests/test_h5ad_scanpy.py draws it)
    assert lib["images"]["hires"].shape == lib["images"]["lowres"].shape == (30, 40, 3)  # small: never enlarged
    assert lib["images"]["hires"].dtype == np.uint8
    assert lib["scalefactors"]["tissue_hires_scalef"] == lib["scalefactors"]["tissue_lowres_scalef"] == 0.04
    assert lib["scalefactors"]["spot_diameter_fullres"] == 58.4
