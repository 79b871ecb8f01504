"""
Evidence: does each part of Gene-DML pull its weight? One command per table in docs/results.md.

    python -m experiments.ablation ablation                      # demo cohort: full model vs 5 ablations x 3 seeds
    python -m experiments.ablation ablation --out runs/ablation-trainable -- --local-encoder trainable
    python -m experiments.ablation her2st --root ../shared/data/her2st
                                                        # real sections with images, leave one out: the
                                                        # same ablation (frozen local encoder) x seeds,
                                                        # vs two baselines (training mean, ridge), with
                                                        # paired differences to the full model
    python -m experiments.ablation compare runs/her2st-ablation runs/her2st-trainable
                                                        # two her2st experiments, paired by section and seed
    python -m experiments.ablation balance --ckpt RUN/best.pt    # each loss part's gradient at the fusion

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
from genedml import cohorts
from genedml import checkpoint
import evaluate
from genedml import metrics
import train
from genedml.encoders import rebuild_encoder
from genedml.cache import ArrayCache

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
    from genedml import demo
    root = Path(args.root)
    demo.make_demo_cohort(root)
    rows = []
    genes_of = json.loads((root / "DEMO.json").read_text())["genes"]
    groups = {level: sum((genes_of[g] for g in names), []) for level, names in DEMO_GROUPS.items()}
    for name in args.variants:
        flags = VARIANTS[name]
        for seed in args.seeds:
            out = Path(args.out) / f"{slug(name)}-seed{seed}"
            summary = run(["--data", "demo", "--root", str(root), "--fold", str(args.fold), "--seed", str(seed),
                           "--epochs", str(args.epochs), *flags, *args.extra], out, args.cache_dir)
            rows.append({"variant": name, "seed": seed, "pcc_m": summary["pcc_m_mean"], "mse": summary["mse_mean"],
                         **group_pcc(out / "eval" / "per_gene.csv", groups)})
            print(f"== {name}, seed {seed}: PCC(M) {rows[-1]['pcc_m']:.4f}  MSE {rows[-1]['mse']:.4f}")
    runs = pd.DataFrame(rows)
    # The ceiling: PCC(M) of the noise-free rates against the labels, on the same held-out sections
    # and genes (genedml/demo.py) -- what a model that knew the expected expression exactly would reach.
    test = cohorts.sections_of("demo", cohorts.fold_split("demo", args.fold)["test"])
    genes = checkpoint.load_checkpoint(Path(args.out) / f"{slug(args.variants[0])}-seed{args.seeds[0]}" / "best.pt")["genes"]
    ceiling = data.ceiling(root, genes=genes)
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


def baselines(args, test, val, trainset, ckpt):
    """Training-mean and ridge predictions for one held-out section; metrics per method. Everything the
    labels and features depend on comes from a model run's checkpoint (its genes, crop size, smoothing
    and frozen trunk), so the baselines are scored on the model runs' labels whatever flags followed `--`."""
    device = torch.device("cpu")
    trunk = rebuild_encoder(ckpt.get("encoder"), ckpt["frozen_trunk"], device=device)  # the model runs' encoder
    cache, genes, d = ArrayCache(args.cache_dir), ckpt["genes"], ckpt["data"]
    sections = {n: cohorts.load_section("her2st", args.root, n) for n in [*trainset, val, test]}
    split = {n: data.prepare_split([sections[n]], genes, d["crop_size"], trunk, cache, device, smooth=d["smooth"])
             for n in sections}
    feats = {n: split[n].context.feats.double() for n in sections}          # (N, 512) frozen features
    labels = {n: torch.as_tensor(split[n].dataset.labels[0], dtype=torch.float64) for n in sections}
    x_tr, y_tr = torch.cat([feats[n] for n in trainset]), torch.cat([labels[n] for n in trainset])
    mu, sd = x_tr.mean(0), x_tr.std(0).clamp(min=1e-6)
    z = lambda n: (feats[n] - mu) / sd
    best = max((metrics.summarise({val: metrics.slide_metrics(ridge_predict(z(val), ridge_fit((x_tr - mu) / sd, y_tr, a)), labels[val])})[1]["pcc_m"], a)
               for a in (1.0, 10.0, 100.0, 1000.0, 10000.0))
    w = ridge_fit((x_tr - mu) / sd, y_tr, best[1])
    mean_pred = y_tr.mean(0, keepdim=True).expand_as(labels[test])
    out = {}
    for method, pred in (("training mean", mean_pred), (f"ridge (alpha {best[1]:g})", ridge_predict(z(test), w))):
        m = metrics.slide_metrics(pred, labels[test])
        out[method] = {"pcc_m": float("nan") if method == "training mean" else float(np.nanmean(m["pcc"])),
                       "mse": float(m["mse"].mean())}
    return out


