"""The global level's inputs: where every spot of a split lies, and one step's sections packed as one batch.

A batch of 256 her2st spots touches ~24 sections, and the global level attends over every spot of each
of them. `SpotGrids` is built once per split, on the CPU; `SpotGrids.layout` lays out one step (in the
loader's workers, features.Collate) as a `GlobalLayout`: which feature rows to read, each token's PEG
cell, the padded (S, n) attention batch and its key mask, and where the batch's own spots are. All the
index arithmetic and every check happen here, so model.GlobalEncoder's forward pass has no host sync.
`GlobalContext` holds the split's stacked frozen features beside its grids, and `attend` runs
self-attention within each section of a layout. Needs nothing of ours.
"""
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F



@dataclass
class SpotGrids:
    """Where every spot of a split lies, for the global level: built once on the CPU when the split is
    prepared, so that all checks and all index arithmetic happen there and the forward pass has none.

    start (S+1,): section s owns rows start[s]:start[s+1] of the split's stacked features;
    cell (N,): each spot's cell row * W + col on its section's array grid (origin at the section's
    smallest x and y); grid (H, W): the largest section's grid, which every section's grid is padded to.
    """
    start: np.ndarray       # (S+1,) int64
    cell: np.ndarray        # (N,) int64
    grid: tuple             # (H, W)

    @classmethod
    def of(cls, coords: list) -> "SpotGrids":
        """From each section's array coordinates (N_s, 2) as (x, y); refuses two spots on one cell."""
        assert coords, "a split without sections has no global level"
        xy = [np.asarray(c, np.int64).reshape(-1, 2) for c in coords]
        xy = [c - c.min(axis=0) for c in xy]
        W = max(int(c[:, 0].max()) + 1 for c in xy)
        H = max(int(c[:, 1].max()) + 1 for c in xy)
        cell = [c[:, 1] * W + c[:, 0] for c in xy]  # row-major: row = array y, column = array x
        for s, c in enumerate(cell):
            assert len(np.unique(c)) == len(c), f"section {s}: two spots share an array position"
        start = np.concatenate([[0], np.cumsum([len(c) for c in cell])]).astype(np.int64)
        return cls(start, np.concatenate(cell), (H, W))

    def layout(self, section, index, buckets: bool = False) -> "GlobalLayout":
        """Lay out one step's global level (see GlobalLayout) from the batch's section and row (B,),
        in numpy: called by the loader's collate function, ahead of the step. With buckets, the
        step's sizes (sections S, slots n, queries r, tokens T) are padded up to a few values
        (`bucket`), so that compiled graphs are reused across steps; results are unchanged (see
        GlobalLayout: spare sections and tokens are never read by the batch's spots). At her2st's
        batch of 256 (24 sections, all touched) the 13 shapes of 60 steps become 1 or 2."""
        section, index = np.asarray(section, np.int64), np.asarray(index, np.int64)
        S_all = len(self.start) - 1
        assert section.ndim == 1 and section.shape == index.shape, "section and index must both be (B,)"
        assert ((section >= 0) & (section < S_all)).all(), f"section outside the split's {S_all} sections"
        size_all = np.diff(self.start)
        assert ((index >= 0) & (index < size_all[section])).all(), "index outside its section's spots"
        secs, slot = np.unique(section, return_inverse=True)   # the step's S sections; each spot's slot
        size = size_all[secs]                                  # (S,) spots per section
        first = np.concatenate([[0], np.cumsum(size)[:-1]])    # where each section starts in the packed tokens
        count = np.bincount(slot, minlength=len(secs))         # (S,) the batch's spots per section
        S, n, T, r = len(secs), int(size.max()), int(size.sum()), int(count.max())
        S_pad, T_pad = S, T
        if buckets:  # each size up to its bucket, but never past what the split can hold
            n, T_pad = min(bucket(n), int(size_all.max())), min(bucket(T), int(self.start[-1]))
            r = min(1 << (r - 1).bit_length(), len(section))   # a power of two: only the last layer's queries
            S_pad = min(bucket(S + (T_pad > T)), S_all + 1)   # spare tokens need a spare section to sit in
        valid = np.zeros((S_pad, n), bool)                     # (S_pad, n) slots holding a spot
        valid[:S] = np.arange(n)[None] < size[:, None]
        key_mask = valid.copy()
        key_mask[S:, 0] = True  # a spare section attends to one key, the zero row: an all-masked row would be NaN
        pad = np.full((S_pad, n), T_pad)                       # T_pad: the zero row past the end
        pad[:S] = np.where(valid[:S], first[:, None] + np.arange(n)[None], T_pad)
        spare = T_pad - T                                      # spare tokens: feature row 0, in spare section S
        tokens = np.concatenate([(self.start[secs][:, None] + np.arange(n)[None])[valid[:S]], np.zeros(spare, np.int64)])
        H, W = self.grid
        cell = np.concatenate([np.repeat(np.arange(S), size) * (H * W) + self.cell[tokens[:T]],  # in the (S, H, W) stack
                               np.full(spare, S * H * W)])
        unpad = np.concatenate([np.flatnonzero(valid), np.full(spare, S * n)])  # spare tokens read the spare slot
        # the batch's own spots, the only queries of the last layer: per section, padded to r
        rows = first[slot] + index                             # (B,) packed position of each batch spot
        by_slot = np.argsort(slot, kind="stable")
        rank = np.empty_like(slot)
        rank[by_slot] = np.arange(len(slot)) - np.repeat(np.concatenate([[0], np.cumsum(count)[:-1]]), count)
        query = np.zeros((S_pad, r), np.int64)                 # (S_pad, r): spare queries read the section's first spot
        query[:S] = first[:, None]
        query[slot, rank] = rows
        t = lambda a: torch.from_numpy(np.ascontiguousarray(a))
        return GlobalLayout(tokens=t(tokens), cell=t(cell), pad=t(pad), key_mask=t(key_mask),
                            unpad=t(unpad), query=t(query), order=t(slot * r + rank), rows=t(rows),
                            sizes=size.tolist(), counts=count.tolist())


