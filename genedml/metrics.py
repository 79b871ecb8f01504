"""The field's metrics, one tensor expression per slide (no per-gene loop).

Per held-out slide: the Pearson r of every gene across the slide's spots (`pearson_per_gene`), MSE
and MAE per gene (`slide_metrics`); PCC(M) = the mean over genes, then over the slides of a fold
(`summarise`), then mean ± std over folds (evaluate.py). PCC(H) is the mean over the 50 "highly
predictive genes", ranked by their PCC averaged over folds (`highly_predictive_genes`). Beside it,
HEST-Benchmark's pooled PCC (`pooled_pcc`): each gene's r over the pooled spots of all of a fold's
test slides. A gene constant on a slide has no r: it is NaN, and counted, never averaged in silently.
"""
import warnings

import numpy as np
import torch



def pearson_per_gene(pred, true):
    """Pearson r of each gene (column) across spots (rows): (N, G), (N, G) -> (G,).

    A gene that is constant over the slide (in prediction or truth) has no defined r: it gets NaN,
    and the caller reports how many genes that happened to rather than averaging NaN silently.
    """
    pred = torch.as_tensor(pred, dtype=torch.float64)
    true = torch.as_tensor(true, dtype=torch.float64)
    assert pred.shape == true.shape and pred.ndim == 2, f"expected two (N, G) arrays, got {tuple(pred.shape)} and {tuple(true.shape)}"
    p = pred - pred.mean(0)
    t = true - true.mean(0)
    denom = (p.square().sum(0) * t.square().sum(0)).sqrt()
    r = (p * t).sum(0) / denom
    return torch.where(denom > 1e-12, r, torch.full_like(r, float("nan"))).numpy()


def slide_metrics(pred, true):
    """Per-gene PCC, MSE, MAE of one slide, as numpy arrays of shape (G,)."""
    pred = np.asarray(pred, dtype=np.float64)
    true = np.asarray(true, dtype=np.float64)
    return {"pcc": pearson_per_gene(pred, true),
            "mse": ((pred - true) ** 2).mean(0),
            "mae": np.abs(pred - true).mean(0)}


def summarise(per_slide):
    """Mean over slides of the per-gene metrics, then over genes. per_slide: {slide: slide_metrics}.

    Returns (per-gene means over slides (dict of (G,) arrays), fold summary dict). PCC(M) skips the
    genes whose r is undefined (constant on a slide) and says how many there were.
    """
    stack = {m: np.stack([s[m] for s in per_slide.values()]) for m in ("pcc", "mse", "mae")}
    with warnings.catch_warnings():          # a gene constant on every slide: NaN, counted below
        warnings.simplefilter("ignore", RuntimeWarning)
        per_gene = {m: np.nanmean(v, axis=0) if m == "pcc" else v.mean(0) for m, v in stack.items()}
    undefined = int(np.isnan(stack["pcc"]).sum())
    slide_pcc = [np.nanmean(s["pcc"]) if np.isfinite(s["pcc"]).any() else float("nan")
                 for s in per_slide.values()]
    return per_gene, {"pcc_m": float(np.nanmean(slide_pcc)) if np.isfinite(slide_pcc).any() else float("nan"),
                      "mse": float(stack["mse"].mean()), "mae": float(stack["mae"].mean()),
                      "undefined_pcc": undefined, "slides": len(per_slide)}


def pooled_pcc(preds, labels):
    """HEST-Benchmark's PCC: each gene's r over the spots of all the slides pooled, (G,). preds and
    labels: lists of (N_s, G) arrays, one per slide."""
    return pearson_per_gene(np.concatenate(preds), np.concatenate(labels))


def shared_genes(gene_lists):
    """The genes in every list, in the order of the first (folds of a per-fold gene choice differ)."""
    common = set.intersection(*map(set, gene_lists))
    return [g for g in gene_lists[0] if g in common]


def highly_predictive_genes(fold_gene_pcc, n=50):
    """Indices of the n genes with the best PCC rank averaged over folds (PCC(H), README: The method in one page).

    fold_gene_pcc: (F, G) per-gene PCC of each fold. Rank 0 = best gene of that fold; undefined
    PCCs rank last.
    """
    pcc = np.nan_to_num(np.asarray(fold_gene_pcc, dtype=np.float64), nan=-np.inf)
    ranks = (-pcc).argsort(1).argsort(1)             # (F, G) rank of each gene within its fold
    return np.argsort(ranks.mean(0), kind="stable")[:min(n, pcc.shape[1])]