def slug(name):
    return name.split(" (")[0].replace(" ", "-")


# Two-sided 95 % quantiles of Student's t for 1..30 degrees of freedom (then ~1.96): no scipy needed.
_T95 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
        2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
        2.045, 2.042]


def paired(diffs):
    """Mean of paired differences and its 95 % t-interval (mean ± t·sd/√n); NaN bounds for one pair,
    all NaN for none (a metric a method does not have, e.g. the training mean's PCC)."""
    d = np.asarray(diffs, np.float64)
    if len(d) == 0:
        return (float("nan"),) * 3
    if len(d) < 2:
        return float(d.mean()), float("nan"), float("nan")
    half = (_T95[len(d) - 2] if len(d) - 1 <= len(_T95) else 1.96) * d.std(ddof=1) / np.sqrt(len(d))
    return float(d.mean()), float(d.mean() - half), float(d.mean() + half)


def by_section(diff: pd.Series):
    """Paired difference over held-out sections: the mean over seeds per section first, then the
    t-interval of those section means. The seeds of one section share its data (and a deterministic
    baseline repeats one value per seed), so the (section, seed) pairs are not independent; the
    sections are the units of the interval."""
    return paired(diff.dropna().groupby(level="test").mean())


def paired_table(runs: pd.DataFrame, reference: str) -> pd.DataFrame:
    """Per method: PCC(M) and MSE (mean, std over runs), and the paired difference to `reference`
    twice: pooled over the (section, seed) pairs (d_*, d_*_lo, d_*_hi) and over the section means
    (d_*_sec, d_*_sec_lo, d_*_sec_hi; the interval to read, see by_section)."""
    table = runs.groupby("method", sort=False).agg(pcc_m=("pcc_m", "mean"), pcc_m_std=("pcc_m", "std"),
                                                   mse=("mse", "mean"), mse_std=("mse", "std"),
                                                   pairs=("pcc_m", "size"), sections=("test", "nunique")).reset_index()
    ref = runs[runs.method == reference].set_index(["test", "seed"])
    for metric in ("pcc_m", "mse"):
        diff = {m: runs[runs.method == m].set_index(["test", "seed"])[metric] - ref[metric] for m in table.method}
        none = (np.nan,) * 3
        table[f"d_{metric}"], table[f"d_{metric}_lo"], table[f"d_{metric}_hi"] = \
            zip(*[paired(diff[m].dropna()) if m != reference else none for m in table.method])
        table[f"d_{metric}_sec"], table[f"d_{metric}_sec_lo"], table[f"d_{metric}_sec_hi"] = \
            zip(*[by_section(diff[m]) if m != reference else none for m in table.method])
    return table


def her2st(args):
    """Leave one section out (validation: the next section in the list) for every variant and seed,
    plus the two baselines; each variant's PCC(M) and MSE, and its paired difference to the full model
    over (held-out section, seed) pairs and over sections (paired_table)."""
    names = args.sections.split(",")
    rows = []
    for i, test in enumerate(names):
        val = names[(i + 1) % len(names)]
        trainset = [n for n in names if n not in (test, val)]
        for name in args.variants:
            for seed in args.seeds:
                summary = run(["--data", "her2st", "--root", args.root, "--sections", args.sections,
                               "--test-sections", test, "--val-sections", val, "--weights", args.weights,
                               "--local-encoder", args.local_encoder, "--seed", str(seed),
                               "--epochs", str(args.epochs), "--batch-size", str(args.batch_size),
                               *VARIANTS[name], *args.extra],
                              Path(args.out) / f"{slug(name)}-seed{seed}" / f"test-{test}", args.cache_dir)
                rows.append({"test": test, "seed": seed, "method": name,
                             "pcc_m": summary["pcc_m_mean"], "mse": summary["mse_mean"]})
        ckpt = checkpoint.load_checkpoint(Path(args.out) / f"{slug(args.variants[0])}-seed{args.seeds[0]}"
                                        / f"test-{test}" / "best.pt")  # the runs' genes, labels and trunk
        for method, m in baselines(args, test, val, trainset, ckpt).items():  # deterministic: one row per seed
            rows += [{"test": test, "seed": seed, "method": method.split(" (")[0], **m} for seed in args.seeds]
        print(pd.DataFrame([r for r in rows if r["test"] == test]).to_string(index=False))
    runs = pd.DataFrame(rows)
    write_table(runs, Path(args.out) / "her2st_runs.csv")
    write_table(paired_table(runs, args.variants[0]), Path(args.out) / "her2st.csv")


