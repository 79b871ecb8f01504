"""The demo cohort: her2st layout, determinism, idempotence, atomic writes, and that each of the three
image levels really carries signal (so the demo can show the method working)."""

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import data
from genedml import demo


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo") / "cohort"
    return demo.make_demo_cohort(root, seed=0)


def _files(root):
    return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())


def _read(root, folder, s):
    return pd.read_csv(root / folder / f"{s}.tsv.gz", sep="\t", index_col=0)


def _spots(root, s):
    """Per spot of section s: truth (tissue fractions) and log(1 + counts), same row order. Raw
    counts, not labels: library-size normalisation couples every gene to every other."""
    counts = _read(root, "ST-cnts", s)
    return _read(root, "truth", s).loc[counts.index], np.log1p(counts)


def test_layout_matches_her2st(cohort):
    meta = json.loads((cohort / "DEMO.json").read_text())
    assert meta["seed"] == 0 and list(meta["sections"]) == [f"{p}{i}" for p in "ABCDEFGH" for i in (1, 2, 3)]
    for s, facts in meta["sections"].items():
        jpgs = list((cohort / "ST-imgs" / s[0] / s).iterdir())
        assert len(jpgs) == 1 and jpgs[0].suffix == ".jpg" and jpgs[0].stem != s, jpgs
        with Image.open(jpgs[0]) as im:
            w, h = im.size
            assert im.mode == "RGB" and 600 <= w <= 1000 and 600 <= h <= 1000, (im.mode, im.size)
        spots = pd.read_csv(cohort / "ST-spotfiles" / f"{s}_selection.tsv", sep="\t")
        assert list(spots.columns) == ["x", "y", "new_x", "new_y", "pixel_x", "pixel_y", "selected"]
        assert spots["x"].dtype.kind == "i" and spots["y"].dtype.kind == "i"
        counts = _read(cohort, "ST-cnts", s)
        assert counts.index.name is None  # like the real files: the first header cell is empty
        selected = spots[spots["selected"] == 1]
        ids = (selected["x"].astype(str) + "x" + selected["y"].astype(str)).tolist()
        assert sorted(ids) == sorted(counts.index), f"{s}: counts ids != selected spot-file ids"
        assert 35 <= len(counts) <= 100 and len(counts) == facts["spots"]
        assert counts.shape[1] >= 50 and counts.columns.tolist() == [g for v in meta["genes"].values() for g in v]
        assert counts.dtypes.map(lambda d: d.kind == "i").all() and (counts.to_numpy() >= 0).all()
        rates = _read(cohort, "rates", s)
        assert rates.index.equals(counts.index) and rates.columns.equals(counts.columns)
        assert (rates.to_numpy() > 0).all()
        # pixel = affine(array) + small jitter, spacing ~73 px, every centre on the image
        A = np.c_[selected[["x", "y"]].to_numpy(float), np.ones(len(selected))]
        pix = selected[["pixel_x", "pixel_y"]].to_numpy()
        coef, *_ = np.linalg.lstsq(A, pix, rcond=None)
        assert np.abs(A @ coef - pix).max() < 8 and 70 < np.hypot(*coef[0]) < 76, coef
        assert (pix > 32).all() and (pix[:, 0] < w - 32).all() and (pix[:, 1] < h - 32).all()


def test_deterministic_and_replaces_other_seed(cohort, tmp_path):
    again = demo.make_demo_cohort(tmp_path / "again", seed=0)
    assert _files(again) == _files(cohort)
    for f in _files(cohort):
        assert (again / f).read_bytes() == (cohort / f).read_bytes(), f"{f} differs for the same seed"
    demo.make_demo_cohort(again, seed=1)  # another seed replaces the whole cohort
    assert json.loads((again / "DEMO.json").read_text())["seed"] == 1
    for f in ["ST-cnts/A1.tsv.gz", "ST-imgs/A/A1/SYN_HE_BT_A1.jpg"]:
        assert (again / f).read_bytes() != (cohort / f).read_bytes(), f"{f} same for seeds 0 and 1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again"], "temporary folders left behind"


def test_idempotent(cohort):
    before = {f: (cohort / f).stat().st_mtime_ns for f in _files(cohort)}
    assert demo.make_demo_cohort(cohort, seed=0) == cohort
    assert {f: (cohort / f).stat().st_mtime_ns for f in _files(cohort)} == before


