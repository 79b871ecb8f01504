"""train.py and evaluate.py end to end on a tiny demo cohort (open_clip's smoke test, nanoGPT's resume).

The demo cohort is generated once per session and trimmed to a 6x6 block of spots per section (36
spots), so that the frozen features (the slow part on a CPU) are extracted once, for a few hundred
crops. Fold 0 with --sections A1,B1,C1 trains on C1, selects the epoch on B1 and holds out A1; at
--batch-size 32 an epoch is one step. One two-epoch run is shared by every test that only reads a
checkpoint; every run shares one feature cache.
"""
import argparse
import json
import math
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from genedml import cohorts
import data
from genedml import demo
from genedml import checkpoint
import evaluate
import train
from genedml.cache import ArrayCache
from model import GeneDML, GeneDMLConfig
from genedml.trunk import build_trunk

SECTIONS = "A1,B1,C1"  # demo fold 0: test patient A, validation patient B, training patient C
TIMING = ("seconds", "spots_per_s", "checkpoint_seconds", "validation_seconds", "best_seconds")  # the only log fields allowed to differ between identical runs


def train_argv(root, cache, out, *extra, epochs=2):
    """A tiny demo run; the trainable local encoder unless extra says otherwise (the demo recipe's is frozen)."""
    return ["--data", "demo", "--root", str(root), "--sections", SECTIONS, "--crop-size", "32", "--dim", "32",
            "--local-encoder", "trainable", "--batch-size", "32", "--epochs", str(epochs), "--cache-dir", str(cache),
            "--out", str(out), "--workers", "0", "--device", "cpu", *extra]


def eval_argv(ckpts, cache, out, *extra):
    return ["--ckpt", *map(str, ckpts), "--out", str(out), "--cache-dir", str(cache), "--device", "cpu",
            "--batch-size", "32", "--maps", "2", *extra]


