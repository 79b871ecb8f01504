"""From sections to what Gene-DML trains on: genes, labels, image crops and the spot dataset.

A `Section` (cohorts.py: the published cohorts; visium.py: your own slides) holds spot ids, array and
pixel coordinates and raw counts. Here: the genes predicted (`select_genes`), the labels, the crops
of each spot and of its 5x5 neighbourhood, cached once per section (`section_crops`), and
`SpotDataset`, which serves any cohort and split with fixed keys. `python data.py download | info |
folds` fetches, lists and splits a published cohort.

Labels (README: The method in one page): counts over the selected genes, library size normalised to 1e4 per spot,
log10(1 + x), then each spot replaced by the mean over itself and its array-grid neighbours (3x3;
on a Visium slide's hexagonal grid, the 6 neighbours). Your own Visium / HEST-1k slides: visium.py.
"""

import argparse
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from tqdm import tqdm

from genedml.cohorts import COHORTS, Section, fold_split, load_section, sections_of
from genedml.crops import N_DIHEDRAL, SectionCrops, cohort_crops, dihedral, neighbour_mask
from genedml.encoders import as_encoder, tag
from genedml.features import section_features, section_tokens
from genedml.metrics import pearson_per_gene
from genedml.packing import GlobalContext, SpotGrids
from genedml import runtime

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- genes and labels
def select_genes(sections: list[Section], n: int = 250) -> list[str]:
    """The n genes with the highest total raw count over these sections; ties by name."""
    names = ", ".join(s.name for s in sections[:5]) + (", ..." if len(sections) > 5 else "")
    return top_genes([s.counts.sum(axis=0) for s in sections], n, where=f"{sections[0].cohort} sections {names}")


def top_genes(totals: list[pd.Series], n: int, where: str = "the sections") -> list[str]:
    """The n genes with the highest sum over these per-section totals (gene -> count); ties by name."""
    total = pd.concat(totals, axis=1).fillna(0).sum(axis=1)
    if n > len(total):  # a small gene panel, say: a clear error before any image is read
        raise ValueError(f"asked for the top {n} genes, but {where} hold only {len(total)} genes: "
                         f"ask for at most {len(total)} (--n-genes {len(total)})")
    return total.sort_index().sort_values(ascending=False, kind="stable").index[:n].tolist()