def compare(args):
    """Two her2st experiments side by side (e.g. frozen vs trainable local encoder): for every method
    both ran, PCC(M) and MSE of each and the paired difference second − first over the (held-out
    section, seed) pairs both have, and over their sections (by_section)."""
    a, b = (pd.read_csv(Path(d) / "her2st_runs.csv").set_index(["method", "test", "seed"]) for d in args.runs)
    rows = []
    both_ran = [m for m in dict.fromkeys(a.index.get_level_values("method")) if m in b.index.get_level_values("method")]
    for method in both_ran:
        both = a.loc[[method]].merge(b.loc[[method]], left_index=True, right_index=True, suffixes=("_a", "_b"))
        if both.empty:
            continue
        row = {"method": method, "pairs": len(both), "sections": both.index.get_level_values("test").nunique()}
        for metric in ("pcc_m", "mse"):
            diff = both[f"{metric}_b"] - both[f"{metric}_a"]
            row[f"{metric}_a"], row[f"{metric}_b"] = both[f"{metric}_a"].mean(), both[f"{metric}_b"].mean()
            row[f"d_{metric}"], row[f"d_{metric}_lo"], row[f"d_{metric}_hi"] = paired(diff.dropna())
            row[f"d_{metric}_sec"], row[f"d_{metric}_sec_lo"], row[f"d_{metric}_sec_hi"] = by_section(diff)
        rows.append(row)
    print(f"a = {args.runs[0]}\nb = {args.runs[1]}")
    write_table(pd.DataFrame(rows), Path(args.out))


# -----------------------------------------------------------------------------
# the balance of the loss parts: how hard each one pulls on the layers they share