def bucket(x: int) -> int:
    """x rounded up to the next of 4, 5, 6, 7, 8 x 2^k (at most 25% more; x itself up to 8): a few
    sizes an octave, e.g. her2st's 19-25 sections a batch to 20, 24 or 28."""
    step = 1 << max(0, int(x).bit_length() - 3)
    return -(-int(x) // step) * step


@dataclass
class GlobalLayout:
    """One step's global level as one padded batch: the step's S sections are S sequences of up to n
    spots. Linear layers run on the T packed tokens (no padding: sections differ ~4x in size); only
    attention sees the padded (S, n) batch, with a key mask (on a GPU, in one call; on a CPU each
    section's part alone, as padding would add FLOPs there). Every field is built on the CPU
    (SpotGrids.layout), so the forward pass never waits for the device to say how many there are."""
    tokens: torch.Tensor    # (T,) rows of the stacked features: every spot of the step's sections
    cell: torch.Tensor      # (T,) PEG cell of each token in the (S, H, W) stack of grids
    pad: torch.Tensor       # (S, n) packed position of each slot; T (a zero row) past a section's end
    key_mask: torch.Tensor  # (S, n) True where a slot holds a spot
    unpad: torch.Tensor     # (T,) flat slot s * n + j of each packed token
    query: torch.Tensor     # (S, r) packed positions of the batch's spots, per section, padded
    order: torch.Tensor     # (B,) flat query s * r + j of each batch spot, in batch order
    rows: torch.Tensor      # (B,) packed position of each batch spot
    sizes: list             # spots of each of the step's own sections, host ints (the CPU's attention runs each alone)
    counts: list            # the batch's spots in each of the step's own sections, host ints

    def to(self, device, non_blocking=False) -> "GlobalLayout":
        return GlobalLayout(**{k: v.to(device, non_blocking=non_blocking) if torch.is_tensor(v) else v
                               for k, v in vars(self).items()})

    def pin_memory(self) -> "GlobalLayout":  # called by a DataLoader with pin_memory=True
        return GlobalLayout(**{k: v.pin_memory() if torch.is_tensor(v) else v for k, v in vars(self).items()})


@dataclass
class GlobalContext:
    """What the global level reads: the frozen features of every spot of a split's sections, stacked
    (on the model's device), and where those spots lie (SpotGrids, on the CPU)."""
    feats: torch.Tensor     # (N, F) float32
    grids: SpotGrids

    @classmethod
    def of(cls, sections: list, device=None) -> "GlobalContext":
        """From one (features (N_s, F), array_xy (N_s, 2)) pair per section."""
        feats = torch.cat([torch.tensor(np.asarray(f), dtype=torch.float32) for f, _ in sections]).to(device)  # copies
        return cls(feats, SpotGrids.of([np.asarray(torch.as_tensor(xy).cpu()) for _, xy in sections]))


PADDED_ON = ("cuda",)  # device types that run the global level's attention as one padded call


def attend(qkv, layout: GlobalLayout, heads: int, queries: bool = False) -> torch.Tensor:
    """Self-attention within each section of a layout, from the packed projections qkv (T, 3C): the
    attended values (T, C) in packed order, or, with queries, at the batch's own spots only (B, C).
    On a GPU the T tokens are laid out as an (S, n) padded batch for one attention call (padded keys
    masked, padded queries discarded); on a CPU, where FLOPs are the cost and padding is ~1.8x of them
    on her2st, each section's contiguous run of packed tokens attends alone."""
    C = qkv.shape[1] // 3
    S, n = layout.pad.shape
    h, d = heads, C // heads
    if qkv.device.type in PADDED_ON:
        padded = F.pad(qkv, (0, 0, 0, 1))  # (T + 1, 3C): the last row is what padded slots read
        q, k, v = padded[layout.pad].view(S, n, 3, h, d).permute(2, 0, 3, 1, 4)  # (S, h, n, d)
        if queries:
            q = qkv[layout.query].view(S, -1, 3, h, d)[:, :, 0].transpose(1, 2)  # (S, h, r, d)
        mask = torch.zeros(S, 1, 1, n, device=qkv.device).masked_fill(~layout.key_mask[:, None, None, :], float("-inf"))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.to(q.dtype))  # (S, h, n_q, d)
        return y.transpose(1, 2).reshape(-1, C)[layout.order if queries else layout.unpad]  # (B, C) or (T, C)
    parts, start, r = [], 0, layout.query.shape[1]
    for s, (n_s, r_s) in enumerate(zip(layout.sizes, layout.counts)):
        q, k, v = qkv[start:start + n_s].view(n_s, 3, h, d).permute(1, 2, 0, 3)  # (h, n_s, d) each
        if queries:
            q = qkv[layout.query[s, :r_s]].view(r_s, 3, h, d)[:, 0].transpose(0, 1)  # (h, r_s, d)
        y = F.scaled_dot_product_attention(q, k, v).transpose(0, 1).reshape(-1, C)  # (n_s or r_s, C)
        parts.append(F.pad(y, (0, 0, 0, r - r_s)) if queries else y)
        start += n_s
    y = torch.cat(parts)  # (T, C) in packed order, or (S * r, C) as the padded queries
    return y[layout.order] if queries else F.pad(y, (0, 0, 0, len(layout.tokens) - len(y)))  # spare tokens: 0