def read_gene_list(path) -> list[str]:
    """A gene list: .txt (one gene per line) or .npy (an array of strings)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: gene list not found")
    if path.suffix == ".npy":
        genes = [str(g) for g in np.load(path, allow_pickle=False).reshape(-1)]
    elif path.suffix == ".txt":
        genes = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    else:
        raise ValueError(f"{path}: gene list must be .txt or .npy")
    if not genes or len(set(genes)) < len(genes):
        raise ValueError(f"{path}: gene list is empty or has duplicates")
    return genes


def gene_counts(section: Section, genes: list[str]) -> np.ndarray:
    """(N, G) float32 raw counts of these genes; a gene absent from the section counts as zero (logged)."""
    absent = [g for g in genes if g not in section.counts.columns]
    if absent:
        log.info("%s/%s: %d of %d genes absent, counted as zero: %s%s", section.cohort, section.name,
                 len(absent), len(genes), ", ".join(absent[:5]), " ..." if len(absent) > 5 else "")
    return section.counts.reindex(columns=genes, fill_value=0).to_numpy(np.float32)


# Array-grid neighbours (dx, dy) averaged by the label smoothing, the spot itself included. Square
# (ST): the 3x3 block. Hexagonal (Visium, array_xy in axial coordinates, see visium.py): the spot and
# its 6 neighbours at 100 µm, the hexagonal grid's first ring.
SMOOTH_OFFSETS = {"square": [(dx, dy) for dx in (-1, 0, 1) for dy in (-1, 0, 1)],
                  "hex": [(0, 0), (1, 0), (-1, 0), (0, 1), (0, -1), (1, -1), (-1, 1)]}


def expression_labels(counts: np.ndarray, array_xy: np.ndarray, smooth: bool = True, geometry: str = "square") -> np.ndarray:
    """(N, G) float32 labels: library size -> 1e4 over the given genes, log10(1 + x), then (smooth)
    the mean over the spot and those of its array-grid neighbours (SMOOTH_OFFSETS) that are spots of
    the section: 8 on the square grid, 6 on the hexagonal one."""
    counts = np.asarray(counts, np.float64)
    lib = counts.sum(axis=1, keepdims=True)  # (N, 1); a spot without counts stays all zero
    y = np.log10(1 + np.divide(counts * 1e4, lib, out=np.zeros_like(counts), where=lib > 0))
    if not smooth:
        return y.astype(np.float32)
    xy = np.asarray(array_xy, np.int64)
    xy = xy - xy.min(axis=0) + 1  # 1-based, so the neighbours of the border spots stay inside the grid
    assert len(np.unique(xy, axis=0)) == len(xy), "expression_labels: duplicate array coordinates"
    assert geometry in SMOOTH_OFFSETS, f"geometry must be one of {list(SMOOTH_OFFSETS)}, got {geometry!r}"
    W, H = xy.max(axis=0) + 2
    grid = np.zeros((W, H, y.shape[1]))  # dense array grid of labels
    have = np.zeros((W, H))  # 1 where a spot exists
    grid[xy[:, 0], xy[:, 1]] = y
    have[xy[:, 0], xy[:, 1]] = 1
    total, n = np.zeros_like(y), np.zeros(len(y))
    for dx, dy in SMOOTH_OFFSETS[geometry]:
        total += grid[xy[:, 0] + dx, xy[:, 1] + dy]
        n += have[xy[:, 0] + dx, xy[:, 1] + dy]
    return (total / n[:, None]).astype(np.float32)


# ----------------------------------------------------------------------------- dataset
class SpotDataset(torch.utils.data.Dataset):
    """Every spot of the given sections: its local crop (or, given tokens, the frozen encoder's token map
    of it), the frozen features of its 5x5 neighbour tiles and their mask, and its label, with its
    section and row. With augment=True the local crop gets a random flip / 90-degree rotation (one of 8,
    crops.dihedral); token maps are served for that same transform of the crop (features.extract_tokens
    caches all 8; without augmentation one map a crop, of the crop as it is, suffices); the tile features
    describe the unaugmented tiles and are left as they are. An item
    holds only what a step reads; the raw counts, coordinates and spot ids stay on the dataset's sections."""

    def __init__(self, sections: list[Section], crops: list[SectionCrops], genes: list[str], features: list[dict],
                 smooth: bool = True, augment: bool = False, tokens: list[np.ndarray] | None = None):
        assert len(crops) == len(sections), f"{len(sections)} sections but {len(crops)} crops"
        assert len(features) == len(sections), "one features dict per section"
        assert tokens is None or len(tokens) == len(sections), "one token array (N, T, h, w, C) per section"
        self.sections, self.crops, self.genes = sections, crops, list(genes)
        self.augment, self.features, self.tokens = augment, features, tokens
        self.labels = [expression_labels(gene_counts(s, self.genes), s.array_xy, smooth, s.geometry)
                       for s in sections]  # per section (N_s, G); the raw counts stay on each Section
        for s, c in zip(sections, crops):
            assert len(c.local) == len(s.spot_ids), f"{s.name}: {len(c.local)} crops for {len(s.spot_ids)} spots"
        for s, t in zip(sections, tokens or []):
            assert t.ndim == 5 and t.shape[0] == len(s.spot_ids) and t.shape[1] >= (N_DIHEDRAL if augment else 1), \
                f"{s.name}: tokens {t.shape}, expected ({len(s.spot_ids)}, {N_DIHEDRAL if augment else 1}, h, w, F)"
        # (total spots, 2): section index, row within the section
        self.rows = np.concatenate([np.stack([np.full(len(s.spot_ids), k), np.arange(len(s.spot_ids))], 1)
                                    for k, s in enumerate(sections)]).astype(np.int64)

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i) -> dict:
        s, j = (int(v) for v in self.rows[i])
        t = int(torch.randint(N_DIHEDRAL, ())) if self.augment else 0  # which flip / rotation
        if self.tokens is None:
            local = dihedral(np.asarray(self.crops[s].local[j]), t)  # (c, c, 3)
            local = torch.from_numpy(np.ascontiguousarray(local.transpose(2, 0, 1)))  # (3, c, c) uint8
        else:  # the encoder's tokens of the transformed crop, copied out of the read-only cache
            tokens = self.tokens[s][j, t]  # (h, w, F)
            local = torch.from_numpy(np.array(tokens).reshape(-1, tokens.shape[-1]))  # (h*w, F) float16
        return {"local": local,
                "neighbour_feats": torch.tensor(np.asarray(self.features[s]["tiles"][j]), dtype=torch.float32),  # (25, F)
                "neighbour_mask": torch.from_numpy(np.ascontiguousarray(self.crops[s].mask(j))),  # (25,) on the image
                "label": torch.tensor(self.labels[s][j]), "section": s, "index": j}


