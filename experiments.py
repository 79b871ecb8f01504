"""
Evidence: does each part of Gene-DML pull its weight? One command per table in README "Results".

    python experiments.py ablation                      # demo cohort: full model vs 5 ablations x 3 seeds
    python experiments.py her2st --root ../shared/data/her2st
                                                        # real sections with images, leave one out,
                                                        # vs two baselines (training mean, ridge)

Both drive train.main / evaluate.main exactly as a user would, so the tables measure the code that
ships. The two baselines of the her2st check sit here because they are baselines, not the method:
- "training mean": predict every spot as the mean training label (PCC undefined: MSE only);
- "ridge": a linear map from the frozen trunk's 512-d feature of the spot's crop to its labels, the
  HEST-Benchmark baseline, solved in closed form with the penalty chosen on the validation section.
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

import data
import evaluate
import train
from features import frozen_trunk, prepare_split
from cache import ArrayCache

# name -> extra train.py flags. Each switches off one part; the full model switches off nothing.
VARIANTS = {
    "Gene-DML (full)": [],
    "no instance-level loss": ["--w-inst", "0"],
    "no instance-group loss": ["--lam", "0"],
    "regression only": ["--w-inst", "0", "--lam", "0"],
    "local level only": ["--levels", "local"],
    "no global level": ["--levels", "local,neighbour"],
}


def run(train_flags, out, cache_dir):
    """Train with these flags, evaluate best.pt on the held-out sections; the fold summary dict.
    A run whose evaluation is already on disk is reused, so an interrupted experiment continues."""
    if (out / "eval" / "summary.json").is_file():
        print(f"== reusing {out}")
        return json.loads((out / "eval" / "summary.json").read_text())
    best = train.main([*train_flags, "--out", str(out), "--cache-dir", cache_dir])
    assert evaluate.main(["--ckpt", str(best), "--out", str(out / "eval"), "--cache-dir", cache_dir,
                          "--maps", "1"]) == 0, f"evaluation of {best} failed"
    return json.loads((out / "eval" / "summary.json").read_text())


def write_table(df, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    evaluate.write_csv(df, path)
    print(f"\n{df.to_string(index=False, float_format='%.3f')}\n(written to {path})")


# -----------------------------------------------------------------------------
# the ablation on the demo cohort

# The demo's genes by the image level that carries their signal (demo.py's docstring).
DEMO_GROUPS = {"local": ["tumour", "stroma", "immune", "fat"], "neighbour": ["interface", "near_tumour", "near_fat"],
               "slide": ["slide"], "none": ["housekeeping"]}


def group_pcc(per_gene_csv, groups):
    """Mean PCC of the selected genes of each group (over slides and genes): which level's signal was learnt."""
    df = pd.read_csv(per_gene_csv)
    return {f"pcc_{level}": df[df.gene.isin(genes)].pcc.mean() for level, genes in groups.items()}


def ablation(args):
    import demo
    root = Path(args.root)
    demo.make_demo_cohort(root)
    rows = []
    genes_of = json.loads((root / "DEMO.json").read_text())["genes"]
    groups = {level: sum((genes_of[g] for g in names), []) for level, names in DEMO_GROUPS.items()}
    for name in args.variants:
        flags = VARIANTS[name]
        for seed in args.seeds:
            out = Path(args.out) / f"{name.split(' (')[0].replace(' ', '-')}-seed{seed}"
            summary = run(["--data", "demo", "--root", str(root), "--fold", str(args.fold), "--seed", str(seed),
                           "--epochs", str(args.epochs), *flags, *args.extra], out, args.cache_dir)
            rows.append({"variant": name, "seed": seed, "pcc_m": summary["pcc_m_mean"], "mse": summary["mse_mean"],
                         **group_pcc(out / "eval" / "per_gene.csv", groups)})
            print(f"== {name}, seed {seed}: PCC(M) {rows[-1]['pcc_m']:.4f}  MSE {rows[-1]['mse']:.4f}")
    runs = pd.DataFrame(rows)
    # The ceiling: PCC(M) of the noise-free rates against the labels, on the same held-out sections
    # and genes (demo.py) -- what a model that knew the expected expression exactly would reach.
    test = data.sections_of("demo", data.fold_split("demo", args.fold)["test"])
    first = args.variants[0].split(" (")[0].replace(" ", "-")
    genes = evaluate.load_checkpoint(Path(args.out) / f"{first}-seed{args.seeds[0]}" / "best.pt")["genes"]
    ceiling = demo.ceiling(root, genes=genes)
    table = runs.groupby("variant", sort=False).agg(pcc_m=("pcc_m", "mean"), pcc_m_std=("pcc_m", "std"),
                                                    mse=("mse", "mean"), mse_std=("mse", "std"),
                                                    **{f"pcc_{g}": (f"pcc_{g}", "mean") for g in DEMO_GROUPS}).reset_index()
    table["seeds"] = len(args.seeds)
    table.loc[len(table)] = {"variant": "noise-free ceiling", "pcc_m": float(np.mean([ceiling[s] for s in test])),
                             "pcc_m_std": 0.0, "mse": float("nan"), "mse_std": float("nan"), "seeds": 0}
    write_table(runs, Path(args.out) / "ablation_runs.csv")
    write_table(table, Path(args.out) / "ablation.csv")