def balance(args):
    """Gradient norm of each weighted loss part at the fusion's output tokens (B, T, D) and at the fusion's
    parameters, at initialisation and for the trained best.pt, averaged over training batches."""
    import losses
    from model import GeneDML
    device = torch.device("cpu")
    ckpt = checkpoint.load_checkpoint(args.ckpt)
    a, d = ckpt["args"], ckpt["data"]
    trained, encoder = evaluate.rebuild(ckpt, device)
    torch.manual_seed(args.seed)
    fresh = GeneDML(trained.cfg)  # same config, fresh weights, the trained model's training statistics
    fresh.load_state_dict({k: v for k, v in trained.state_dict().items() if "mean" in k or "std" in k}, strict=False)
    fresh.load_trunk_weights(encoder.net.state_dict())  # a trainable local trunk starts where training started it
    sections = [cohorts.load_section(d["cohort"], a["root"], n) for n in d["sections"]["train"]]
    cfg = trained.cfg
    split = data.prepare_split(sections, ckpt["genes"], d["crop_size"], encoder, ArrayCache(args.cache_dir), device,
                          smooth=d["smooth"], local_tokens=cfg.local_encoder == "frozen" and cfg.frozen_tokens == "cached")
    loader = torch.utils.data.DataLoader(split.dataset, batch_size=a["batch_size"], shuffle=True, drop_last=True,
                                         generator=torch.Generator().manual_seed(args.seed))
    rows = []
    for state, model in (("initialisation", fresh), ("trained (best.pt)", trained)):
        model.train()
        grab = {}
        hook = model.fusion.ff.register_forward_hook(lambda m, i, o: grab.__setitem__("x", o))
        params = list(model.fusion.parameters())
        for step, batch in enumerate(loader):
            if step == args.batches:
                break
            label, local = batch["label"], batch["local"]
            if evaluate.online(model, encoder) is not None:  # an online frozen local level reads the encoder's tokens
                local = encoder.tokens(local).flatten(1, 2)
            out = model(local, batch["neighbour_feats"], batch["neighbour_mask"], batch["section"],
                        batch["index"], split.context, expression=label)
            parts = {"instance (w_inst·L_inst)": a["w_inst"] * losses.multi_scale_instance_loss(
                         out.gene, list(out.embeddings.values()), a["tau"]),
                     "group (λ·L_group)": a["lam"] * losses.instance_group_loss(
                         out.image_cluster, out.gene_cluster, min(a["k"], len(label)), a["tau_group"]),
                     "regression (w_mse·L_mse)": a["w_mse"] * torch.nn.functional.mse_loss(out.prediction, label)}
            grads = {}
            for name, loss in parts.items():
                g_x, *g_p = torch.autograd.grad(loss, [grab["x"], *params], retain_graph=True, allow_unused=True)
                grads[name] = g_x.flatten()
                rows.append({"state": state, "part": name, "batch": step, "loss": float(loss.detach()),
                             "grad_fusion_output": float(g_x.norm()),
                             "grad_fusion_params": float(torch.sqrt(sum((g.square().sum() for g in g_p if g is not None),
                                                                        torch.zeros(())))) })
            names = list(grads)
            for i, n in enumerate(names):  # do the parts pull the shared tokens the same way?
                rows[-len(names) + i]["cos_to_regression"] = float(torch.nn.functional.cosine_similarity(
                    grads[n], grads[names[-1]], dim=0))
        hook.remove()
    df = pd.DataFrame(rows).groupby(["state", "part"], sort=False).mean(numeric_only=True).drop(columns="batch").reset_index()
    regression = df.groupby("state", sort=False).grad_fusion_output.transform("last")  # the last part of each state
    df["times_regression"] = df.grad_fusion_output / regression
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    evaluate.write_csv(df, Path(args.out))
    print(f"\n{df.to_string(index=False, float_format='%.3g')}\n(written to {args.out})")


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m experiments.ablation", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="experiment", required=True)
    a = sub.add_parser("ablation", help="demo cohort: the full model against five ablations")
    a.add_argument("--root", default="data/demo")
    a.add_argument("--fold", type=int, default=0, help="demo fold (0 holds out patient A)")
    a.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    a.add_argument("--epochs", type=int, default=10)
    a.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), metavar="NAME",
                   help=f"which variants to run (default: all: {', '.join(VARIANTS)})")
    a.add_argument("--out", default="runs/ablation")
    h = sub.add_parser("her2st", help="real her2st sections with images: leave one section out, the ablation vs baselines")
    h.add_argument("--root", default="data/her2st")
    h.add_argument("--sections", default="B4,C2,C3,C4,C5", help="sections with an image")
    h.add_argument("--weights", default="none", help="trunk weights (none | imagenet | checkpoint path)")
    h.add_argument("--local-encoder", default="frozen", choices=["frozen", "trainable"])
    h.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    h.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), metavar="NAME",
                   help="which variants to run; the first is the reference of the paired differences")
    h.add_argument("--epochs", type=int, default=30)
    h.add_argument("--batch-size", type=int, default=32)
    h.add_argument("--out", default="runs/her2st-ablation")
    c = sub.add_parser("compare", help="two her2st experiments' runs side by side, paired by section and seed")
    c.add_argument("runs", nargs=2, metavar="DIR", help="two --out folders of experiments.py her2st")
    c.add_argument("--out", default="runs/her2st-compare.csv", help="CSV to write")
    g = sub.add_parser("balance", help="gradient norm of each loss part at the fusion, at init and trained")
    g.add_argument("--ckpt", required=True, help="a best.pt of a full Gene-DML run")
    g.add_argument("--batches", type=int, default=8, help="training batches to average over")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--out", default="runs/balance.csv", help="CSV to write")
    g.add_argument("--cache-dir", default="cache")
    for s in (a, h):
        s.add_argument("--cache-dir", default="cache")
        s.add_argument("extra", nargs=argparse.REMAINDER, help="further train.py flags, after --")
    args = p.parse_args(argv)
    if args.experiment in ("ablation", "her2st"):
        args.extra = [x for x in args.extra if x != "--"]
    {"ablation": ablation, "her2st": her2st, "compare": compare, "balance": balance}[args.experiment](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