def read_log(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_tensors(a, b, where=""):
    """Recursively: the same keys, torch.equal tensors, equal everything else."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: keys differ"
        for k in a:
            assert_same_tensors(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tensors(x, y, f"{where}/{i}")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"{where}: tensors differ"
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory):
    root = demo.make_demo_cohort(tmp_path_factory.mktemp("demo"))
    for f in (root / "ST-spotfiles").glob("*_selection.tsv"):
        spots = pd.read_csv(f, sep="\t")
        block = spots["x"].between(4, 9) & spots["y"].between(4, 9)
        spots = spots[block | (spots["selected"] == 0)]  # keep the off-tissue rows: they have no counts
        assert (spots["selected"] == 1).sum() >= 30, f"{f.name}: the block missed the tissue"
        spots.to_csv(f, sep="\t", index=False)
    return root


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def run(demo_root, cache_dir, tmp_path_factory):
    """Two epochs straight; its folder holds best.pt, last.pt and log.jsonl."""
    out = tmp_path_factory.mktemp("run")
    best = train.main(train_argv(demo_root, cache_dir, out))
    assert best == out / "best.pt"
    return out


@pytest.fixture(scope="session")
def evaluated(run, cache_dir):
    out = run / "eval"
    return evaluate.main(eval_argv([run / "best.pt"], cache_dir, out)), out


@pytest.fixture(scope="session")
def stopped(demo_root, cache_dir, tmp_path_factory):
    """The same run as `run`, with a loss that turns NaN at the second step (= epoch 1).
    Returns (its folder, the SystemExit raised or None, last.pt's epoch and the log right after the stop)."""
    out = tmp_path_factory.mktemp("stopped")
    real, calls = train.gene_dml_loss, []

    def loss(*a, **kw):
        calls.append(1)
        total, parts = real(*a, **kw)
        return (total * float("nan"), {**parts, "total": float("nan")}) if len(calls) >= 2 else (total, parts)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train, "gene_dml_loss", loss)
        try:
            train.main(train_argv(demo_root, cache_dir, out))
            error = None
        except SystemExit as e:
            error = e
    return out, error, load(out / "last.pt")["epoch"], read_log(out / "log.jsonl")


# ----------------------------------------------------------------------------- arguments

def test_get_args_defaults_come_from_the_cohort_table_and_flags_override():
    demo_args = train.get_args(["--data", "demo"])
    spec = cohorts.COHORTS["demo"]
    assert (demo_args.root, demo_args.crop_size, demo_args.k, demo_args.n_genes) == \
        (spec["root"], spec["crop"], spec["k"], spec["genes"])
    assert (demo_args.epochs, demo_args.batch_size, demo_args.weights, demo_args.local_encoder) == \
        (10, 64, "none", "frozen")
    assert demo_args.out == "runs/demo" and demo_args.levels == ("local", "neighbour", "global")
    real = train.get_args(["--data", "her2st"])
    assert (real.root, real.crop_size, real.k, real.n_genes) == ("data/her2st", 224, 18, 250)
    assert (real.epochs, real.batch_size, real.weights, real.local_encoder) == (200, 256, "imagenet", "trainable")
    over = train.get_args(["--data", "her2st", "--root", "x", "--crop-size", "112", "--k", "5", "--n-genes", "20",
                           "--epochs", "3", "--batch-size", "8", "--weights", "none", "--out", "o",
                           "--levels", "local, global"])
    assert (over.root, over.crop_size, over.k, over.n_genes, over.epochs, over.batch_size, over.weights, over.out) == \
        ("x", 112, 5, 20, 3, 8, "none", "o")
    assert over.levels == ("local", "global")
    assert train.get_args(["--data", "demo", "--local-encoder", "trainable"]).local_encoder == "trainable"
    with pytest.raises(SystemExit):
        train.get_args(["--fold", "first"])


@pytest.mark.parametrize("flags, says", [
    (["--levels", "local,globl"], "--levels: expected a comma list of local, neighbour, global; got globl"),
    (["--levels", ","], "--levels: expected a comma list of names"),
    (["--data", "her2st", "--fold", "8"], "--fold 8: her2st has 8 folds, 0..7"),
    (["--data", "cscc", "--fold", "4"], "cscc has 4 folds"),
    (["--n-genes", "0"], "--n-genes: must be at least 1, got 0"),
    # issue 25: each of these used to start a run, or end in a traceback
    (["--epochs", "-1"], "--epochs: must be at least 0, got -1"),
    (["--batch-size", "0"], "--batch-size: must be at least 1, got 0"),
    (["--batch-size", "-4"], "--batch-size: must be at least 1, got -4"),
    (["--k", "0"], "--k: must be at least 1, got 0"),
    (["--tau", "0"], "--tau: must be greater than 0, got 0"),
    (["--tau-group", "nan"], "--tau-group: expected a finite number, got 'nan'"),
    (["--lr=-1e-4"], "--lr: must be greater than 0"),
    (["--lam", "-0.5"], "--lam: must be at least 0"),
    (["--crop-size", "16"], "--crop-size: must be at least 32, got 16"),
    (["--patience", "0"], "--patience: must be at least 1"),
    (["--workers", "-1"], "--workers: must be at least 0"),
    (["--batch-size", "ten"], "--batch-size: expected an integer, got 'ten'"),
    (["--data", "her2st", "--crop-um", "0"], "--crop-um: must be greater than 0"),
    (["--data", "nowhere"], "--data must be one of"),
])
def test_bad_flags_are_refused_by_get_args(flags, says, capsys):
    """Before any slide is read: a usage error (exit 2) that names the flag, not a traceback after the crops."""
    with pytest.raises(SystemExit) as e:
        train.get_args(flags)
    assert e.value.code == 2 and says in capsys.readouterr().err


def test_more_genes_than_the_sections_hold_is_a_clear_error_before_any_crop(demo_root, tmp_path):
    with pytest.raises(ValueError, match=r"hold only \d+ genes: ask for at most \d+ \(--n-genes \d+\)"):
        train.main(train_argv(demo_root, tmp_path / "cache", tmp_path / "out", "--n-genes", "100000"))
    assert not (tmp_path / "cache").exists(), "the error must come before any crop is cached"


# ----------------------------------------------------------------------------- training and evaluation

def test_smoke_train_writes_checkpoints_and_one_log_line_per_epoch(run):
    assert (run / "best.pt").is_file() and (run / "last.pt").is_file()
    assert not [f for f in os.listdir(run) if ".tmp" in f], "a temporary checkpoint file was left behind"
    lines = read_log(run / "log.jsonl")
    assert [line["epoch"] for line in lines] == [0, 1]
    for line in lines:
        for key in ("train_inst", "train_group", "train_mse", "train_total", "val_pcc_m", "val_mse", "lr", *TIMING):
            assert key in line and math.isfinite(line[key]), f"log field {key}: {line.get(key)}"
        # the parts add up to the total with the default weights (w_inst 1, lam 0.8, w_mse 1)
        parts = line["train_inst"] + 0.8 * line["train_group"] + line["train_mse"]
        assert line["train_total"] == pytest.approx(parts, rel=1e-5)
    assert load(run / "last.pt")["epoch"] == 1


def test_evaluate_writes_tables_and_maps(run, evaluated, demo_root):
    rc, out = evaluated
    assert rc == 0
    ckpt = load(run / "best.pt")
    genes = ckpt["genes"]
    assert ckpt["data"]["sections"] == {"train": ["C1"], "val": ["B1"], "test": ["A1"]}

    pred = pd.read_csv(out / "predictions.csv")
    assert list(pred.columns) == ["section", "spot_id", "array_x", "array_y", "pixel_x", "pixel_y", *genes]
    a1 = cohorts.load_section("demo", demo_root, "A1")
    assert len(pred) == len(a1.spot_ids) and set(pred["spot_id"]) == set(a1.spot_ids)
    assert (pred["section"] == "A1").all() and np.isfinite(pred[genes].to_numpy()).all()

    per_gene = pd.read_csv(out / "per_gene.csv")
    assert {"slide", "gene", "pcc", "mse", "mae"} <= set(per_gene.columns)
    assert len(per_gene) == len(genes) and (per_gene["slide"] == "A1").all()

    folds = pd.read_csv(out / "folds.csv")
    assert len(folds) == 1 and folds.loc[0, "test"] == "A1" and folds.loc[0, "selection"] == "validation"
    # PCC(M) recomputed here from predictions.csv and labels made by data.py
    pred = pred.set_index("spot_id").loc[a1.spot_ids, genes].to_numpy()
    label = data.expression_labels(data.gene_counts(a1, genes), a1.array_xy)
    r = [np.corrcoef(pred[:, g], label[:, g])[0, 1] for g in range(len(genes))
         if pred[:, g].std() > 1e-6 and label[:, g].std() > 1e-6]
    assert folds.loc[0, "pcc_m"] == pytest.approx(np.mean(r), abs=2e-3)

    summary = json.loads((out / "summary.json").read_text())
    assert summary["cohort"] == "demo" and summary["folds"] == 1 and summary["selection"] == "validation"
    assert summary["pcc_m_mean"] == pytest.approx(folds.loc[0, "pcc_m"], abs=1e-4)

    maps = sorted((out / "maps").glob("*.png"))
    assert len(maps) == 2 and all(m.name.startswith("A1_") and m.stem[3:] in genes for m in maps)
    for m in maps:
        with Image.open(m) as im:
            im.verify()
        with Image.open(m) as im:
            assert im.width > 100 and im.height > 100


def test_checkpoint_round_trip(run, evaluated, demo_root, cache_dir):
    ckpt = load(run / "best.pt")  # weights_only=True: plain tensors and primitives only
    for key in ("model", "frozen_trunk", "genes", "config", "data", "selection", "epoch", "best", "args"):
        assert key in ckpt, f"checkpoint lacks {key}"
    assert not {"optimizer", "scheduler", "scaler"} & set(ckpt), "best.pt is for evaluation: no optimiser state"
    last = load(run / "last.pt")
    assert {"optimizer", "scheduler", "scaler"} <= set(last) and set(ckpt) <= set(last)
    assert ckpt["data"]["cohort"] == "demo" and ckpt["data"]["crop_size"] == 32
    assert ckpt["best"]["epoch"] == ckpt["epoch"], "best.pt is written at its best epoch"
    # the frozen trunk is the fixed seed-0 init, whatever --seed (so runs share one feature cache)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        assert_same_tensors(build_trunk("none").state_dict(), ckpt["frozen_trunk"], "frozen_trunk")

    model, trunk = evaluate.rebuild(checkpoint.load_checkpoint(run / "best.pt"), "cpu")
    fresh = GeneDML(GeneDMLConfig.for_cohort("demo", len(ckpt["genes"]), dim=32)).eval()
    fresh.load_state_dict(ckpt["model"])
    a1 = cohorts.load_section("demo", demo_root, "A1")
    split = data.prepare_split([a1], ckpt["genes"], 32, trunk, ArrayCache(cache_dir), "cpu")
    loader = torch.utils.data.DataLoader(split.dataset, batch_size=64)
    ours = evaluate.predict(model, loader, split.context, "cpu")[0][0]
    theirs = evaluate.predict(fresh, loader, split.context, "cpu")[0][0]
    assert ours.shape == (len(a1.spot_ids), len(ckpt["genes"]))
    assert np.array_equal(ours, theirs)
    # and they are what evaluate.main wrote (CSV keeps 5 significant digits)
    written = pd.read_csv(evaluated[1] / "predictions.csv").set_index("spot_id").loc[a1.spot_ids, ckpt["genes"]]
    assert np.allclose(written.to_numpy(), ours, rtol=1e-4, atol=1e-5)


def test_select_on_test_is_labelled_everywhere(demo_root, cache_dir, tmp_path):
    train.main(train_argv(demo_root, cache_dir, tmp_path / "run", "--select-on-test", epochs=1))
    ckpt = load(tmp_path / "run" / "best.pt")
    assert ckpt["selection"].startswith("test") and "published" in ckpt["selection"]
    assert "test_pcc_m" in read_log(tmp_path / "run" / "log.jsonl")[0]
    assert evaluate.main(eval_argv([tmp_path / "run" / "best.pt"], cache_dir, tmp_path / "eval")) == 0
    assert pd.read_csv(tmp_path / "eval" / "folds.csv")["selection"].str.startswith("test").all()
    assert json.loads((tmp_path / "eval" / "summary.json").read_text())["selection"].startswith("test")


def test_predict_a_slide_without_counts(run, demo_root, cache_dir, tmp_path):
    # a copy of D1's image and spot file alone, away from the cohort and its count files
    slide = tmp_path / "slide"
    slide.mkdir()
    (image,) = (demo_root / "ST-imgs" / "D" / "D1").glob("*.jpg")
    (slide / "he.jpg").write_bytes(image.read_bytes())
    (slide / "spots.tsv").write_bytes((demo_root / "ST-spotfiles" / "D1_selection.tsv").read_bytes())
    out = tmp_path / "pred"
    assert evaluate.main(eval_argv([run / "best.pt"], cache_dir, out, "--predict",
                                   str(slide / "he.jpg"), str(slide / "spots.tsv"))) == 0
    spots = pd.read_csv(slide / "spots.tsv", sep="\t")
    spots = spots[spots["selected"] == 1]
    genes = load(run / "best.pt")["genes"]
    pred = pd.read_csv(out / "predictions.csv")
    assert list(pred.columns) == ["section", "spot_id", "array_x", "array_y", "pixel_x", "pixel_y", *genes]
    assert len(pred) == len(spots) and list(pred["spot_id"]) == [f"{x}x{y}" for x, y in zip(spots["x"], spots["y"])]
    assert np.isfinite(pred[genes].to_numpy()).all()
    assert not (out / "per_gene.csv").exists(), "no counts, so no metrics"
    maps = sorted((out / "maps").glob("*.png"))
    assert len(maps) == 2
    with Image.open(maps[0]) as im:
        im.verify()


def test_resume_continues_exactly(run, stopped, demo_root, cache_dir, capsys):
    out, _, stopped_epoch, _ = stopped
    assert stopped_epoch == 0, "the stopped run should hold one finished epoch"
    with open(out / "log.jsonl", "a") as f:  # as if killed after logging epoch 1, before its checkpoint
        f.write(json.dumps({"epoch": 1, "train_total": 123.0}) + "\n")
    train.main(train_argv(demo_root, cache_dir, out, "--resume", str(out / "last.pt")))
    assert "=> loaded checkpoint" in capsys.readouterr().out
    assert_resumed_like(run, out, ("model", "frozen_trunk", "optimizer", "scheduler", "scaler", "genes", "epoch", "best"))


@pytest.mark.parametrize("changed", [["--lam", "0.5"], ["--w-mse", "2", "--no-smooth"], ["--tau", "0.1"],
                                     ["--batch-size", "16"]])
def test_resume_refuses_other_settings(run, demo_root, cache_dir, tmp_path, changed):
    """A single-fold --resume refuses what --fold all's re-run refuses, naming each changed flag."""
    with pytest.raises(SystemExit, match="other settings") as e:
        train.main(train_argv(demo_root, cache_dir, tmp_path, *changed, "--resume", str(run / "last.pt")))
    for flag in changed:
        if flag.startswith("--"):
            assert flag in str(e.value.code)
    assert not (tmp_path / "last.pt").exists()


def test_resume_needs_no_network_for_imagenet_weights(demo_root, cache_dir, tmp_path, monkeypatch):
    """--resume takes the frozen trunk from the checkpoint: with torch.hub's download failing (offline),
    a run started with --weights imagenet resumes, and continues with the same trunk."""
    import torchvision
    from urllib.error import URLError
    torch.manual_seed(5)
    fake = torchvision.models.resnet18().state_dict()  # stands in for the downloaded ImageNet weights

    def online(url, **kw):
        return fake

    def offline(url, **kw):
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", online)
    train.main(train_argv(demo_root, cache_dir, tmp_path, "--weights", "imagenet", epochs=1))
    first = load(tmp_path / "last.pt")
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(FileNotFoundError, match="Offline"):  # the stand-in network is really down
        train.main(train_argv(demo_root, cache_dir, tmp_path / "fresh", "--weights", "imagenet", epochs=1))
    train.main(train_argv(demo_root, cache_dir, tmp_path, "--weights", "imagenet", "--resume", str(tmp_path / "last.pt")))
    resumed = load(tmp_path / "last.pt")
    assert resumed["epoch"] == 1
    assert_same_tensors(first["frozen_trunk"], resumed["frozen_trunk"], "frozen_trunk")
    assert torch.equal(first["frozen_trunk"]["conv1.weight"], fake["conv1.weight"])


def assert_resumed_like(straight, resumed, keys):
    """The resumed run's last.pt (these keys) and log equal the straight run's, timing aside."""
    a, b = load(straight / "last.pt"), load(resumed / "last.pt")
    for key in keys:
        assert_same_tensors(a[key], b[key], key)
    drop = lambda lines: [{k: v for k, v in line.items() if k not in TIMING} for line in lines]
    assert drop(read_log(resumed / "log.jsonl")) == drop(read_log(straight / "log.jsonl"))


def test_the_training_set_on_the_device_trains_as_the_loader_does(run, demo_root, cache_dir, tmp_path, capsys):
    """--data-on-device on (here the CPU is the device) runs the loader's run: the same log and weights."""
    train.main(train_argv(demo_root, cache_dir, tmp_path, "--data-on-device", "on"))
    assert "batches: training set on the cpu" in capsys.readouterr().out
    assert_resumed_like(run, tmp_path, ("model", "optimizer", "scheduler", "epoch", "best"))


def test_nonfinite_loss_stops_and_keeps_the_last_checkpoint(stopped):
    _, error, last_epoch, log = stopped
    assert error is not None, "a NaN loss must stop training"
    assert "non-finite loss" in str(error.code) and "last.pt" in str(error.code)
    assert last_epoch == 0, "last.pt must still be the checkpoint of the last finished epoch"
    assert [line["epoch"] for line in log] == [0], "no log line for the epoch that failed"


# ----------------------------------------------------------------------------- bad checkpoints

class NotAState:  # a pickle that weights_only=True refuses
    pass


@pytest.mark.parametrize("case", ["missing", "random bytes", "custom class", "namespace", "missing keys",
                                  "no frozen trunk", "a tensor"])
def test_bad_checkpoint_is_a_clear_error(case, tmp_path, capsys):
    path = tmp_path / "bad.pt"
    if case == "random bytes":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    elif case == "custom class":
        torch.save({"model": NotAState()}, path)
    elif case == "namespace":
        torch.save({"model": {}, "args": argparse.Namespace(lr=1e-4)}, path)
    elif case == "missing keys":
        torch.save({"model": {}, "genes": ["G1"]}, path)
    elif case == "no frozen trunk":
        torch.save({"model": {}, "config": {"n_genes": 1}, "genes": ["G1"], "data": {}, "selection": "validation"}, path)
    elif case == "a tensor":
        torch.save(torch.zeros(3), path)
    rc = evaluate.main(["--ckpt", str(path), "--out", str(tmp_path / "eval")])
    err = capsys.readouterr().err
    assert rc != 0
    assert "bad.pt" in err and err.startswith("error:") and "Traceback" not in err
    if case == "missing keys":
        assert "config" in err and "data" in err
    if case == "no frozen trunk":
        assert "frozen_trunk" in err


def test_checkpoint_whose_weights_do_not_fit_its_config(run, tmp_path, capsys):
    ckpt = load(run / "best.pt")
    ckpt["config"]["dim"] = 64
    torch.save({k: v for k, v in ckpt.items() if k != "optimizer"}, tmp_path / "wrong.pt")
    assert evaluate.main(["--ckpt", str(tmp_path / "wrong.pt"), "--out", str(tmp_path / "eval")]) != 0
    assert "wrong.pt" in capsys.readouterr().err


@pytest.mark.parametrize("change", ["no shared gene", "cohort", "selection"])
def test_checkpoints_that_do_not_belong_together(change, run, cache_dir, tmp_path, capsys):
    ckpt = {k: v for k, v in load(run / "best.pt").items() if k != "optimizer"}
    other = {"no shared gene": {**ckpt, "genes": [g + "x" for g in ckpt["genes"]]},
             "cohort": {**ckpt, "data": {**ckpt["data"], "cohort": "her2st"}},
             "selection": {**ckpt, "selection": "test (published protocol)"}}[change]
    for name, c in (("a", ckpt), ("b", other)):
        (tmp_path / name).mkdir()
        torch.save(c, tmp_path / name / "best.pt")
    rc = evaluate.main(eval_argv([tmp_path / "a" / "best.pt", tmp_path / "b" / "best.pt"], cache_dir, tmp_path / "eval"))
    assert rc != 0
    assert "do not belong together" in capsys.readouterr().err
    assert not (tmp_path / "eval" / "folds.csv").exists()


# ----------------------------------------------------------------------------- every fold

def test_fold_all_trains_each_fold_and_tables_them(demo_root, cache_dir, tmp_path, monkeypatch, capsys):
    # two folds instead of four (test A / val B, test B / val A; C1 trains both), to stay cheap
    monkeypatch.setitem(cohorts.COHORTS["demo"], "folds", [["A"], ["B"]])
    best = train.main(train_argv(demo_root, cache_dir, tmp_path, "--fold", "all", epochs=1))
    assert best == [tmp_path / "fold0" / "best.pt", tmp_path / "fold1" / "best.pt"]
    ckpts = [load(b) for b in best]
    assert [c["data"]["sections"]["test"] for c in ckpts] == [["A1"], ["B1"]]
    # one gene list for the cohort (every section in use), the same in every fold
    cohort = data.select_genes([cohorts.load_section("demo", demo_root, n) for n in SECTIONS.split(",")], 50)
    assert ckpts[0]["genes"] == ckpts[1]["genes"] == cohort
    folds = pd.read_csv(tmp_path / "eval" / "folds.csv")
    assert list(folds["fold"]) == [0, 1] and list(folds["test"]) == ["A1", "B1"]
    assert np.isfinite(folds["pcc_m"]).all() and np.isfinite(folds["pcc_h"]).all()
    for fold in ("fold0", "fold1"):
        assert (tmp_path / "eval" / fold / "predictions.csv").is_file()
    assert json.loads((tmp_path / "eval" / "summary.json").read_text())["folds"] == 2
    assert "Gene-DML*" not in capsys.readouterr().out  # the paper has no demo row


@pytest.mark.parametrize("select_on_test", [False, True])
def test_split_of_each_protocol(select_on_test):
    """her2st fold 0 holds out patient A; the honest default also holds out validation patient B."""
    args = train.get_args(["--data", "her2st", *(["--select-on-test"] if select_on_test else [])])
    names = train.split_sections(args, 0)
    assert names["test"] == [f"A{i}" for i in range(1, 7)]
    if select_on_test:  # the published protocol: every non-test patient trains, none validates
        assert names["val"] == [] and len(names["train"]) == 30 and {n[0] for n in names["train"]} == set("BCDEFGH")
    else:
        assert names["val"] == [f"B{i}" for i in range(1, 7)]
        assert len(names["train"]) == 24 and {n[0] for n in names["train"]} == set("CDEFGH")
    with pytest.raises(SystemExit):
        train.get_args(["--select-on-test", "--val-sections", "B1"])


def test_data_folds_counts_the_spots_of_both_protocols(demo_root, capsys):
    assert data.main(["folds", "demo", "--root", str(demo_root)]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[1:]]
    folds = cohorts.COHORTS["demo"]["folds"]
    assert [r[1:3] for r in rows] == [[",".join(f), folds[(i + 1) % len(folds)][0]] for i, f in enumerate(folds)]
    sections = {p: [cohorts.load_section("demo", demo_root, n) for n in demo.PATIENTS[p]] for p in demo.PATIENTS}
    cohort = set(data.select_genes(sum(sections.values(), []), 50))
    spots = {p: sum(len(s.spot_ids) for s in ss) for p, ss in sections.items()}
    for fold, test, val, n_test, n_val, n_train, n_published, _, overlap in rows:
        assert (int(n_test), int(n_val)) == (sum(spots[p] for p in test.split(",")), spots[val])
        assert int(n_published) == sum(spots.values()) - int(n_test) == int(n_train) + spots[val]
        train_patients = cohorts.fold_split("demo", int(fold))["train"]
        own = data.select_genes(sum((sections[p] for p in train_patients), []), 50)
        assert overlap == f"{len(cohort.intersection(own))}/50"


def fold_all_argv(demo_root, cache_dir, out):
    """Published protocol, per-fold genes: fold 0 trains on B1+C1, fold 1 on A1+C1 (different lists)."""
    return train_argv(demo_root, cache_dir, out, "--fold", "all", "--select-on-test", "--genes-from", "train")


@pytest.fixture(scope="session")
def straight_folds(demo_root, cache_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("folds")
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(cohorts.COHORTS["demo"], "folds", [["A"], ["B"]])
        train.main(fold_all_argv(demo_root, cache_dir, out))
    return out


def test_select_on_test_fold_all_with_per_fold_genes(straight_folds, demo_root):
    ckpts = [load(straight_folds / f"fold{i}" / "best.pt") for i in (0, 1)]
    assert [c["data"]["sections"] for c in ckpts] == [{"train": ["B1", "C1"], "val": [], "test": ["A1"]},
                                                      {"train": ["A1", "C1"], "val": [], "test": ["B1"]}]
    assert ckpts[0]["genes"] != ckpts[1]["genes"]  # the premise: per-fold lists differ
    for c in ckpts:
        train_sections = [cohorts.load_section("demo", demo_root, n) for n in c["data"]["sections"]["train"]]
        assert c["genes"] == data.select_genes(train_sections, 50)
    folds = pd.read_csv(straight_folds / "eval" / "folds.csv")
    assert folds["selection"].str.startswith("test").all() and np.isfinite(folds["pcc_h"]).all()
    genes = pd.read_csv(straight_folds / "eval" / "genes.csv")
    shared = set(ckpts[0]["genes"]) & set(ckpts[1]["genes"])
    assert set(genes["gene"]) == set(ckpts[0]["genes"]) | set(ckpts[1]["genes"])
    assert genes["hpg"].sum() == min(50, len(shared)) and set(genes.loc[genes["hpg"], "gene"]) <= shared


def test_fold_all_resumes_after_a_kill_and_ends_in_the_same_table(straight_folds, demo_root, cache_dir, tmp_path,
                                                                  monkeypatch, capsys):
    monkeypatch.setitem(cohorts.COHORTS["demo"], "folds", [["A"], ["B"]])
    real, calls = train.gene_dml_loss, []

    def killed(*a, **kw):  # a kill in fold 1, epoch 1, after its first step: last.pt holds epoch 0
        if (tmp_path / "fold1" / "last.pt").exists():
            calls.append(1)
            if len(calls) == 2:
                raise KeyboardInterrupt
        return real(*a, **kw)

    with monkeypatch.context() as mp:
        mp.setattr(train, "gene_dml_loss", killed)
        with pytest.raises(KeyboardInterrupt):
            train.main(fold_all_argv(demo_root, cache_dir, tmp_path))
    assert load(tmp_path / "fold1" / "last.pt")["epoch"] == 0 and not (tmp_path / "eval").exists()
    capsys.readouterr()

    train.main(fold_all_argv(demo_root, cache_dir, tmp_path))  # the same command again
    printed = capsys.readouterr().out
    assert "fold 0: finished earlier" in printed and "=> loaded checkpoint" in printed
    assert_same_table_and_weights(straight_folds, tmp_path)

    # a failure while building the table is a non-zero exit with the reason; the next re-run completes it
    def broken(*a, **kw):
        raise ValueError("the test broke the table")

    with monkeypatch.context() as mp:
        mp.setattr(evaluate, "evaluate_checkpoint", broken)
        with pytest.raises(SystemExit) as e:
            train.main(fold_all_argv(demo_root, cache_dir, tmp_path))
    assert e.value.code not in (0, None) and "could not be built" in str(e.value.code)
    assert "the test broke the table" in capsys.readouterr().err
    train.main(fold_all_argv(demo_root, cache_dir, tmp_path))
    assert_same_table_and_weights(straight_folds, tmp_path)
    # and other settings in the same folder are refused rather than mixed in
    with pytest.raises(SystemExit, match="other settings.*--lr"):
        train.main(fold_all_argv(demo_root, cache_dir, tmp_path) + ["--lr", "0.001"])


def assert_same_table_and_weights(a, b):
    assert pd.read_csv(a / "eval" / "folds.csv").equals(pd.read_csv(b / "eval" / "folds.csv"))
    for fold in ("fold0", "fold1"):
        for name in ("best.pt", "last.pt"):
            x, y = load(a / fold / name), load(b / fold / name)
            for key in ("model", "epoch", "best", "genes") + (("optimizer",) if name == "last.pt" else ()):
                assert_same_tensors(x[key], y[key], f"{fold}/{name}/{key}")


def test_missing_cohort_names_the_files_and_the_fetch_command(tmp_path):
    import subprocess
    import sys
    (tmp_path / "her2st" / "ST-cnts").mkdir(parents=True)   # a partial cohort: counts folder only
    run = subprocess.run([sys.executable, "train.py", "--data", "her2st", "--root", str(tmp_path / "her2st"),
                          "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache")],
                         cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=120)
    assert run.returncode != 0
    assert "Traceback" not in run.stderr
    assert "108 file(s) missing" in run.stderr                   # 36 sections x (counts, spots, image)
    assert "C1.tsv.gz" in run.stderr and "C1_selection.tsv" in run.stderr
    assert "python data.py download her2st --root" in run.stderr
    assert not (tmp_path / "out" / "last.pt").exists()


def test_background_checkpoint_writer_saves_a_snapshot_and_reports_failures(tmp_path):
    """The GPU's last.pt: written by a thread while training goes on; what lands on disk is the state
    at save(), even if the tensors change right after, and a failed write raises in the loop."""
    writer = checkpoint.CheckpointWriter(background=True)
    weights = torch.zeros(1000)
    writer.save({"model": {"w": weights}, "epoch": 3}, tmp_path / "last.pt")
    weights += 1  # the next step, while the thread may still be writing
    writer.wait()
    saved = load(tmp_path / "last.pt")
    assert saved["epoch"] == 3 and torch.equal(saved["model"]["w"], torch.zeros(1000))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temporary file is left"
    writer.save({"epoch": 4}, tmp_path / "missing-folder" / "last.pt")
    with pytest.raises((RuntimeError, OSError), match="missing-folder"):  # torch.save: "Parent directory ... does not exist"
        writer.wait()
    writer.wait()  # the error is reported once


def test_experiments_balance_runs_on_a_trained_checkpoint(run, cache_dir, tmp_path):
    """experiments/ablation.py balance rebuilds a trained run's model and encoder and measures each loss part's pull."""
    from experiments import ablation
    ablation.main(["balance", "--ckpt", str(run / "best.pt"), "--batches", "1", "--cache-dir", str(cache_dir),
                      "--out", str(tmp_path / "balance.csv")])
    df = pd.read_csv(tmp_path / "balance.csv")
    assert list(dict.fromkeys(df["state"])) == ["initialisation", "trained (best.pt)"] and len(df) == 6
    assert (df["grad_fusion_output"] > 0).all() and np.isfinite(df["times_regression"]).all()


# ----------------------------------------------------------------------------- bad input: a message, not a traceback (issue 25)

def test_device_is_checked_where_it_is_resolved(monkeypatch):
    """distributed.device_for, which train.py and evaluate.py both call, names the valid forms."""
    from genedml import distributed
    assert distributed.device_for("cpu") == torch.device("cpu")
    for bad in ("gpu0", "cuda:x", "meta"):
        with pytest.raises(ValueError, match=f"--device '{bad}' is not a device; expected auto, cpu, cuda or cuda:N"):
            distributed.device_for(bad)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a machine without a GPU or its driver
    for name in ("cuda", "cuda:1"):
        with pytest.raises(ValueError, match=f"--device {name}: torch finds no usable cuda device.*expected auto, cpu"):
            distributed.device_for(name)
    assert distributed.device_for("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ValueError, match="--device cuda:2: this machine has 2 CUDA device"):
        distributed.device_for("cuda:2")


@pytest.mark.parametrize("case", ["crop too small", "shortened gene list", "no sections", "sections missing"])
def test_checkpoint_evaluation_cannot_use_is_refused_at_loading(case, run, cache_dir, tmp_path, capsys):
    ckpt = load(run / "best.pt")
    says = {"crop too small": "crop size 16 px, below the 32 px", "shortened gene list": "has 49 genes, its model predicts 50",
            "no sections": "no held-out sections", "sections missing": "no held-out sections"}[case]
    if case == "crop too small":
        ckpt["data"]["crop_size"] = 16
    elif case == "shortened gene list":
        ckpt["genes"] = ckpt["genes"][:-1]
    elif case == "no sections":
        ckpt["data"]["sections"] = {"train": [], "val": [], "test": []}
    else:
        del ckpt["data"]["sections"]
    torch.save(ckpt, tmp_path / "edited.pt")
    assert evaluate.main(eval_argv([tmp_path / "edited.pt"], cache_dir, tmp_path / "eval")) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path / 'edited.pt'}: cannot be evaluated") and says in err, err
    assert not (tmp_path / "eval" / "predictions.csv").exists(), "refused before anything is computed or written"
    if case.endswith("sections"):  # a slide from elsewhere (--predict, --external) needs no held-out sections
        checkpoint.check_for_evaluation(ckpt, tmp_path / "edited.pt", held_out=False)


def test_the_three_commands_turn_bad_input_into_one_error_line(tmp_path):
    """Each bad input, run as a user runs it: `error: ...` on stderr, a non-zero exit, no traceback."""
    import subprocess
    import sys
    file = tmp_path / "a_file"
    file.write_text("not a folder")
    ckpt = tmp_path / "short_genes.pt"  # everything evaluate.py reads first, and a gene list one short of the model's
    torch.save({"model": {}, "frozen_trunk": None, "config": {"n_genes": 2}, "genes": ["G1"],
                "data": {"crop_size": 32, "sections": {"test": ["A1"]}}, "selection": "validation"}, ckpt)
    run_flags = ["--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache")]
    cases = {  # command: what the error line names
        ("train.py", "--data", "demo", "--device", "gpu0", *run_flags): "--device 'gpu0' is not a device; expected auto",
        ("train.py", "--data", "demo", "--root", str(file), "--device", "cpu", *run_flags): f"{file}: a file, not a folder",
        ("evaluate.py", "--ckpt", str(ckpt), "--device", "cpu"): f"{ckpt}: cannot be evaluated: its gene list has 1 genes",
        ("data.py", "download", "her2st", "--root", str(file)): f"{file}: a file, not a folder",
        ("data.py", "download", "her2st", "--root", str(tmp_path / "dl"), "--base-url", "foo"): "--base-url 'foo'",
    }
    started = {argv: subprocess.Popen([sys.executable, *argv], cwd=Path(__file__).resolve().parents[1], text=True,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for argv in cases}
    for argv, process in started.items():  # all at once: most of each one's time is importing torch
        stderr = process.communicate(timeout=120)[1]
        assert process.returncode != 0 and "Traceback" not in stderr, (argv, stderr[-2000:])
        assert f"error: {cases[argv]}" in stderr.splitlines()[-1], (argv, stderr[-2000:])


# ----------------------------------------------------------------------------- integrity: damaged files, full disks, kills

def _damage_a_tensor(path):
    """Write 64 random bytes into the middle of the largest tensor record of a torch zip file."""
    import zipfile
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with open(path, "r+b") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = np.frombuffer(f.read(4), "<u2")
        f.seek(info.header_offset + 30 + int(name_len) + int(extra_len) + info.file_size // 2)
        f.write(np.random.default_rng(0).bytes(64))


def test_a_damaged_checkpoint_is_refused_naming_the_tensor(run, cache_dir, tmp_path, capsys):
    """64 random bytes in a tensor: torch.load reads it without complaint; load_checkpoint refuses it, and
    nothing is evaluated (no table of NaN, no cache entry evicted as stale)."""
    bad = tmp_path / "best.pt"
    bad.write_bytes((run / "best.pt").read_bytes())
    _damage_a_tensor(bad)
    load(bad)  # what weights_only=True alone accepts
    entries = sorted(p.name for p in cache_dir.iterdir())
    assert evaluate.main(eval_argv([bad], cache_dir, tmp_path / "eval")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and str(bad) in err and "damaged" in err and "Traceback" not in err
    assert re.search(r"\((model|frozen_trunk)/\S+", err), f"the tensor is named: {err}"
    assert sorted(p.name for p in cache_dir.iterdir()) == entries and not (tmp_path / "eval" / "folds.csv").exists()


def test_non_finite_weights_are_refused(run, tmp_path, capsys):
    ckpt = load(run / "best.pt")
    name = next(iter(ckpt["model"]))
    ckpt["model"][name][..., 0] = float("nan")
    checkpoint.save_atomic(ckpt, tmp_path / "nan.pt")  # a checksum that matches: only the values are wrong
    assert evaluate.main(["--ckpt", str(tmp_path / "nan.pt"), "--out", str(tmp_path / "eval")]) == 2
    assert f"non-finite weights in model/{name}" in capsys.readouterr().err


def test_a_checkpoint_round_trips_with_its_checksum(run):
    ckpt = checkpoint.load_checkpoint(run / "last.pt")
    assert set(ckpt["checksum"]) == set(checkpoint.tensor_checksums({k: v for k, v in ckpt.items() if k != "checksum"}))
    assert any(k.startswith("optimizer/") for k in ckpt["checksum"]) and ckpt["log"]["epoch"] == ckpt["epoch"]


def _enospc_after(nbytes):
    """A stand-in for torch.save / to_csv on a full disk: some bytes land, then ENOSPC; torch.save's zip
    writer then raises a RuntimeError of its own, with the OSError as its context."""
    import errno

    def write(obj, f, *a, **kw):
        f.write(b"x" * nbytes if "b" in f.mode else "x" * nbytes)
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            if "b" in f.mode:
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1000 vs 900")
            raise
    return write


def test_a_full_disk_under_out_is_one_line_and_keeps_the_previous_last_pt(run, demo_root, cache_dir, tmp_path,
                                                                          monkeypatch):
    """last.pt of epoch 1 meets a full disk: one line naming the folder, no temporary file, the previous
    last.pt (epoch 0) still loads, and once there is space --resume ends where the straight run ends."""
    out, real, full = tmp_path / "out", checkpoint.torch.save, _enospc_after(1000)

    def save(obj, f):
        return (full if obj.get("epoch") == 1 else real)(obj, f)

    with monkeypatch.context() as mp:
        mp.setattr(checkpoint.torch, "save", save)
        with pytest.raises(SystemExit) as e:
            train.main(train_argv(demo_root, cache_dir, out))
    message = str(e.value.code)
    assert message.startswith(f"error: no space left on {out} (writing ") and "\n" not in message
    assert checkpoint.load_checkpoint(out / "last.pt")["epoch"] == 0
    assert not [f for f in os.listdir(out) if ".tmp" in f], "the temporary file is removed"
    train.main(train_argv(demo_root, cache_dir, out, "--resume", str(out / "last.pt")))
    assert_resumed_like(run, out, ("model", "optimizer", "epoch", "best"))


def test_a_full_disk_writing_a_csv_keeps_the_previous_table(tmp_path, monkeypatch):
    path = tmp_path / "folds.csv"
    checkpoint.write_csv(pd.DataFrame({"a": [1.0]}), path)
    monkeypatch.setattr(pd.DataFrame, "to_csv", lambda self, f, **kw: _enospc_after(10)(self, f))
    with pytest.raises(SystemExit, match=f"no space left on {tmp_path}"):
        checkpoint.write_csv(pd.DataFrame({"a": [2.0]}), path)
    assert [p.name for p in tmp_path.iterdir()] == ["folds.csv"]
    monkeypatch.undo()
    assert pd.read_csv(path)["a"].tolist() == [1.0]


# What the killed run does at epoch 1 (its first step, its last.pt write, its log line), run in a child
# process that SIGKILLs itself there: what a kill at that moment leaves on disk.
KILL = """
import builtins, json, os, signal, sys
import train
from genedml import checkpoint
argv, where = json.loads(sys.argv[1]), sys.argv[2]
die = lambda: os.kill(os.getpid(), signal.SIGKILL)
calls = []
if where == "mid-step":
    real_loss = train.gene_dml_loss
    def loss(*a, **kw):
        calls.append(1)
        if len(calls) == 2:  # epoch 1's first step
            die()
        return real_loss(*a, **kw)
    train.gene_dml_loss = loss
elif where == "mid-checkpoint":
    real_save = checkpoint.torch.save
    def save(obj, f):
        if obj.get("epoch") == 1 and "optimizer" in obj:
            f.write(b"PK half a checkpoint")
            f.flush()
            die()
        return real_save(obj, f)
    checkpoint.torch.save = save
elif where in ("before-log", "mid-log"):
    class Torn:
        def __init__(self, f): self.f = f
        def __enter__(self): return self
        def __exit__(self, *e): self.f.close()
        def write(self, text):
            self.f.write(text[:len(text) // 2])
            self.f.flush()
            die()
    def opener(path, mode="r", *a, **kw):
        if str(path).endswith("log.jsonl") and "a" in mode:
            calls.append(1)
            if len(calls) == 2:  # epoch 1's line, after its last.pt
                if where == "before-log":
                    die()
                return Torn(builtins.open(path, mode, *a, **kw))
        return builtins.open(path, mode, *a, **kw)
    train.open = opener
print("started", flush=True)
train.main(argv)
"""


@pytest.mark.parametrize("where", ["mid-step", "mid-checkpoint", "before-log", "mid-log", "random"])
def test_sigkill_then_resume_ends_like_the_straight_run(run, demo_root, cache_dir, tmp_path, capsys, where):
    """SIGKILL during epoch 1 (a step, the last.pt write, before or during its log line, or a random
    moment after epoch 0): last.pt loads, --resume leaves no temporary file and ends, checkpoint and
    log, where the uninterrupted run ends."""
    import random
    import signal
    import subprocess
    import sys
    import time
    out = tmp_path / "out"
    argv = train_argv(demo_root, cache_dir, out)
    child = subprocess.Popen([sys.executable, "-c", KILL, json.dumps(argv), where], cwd=Path(__file__).resolve().parents[1],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    if where == "random":
        for line in child.stdout:  # once epoch 0's last.pt is in place, at a moment of epoch 1 or of its writes
            if line.startswith("epoch 0:"):
                while not (out / "last.pt").exists() and child.poll() is None:
                    time.sleep(0.01)
                time.sleep(random.Random().uniform(0, 1.5))
                child.send_signal(signal.SIGKILL)
                break
    rc = child.wait(timeout=300)
    assert rc == -signal.SIGKILL or where == "random", f"the child was to die at {where}, exit {rc}"
    last = checkpoint.load_checkpoint(out / "last.pt")  # loads, whatever the moment
    assert last["epoch"] in (0, 1)
    if where == "mid-checkpoint":
        assert [f for f in os.listdir(out) if f.startswith(".last.pt.tmp-")], "the kill left its temporary file"
    train.main(argv + ["--resume", str(out / "last.pt")])
    assert not [f for f in os.listdir(out) if ".tmp" in f], "no temporary file is left"
    if where == "mid-log":
        assert "dropped its last line, torn by the kill" in capsys.readouterr().out
    assert_resumed_like(run, out, ("model", "optimizer", "scheduler", "epoch", "best"))


def test_two_runs_building_one_cache_at_once_both_succeed(demo_root, tmp_path):
    """Two train.py --epochs 0 on one new --cache-dir, at once: both exit 0, and every entry is intact."""
    import subprocess
    import sys
    from genedml import cache as cache_module
    argvs = [train_argv(demo_root, tmp_path / "cache", tmp_path / f"out{i}", epochs=0) for i in range(2)]
    runs = [subprocess.Popen([sys.executable, "train.py", *a], cwd=Path(__file__).resolve().parents[1],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for a in argvs]
    for r in runs:
        assert r.wait(timeout=600) == 0, r.stderr.read()[-2000:]
    entries = list((tmp_path / "cache").iterdir())
    assert entries and not [p for p in entries if p.name.startswith(".")], "no temporary folder is left"
    for entry in entries:
        meta = json.loads((entry / "key.json").read_text())
        for a in meta["arrays"]:
            assert cache_module._crc32(entry / f"{a}.npy") == meta["crc32"][a], f"{entry.name}/{a}.npy"
