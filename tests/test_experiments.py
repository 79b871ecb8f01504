"""experiments.py's arithmetic: paired differences and their interval, the ridge baseline, and the
side-by-side comparison of two her2st experiments (the training runs themselves are train.py's tests)."""
import math

import numpy as np
import pandas as pd
import pytest
import torch

import experiments


def test_paired_difference_and_its_t_interval():
    d = [0.01, -0.02, 0.03, 0.00, 0.05]
    mean, lo, hi = experiments.paired(d)
    sd = math.sqrt(sum((x - 0.014) ** 2 for x in d) / 4)      # sample sd, 4 degrees of freedom
    half = 2.776 * sd / math.sqrt(5)                          # Student's t(0.975, 4) = 2.776
    assert mean == pytest.approx(0.014) and lo == pytest.approx(0.014 - half) and hi == pytest.approx(0.014 + half)
    one = experiments.paired([0.2])
    assert one[0] == pytest.approx(0.2) and math.isnan(one[1]) and math.isnan(one[2])
    assert all(math.isnan(v) for v in experiments.paired([]))  # no pair: nothing to say, and no warning


def test_ridge_recovers_a_linear_map_and_leaves_the_intercept_unpenalised():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 5, generator=g, dtype=torch.float64)
    w = torch.randn(5, 3, generator=g, dtype=torch.float64)
    y = x @ w + 7.0                                           # a large intercept
    fit = experiments.ridge_fit(x, y, alpha=1e-8)
    torch.testing.assert_close(experiments.ridge_predict(x, fit), y)
    heavy = experiments.ridge_fit(x, y, alpha=1e8)            # weights shrunk to ~0, the intercept kept
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
    assert experiments.main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out)]) == 0
    table = pd.read_csv(out).set_index("method")
    assert list(table.index) == ["full", "training mean"]      # methods both ran, in a's order
    full = table.loc["full"]
    assert full.pairs == 2                                     # B4 and C3 (seed 0); C2 pairs with nothing
    assert full.d_pcc_m == pytest.approx(((0.32 - 0.30) + (0.16 - 0.10)) / 2)
    assert full.d_mse == pytest.approx(((0.19 - 0.20) + (0.37 - 0.40)) / 2)
    assert full.d_pcc_m_lo < full.d_pcc_m < full.d_pcc_m_hi
    mean = table.loc["training mean"]
    assert math.isnan(mean.d_pcc_m) and mean.d_mse == pytest.approx(-0.05)
