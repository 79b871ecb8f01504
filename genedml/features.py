"""Frozen features: what the neighbour and global levels see, extracted once per slide and encoder.

The neighbour level reads the frozen encoder's feature (encoders.py: ResNet18 by default, or a
pathology foundation model) of each of the 5x5 tiles around a spot, and the global level the frozen
feature of every spot of the slide (model.py). With the local encoder frozen (train.py --local-encoder
frozen, --frozen-tokens cached), the local level reads the frozen encoder's whole token map of the
spot's crop under each of the crop's 8 flips / rotations (ResNet18: 8 x 7x7x512 at 224 px; UNI:
8 x 14x14x1024; float16), so that the augmentation reaches the model; a split that is not augmented
(validation, test, evaluate.py, --predict) reads only the crop as it is, so only that map is
extracted for it (or read from an 8-transform entry already there). None of these change during
training, so they are computed once, cached on disk next to the crops (cache.py) and keyed by the
crops and the encoder (name, weights hash, input size, precision). data.prepare_split turns a list of
sections into what the model reads (crops -> these features -> a data.SpotDataset plus the global
level's context). With --frozen-tokens online only the tokens' statistics are prepared here
(`online_token_statistics`): the encoder itself runs on every step's crops.
"""
import numpy as np
import torch
from tqdm import tqdm

from genedml.crops import N_DIHEDRAL, dihedral
from genedml.encoders import FrozenEncoder, as_encoder, tag


@torch.no_grad()
def extract_features(trunk, crops, batch_size=64, device="cpu", progress=True) -> dict[str, np.ndarray]:
    """Run the frozen encoder's tile feature (ResNet18: its global-average-pooled map; a ViT: its CLS
    token) once over every crop and on-image tile of a section.

    trunk: an encoders.FrozenEncoder, or a bare ResNet18 trunk. crops has .local (N,c,c,3) uint8 and
    .tiles(i) -> (tiles (g²,c,c,3) uint8, mask (g²,) bool).
    Returns {"local": (N, F), "tiles": (N, g², F)} float32 (F = the encoder's feature width), zeros
    where a tile is off the image. On a GPU it runs in the encoder's precision (stored as float32).
    """
    device = torch.device(device)
    encoder = as_encoder(trunk).to(device).eval()  # eval: BatchNorm uses (and keeps) its running statistics
    n = len(crops.local)
    assert n > 0, "a section without spots has no features"
    g2 = len(crops.tiles(0)[1])  # tiles per window (25)
    F = encoder.feature_dim
    out = {"local": np.zeros((n, F), np.float32), "tiles": np.zeros((n, g2, F), np.float32)}
    todo, where = [], []  # images waiting for the trunk, and (spot, tile) each one belongs to; tile -1 = local

    def run(k):
        x = torch.from_numpy(np.stack(todo[:k])).to(device).permute(0, 3, 1, 2)  # (k, 3, c, c) uint8
        f = encoder.features(x).cpu().numpy()  # (k, F)
        for (i, j), fi in zip(where[:k], f):
            if j < 0:
                out["local"][i] = fi
            else:
                out["tiles"][i, j] = fi
        del todo[:k], where[:k]

    for i in tqdm(range(n), desc="frozen features", unit="spot", disable=not progress):
        tiles, mask = crops.tiles(i)
        assert len(tiles) == len(mask) == g2, f"spot {i}: {len(tiles)} tiles, {len(mask)} mask entries, not {g2}"
        todo.append(crops.local[i]); where.append((i, -1))
        for j in np.flatnonzero(mask):
            todo.append(tiles[j]); where.append((i, int(j)))
        while len(todo) >= batch_size:
            run(batch_size)
    if todo:
        run(len(todo))
    return out


def section_features(trunk, weights_id, crops, cache, name: str, **kw) -> dict[str, np.ndarray]:
    """extract_features, built once and then read from the cache (keyed by the crops and the encoder:
    weights_id is FrozenEncoder.cache_key, or a ResNet18 trunk's weights hash)."""
    return cache.get(name, {"crops": crops.key, "weights": weights_id},
                     lambda: extract_features(trunk, crops, **kw))


