"""The evaluation metrics against numpy and against cases worked out by hand."""
import math

import numpy as np
import pytest

from genedml.metrics import highly_predictive_genes, pearson_per_gene, slide_metrics, summarise


def test_pearson_matches_numpy_corrcoef():
    rng = np.random.default_rng(0)
    pred, true = rng.normal(size=(40, 7)), rng.normal(size=(40, 7))
    true[:, 3] = 2 * pred[:, 3] + 1                       # a perfectly predicted gene
    r = pearson_per_gene(pred, true)
    expected = [np.corrcoef(pred[:, g], true[:, g])[0, 1] for g in range(7)]
    np.testing.assert_allclose(r, expected, rtol=1e-10)
    assert r[3] == pytest.approx(1.0)


def test_pearson_hand_computed():
    # x = (1, 2, 3), y = (1, 3, 2): centred (-1, 0, 1) and (-1, 1, 0) -> r = 1 / (sqrt(2) sqrt(2)) = 0.5
    r = pearson_per_gene(np.array([[1.], [2.], [3.]]), np.array([[1.], [3.], [2.]]))
    assert r[0] == pytest.approx(0.5)
    r = pearson_per_gene(np.array([[1.], [2.], [3.]]), np.array([[3.], [2.], [1.]]))
    assert r[0] == pytest.approx(-1.0)


def test_constant_gene_is_undefined_and_reported_not_averaged():
    pred = np.array([[1., 5.], [2., 5.], [3., 5.]])         # gene 1 predicted constant
    true = np.array([[1., 1.], [2., 2.], [3., 4.]])
    m = slide_metrics(pred, true)
    assert m["pcc"][0] == pytest.approx(1.0) and math.isnan(m["pcc"][1])
    _, s = summarise({"slide": m})
    assert s["pcc_m"] == pytest.approx(1.0)               # mean over the defined genes only
    assert s["undefined_pcc"] == 1                        # ...and the undefined one is counted
    np.testing.assert_allclose(m["mse"], [0.0, ((4 ** 2 + 3 ** 2 + 1 ** 2) / 3)])
    np.testing.assert_allclose(m["mae"], [0.0, (4 + 3 + 1) / 3])


def test_summary_averages_slides_first():
    a = slide_metrics(np.array([[1.], [2.], [3.]]), np.array([[1.], [2.], [3.]]))       # r = 1
    b = slide_metrics(np.array([[1.], [2.], [3.]]), np.array([[1.], [3.], [2.]]))       # r = .5
    per_gene, s = summarise({"a": a, "b": b})
    assert s["pcc_m"] == pytest.approx(0.75) and s["slides"] == 2
    assert per_gene["pcc"][0] == pytest.approx(0.75)


def test_highly_predictive_genes_use_rank_averaged_over_folds():
    # gene 2 is best in both folds; gene 0 is 2nd in fold 0 and last in fold 1; gene 1 the reverse
    # but with a NaN in fold 0 (ranks last there).
    pcc = np.array([[0.5, np.nan, 0.9, 0.1],
                    [0.0, 0.6, 0.8, 0.5]])
    order = highly_predictive_genes(pcc, n=4)
    assert order[0] == 2
    # mean ranks: gene0 (1+3)/2=2, gene1 (3+1)/2=2, gene2 0, gene3 (2+2)/2=2 -> gene 2 first, rest tie
    assert set(order[1:]) == {0, 1, 3}
    assert list(highly_predictive_genes(pcc, n=1)) == [2]
    assert len(highly_predictive_genes(pcc, n=50)) == 4   # n clamps to the number of genes