# -----------------------------------------------------------------------------
# the real-data check: her2st sections with images, leave one section out, vs baselines

def ridge_fit(x, y, alpha):
    """W = (XᵀX + αI)⁻¹ Xᵀy on standardised X with an intercept column left unpenalised."""
    x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    penalty = alpha * torch.eye(x.shape[1], dtype=x.dtype)
    penalty[-1, -1] = 0
    return torch.linalg.solve(x.T @ x + penalty, x.T @ y)


def ridge_predict(x, w):
    return torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1) @ w


def baselines(args, test, val, trainset):
    """Training-mean and ridge predictions for one held-out section; metrics per method."""
    device = torch.device("cpu")
    trunk = frozen_trunk(args.weights, device)
    cache = ArrayCache(args.cache_dir)
    sections = {n: data.load_section("her2st", args.root, n) for n in [*trainset, val, test]}
    genes = data.select_genes([sections[n] for n in trainset], 250)
    split = {n: prepare_split([sections[n]], genes, 224, trunk, cache, device) for n in sections}
    feats = {n: split[n].context[0][0].double() for n in sections}          # (N, 512) frozen features
    labels = {n: torch.as_tensor(split[n].dataset.labels[0], dtype=torch.float64) for n in sections}
    x_tr, y_tr = torch.cat([feats[n] for n in trainset]), torch.cat([labels[n] for n in trainset])
    mu, sd = x_tr.mean(0), x_tr.std(0).clamp(min=1e-6)
    z = lambda n: (feats[n] - mu) / sd
    best = max((evaluate.summarise({val: evaluate.slide_metrics(ridge_predict(z(val), ridge_fit((x_tr - mu) / sd, y_tr, a)), labels[val])})[1]["pcc_m"], a)
               for a in (1.0, 10.0, 100.0, 1000.0, 10000.0))
    w = ridge_fit((x_tr - mu) / sd, y_tr, best[1])
    mean_pred = y_tr.mean(0, keepdim=True).expand_as(labels[test])
    out = {}
    for method, pred in (("training mean", mean_pred), (f"ridge (alpha {best[1]:g})", ridge_predict(z(test), w))):
        m = evaluate.slide_metrics(pred, labels[test])
        out[method] = {"pcc_m": float("nan") if method == "training mean" else float(np.nanmean(m["pcc"])),
                       "mse": float(m["mse"].mean())}
    return out


def her2st(args):
    names = args.sections.split(",")
    rows = []
    for i, test in enumerate(names):
        val = names[(i + 1) % len(names)]
        trainset = [n for n in names if n not in (test, val)]
        summary = run(["--data", "her2st", "--root", args.root, "--sections", args.sections,
                       "--test-sections", test, "--val-sections", val, "--weights", args.weights,
                       "--epochs", str(args.epochs), "--batch-size", str(args.batch_size), *args.extra],
                      Path(args.out) / f"test-{test}", args.cache_dir)
        rows.append({"test": test, "method": "Gene-DML", "pcc_m": summary["pcc_m_mean"], "mse": summary["mse_mean"]})
        for method, m in baselines(args, test, val, trainset).items():
            rows.append({"test": test, "method": method.split(" (")[0], **m})
        print(pd.DataFrame(rows[-3:]).to_string(index=False))
    runs = pd.DataFrame(rows)
    write_table(runs, Path(args.out) / "her2st_runs.csv")
    table = runs.groupby("method", sort=False).agg(pcc_m=("pcc_m", "mean"), pcc_m_std=("pcc_m", "std"),
                                                   mse=("mse", "mean"), mse_std=("mse", "std")).reset_index()
    write_table(table, Path(args.out) / "her2st.csv")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="experiment", required=True)
    a = sub.add_parser("ablation", help="demo cohort: the full model against five ablations")
    a.add_argument("--root", default="data/demo")
    a.add_argument("--fold", type=int, default=0, help="demo fold (0 holds out patient A)")
    a.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    a.add_argument("--epochs", type=int, default=10)
    a.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), metavar="NAME",
                   help=f"which variants to run (default: all: {', '.join(VARIANTS)})")
    a.add_argument("--out", default="runs/ablation")
    h = sub.add_parser("her2st", help="real her2st sections with images: leave one section out, vs baselines")
    h.add_argument("--root", default="data/her2st")
    h.add_argument("--sections", default="B4,C2,C3,C4,C5", help="sections with an image")
    h.add_argument("--weights", default="none", help="trunk weights (none | imagenet | checkpoint path)")
    h.add_argument("--epochs", type=int, default=5)
    h.add_argument("--batch-size", type=int, default=32)
    h.add_argument("--out", default="runs/her2st-check")
    for s in (a, h):
        s.add_argument("--cache-dir", default="cache")
        s.add_argument("extra", nargs=argparse.REMAINDER, help="further train.py flags, after --")
    args = p.parse_args(argv)
    args.extra = [x for x in args.extra if x != "--"]
    {"ablation": ablation, "her2st": her2st}[args.experiment](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
