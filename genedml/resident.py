"""The training set kept on the device (train.py --data-on-device): batches gathered there by index.

her2st's training crops (1.5 GB), neighbour features (0.5 GB) and token maps (4 GB) fit in a modern
GPU's memory many times over. Kept there, a step's batch is a handful of gathers on the device, the
crop's flip / rotation a permutation of its pixels: no worker process, pinning thread or copy stands
between the steps. `ResidentBatches` yields the batch dicts data.Split.train_loader yields, with the
same values for the same seed (the loader in one process: its items draw their transforms from the
global generator, in batch order, and so do these batches), already on the device. `choose` decides
from --data-on-device and the free device memory. Needs nothing of ours but crops and packing.
"""
import numpy as np
import torch

from genedml.crops import N_DIHEDRAL, dihedral

FREE_SHARE = 0.5  # --data-on-device auto: the training set may take at most this share of the free device memory


def split_bytes(split) -> int:
    """Bytes the training set takes on the device: each spot's crop or token maps, neighbour features,
    neighbour mask and label."""
    d = split.dataset
    local = sum(np.asarray(t).nbytes for t in d.tokens) if d.tokens is not None else \
        sum(np.asarray(c.local).nbytes for c in d.crops)
    feats = sum(np.asarray(f["tiles"]).nbytes for f in d.features)
    n, g2 = len(d), d.features[0]["tiles"].shape[1]
    return int(local + feats + n * g2 + sum(l.nbytes for l in d.labels))


def choose(mode: str, split, device) -> tuple[bool, str]:
    """(keep the training set on the device?, the reason, for the run's first line) for --data-on-device
    auto (on CUDA when it takes at most FREE_SHARE of the free memory), on or off."""
    gb = split_bytes(split) / 2**30
    if mode == "off":
        return False, "loader"
    if mode == "on":
        return True, f"training set on the {torch.device(device).type} ({gb:.1f} GB)"
    if torch.device(device).type != "cuda":
        return False, "loader"
    free = torch.cuda.mem_get_info(device)[0] / 2**30
    if gb > FREE_SHARE * free:
        return False, f"loader (the training set's {gb:.1f} GB is over {FREE_SHARE:.0%} of the GPU's {free:.0f} GB free)"
    return True, f"training set on the GPU ({gb:.1f} GB)"


def _stack(arrays, device) -> torch.Tensor:
    """The arrays (memory-mapped, one per section) as one tensor on the device, copied a section at a
    time (the host never holds them all at once)."""
    arrays = [np.asarray(a) for a in arrays]
    out = torch.empty((sum(len(a) for a in arrays), *arrays[0].shape[1:]),
                      dtype=torch.from_numpy(arrays[0][:0].copy()).dtype, device=device)
    start = 0
    for a in arrays:
        out[start:start + len(a)].copy_(torch.from_numpy(np.array(a)))  # a copy: the cache is read-only
        start += len(a)
    return out


class ResidentBatches:
    """data.Split.train_loader's batches, from the training set held on the device.

    split: a data.Split whose dataset serves frozen neighbour features (as prepare_split's do) and
    crops or token maps; batch_sampler: the batches of dataset rows (distributed.ShardedBatchSampler);
    buckets: pad each layout to a few sizes, as the loader's Collate does for a compiled step.
    """

    def __init__(self, split, batch_sampler, device, buckets: bool = False):
        d = split.dataset
        assert d.features is not None, "the training set on the device needs frozen neighbour features"
        self.sampler, self.grids, self.buckets, self.augment = batch_sampler, split.context.grids, buckets, d.augment
        self.device = torch.device(device)
        self.rows = d.rows  # (N, 2) section, row: on the host, for the layout
        self.section, self.index = (torch.from_numpy(np.ascontiguousarray(d.rows[:, k])).to(self.device) for k in (0, 1))
        self.tokens = _stack(d.tokens, self.device) if d.tokens is not None else None  # (N, 8, h, w, C) float16
        self.crops = _stack([c.local for c in d.crops], self.device) if d.tokens is None else None  # (N, c, c, 3) uint8
        self.feats = _stack([f["tiles"] for f in d.features], self.device)  # (N, 25, F) float32
        self.mask = _stack([np.stack([c.mask(j) for j in range(len(c.local))]) for c in d.crops], self.device)  # (N, 25)
        self.labels = _stack(d.labels, self.device)  # (N, G) float32
        if self.crops is not None:  # transform t as a pixel permutation: out[p] = crop[perm[t, p]]
            c = self.crops.shape[1]
            grid = np.arange(c * c).reshape(c, c)
            self.perm = torch.from_numpy(np.stack([dihedral(grid, t).reshape(-1) for t in range(N_DIHEDRAL)])).to(self.device)

    def __len__(self):
        return len(self.sampler)

    def _to_device(self, x: torch.Tensor) -> torch.Tensor:
        """A host tensor on the device without a sync: pinned, then copied asynchronously (CUDA)."""
        return x.pin_memory().to(self.device, non_blocking=True) if self.device.type == "cuda" else x.to(self.device)

    def __iter__(self):
        # A DataLoader draws its workers' base seed from the global generator when an epoch starts;
        # drawing it too keeps the transforms below those of the loader's items.
        torch.empty((), dtype=torch.int64).random_()
        for rows in self.sampler:
            rows = np.asarray(rows, np.int64)
            # one draw per item in batch order, as SpotDataset.__getitem__ draws torch.randint(8, ())
            t = torch.randint(N_DIHEDRAL, (len(rows),)) if self.augment else torch.zeros(len(rows), dtype=torch.int64)
            yield self.batch(rows, t)

    def batch(self, rows: np.ndarray, t: torch.Tensor) -> dict:
        """The batch of these dataset rows with transforms t (B,), as the loader's Collate stacks it."""
        s, j = self.rows[rows, 0], self.rows[rows, 1]
        layout = self.grids.layout(s, j, self.buckets)
        layout = layout.pin_memory().to(self.device, non_blocking=True) if self.device.type == "cuda" else layout
        i, t = self._to_device(torch.from_numpy(rows)), self._to_device(t)
        if self.tokens is not None:  # the token maps of the transformed crop, (B, h*w, C) float16
            local = self.tokens[i, t].flatten(1, 2)
        else:  # gather and transform in one index: (B, c*c, 3) -> (B, 3, c, c) uint8, channels-last in memory
            B, c = len(rows), self.crops.shape[1]
            local = self.crops.view(len(self.crops), c * c, 3)[i[:, None], self.perm[t]].view(B, c, c, 3).permute(0, 3, 1, 2)
        return {"local": local, "neighbour_feats": self.feats[i], "neighbour_mask": self.mask[i], "label": self.labels[i],
                "section": self.section[i], "index": self.index[i], "layout": layout}
