"""ablation.py's arithmetic: paired differences and their interval (pooled and per section), the
ridge baseline and what it is scored on, and the side-by-side comparison of two her2st experiments
(the training runs themselves are train.py's tests)."""
import argparse
import math

import numpy as np
import pandas as pd
import pytest
import torch

from genedml import cohorts
import data
from experiments import ablation
from genedml.trunk import build_trunk


def test_paired_difference_and_its_t_interval():
    d = [0.01, -0.02, 0.03, 0.00, 0.05]
    mean, lo, hi = ablation.paired(d)
    sd = math.sqrt(sum((x - 0.014) ** 2 for x in d) / 4)      # sample sd, 4 degrees of freedom
    half = 2.776 * sd / math.sqrt(5)                          # Student's t(0.975, 4) = 2.776
    assert mean == pytest.approx(0.014) and lo == pytest.approx(0.014 - half) and hi == pytest.approx(0.014 + half)
    one = ablation.paired([0.2])
    assert one[0] == pytest.approx(0.2) and math.isnan(one[1]) and math.isnan(one[2])
    assert all(math.isnan(v) for v in ablation.paired([]))  # no pair: nothing to say, and no warning


def test_ridge_recovers_a_linear_map_and_leaves_the_intercept_unpenalised():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 5, generator=g, dtype=torch.float64)
    w = torch.randn(5, 3, generator=g, dtype=torch.float64)
    y = x @ w + 7.0                                           # a large intercept
    fit = ablation.ridge_fit(x, y, alpha=1e-8)
    torch.testing.assert_close(ablation.ridge_predict(x, fit), y)
    heavy = ablation.ridge_fit(x, y, alpha=1e8)            # weights shrunk to ~0, the intercept kept
    assert heavy[:-1].abs().max() < 1e-3 and torch.allclose(heavy[-1], y.mean(0), atol=1e-3)


def write_runs(folder, rows):
    folder.mkdir()
    pd.DataFrame(rows, columns=["test", "seed", "method", "pcc_m", "mse"]).to_csv(folder / "her2st_runs.csv", index=False)


def test_compare_pairs_by_section_and_seed(tmp_path):
    write_runs(tmp_path / "a", [("B4", 0, "full", 0.30, 0.20), ("C2", 0, "full", 0.20, 0.30), ("C3", 0, "full", 0.10, 0.40),
                                ("B4", 0, "training mean", np.nan, 0.50), ("B4", 0, "only in a", 0.9, 0.1)])
    write_runs(tmp_path / "b", [("C3", 0, "full", 0.16, 0.37), ("B4", 0, "full", 0.32, 0.19),   # another row order,
                                ("C2", 1, "full", 0.99, 0.01),                                 # no partner in a,
                                ("B4", 0, "training mean", np.nan, 0.45)])
    out = tmp_path / "compare.csv"
    assert ablation.main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out)]) == 0
    table = pd.read_csv(out).set_index("method")
    assert list(table.index) == ["full", "training mean"]      # methods both ran, in a's order
    full = table.loc["full"]
    assert full.pairs == 2                                     # B4 and C3 (seed 0); C2 pairs with nothing
    assert full.d_pcc_m == pytest.approx(((0.32 - 0.30) + (0.16 - 0.10)) / 2)
    assert full.d_mse == pytest.approx(((0.19 - 0.20) + (0.37 - 0.40)) / 2)
    assert full.d_pcc_m_lo < full.d_pcc_m < full.d_pcc_m_hi
    assert full.sections == 2 and full.d_pcc_m_sec == pytest.approx(full.d_pcc_m)  # one seed a section
    mean = table.loc["training mean"]
    assert math.isnan(mean.d_pcc_m) and mean.d_mse == pytest.approx(-0.05)


def test_section_level_interval_averages_the_seeds_of_each_section_first():
    # 3 sections x 2 seeds; the deterministic baseline repeats one value per seed
    rows, full = [], {("B4", 0): 0.30, ("B4", 1): 0.34, ("C2", 0): 0.20, ("C2", 1): 0.22, ("C3", 0): 0.10, ("C3", 1): 0.16}
    base = {"B4": 0.25, "C2": 0.21, "C3": 0.15}
    for (test, seed), v in full.items():
        rows += [(test, seed, "full", v, 0.2), (test, seed, "ridge", base[test], 0.3)]
    runs = pd.DataFrame(rows, columns=["test", "seed", "method", "pcc_m", "mse"])
    table = ablation.paired_table(runs, "full").set_index("method")
    ridge = table.loc["ridge"]
    assert ridge.pairs == 6 and ridge.sections == 3
    section_means = [base[t] - (full[t, 0] + full[t, 1]) / 2 for t in ("B4", "C2", "C3")]   # 3 units, not 6
    assert (ridge.d_pcc_m_sec, ridge.d_pcc_m_sec_lo, ridge.d_pcc_m_sec_hi) == pytest.approx(ablation.paired(section_means))
    pooled = [base[t] - v for (t, _), v in full.items()]
    assert (ridge.d_pcc_m, ridge.d_pcc_m_lo, ridge.d_pcc_m_hi) == pytest.approx(ablation.paired(pooled))
    assert ridge.d_pcc_m_sec_hi - ridge.d_pcc_m_sec_lo > ridge.d_pcc_m_hi - ridge.d_pcc_m_lo  # 2 df, not 5: wider
    assert ridge.d_mse_sec == pytest.approx(0.1) and math.isnan(table.loc["full"].d_pcc_m_sec)


def test_baselines_score_the_labels_and_crops_of_the_model_runs(tmp_path):
    """The baselines take crop size, smoothing, genes and trunk from a run's checkpoint, so flags passed
    after `--` (--no-smooth, --crop-size) reach them too."""
    from test_data import _counts, _ids, _spots, write_her2st
    root = tmp_path / "her2st"
    for i, name in enumerate(("A1", "B1", "C1", "D1")):
        write_her2st(root, name, counts=_counts(_ids(_spots()), seed=i))
    torch.manual_seed(0)
    genes = ["G1", "G2", "G3", "G4"]
    ckpt = {"genes": genes, "data": {"crop_size": 16, "smooth": False}, "frozen_trunk": build_trunk("none").state_dict()}
    args = argparse.Namespace(root=str(root), cache_dir=str(tmp_path / "cache"))
    got = ablation.baselines(args, "A1", "B1", ["C1", "D1"], ckpt)
    crops = sorted(p.name.rsplit("-", 1)[0] for p in (tmp_path / "cache").iterdir() if "crops" in p.name)
    assert crops and all(c.endswith("-crops16") for c in crops)  # the run's 16 px (the sections' images are one
    # file's copies, so the content-keyed cache holds one entry for all four)

    def labels(name, smooth):
        s = cohorts.load_section("her2st", root, name)
        return data.expression_labels(data.gene_counts(s, genes), s.array_xy, smooth=smooth)

    def mean_mse(smooth):  # the training mean's MSE, by hand
        train = np.concatenate([labels("C1", smooth), labels("D1", smooth)])
        return float(((labels("A1", smooth) - train.mean(0)) ** 2).mean())

    assert got["training mean"]["mse"] == pytest.approx(mean_mse(False), rel=1e-6)
    assert abs(mean_mse(True) - mean_mse(False)) > 1e-3, "the test must tell the two labellings apart"