# ----------------------------------------------------------------------------- a split, ready to train or score
@dataclass
class Split:
    sections: list       # cohorts.Section, one per slide
    dataset: object      # data.SpotDataset over those sections
    context: GlobalContext  # every spot's frozen feature (on the device) and where it lies, for the global level
    tokens: list | None = None  # per section: frozen local tokens (N, 8, h, w, C) float16 (N, 1, ... unaugmented), if asked for

    def loader(self, batch_size: int, **kw) -> torch.utils.data.DataLoader:
        """A DataLoader over the split whose batches carry their global-level layout (Collate)."""
        return torch.utils.data.DataLoader(self.dataset, batch_size=batch_size, collate_fn=Collate(self.context.grids), **kw)

    def train_loader(self, batch_sampler, device, workers: int | None = None, buckets: bool = False) -> torch.utils.data.DataLoader:
        """The training loader (train.py's): the sampler's batches, stacked and laid out (Collate; with
        buckets, padded to a few sizes for compiled steps) by `workers` processes ahead of the step
        (loader_settings). Persistent workers keep their own random streams across epochs: exact
        --resume is a property of workers = 0 (the CPU default)."""
        # the global batch: under torchrun the N processes' loaders (batch / N each) share one /dev/shm
        settings = self.loader_settings(batch_sampler.batch_size, device, workers)
        return torch.utils.data.DataLoader(self.dataset, batch_sampler=batch_sampler,
                                           collate_fn=Collate(self.context.grids, buckets), **settings)

    def loader_settings(self, batch: int, device, workers: int | None = None) -> dict:
        """DataLoader settings of training, for any loader of this split (validation's too): `workers`
        persistent processes (default_workers when None), each with up to 4 batches prefetched, fewer
        where /dev/shm cannot hold them (runtime.fit_to_shm, with a warning); pinned memory on CUDA,
        so the copies to the GPU overlap the step (non_blocking)."""
        workers = default_workers(device) if workers is None else workers
        prefetch = 4
        if workers:  # workers hand their batches over through shared memory
            with torch.random.fork_rng(devices=[]):  # one item's bytes, without a draw from training's stream
                item = self.dataset[0]
            size = batch * sum(v.nbytes for v in item.values() if torch.is_tensor(v))
            workers, prefetch, message = runtime.fit_to_shm(workers, prefetch, size, runtime.shm_free_bytes())
            if message:
                log.warning(message)
        return dict(num_workers=workers, pin_memory=torch.device(device).type == "cuda",
                    persistent_workers=workers > 0, prefetch_factor=prefetch if workers else None)


def default_workers(device) -> int:
    """Loader workers: min(8, cores - 1) on CUDA; 0 on a CPU, where they would take the step's cores."""
    return min(8, max(1, (os.cpu_count() or 2) - 1)) if torch.device(device).type == "cuda" else 0


class Collate:
    """The DataLoader's collate function: stack the items, then lay out the step's global level
    (packing.SpotGrids.layout) as batch["layout"]. It runs in the loader's workers, ahead of the step,
    so the model's forward pass needs no host-device round trip to find the step's sections.
    buckets: pad the layout to a few sizes (compiled steps: SpotGrids.layout)."""

    def __init__(self, grids: SpotGrids, buckets: bool = False):
        self.grids, self.buckets = grids, buckets

    def __call__(self, items: list) -> dict:
        batch = torch.utils.data.default_collate(items)
        batch["layout"] = self.grids.layout(batch["section"].numpy(), batch["index"].numpy(), self.buckets)
        return batch