def test_refuses_foreign_folder(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="DEMO.json"):
        demo.make_demo_cohort(tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_interrupted_run_leaves_nothing(tmp_path, monkeypatch):
    calls = []
    real = demo._section

    def flaky(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(demo, "_section", flaky)
    with pytest.raises(KeyboardInterrupt):
        demo.make_demo_cohort(tmp_path / "cohort")
    assert list(tmp_path.iterdir()) == [], "an interrupted run left files behind"


def test_crops_of_tissue_types_differ(cohort):
    """Local level: 64-px crops of pure tissue types are told apart by their mean colour alone."""
    means, types = [], []
    for s in ["A1", "B1", "C1", "D1"]:
        truth = _read(cohort, "truth", s)
        spots = pd.read_csv(cohort / "ST-spotfiles" / f"{s}_selection.tsv", sep="\t")
        spots.index = spots["x"].astype(str) + "x" + spots["y"].astype(str)
        image = np.asarray(Image.open(next((cohort / "ST-imgs" / s[0] / s).glob("*.jpg"))), np.float64)
        own = truth[[f"own_{t}" for t in demo.TISSUES]].to_numpy()
        for i in np.flatnonzero(own.max(1) > 0.95):
            x, y = np.round(spots.loc[truth.index[i], ["pixel_x", "pixel_y"]].to_numpy(float)).astype(int)
            means.append(image[y - 32:y + 32, x - 32:x + 32].reshape(-1, 3).mean(0))
            types.append(own[i].argmax())
    means, types = np.array(means), np.array(types)
    assert set(types) == set(range(len(demo.TISSUES))), "some tissue type has no pure spot"
    centroids = np.stack([means[types == t].mean(0) for t in range(len(demo.TISSUES))])
    gaps = np.linalg.norm(centroids[:, None] - centroids[None], axis=-1)[np.triu_indices(4, 1)]
    assert gaps.min() > 15, f"tissue colours too close: {centroids.round()}"
    nearest = np.linalg.norm(means[:, None] - centroids[None], axis=-1).argmin(1)
    assert (nearest == types).mean() > 0.9


def test_local_genes_follow_own_tissue(cohort):
    meta = json.loads((cohort / "DEMO.json").read_text())
    truth, y = zip(*(_spots(cohort, s) for s in meta["sections"]))
    truth, y = pd.concat(truth), pd.concat(y)
    for t in demo.TISSUES:
        r = np.corrcoef(y[meta["genes"][t]].mean(axis=1), truth[f"own_{t}"])[0, 1]
        assert r > 0.6, f"{t} markers vs own {t} fraction: r = {r:.2f}"
    r = np.corrcoef(y[meta["genes"]["housekeeping"]].mean(axis=1), truth["own_tumour"])[0, 1]
    assert abs(r) < 0.3, f"house-keeping genes should not follow the tissue: r = {r:.2f}"


def _residual(x, features):
    """x with its least-squares fit on features (+ intercept) removed."""
    A = np.c_[features, np.ones(len(features))]
    return x - A @ np.linalg.lstsq(A, x, rcond=None)[0]


def test_neighbour_genes_follow_neighbourhood_beyond_own_tissue(cohort):
    meta = json.loads((cohort / "DEMO.json").read_text())
    truth, y = zip(*(_spots(cohort, s) for s in meta["sections"]))
    truth, y = pd.concat(truth), pd.concat(y)
    own = truth[[f"own_{t}" for t in demo.TISSUES]].to_numpy()
    mix = truth["ring_tumour"] * truth["ring_immune"]
    for group, driver in [("interface", mix), ("near_tumour", truth["ring_tumour"]), ("near_fat", truth["ring_fat"])]:
        r = np.corrcoef(_residual(y[meta["genes"][group]].mean(axis=1).to_numpy(), own), driver)[0, 1]
        assert r > 0.2, f"{group} genes vs neighbourhood, own tissue removed: r = {r:.2f}"
    r = np.corrcoef(_residual(y[meta["genes"]["tumour"]].mean(axis=1).to_numpy(), own), mix)[0, 1]
    assert abs(r) < 0.1, f"local tumour markers should not depend on the neighbourhood: r = {r:.2f}"


def test_slide_genes_depend_on_the_slide(cohort):
    meta = json.loads((cohort / "DEMO.json").read_text())
    level, z = [], []
    for s, facts in meta["sections"].items():
        truth, y = _spots(cohort, s)
        score = y[meta["genes"]["slide"]].mean(axis=1)
        level.append(score.mean())
        z.append(facts["slide_factor"])
        if abs(z[-1]) > 0.5:  # the switch: stromal in tumour-rich slides, tumoural in tumour-poor ones
            r = np.corrcoef(score, truth["own_stroma"] - truth["own_tumour"])[0, 1]
            assert np.sign(r) == np.sign(z[-1]) and abs(r) > 0.3, f"{s}: z = {z[-1]}, r = {r:.2f}"
    assert np.ptp(z) > 1.5, f"slides too alike: {z}"
    assert np.corrcoef(level, z)[0, 1] > 0.5, "slide-gene level does not follow the slide factor"


def test_noise_free_ceiling(cohort):
    c = data.ceiling(cohort)
    assert list(c) == [f"{p}{i}" for p in "ABCDEFGH" for i in (1, 2, 3)]
    assert 0.3 < np.mean(list(c.values())) < 0.95 and all(0.2 < v < 0.98 for v in c.values()), c
    assert np.mean(list(data.ceiling(cohort, smooth=False).values())) < np.mean(list(c.values()))


def test_her2st_reader_loads_demo(cohort):
    from genedml import cohorts
    section = cohorts.load_section("demo", cohort, "A1")
    counts = _read(cohort, "ST-cnts", "A1")
    assert sorted(section.spot_ids) == sorted(counts.index) and section.patient == "A"
    assert section.image_path.is_file() and section.pixel_xy.shape == (len(counts), 2)
    np.testing.assert_array_equal(section.counts.loc[counts.index].to_numpy(), counts.to_numpy())


def test_cli(cohort, capsys):
    data.main(["demo", "--root", str(cohort), "--seed", "0"])
    out = capsys.readouterr().out
    assert "A1:" in out and "H3:" in out and "ceiling" in out
    with pytest.raises(SystemExit) as e:
        data.main(["demo", "--help"])
    assert e.value.code == 0
