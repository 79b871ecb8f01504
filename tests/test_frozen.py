"""The frozen local encoder (train.py --local-encoder frozen): its token cache, the token-grid
augmentation, and train / evaluate / resume / predict end to end at tiny size (test_train.py's cohort)."""
import json
import warnings

import numpy as np
import pandas as pd
import pytest
import torch

from genedml import cohorts
import data
from genedml import checkpoint
from genedml import encoders
import evaluate
from genedml import features
import train
from genedml.cache import ArrayCache
from model import GeneDML, GeneDMLConfig, LocalEncoder
from genedml.trunk import build_trunk, preprocess
from genedml.crops import dihedral, section_crops
from test_train import (assert_resumed_like, assert_same_tensors, cache_dir, demo_root, eval_argv, load, read_log,  # noqa: F401
                        train_argv)

FROZEN = ("--local-encoder", "frozen")


@pytest.fixture(scope="module")
def frozen_run(demo_root, cache_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("frozen")
    assert train.main(train_argv(demo_root, cache_dir, out, *FROZEN)) == out / "best.pt"
    return out


def test_tokens_are_the_maps_of_each_transformed_crop_and_are_cached_by_trunk(demo_root, tmp_path):
    section = cohorts.load_section("demo", demo_root, "A1")
    crops = section_crops(section, ArrayCache(tmp_path), 64, progress=False)
    trunk = build_trunk("none").eval()
    cache, wid = ArrayCache(tmp_path), encoders.trunk_id(trunk)
    tokens = features.section_tokens(trunk, wid, crops, cache, "demo-A1-tokens", progress=False)["tokens"]
    assert tokens.shape == (len(section.spot_ids), 8, 2, 2, 512) and tokens.dtype == np.float16  # 64 px -> 2x2
    for t in range(8):  # tokens[:, t] is the trunk's map of the crop under transform t, not a turned grid
        crop = np.ascontiguousarray(dihedral(np.array(crops.local[:3]), t, axes=(1, 2)))
        with torch.no_grad():
            fmap = trunk(preprocess(torch.from_numpy(crop).permute(0, 3, 1, 2))).permute(0, 2, 3, 1).numpy()
        assert np.allclose(tokens[:3, t], fmap, rtol=1e-2, atol=1e-2), t
    # the untransformed map's mean over the grid is the pooled frozen feature the other levels read
    pooled = features.extract_features(trunk, crops, progress=False)["local"]
    assert np.allclose(np.asarray(tokens[:, 0], np.float32).mean((1, 2)), pooled, rtol=1e-2, atol=1e-2)
    # a second call is a cache hit; another trunk is another key, and the stale entry goes
    again = features.section_tokens(None, wid, crops, cache, "demo-A1-tokens", progress=False)["tokens"]
    assert np.array_equal(again, tokens)
    other = build_trunk("none").eval()
    features.section_tokens(other, encoders.trunk_id(other), crops, cache, "demo-A1-tokens", progress=False)
    assert len([p for p in tmp_path.iterdir() if p.name.startswith("demo-A1-tokens-")]) == 1



def test_inference_tokens_are_the_untransformed_maps_alone(demo_root, tmp_path):
    section = cohorts.load_section("demo", demo_root, "A1")
    crops = section_crops(section, ArrayCache(tmp_path / "crops"), 64, progress=False)
    trunk = build_trunk("none").eval()
    wid = encoders.trunk_id(trunk)
    # no 8-transform entry: only the crop as it is goes through the trunk, in an entry of its own
    one = features.section_tokens(trunk, wid, crops, ArrayCache(tmp_path / "a"), "demo-A1-tokens", transforms=1,
                                  progress=False)["tokens"]
    assert one.shape == (len(section.spot_ids), 1, 2, 2, 512)
    assert [p.name.rsplit("-", 1)[0] for p in (tmp_path / "a").iterdir()] == ["demo-A1-tokens-identity"]
    # an 8-transform entry (a slide trained on) serves them without running the trunk (None here)
    cache = ArrayCache(tmp_path / "b")
    eight = features.section_tokens(trunk, wid, crops, cache, "demo-A1-tokens", progress=False)["tokens"]
    served = features.section_tokens(None, wid, crops, cache, "demo-A1-tokens", transforms=1, progress=False)["tokens"]
    assert served.shape == one.shape and np.array_equal(served, eight[:, :1]) and np.array_equal(served, one)
    assert len(list((tmp_path / "b").iterdir())) == 1  # nothing extracted, nothing added

def test_token_statistics_match_numpy():
    rng = np.random.default_rng(0)
    parts = [rng.gamma(1.0, 1.0, (n, 8, 2, 2, 512)).astype(np.float16) for n in (3, 5)]
    mean, std = features.token_statistics(parts, chunk=2)
    flat = np.concatenate([p[:, 0].reshape(-1, 512) for p in parts]).astype(np.float64)  # the untransformed crops
    assert np.allclose(mean, flat.mean(0), atol=1e-5) and np.allclose(std, flat.std(0), atol=1e-4)


def test_an_augmented_item_serves_the_tokens_of_its_transform(demo_root, tmp_path):
    section = cohorts.load_section("demo", demo_root, "A1")
    crops = section_crops(section, ArrayCache(tmp_path), 32, progress=False)
    n = len(section.spot_ids)
    grid = np.random.default_rng(0).random((n, 8, 3, 3, 512)).astype(np.float16)  # distinct per transform
    feats = [{"tiles": np.zeros((n, 25, 512), np.float32)}]
    grid.flags.writeable = False  # as the memory-mapped cache serves it: items are copies, and torch says nothing
    plain = data.SpotDataset([section], [crops], ["TUM01"], feats, tokens=[grid])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert plain[0]["local"].shape == (9, 512) and plain[0]["local"].dtype == torch.float16
    assert np.array_equal(plain[0]["local"].numpy(), grid[0, 0].reshape(9, 512))
    augmented = data.SpotDataset([section], [crops], ["TUM01"], feats, tokens=[grid], augment=True)
    seen = set()
    for seed in range(40):
        torch.manual_seed(seed)
        t = int(torch.randint(8, ()))  # what __getitem__ draws
        torch.manual_seed(seed)
        assert np.array_equal(augmented[0]["local"].numpy(), grid[0, t].reshape(9, 512)), t
        seen.add(t)
    assert len(seen) == 8, "all eight flips / rotations should occur"


def test_the_frozen_model_sees_the_augmentation(demo_root, tmp_path):
    """The fusion gives local tokens no position, so turning the token grid of the plain crop (as the
    frozen mode once did) left the output unchanged. Served tokens are the trunk's tokens of the
    transformed crop: the output changes, and equals the output on those tokens computed afresh."""
    section = cohorts.load_section("demo", demo_root, "A1")
    crops = section_crops(section, ArrayCache(tmp_path), 64, progress=False)
    trunk = build_trunk("none").eval()
    tokens = features.extract_tokens(trunk, crops, progress=False)["tokens"]
    feats = [{"tiles": np.zeros((len(section.spot_ids), 25, 512), np.float32)}]
    ds = data.SpotDataset([section], [crops], ["TUM01"], feats, tokens=[tokens], augment=True)
    torch.manual_seed(0)
    model = GeneDML(GeneDMLConfig(n_genes=1, dim=32, levels=("local",), local_encoder="frozen", head_hidden=48)).eval()
    model.set_statistics(np.zeros((2, 1)), torch.zeros(2, 512), tokens=features.token_statistics([tokens]))
    run = lambda local: model(local[None], None, None, None, None, None).prediction[0, 0]
    outputs = {}
    with torch.no_grad():
        for seed in range(40):
            torch.manual_seed(seed)
            t = int(torch.randint(8, ()))
            torch.manual_seed(seed)
            outputs[t] = run(ds[0]["local"])
            crop = np.ascontiguousarray(dihedral(np.array(crops.local[0]), t))
            fresh = trunk(preprocess(torch.from_numpy(crop).permute(2, 0, 1)[None]))[0].flatten(1).T  # (4, 512)
            assert torch.allclose(outputs[t], run(fresh), rtol=1e-3, atol=1e-3), t
    assert len(outputs) == 8
    spread = max(abs(float(v - outputs[0])) for v in outputs.values())
    assert spread > 1e-3 * (abs(float(outputs[0])) + 1e-3), "the augmentation does not reach the output"


def test_frozen_local_encoder_reads_tokens_only():
    enc = LocalEncoder("frozen")
    assert not list(enc.parameters()), "nothing of a frozen local encoder trains"
    with pytest.raises(AssertionError, match="expected tokens"):
        enc(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(AssertionError, match="local encoder must be one of"):
        LocalEncoder("half-frozen")


def test_frozen_run_trains_evaluates_and_records_its_mode(frozen_run, cache_dir):
    ckpt = load(frozen_run / "best.pt")
    assert ckpt["config"]["local_encoder"] == "frozen" and ckpt["args"]["local_encoder"] == "frozen"
    assert not any(k.startswith("local_encoder.trunk") for k in ckpt["model"]), "no local trunk in frozen mode"
    assert ckpt["model"]["local_encoder.token_std"].min() > 0
    assert [line["epoch"] for line in read_log(frozen_run / "log.jsonl")] == [0, 1]
    out = frozen_run / "eval"
    assert evaluate.main(eval_argv([frozen_run / "best.pt"], cache_dir, out)) == 0
    folds = pd.read_csv(out / "folds.csv")
    assert folds.loc[0, "test"] == "A1" and np.isfinite(folds.loc[0, "pcc_m"])
    # evaluate.rebuild makes the same model from the checkpoint alone
    model, _ = evaluate.rebuild(checkpoint.load_checkpoint(frozen_run / "best.pt"), "cpu")
    assert model.local_encoder.mode == "frozen"
    fresh = GeneDML(GeneDMLConfig.for_cohort("demo", len(ckpt["genes"]), dim=32, local_encoder="frozen"))
    fresh.load_state_dict(ckpt["model"])


def test_frozen_run_predicts_a_slide_without_counts(frozen_run, demo_root, cache_dir, tmp_path):
    (image,) = (demo_root / "ST-imgs" / "D" / "D1").glob("*.jpg")
    spots = demo_root / "ST-spotfiles" / "D1_selection.tsv"
    assert evaluate.main(eval_argv([frozen_run / "best.pt"], cache_dir, tmp_path, "--predict", str(image), str(spots))) == 0
    pred = pd.read_csv(tmp_path / "predictions.csv")
    genes = load(frozen_run / "best.pt")["genes"]
    assert len(pred) == (pd.read_csv(spots, sep="\t")["selected"] == 1).sum()
    assert np.isfinite(pred[genes].to_numpy()).all()


def test_frozen_resume_continues_exactly(frozen_run, demo_root, cache_dir, tmp_path, capsys):
    train.main(train_argv(demo_root, cache_dir, tmp_path, *FROZEN, epochs=1))
    train.main(train_argv(demo_root, cache_dir, tmp_path, *FROZEN, "--resume", str(tmp_path / "last.pt")))
    assert "=> loaded checkpoint" in capsys.readouterr().out
    assert_resumed_like(frozen_run, tmp_path, ("model", "frozen_trunk", "optimizer", "scheduler", "genes", "epoch", "best", "config"))


def test_resume_refuses_the_other_mode(frozen_run, demo_root, cache_dir, tmp_path):
    with pytest.raises(SystemExit, match="local encoder"):
        train.main(train_argv(demo_root, cache_dir, tmp_path, "--local-encoder", "trainable",
                              "--resume", str(frozen_run / "last.pt")))


def test_no_augment_switch_is_recorded(demo_root, cache_dir, tmp_path):
    train.main(train_argv(demo_root, cache_dir, tmp_path, *FROZEN, "--no-augment", epochs=1))
    assert load(tmp_path / "last.pt")["args"]["no_augment"] is True
    assert json.loads((tmp_path / "log.jsonl").read_text().splitlines()[0])["epoch"] == 0


# ----------------------------------------------------------------------------- the faster step computes the same

def test_channels_last_local_trunk_equals_the_plain_trunk():
    torch.manual_seed(0)
    enc = LocalEncoder("trainable").eval()
    plain = build_trunk("none").eval()
    plain.load_state_dict(enc.trunk.state_dict())
    crops = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        want = plain(preprocess(crops)).flatten(2).transpose(1, 2)
        assert torch.allclose(enc(crops), want, atol=1e-4, rtol=1e-4)