def prepare_split(sections, genes, crop_size, trunk, cache, device, smooth=True, augment=False, local_tokens=False):
    """Crop every section (cached), extract its frozen features once (cached), build the dataset.
    trunk: an encoders.FrozenEncoder (or a bare ResNet18 trunk). local_tokens: the dataset serves the
    frozen encoder's token map of each crop (cached) instead of the crop: under all 8 transforms when
    augmented, else of the crop as it is alone (inference: features.section_tokens)."""
    encoder = as_encoder(trunk)
    key, t = encoder.cache_key(device), tag(encoder.spec)  # t: "" for the ResNet18, "-uni" ...; the kind ends the name (cache.py)
    crops = cohort_crops(sections, cache, crop_size)  # decodes each JPEG once, ever
    feats = [section_features(encoder, key, c, cache, f"{s.cohort}-{s.name}{t}-features", device=device)
             for s, c in zip(sections, crops)]
    tokens = [section_tokens(encoder, key, c, cache, f"{s.cohort}-{s.name}{t}-tokens", device=device,
                             transforms=N_DIHEDRAL if augment else 1)["tokens"]
              for s, c in zip(sections, crops)] if local_tokens else None
    dataset = SpotDataset(sections, crops, genes, feats, smooth=smooth, augment=augment, tokens=tokens)
    context = GlobalContext.of([(np.asarray(f["local"]), s.array_xy) for f, s in zip(feats, sections)], device)
    return Split(sections, dataset, context, tokens)


# ----------------------------------------------------------------------------- the demo's ceiling
def ceiling(root, genes=None, n_genes: int = 50, smooth: bool = True) -> dict[str, float]:
    """The demo cohort's noise-free ceiling (genedml/demo.py writes the cohort and its expected counts):
    PCC(M) per section between labels made from the noise-free rates and labels made from the noisy
    counts, the same normalisation as training. What a perfect predictor of the expected expression
    reaches. genes: default the n_genes with the highest total count over the cohort (as select_genes)."""
    root = Path(root)
    sections = json.loads((root / "DEMO.json").read_text())["sections"]

    def read(folder, s):
        return pd.read_csv(root / folder / f"{s}.tsv.gz", sep="\t", index_col=0)

    counts = {s: read("ST-cnts", s) for s in sections}
    if genes is None:
        genes = top_genes([c.sum(axis=0) for c in counts.values()], n_genes)  # ties by name, as training
    out = {}
    for s in sections:
        xy = np.array([i.split("x") for i in counts[s].index], dtype=np.int64)
        noisy = expression_labels(counts[s][list(genes)].to_numpy(float), xy, smooth)
        clean = expression_labels(read("rates", s).loc[counts[s].index, list(genes)].to_numpy(float), xy, smooth)
        out[s] = float(np.nanmean(pearson_per_gene(clean, noisy)))
    return out