@torch.no_grad()
def extract_tokens(trunk, crops, batch_size=64, device="cpu", progress=True, transforms=N_DIHEDRAL) -> dict[str, np.ndarray]:
    """The frozen encoder's token map of every local crop under each of the 8 flips / 90-degree
    rotations the training augmentation draws (transforms=1: the crop as it is, all inference reads):
    the frozen local level's input. trunk: an encoders.FrozenEncoder or a bare ResNet18 trunk
    (ResNet18: its last feature map; a ViT: its patch tokens).

    Returns {"tokens": (N, transforms, h, w, C) float16} (ResNet18: 7 x 7 x 512 at 224 px); tokens[i, t] is the encoder's
    map of dihedral(crop_i, t), exactly what the Gene-DML reference's frozen encoder computes
    on the augmented crop (a convolution is not rotation-equivariant, so rotating the token grid of
    the plain crop would not be), and t = 0 is the crop as it is. The fusion gives the local tokens
    no position, so their order is irrelevant and only the trunk's response to the transformed crop
    carries the augmentation. float16 halves the disk: ReLU features lose nothing a projection can use.
    """
    device = torch.device(device)
    encoder = as_encoder(trunk).to(device).eval()  # in its precision on a GPU
    n = len(crops.local)
    assert n > 0, "a section without spots has no tokens"
    out = None
    for a in tqdm(range(0, n, batch_size), desc=f"frozen tokens ({transforms} transform{'s' * (transforms > 1)})",
                  unit="batch", disable=not progress):
        crop = np.asarray(crops.local[a:a + batch_size])  # (b, c, c, 3)
        for t in range(transforms):
            x = torch.from_numpy(np.array(dihedral(crop, t, axes=(1, 2))))  # a copy: the cache is read-only
            fmap = encoder.tokens(x.to(device).permute(0, 3, 1, 2))  # (b, h, w, C)
            if out is None:
                out = np.zeros((n, transforms, *fmap.shape[1:]), np.float16)
            out[a:a + len(fmap), t] = fmap.half().cpu().numpy()
    return {"tokens": out}


class _Absent(Exception):
    """Raised by a build that must not run: it turns cache.get into a look-up."""


def _absent():
    raise _Absent


def section_tokens(trunk, weights_id, crops, cache, name: str, transforms=N_DIHEDRAL, **kw) -> dict[str, np.ndarray]:
    """extract_tokens, built once and then read from the cache (keyed by the crops and the encoder:
    weights_id is FrozenEncoder.cache_key, or a ResNet18 trunk's weights hash). transforms=1 (inference):
    the untransformed maps of an 8-transform entry when there is one (a slide trained on), else only
    those maps extracted, in an entry of their own (<name>-identity), so that neither evicts the other."""
    key = {"crops": crops.key, "weights": weights_id, "dtype": "float16", "transforms": N_DIHEDRAL}
    if transforms == N_DIHEDRAL:
        return cache.get(name, key, lambda: extract_tokens(trunk, crops, **kw))
    assert transforms == 1, f"tokens are extracted under all {N_DIHEDRAL} transforms or the identity alone, not {transforms}"
    try:
        return {"tokens": cache.get(name, key, _absent)["tokens"][:, :1]}  # a view of the memory-mapped entry
    except _Absent:
        return cache.get(f"{name}-identity", {**key, "transforms": 1},
                         lambda: extract_tokens(trunk, crops, transforms=1, **kw))


@torch.no_grad()
def token_moments(encoder: FrozenEncoder, crops, batch_size=64, device="cpu", progress=True) -> dict[str, np.ndarray]:
    """Per-channel sums of the encoder's tokens and of their squares over one section's crops (float64),
    streamed a batch at a time: what online_token_statistics adds up, without keeping any token."""
    encoder = encoder.to(device).eval()
    total, square, count = 0.0, 0.0, 0
    for a in tqdm(range(0, len(crops.local), batch_size), desc="token statistics", unit="batch", disable=not progress):
        x = torch.from_numpy(np.array(crops.local[a:a + batch_size])).to(device).permute(0, 3, 1, 2)
        t = encoder.tokens(x).double().flatten(0, 2)  # (b*h*w, C)
        total, square, count = total + t.sum(0).cpu().numpy(), square + (t * t).sum(0).cpu().numpy(), count + len(t)
    return {"sum": np.asarray(total), "square": np.asarray(square), "count": np.array(count)}


def online_token_statistics(encoder: FrozenEncoder, split, cache, device, progress=True) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std (C,) of the frozen encoder's tokens over every (unaugmented) training
    crop, for the online frozen local level: one pass of the encoder over the crops, section by
    section, cached like the features, so no token array is ever held."""
    encoder = as_encoder(encoder)
    key = encoder.cache_key(device)
    parts = [cache.get(f"{s.cohort}-{s.name}{tag(encoder.spec)}-token-moments", {"crops": c.key, "weights": key},
                       lambda c=c: token_moments(encoder, c, device=device, progress=progress))
             for s, c in zip(split.sections, split.dataset.crops)]
    count = sum(float(p["count"]) for p in parts)
    mean = sum(np.asarray(p["sum"]) for p in parts) / count
    var = sum(np.asarray(p["square"]) for p in parts) / count - mean ** 2
    return mean.astype(np.float32), np.sqrt(np.maximum(var, 0)).astype(np.float32)


def token_statistics(tokens: list, chunk: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std (C,) over every token of every spot's untransformed crop (transform 0:
    what online_token_statistics computes, so both frozen paths standardise alike), a chunk of spots at
    a time (float64 sums; the arrays are memory-mapped and need not fit in memory)."""
    total, square, count = 0.0, 0.0, 0
    for t in tokens:  # (N, 8, h, w, C) float16, memory-mapped
        for a in range(0, len(t), chunk):
            x = np.asarray(t[a:a + chunk, 0], np.float64).reshape(-1, t.shape[-1])
            total, square, count = total + x.sum(0), square + (x * x).sum(0), count + len(x)
    mean = total / count
    return mean.astype(np.float32), np.sqrt(np.maximum(square / count - mean ** 2, 0)).astype(np.float32)
