"""How batches reach the device: the training set held there (genedml/resident.py) serves the loader's
batches, and the loader's workers fit the shared memory they pass batches through (genedml/runtime.py)."""
import logging

import numpy as np
import pytest
import torch

import data
from experiments import fold_benchmark
from genedml import distributed, resident, runtime


@pytest.fixture(scope="module")
def fold():
    """Three her2st-shaped sections, 40 spots, 32 px crops, frozen features and token maps; augmented."""
    return fold_benchmark.synthetic_fold(3, 40, 32, tokens=True, device="cpu", genes=6)


def assert_same_batches(want, got):
    assert len(want) == len(got) > 1
    for a, b in zip(want, got):
        assert a.keys() == b.keys()
        for key in a:
            if key == "layout":
                for field, value in vars(a[key]).items():
                    other = getattr(b[key], field)
                    assert (torch.equal(value, other) if torch.is_tensor(value) else value == other), f"layout.{field}"
            else:
                assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("served", ["crops", "tokens"])
@pytest.mark.parametrize("buckets", [False, True], ids=["layout", "bucketed layout"])
def test_resident_batches_equal_the_loaders_for_the_same_seed(fold, served, buckets):
    """Every batch of an epoch (crops flipped / rotated, or the token maps of the transform), with the
    loader in one process: the same values, dtypes and layouts; and a second epoch too."""
    split = fold if served == "tokens" else fold_benchmark.without_tokens(fold)
    sampler = distributed.ShardedBatchSampler(len(split.dataset), 8, drop_last=True, seed=3)
    loader = split.train_loader(sampler, "cpu", workers=0, buckets=buckets)
    batches = resident.ResidentBatches(split, sampler, "cpu", buckets=buckets)
    assert len(batches) == len(loader) == len(split.dataset) // 8 >= 4
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        torch.manual_seed(epoch)
        want = list(loader)
        torch.manual_seed(epoch)
        got = list(batches)
        assert_same_batches(want, got)
    # the augmentation is on: some crop was transformed, so equality is not the identity's
    assert any(not torch.equal(b["local"][k], _plain(split, b, k)) for b in got for k in range(len(b["label"])))


def _plain(split, batch, k):
    """Item k of a batch as the unaugmented dataset serves it."""
    s, j = int(batch["section"][k]), int(batch["index"][k])
    if split.tokens is not None:
        t = split.tokens[s][j, 0]
        return torch.from_numpy(np.array(t).reshape(-1, t.shape[-1]))
    return torch.from_numpy(np.ascontiguousarray(split.dataset.crops[s].local[j].transpose(2, 0, 1)))


def test_the_choice_of_data_on_device(fold):
    assert resident.choose("off", fold, "cpu") == (False, "loader")
    assert resident.choose("auto", fold, "cpu")[0] is False  # the CPU keeps the loader
    on, why = resident.choose("on", fold, "cpu")
    assert on and "training set on the cpu" in why
    n = len(fold.dataset)
    assert resident.split_bytes(fold) == n * (8 * 1 * 1 * 512 * 2 + 25 * 512 * 4 + 25 + 6 * 4)  # tokens, features, mask, labels


def test_loader_workers_fit_the_shared_memory():
    MB = 2**20
    assert runtime.fit_to_shm(8, 4, 52 * MB, 64 * 2**30) == (8, 4, None)     # plenty of room
    assert runtime.fit_to_shm(8, 4, 52 * MB, None) == (8, 4, None)           # no /dev/shm to check
    assert runtime.fit_to_shm(8, 4, 52 * MB, 2 * 1024 * MB)[:2] == (8, 2)    # fewer prefetched batches first
    assert runtime.fit_to_shm(8, 4, 52 * MB, 400 * MB)[:2] == (1, 2)         # then fewer workers
    workers, _, message = runtime.fit_to_shm(8, 4, 52 * MB, 64 * MB)         # a container's default: none fits
    assert workers == 0 and "/dev/shm has 64 MB free" in message and "main process" in message
    for free in (64, 400, 2048, 65536):  # what is kept always fits in half the free memory
        w, p, _ = runtime.fit_to_shm(8, 4, 52 * MB, free * MB)
        assert w * p * 52 <= free / 2


def test_the_training_loader_sizes_itself_to_dev_shm(fold, monkeypatch, caplog):
    sampler = distributed.ShardedBatchSampler(len(fold.dataset), 8, drop_last=True, seed=0)
    item = sum(v.nbytes for v in fold.dataset[0].values() if torch.is_tensor(v))
    monkeypatch.setattr(runtime, "shm_free_bytes", lambda path=runtime.SHM: 2 * 8 * item * 3)  # 3 batches in half
    with caplog.at_level(logging.WARNING):
        loader = fold.train_loader(sampler, "cpu", workers=2)
    assert (loader.num_workers, loader.prefetch_factor) == (1, 2) and "/dev/shm" in caplog.text
    monkeypatch.setattr(runtime, "shm_free_bytes", lambda path=runtime.SHM: 2**40)
    loader = fold.train_loader(sampler, "cpu", workers=2)
    assert (loader.num_workers, loader.prefetch_factor, loader.persistent_workers) == (2, 4, True)
    assert data.default_workers("cpu") == 0