# ----------------------------------------------------------------------------- command line
def _tiles_off_image(pixel_xy, size, crop, grid=5) -> tuple[float, float]:
    """Shares of the 5x5 neighbour tiles whose centre is off the image (masked, here and in the
    reference) and that are on it but partly off (kept and padded white here, masked in the reference)."""
    W, H = size
    on = np.stack([neighbour_mask((H, W), c, crop, grid).reshape(grid, grid) for c in pixel_xy])  # (N, g, g)
    offsets = (np.arange(grid) - grid // 2) * crop
    c = np.floor(np.asarray(pixel_xy, np.float64) + 0.5)
    tx = (c[:, 0, None] + offsets)[:, None, :]  # (N, 1, g) tile centres
    ty = (c[:, 1, None] + offsets)[:, :, None]  # (N, g, 1)
    inside = (tx - crop // 2 >= 0) & (tx - crop // 2 + crop <= W) & (ty - crop // 2 >= 0) & (ty - crop // 2 + crop <= H)
    return float((~on).mean()), float((on & ~inside).mean())


def _info(argv) -> int:
    p = argparse.ArgumentParser(prog="python data.py info", description="what is on disk for a cohort")
    p.add_argument("cohort", choices=list(COHORTS))
    p.add_argument("--root", default=None, help="cohort folder (default: data/<cohort>)")
    args = p.parse_args(argv)
    root = Path(args.root or COHORTS[args.cohort]["root"])
    crop = COHORTS[args.cohort]["crop"]
    print(f"{'section':<14}{'patient':<10}{'spots':>6}{'genes':>7}  {'image':<11}  neighbour tiles: centre off / partly off")
    for name in sections_of(args.cohort, COHORTS[args.cohort]["patients"], root):
        try:
            s = load_section(args.cohort, root, name)
            image, tiles = "absent", ""
            if s.image_path is not None:
                with Image.open(s.image_path) as im:  # header only
                    image = "%dx%d" % im.size
                    off, partly = _tiles_off_image(s.pixel_xy, im.size, crop)
                tiles = f"{off:.1%} / {partly:.1%}"
            print(f"{name:<14}{s.patient:<10}{len(s.spot_ids):>6}{s.counts.shape[1]:>7}  {image:<11}  {tiles}")
        except (FileNotFoundError, ValueError) as e:
            print(f"{name:<14}error: {e}")
    return 0


def _folds(argv) -> int:
    p = argparse.ArgumentParser(prog="python data.py folds",
                                description="spots per fold in both protocols (needs counts and spot files only)")
    p.add_argument("cohort", choices=list(COHORTS))
    p.add_argument("--root", default=None, help="cohort folder (default: data/<cohort>)")
    args = p.parse_args(argv)
    root = Path(args.root or COHORTS[args.cohort]["root"])
    spots, totals = {}, {}  # per patient: spots, and per-section gene totals
    for name in tqdm(sections_of(args.cohort, COHORTS[args.cohort]["patients"], root), desc="reading sections"):
        s = load_section(args.cohort, root, name)
        spots[s.patient] = spots.get(s.patient, 0) + len(s.spot_ids)
        totals.setdefault(s.patient, []).append(s.counts.sum(axis=0))
    n_genes = COHORTS[args.cohort]["genes"]
    cohort_list = set(top_genes(sum(totals.values(), []), n_genes))
    print(f"{'fold':>4} {'test':>8} {'val':>8} {'test spots':>11} {'val spots':>10} {'train (validation)':>19} "
          f"{'train (--select-on-test)':>25} {'fewer':>6} {'per-fold genes in the cohort list':>34}")
    for fold in range(len(COHORTS[args.cohort]["folds"])):
        honest, published = fold_split(args.cohort, fold), fold_split(args.cohort, fold, select_on_test=True)
        n = {part: sum(spots.get(p, 0) for p in patients) for part, patients in honest.items()}
        n_pub = sum(spots.get(p, 0) for p in published["train"])
        own = top_genes(sum((totals.get(p, []) for p in honest["train"]), []), n_genes)  # --genes-from train
        print(f"{fold:>4} {','.join(honest['test']):>8} {','.join(honest['val']):>8} {n['test']:>11} {n['val']:>10} "
              f"{n['train']:>19} {n_pub:>25} {1 - n['train'] / max(n_pub, 1):>6.1%} "
              f"{f'{len(cohort_list.intersection(own))}/{n_genes}':>34}")
    return 0


def _demo(argv) -> int:
    from genedml import demo  # lazily: only this command and train.py --data demo write the demo
    p = argparse.ArgumentParser(prog="python data.py demo", description="Write the synthetic demo cohort (her2st layout).")
    p.add_argument("--root", default="data/demo", help="folder to write (default: data/demo)")
    p.add_argument("--seed", type=int, default=0, help="same seed -> byte-identical files")
    args = p.parse_args(argv)
    root = demo.make_demo_cohort(args.root, args.seed)
    meta = json.loads((root / "DEMO.json").read_text())
    print(f"demo cohort (seed {meta['seed']}) in {root}:")
    for s, f in meta["sections"].items():
        print(f"  {s}: {f['spots']} spots, tumour burden {f['tumour_burden']:.2f} "
              f"(slide factor {f['slide_factor']:+.2f}), image {next((root / 'ST-imgs').glob(f'*/{s}/*.jpg'))}")
    c = ceiling(root)
    print(f"noise-free ceiling PCC(M), top-50 genes: {np.mean(list(c.values())):.3f} (mean over sections)")
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "download":
        from genedml import download  # lazily: only the download command needs it
        return download.main(argv[1:])
    if argv and argv[0] == "demo":
        return _demo(argv[1:])
    if argv and argv[0] in ("info", "folds"):
        logging.basicConfig(level=logging.WARNING)
        return (_info if argv[0] == "info" else _folds)(argv[1:])
    print("usage: python data.py download <cohort> --root R [...]  |  python data.py info|folds <cohort> --root R"
          "  |  python data.py demo [--root R] [--seed S]")
    return 2


if __name__ == "__main__":
    sys.exit(main())
