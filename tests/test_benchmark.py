"""benchmark.py runs end to end at --quick sizes and its figures are sane (no timing is asserted)."""
import json

import pytest
import torch

from experiments import benchmark


def test_quick_benchmark_runs_and_reports(tmp_path):
    figures = benchmark.main(["--quick", "--only", "step,eval", "--json", str(tmp_path / "bench.json")])
    ev = figures["eval"]
    assert sorted(figures["step"]["shapes"]) == [1, 3]  # a one-slide fold and a several-slide fold
    for S, step in figures["step"]["shapes"].items():
        assert all(step["spots_per_s"][k] > 0 for k in ("trainable", "frozen", "online", "resnet18", "resnet18_channels_last"))
        assert step["trainable_over_resnet18"] > 0 and step["frozen_over_trainable"] > 0
        assert 0 <= step["kmeans_share"] < 1 and all(0 <= v < 1.5 for v in step["shares"].values())
        assert step["feature_images_per_s"] > 0 and step["token_spots_per_s"] > 0
        assert all(v > 0 for v in step["loader_items_per_s"].values())
        assert 1 <= step["sections_in_batch"] <= S
    assert ev["max_abs_diff"] < 1e-9          # the vectorised metrics equal the per-gene loop
    assert json.loads((tmp_path / "bench.json").read_text())["eval"]["max_abs_diff"] == ev["max_abs_diff"]


def test_gpu_check_runs_on_the_cpu_at_a_small_size():
    args = benchmark.get_args(["--gpu-check", "--device", "cpu"])
    assert args.only == ["step", "fold"] and args.step_sections == [3] and args.fold_spots < 1000  # small on a CPU
    assert args.fold_modes == ["trainable", "frozen", "online"] and args.fold_feeds == ["loader", "device"]
    assert args.fold_compile == ["off"]  # inductor's compile takes minutes on a small CPU: the GPU check alone compiles
    assert benchmark.GPU_CHECK["fold_compile"] == "off,on"
    figures = benchmark.main(["--gpu-check", "--device", "cpu", "--only", "fold"])  # the step: test above
    fold = figures["fold"]
    runs = {(r["mode"], r["feed"]): r for r in fold["runs"]}
    assert set(runs) == {(m, f) for m in ("trainable", "frozen", "online") for f in ("loader", "device")}
    for r in runs.values():
        assert r["epoch_steps"] == fold["spots"] // fold["batch"] and r["steps"] == r["epoch_steps"] - r["untimed_steps"] > 0
        assert r["spots"] == r["steps"] * fold["batch"] and r["epoch_s"] >= r["seconds"] > 0
        assert 0 <= r["data_wait_share"] <= 1 and r["peak_gb"] is None and r["sync_free_step"] is None  # no GPU here


def test_the_fold_benchmark_times_the_epoch_it_warmed_up(monkeypatch):
    """The timed steps continue the warm-up's iterator: a second one would start on an empty pipeline
    (its workers' prefetched batches dropped), inflating the data-wait share."""
    from experiments import fold_benchmark
    split = fold_benchmark.without_tokens(fold_benchmark.synthetic_fold(2, 24, 32, tokens=True, device="cpu", genes=6))
    iterators, real = [], torch.utils.data.DataLoader.__iter__
    monkeypatch.setattr(torch.utils.data.DataLoader, "__iter__", lambda self: (iterators.append(1), real(self))[1])
    r = fold_benchmark.train_epochs(split, "trainable", 8, torch.device("cpu"), False, 0, warmup=1, feeds=("loader",))
    assert len(iterators) == 1 and r["loader"]["untimed_steps"] == 1 and r["loader"]["steps"] == r["loader"]["epoch_steps"] - 1


def test_quick_ddp_benchmark_times_two_processes():
    figures = benchmark.main(["--quick", "--only", "ddp", "--reps", "1", "--ddp-processes", "2", "--crop", "32"])
    assert list(figures["ddp"]["steps_per_s"]) == [2] and figures["ddp"]["steps_per_s"][2] > 0


def test_quick_encoder_benchmark_counts_flops_and_rates():
    pytest.importorskip("timm")
    figures = benchmark.main(["--quick", "--only", "encoders", "--encoders", "resnet18,tiny-vit", "--encoder-px", "64"])
    enc = figures["encoders"]
    assert set(enc) >= {"resnet18", "tiny-vit"} and all(enc[k]["images_per_s"] > 0 for k in ("resnet18", "tiny-vit"))
    # ResNet18 at 64 px: 1.82 GMAC at 224 px scaled by (64/224)^2, two FLOPs a MAC
    assert abs(enc["resnet18"]["gflop_per_image"] - 2 * 1.8145 * (64 / 224) ** 2) < 0.02
    assert enc["tiny-vit"]["params_m"] < 1 and enc["tiny-vit"]["gflop_per_image"] < enc["resnet18"]["gflop_per_image"]
