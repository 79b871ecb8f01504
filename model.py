"""Gene-DML: predict spot gene expression from an H&E image at three levels, aligned with genes.

Gene-DML (Song, Fan, Chang, Cai, "Gene-DML: Dual-Pathway Multi-Level Discrimination for Gene
Expression Prediction from Histopathology Images", WACV 2026, https://arxiv.org/abs/2507.14670),
built on the ResNet18 three-level design of TRIPLEX (Chung et al., CVPR 2024).
In: for a batch of spots, the crop centred on each spot (local; or, with the local encoder frozen,
the frozen encoder's token map of that crop, extracted once or computed on the fly), the frozen
encoder's features of the 5x5 tiles around it (neighbour) and of every spot of its section (global),
plus, in training, the measured expression. The frozen encoder is a ResNet18 or a pathology
foundation model (encoders.py); its widths are the config's feat_dim and token_dim. Out: a `GeneDMLOutput` with one L2-normalised embedding per image level, a
clustering-space image and gene embedding, and the predicted expression of G genes. No loss here:
see losses.py.

Read top to bottom: the config, the transformer parts, the three levels, the gene encoder, the
fusion and GeneDML. Every level is defined here; the global level first for one section
(GlobalEncoder.forward), then batched over a step's sections (GlobalEncoder.packed). Two helpers live
outside so that this file holds the model alone: genedml/trunk.py (torchvision's ResNet18 without its
classifier, and its weights) and genedml/packing.py (the step's sections laid out for the batched global
level by the loader, and attention within each of them). It is the one file a reader re-derives Gene-DML from.
"""

from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from genedml import packing  # the global level's packed inputs, laid out by the loader, and attention over them
from genedml.packing import GlobalContext, GlobalLayout
from genedml.trunk import FEAT_DIM, build_trunk  # torchvision's ResNet18 without its classifier

LEVELS = ("local", "neighbour", "global")
LOCAL_ENCODERS = ("trainable", "frozen")  # TRIPLEX trains the local ResNet18; the Gene-DML reference freezes it


@dataclass
class GeneDMLConfig:
    n_genes: int = 250                # G: genes predicted (the top-250 highly expressed ones)
    dim: int = 512                    # D: width of every token and embedding
    levels: tuple = LEVELS            # image levels switched on; any non-empty subset (ablations)
    grid: int = 5                     # the neighbour window is grid x grid tiles
    neighbour_depth: int = 4          # transformer layers of the neighbour encoder
    neighbour_heads: int = 4
    neighbour_mlp_ratio: float = 4.0  # MLP width / D
    neighbour_dropout: float = 0.3
    global_depth: int = 5             # transformer layers of the global encoder (PEG after the first)
    global_heads: int = 8
    global_mlp_ratio: float = 4.0
    global_dropout: float = 0.3
    fusion_heads: int = 1             # one fusion layer over all image tokens
    fusion_mlp_ratio: float = 2.0     # MLP 1024 at D = 512
    fusion_dropout: float = 0.1
    gene_dropout: float = 0.3         # inside the gene encoder's residual branch
    gene_mlp_ratio: float = 2.0       # the gene encoder's closing feed-forward (dropout 0.1)
    head_hidden: int = 1536           # regression head D -> 1536 -> D -> G (3·D in the reference)
    head_dropout: float = 0.1
    weights: str = "none"             # local trunk init: "none", "imagenet" or a checkpoint path
    local_encoder: str = "trainable"  # "trainable" reads crops; "frozen" reads the frozen encoder's tokens
    frozen_tokens: str = "cached"     # how a frozen local level's tokens were fed: "cached" or "online" (the
                                      # encoder on each step's crop, outside the model); recorded for evaluation
    feat_dim: int = FEAT_DIM          # width of a frozen tile / spot feature (the encoder's: 512 ... 2560)
    token_dim: int = FEAT_DIM         # width of a local token (the encoder's; Virchow2: half its feature)

    @classmethod
    def for_cohort(cls, cohort: str, n_genes: int, **overrides) -> "GeneDMLConfig":
        """Per-cohort encoder sizes of the Gene-DML reference code (dml.py, ImageEncoder_UNI)."""
        assert cohort in COHORT_SIZES, f"unknown cohort {cohort!r}; known: {sorted(COHORT_SIZES)}"
        return replace(cls(n_genes=n_genes, **COHORT_SIZES[cohort]), **overrides)


# (depth, heads, MLP ratio, dropout) of the neighbour and global encoders per cohort. The
# reference tuned these at UNI width 1024; we keep them at D = 512. "demo" is a laptop-sized model of
# the same architecture (D = 128, two layers per encoder) so that it trains in minutes on a CPU.
_HER2ST = dict(neighbour_depth=4, neighbour_heads=4, neighbour_mlp_ratio=4.0, neighbour_dropout=0.3,
               global_depth=5, global_heads=8, global_mlp_ratio=4.0, global_dropout=0.3)
COHORT_SIZES = {
    "her2st": _HER2ST,
    "demo": dict(_HER2ST, dim=128, neighbour_depth=2, global_depth=2, global_heads=4, head_hidden=384),
    "stnet": dict(_HER2ST, neighbour_heads=8, global_depth=3, global_mlp_ratio=2.0, global_dropout=0.1),
    "cscc": dict(neighbour_depth=4, neighbour_heads=16, neighbour_mlp_ratio=1.0, neighbour_dropout=0.3,
                 global_depth=2, global_heads=16, global_mlp_ratio=1.0, global_dropout=0.1),
}


# ----------------------------------------------------------------------------- transformer parts
def feed_forward(dim: int, hidden: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout),
                         nn.Linear(hidden, dim), nn.Dropout(dropout))


class RelativePositionBias(nn.Module):
    """A learnable bias per head for each distance (|Δrow|, |Δcol|) on a g x g grid, as in TRIPLEX.

    Tokens are the grid cells in row-major order; the pair (query t, key s) gets table[h, distance(t, s)],
    added to its attention logit, so attention can prefer near tiles over far ones. The bias has no
    direction (a tile above and one below are alike), as tissue has no up or down, and it starts at
    zero (plain attention).
    """

    def __init__(self, grid: int, heads: int):
        super().__init__()
        self.table = nn.Parameter(torch.zeros(heads, grid * grid))  # (h, 25) for a 5x5 grid
        cells = torch.arange(grid * grid)
        row, col = cells // grid, cells % grid
        d_row = (row[:, None] - row[None, :]).abs()  # (g², g²) in [0, g-1]
        d_col = (col[:, None] - col[None, :]).abs()
        self.register_buffer("index", d_row * grid + d_col, persistent=False)

    def forward(self) -> torch.Tensor:
        return self.table[:, self.index]  # (h, g², g²)


class Attention(nn.Module):
    """Multi-head self-attention with an optional additive bias and a key mask (False = ignore key).

    Dropout acts on the output projection only, not on the attention weights, as in TRIPLEX and the
    Gene-DML reference.
    """

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        assert dim % heads == 0, f"dim {dim} must be a multiple of heads {heads}"
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(dropout))

    def forward(self, x, bias=None, key_mask=None):  # (B, n, C) -> (B, n, C)
        B, n, C = x.shape
        q, k, v = self.qkv(x).view(B, n, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)  # (B,h,n,C/h)
        mask = None  # additive logits mask, broadcast to (B, h, n_q, n)
        if bias is not None:
            mask = bias.unsqueeze(0)  # (1, h, n, n)
        if key_mask is not None:
            # -inf on ignored keys: softmax gives them weight exactly 0, so their content cannot leak
            pad = torch.zeros(B, 1, 1, n, device=x.device).masked_fill(~key_mask[:, None, None, :], float("-inf"))
            mask = pad if mask is None else mask + pad
        if mask is not None:
            mask = mask.to(q.dtype)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, h, n, C/h)
        return self.proj(y.transpose(1, 2).reshape(B, n, C))  # (B, n, C)

    def packed(self, x, layout, queries=False):
        """Self-attention within each section of a GlobalLayout (packing.attend: one padded call on a
        GPU, each section alone on a CPU): x (T, C) packed tokens -> (T, C), or, with queries, the
        output at the batch's own spots only (B, C)."""
        return self.proj(packing.attend(self.qkv(x), layout, self.heads, queries))


class Block(nn.Module):
    """Pre-norm transformer layer: x + Attention(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, dropout: float, grid: int | None = None):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, dropout)
        self.mlp = feed_forward(dim, int(dim * mlp_ratio), dropout)
        self.bias = RelativePositionBias(grid, heads) if grid else None

    def forward(self, x, key_mask=None):  # (B, n, D) -> (B, n, D)
        bias = self.bias() if self.bias is not None else None
        x = x + self.attn(self.norm1(x), bias, key_mask)
        return x + self.mlp(self.norm2(x))

    def packed(self, x, layout, queries=False):
        """The same layer over the packed tokens of several sections (Attention.packed): (T, D) -> (T, D),
        or with queries the batch's own spots only (B, D)."""
        x = (x[layout.rows] if queries else x) + self.attn.packed(self.norm1(x), layout, queries)
        return x + self.mlp(self.norm2(x))



# ----------------------------------------------------------------------------- the three levels
class LocalEncoder(nn.Module):
    """Target spot: each cell of the trunk's last feature map (ResNet18: 7x7 = 49 at 224 px), or each
    patch token of a ViT (UNI: 14x14 = 196), is a token.

    trainable (TRIPLEX): a ResNet18 trunk is trained and reads the uint8 crop (B,3,c,c); it runs
      channels-last, which oneDNN and cuDNN convolve faster (same function, another memory layout).
    frozen (the Gene-DML reference, whose local encoder is a frozen UNI): it reads the frozen encoder's
      tokens of the crop (B, n, token_dim) and standardises them with per-channel training statistics,
      like the other levels' features. The tokens are computed outside the model, never trained: once per
      crop and cached (features.extract_tokens), or on every step's augmented crop under no_grad (train.py
      --frozen-tokens online), so the frozen encoder is in no state dict and no optimiser.
    """

    def __init__(self, mode: str = "trainable", weights: str = "none", token_dim: int = FEAT_DIM):
        super().__init__()
        assert mode in LOCAL_ENCODERS, f"local encoder must be one of {LOCAL_ENCODERS}, got {mode!r}"
        self.mode = mode
        if mode == "trainable":
            assert token_dim == FEAT_DIM, f"the trainable local trunk is a ResNet18 ({FEAT_DIM} wide), not {token_dim}"
            self.trunk = build_trunk(weights).to(memory_format=torch.channels_last)
        else:  # set by GeneDML.set_statistics
            self.register_buffer("token_mean", torch.zeros(token_dim))
            self.register_buffer("token_std", torch.ones(token_dim))

    def forward(self, local):  # (B, 3, c, c) uint8 crops, or (B, n, C) frozen tokens
        if self.mode == "frozen":
            C = len(self.token_mean)
            assert local.ndim == 3 and local.shape[-1] == C and local.is_floating_point(), \
                f"frozen local encoder: expected tokens (B,n,{C}), got {local.dtype} {tuple(local.shape)}"
            return (local.float() - self.token_mean) / self.token_std  # (B, n, C)
        fmap = self.trunk(self.trunk.preprocess(local).contiguous(memory_format=torch.channels_last))  # (B, 512, c/32, c/32)
        return fmap.flatten(2).transpose(1, 2)  # (B, (c/32)², 512): 49 tokens at 224 px


class NeighbourEncoder(nn.Module):
    """5x5 frozen tile features -> transformer with relative-position bias; off-image tiles are masked."""

    def __init__(self, cfg: GeneDMLConfig):
        super().__init__()
        self.grid = cfg.grid
        self.proj = nn.Linear(cfg.feat_dim, cfg.dim)
        self.blocks = nn.ModuleList(
            Block(cfg.dim, cfg.neighbour_heads, cfg.neighbour_mlp_ratio, cfg.neighbour_dropout, grid=cfg.grid)
            for _ in range(cfg.neighbour_depth))
        self.norm = nn.LayerNorm(cfg.dim)

    def forward(self, feats, mask):  # (B, g², F) float, (B, g²) bool (True = on the image)
        """The centre tile is the spot itself, on the image by construction (cohorts.load_section checks the
        spot centres): every row attends to at least that tile. (Not asserted here: that would wait for the device.)"""
        g2, width = self.grid ** 2, self.proj.in_features
        assert feats.ndim == 3 and feats.shape[1:] == (g2, width), \
            f"expected neighbour features (B,{g2},{width}), got {tuple(feats.shape)}"
        assert mask.dtype == torch.bool and mask.shape == feats.shape[:2], \
            f"expected a bool neighbour mask (B,{g2}), got {mask.dtype} {tuple(mask.shape)}"
        x = self.proj(feats)  # (B, g², D)
        for block in self.blocks:
            x = block(x, key_mask=mask)  # masked tiles are never attended to
        return self.norm(x)  # (B, g², D); rows of masked tiles are dropped later by the fusion


class PEG(nn.Module):
    """Positional-encoding generator (Chu et al., CPVT; TRIPLEX's PEGH) on the spot array.

    Scatter a section's spot tokens onto its dense array grid (empty cells 0), run a depthwise 3x3 conv,
    gather the result back at each spot and add it: a token learns about its array neighbours' content
    and position.
    """

    def __init__(self, dim: int, kernel: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, kernel, padding=kernel // 2, groups=dim)

    def forward(self, x, xy):  # one section: (N, D) tokens, (N, 2) array coordinates (x, y) -> (N, D)
        xy = xy - xy.min(0).values
        col, row = xy[:, 0], xy[:, 1]
        grid = x.new_zeros(int(row.max()) + 1, int(col.max()) + 1, x.shape[1])  # (H, W, D)
        grid[row, col] = x
        return x + self.conv(grid.permute(2, 0, 1)[None])[0].permute(1, 2, 0)[row, col]

    def packed(self, x, cell, sections: int, grid: tuple):  # (T, D), (T,) cell in the (S, H, W) stack
        """The same for a step's S sections at once (packing.GlobalLayout): S grids of one (S, D, H, W)
        batch; a section smaller than H x W sits in its top-left corner, and the zeros around it are
        what the conv's own zero padding would give."""
        H, W = grid
        D = x.shape[1]
        g = x.new_zeros(sections * H * W, D)
        g[cell] = x  # empty cells stay 0
        g = g.view(sections, H, W, D).permute(0, 3, 1, 2)  # (S, D, H, W)
        return x + self.conv(g).permute(0, 2, 3, 1).reshape(-1, D)[cell]  # (T, D)


class GlobalEncoder(nn.Module):
    """The frozen feature of every spot of a section -> layer -> PEG on the array grid -> depth-1 layers
    -> the batch spots' rows: each spot sees its whole slide.

    `forward` is the definition, for one section. A training step touches ~24 sections; `packed` is the
    same computation for all of them at once (each section's spots attend to each other only), laid out
    ahead by the loader (packing.py); tests/test_model.py checks the two agree, values and gradients.
    """

    def __init__(self, cfg: GeneDMLConfig):
        super().__init__()
        self.proj = nn.Linear(cfg.feat_dim, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg.dim, cfg.global_heads, cfg.global_mlp_ratio, cfg.global_dropout)
                                    for _ in range(cfg.global_depth))
        self.peg = PEG(cfg.dim)
        self.norm = nn.LayerNorm(cfg.dim)

    def forward(self, feats, xy, rows):  # one section: (N, F) features, (N, 2) array x, y; (B,) rows -> (B, D)
        x = self.blocks[0](self.proj(feats)[None])[0]  # (N, D): one sequence of the section's N spots
        x = self.peg(x, xy)
        for block in self.blocks[1:]:
            x = block(x[None])[0]
        return self.norm(x)[rows]  # (B, D)

    def packed(self, feats, layout: GlobalLayout, grid: tuple):  # (T, F) packed features -> (B, D)
        """forward for every section of a step at once. Only the last layer can skip the other spots
        (they are still its keys and values), so it computes the batch's rows alone."""
        width = self.proj.in_features
        assert feats.ndim == 2 and feats.shape == (len(layout.tokens), width), \
            f"expected the layout's {len(layout.tokens)} packed features (T,{width}), got {tuple(feats.shape)}"
        S = layout.pad.shape[0]
        x = self.blocks[0].packed(self.proj(feats), layout)  # (T, D)
        x = self.peg.packed(x, layout.cell, S, grid)  # (T, D)
        if len(self.blocks) == 1:
            return self.norm(x[layout.rows])  # (B, D)
        for block in self.blocks[1:-1]:
            x = block.packed(x, layout)
        return self.norm(self.blocks[-1].packed(x, layout, queries=True))  # (B, D)


# ----------------------------------------------------------------------------- genes, fusion, model
class GeneEncoder(nn.Module):
    """Expression (B,G) -> L2-normalised gene embedding g (B,D). Training only."""

    def __init__(self, cfg: GeneDMLConfig):
        super().__init__()
        self.proj = nn.Linear(cfg.n_genes, cfg.dim)
        self.fc = nn.Linear(cfg.dim, cfg.dim)
        self.drop = nn.Dropout(cfg.gene_dropout)
        self.norm = nn.LayerNorm(cfg.dim)
        self.ff = feed_forward(cfg.dim, int(cfg.dim * cfg.gene_mlp_ratio), 0.1)

    def forward(self, expression):  # (B, G)
        h = self.proj(expression)  # (B, D)
        x = self.norm(h + self.drop(self.fc(F.gelu(h))))  # residual to the first projection
        return F.normalize(self.ff(x), dim=-1)  # the reference applies this feed-forward without a residual


class Fusion(nn.Module):
    """Concatenate all image tokens, one transformer layer + feed-forward, then mean-pool per level."""

    def __init__(self, cfg: GeneDMLConfig, in_dims: dict[str, int]):
        super().__init__()
        self.proj = nn.ModuleDict({level: nn.Linear(d, cfg.dim) for level, d in in_dims.items()})
        self.block = Block(cfg.dim, cfg.fusion_heads, cfg.fusion_mlp_ratio, cfg.fusion_dropout)
        self.ff = feed_forward(cfg.dim, int(cfg.dim * cfg.fusion_mlp_ratio), cfg.fusion_dropout)

    def forward(self, tokens: dict, valid: dict):  # level -> (B, n_l, d_l) tokens, (B, n_l) bool
        x = torch.cat([self.proj[level](t) for level, t in tokens.items()], dim=1)  # (B, T, D)
        keep = torch.cat([valid[level] for level in tokens], dim=1)  # (B, T): off-image tiles are False
        x = self.ff(self.block(x, key_mask=keep))  # (B, T, D), plain feed-forward as in the reference
        w = keep.to(x.dtype).unsqueeze(-1)  # (B, T, 1)
        pooled, start = {}, 0
        for level, t in tokens.items():  # mean over each level's valid tokens
            end = start + t.shape[1]
            pooled[level] = (x[:, start:end] * w[:, start:end]).sum(1) / w[:, start:end].sum(1)  # (B, D)
            start = end
        return pooled, (x * w).sum(1) / w.sum(1)  # per level, and over all valid tokens (B, D)


@dataclass
class GeneDMLOutput:
    embeddings: dict[str, torch.Tensor]  # level -> (B, D) L2-normalised (enabled levels only)
    image_cluster: torch.Tensor     # (B, D) clustering head on the mean fused token, L2-normalised
    gene: torch.Tensor | None       # (B, D) L2-normalised gene embedding (when expression is given)
    gene_cluster: torch.Tensor | None  # (B, D) clustering head on the gene embedding
    prediction: torch.Tensor        # (B, G)


class GeneDML(nn.Module):
    """Image side: three levels -> fusion -> one embedding per level, and the mean fused token ->
    regression head and clustering head. Gene side (training): gene encoder -> g -> the same clustering head.

        local crop (B,3,c,c) or tokens    LocalEncoder     (B, n, token_dim) ---+
        neighbour (B,25,F), mask (B,25)   NeighbourEncoder (B, 25, D)        ---+-- Fusion -> v_local, v_neighbour,
        context: the step's sections      GlobalEncoder    (B, D)            ---+           v_global, mean token
    (F = cfg.feat_dim, the frozen encoder's feature width: 512 for the ResNet18, 1024 for UNI.)
    Each level can be switched off (cfg.levels); its module is then not built and its inputs may be None.
    """

    def __init__(self, cfg: GeneDMLConfig):
        super().__init__()
        assert cfg.levels and set(cfg.levels) <= set(LEVELS), f"levels must be a non-empty subset of {LEVELS}"
        self.cfg = cfg
        self.levels = tuple(level for level in LEVELS if level in cfg.levels)  # fixed token order
        on = self.levels.__contains__
        assert cfg.local_encoder in LOCAL_ENCODERS, f"local_encoder must be one of {LOCAL_ENCODERS}"
        self.local_encoder = LocalEncoder(cfg.local_encoder, cfg.weights, cfg.token_dim) if on("local") else None
        self.neighbour_encoder = NeighbourEncoder(cfg) if on("neighbour") else None
        self.global_encoder = GlobalEncoder(cfg) if on("global") else None
        in_dims = {"local": cfg.token_dim, "neighbour": cfg.dim, "global": cfg.dim}
        self.fusion = Fusion(cfg, {level: in_dims[level] for level in self.levels})
        self.gene_encoder = GeneEncoder(cfg)
        D = cfg.dim
        self.head = nn.Sequential(nn.Linear(D, cfg.head_hidden), nn.ReLU(), nn.Dropout(cfg.head_dropout),
                                  nn.Linear(cfg.head_hidden, D), nn.ReLU(), nn.Dropout(cfg.head_dropout),
                                  nn.Linear(D, cfg.n_genes))
        self.cluster_head = nn.Linear(D, D)  # shared by images and genes; L2-normalised after
        # Training-set statistics (set_statistics), saved with the weights. Every gene's log expression
        # and every frozen ReLU feature is positive, so un-centred inputs give all spots nearly the same
        # embedding at initialisation (cosine ~0.97); the soft InfoNCE targets are then uniform, which
        # makes collapse a fixed point. Standardised inputs start the embeddings apart instead, and the
        # regression head starts at the training mean instead of at zero. (The head's output is not
        # scaled by the std: that would shrink the MSE gradient against the contrastive ones.)
        self.register_buffer("expr_mean", torch.zeros(cfg.n_genes))
        self.register_buffer("expr_std", torch.ones(cfg.n_genes))
        self.register_buffer("feat_mean", torch.zeros(cfg.feat_dim))
        self.register_buffer("feat_std", torch.ones(cfg.feat_dim))

    @torch.no_grad()
    def set_statistics(self, expression, features, tokens=None) -> None:
        """Per-gene mean/std of the training labels (N, G) and per-channel mean/std of the frozen features
        (M, F); with a frozen local encoder also those of its tokens, as a (mean, std) pair of (token_dim,)."""
        for name, x in (("expr", expression), ("feat", features)):
            x = torch.as_tensor(x, dtype=torch.float32)
            getattr(self, f"{name}_mean").copy_(x.mean(0))
            getattr(self, f"{name}_std").copy_(x.std(0).clamp(min=1e-3))  # a constant gene stays finite
        if self.local_encoder is not None and self.local_encoder.mode == "frozen":
            assert tokens is not None, "a frozen local encoder needs the (mean, std) of its training tokens"
            self.local_encoder.token_mean.copy_(torch.as_tensor(tokens[0], dtype=torch.float32))
            self.local_encoder.token_std.copy_(torch.as_tensor(tokens[1], dtype=torch.float32).clamp(min=1e-3))

    def load_trunk_weights(self, state: dict) -> None:
        """Start the trainable local trunk from a trunk's weights (copied), e.g. the frozen trunk's."""
        if self.local_encoder is not None and self.local_encoder.mode == "trainable":
            self.local_encoder.trunk.load_state_dict(state)

    def global_tokens(self, section, index, context, layout=None):
        """Each batch spot's row of the global encoder (B, D), all of the step's sections in one pass.
        context: a GlobalContext (or a list of (features, array_xy) pairs, one per section); layout: the
        step's GlobalLayout, built ahead by the loader (data.Collate). Without it, it is built here from
        section and index, which waits for them on the CPU: fine for tests and scripts, not for training."""
        if not isinstance(context, GlobalContext):
            context = GlobalContext.of(context, section.device)
        if layout is None:
            layout = context.grids.layout(section.cpu(), index.cpu()).to(section.device)
        feats = (context.feats[layout.tokens].float() - self.feat_mean) / self.feat_std  # (T, F)
        return self.global_encoder.packed(feats, layout, context.grids.grid)  # (B, D)

    def forward(self, local, neighbour, neighbour_mask, section, index, context, expression=None,
                layout=None) -> GeneDMLOutput:
        tokens, valid = {}, {}  # level -> (B, n, d) tokens, (B, n) bool: False = leave out of the fusion
        if self.local_encoder is not None:
            assert local is not None, "the local level is on: pass the uint8 crops (B,3,c,c) or frozen tokens (B,n,C)"
            tokens["local"] = self.local_encoder(local)  # (B, n, token_dim)
            valid["local"] = torch.ones(tokens["local"].shape[:2], dtype=torch.bool, device=local.device)
        if self.neighbour_encoder is not None:
            assert neighbour is not None and neighbour_mask is not None, \
                "the neighbour level is on: pass neighbour (B,25,F) and neighbour_mask (B,25)"
            assert neighbour.ndim == 3 and neighbour.shape[-1] == self.cfg.feat_dim, \
                f"expected neighbour features (B,25,{self.cfg.feat_dim}), got {tuple(neighbour.shape)}"
            neighbour = (neighbour.float() - self.feat_mean) / self.feat_std  # masked tiles stay masked
            tokens["neighbour"] = self.neighbour_encoder(neighbour, neighbour_mask)  # (B, 25, D)
            valid["neighbour"] = neighbour_mask
        if self.global_encoder is not None:
            assert section is not None and index is not None and context is not None, \
                "the global level is on: pass section (B,), index (B,) and context"
            assert section.ndim == 1 and section.shape == index.shape, "section and index must both be (B,)"
            tokens["global"] = self.global_tokens(section, index, context, layout).unsqueeze(1)  # (B, 1, D)
            valid["global"] = torch.ones(len(section), 1, dtype=torch.bool, device=section.device)
        B = next(iter(tokens.values())).shape[0]
        assert all(t.shape[0] == B for t in tokens.values()), \
            f"levels disagree on the batch size: { {k: t.shape[0] for k, t in tokens.items()} }"

        pooled, fused = self.fusion(tokens, valid)  # level -> (B, D), (B, D)
        out = GeneDMLOutput(
            embeddings={level: F.normalize(v, dim=-1) for level, v in pooled.items()},
            image_cluster=F.normalize(self.cluster_head(fused), dim=-1),
            gene=None, gene_cluster=None,
            prediction=self.expr_mean + self.head(fused))  # (B, G) labels: the head learns the deviation
        if expression is not None:
            assert expression.shape == (B, self.cfg.n_genes), \
                f"expected expression (B={B}, G={self.cfg.n_genes}), got {tuple(expression.shape)}"
            out.gene = self.gene_encoder((expression - self.expr_mean) / self.expr_std)  # (B, D)
            out.gene_cluster = F.normalize(self.cluster_head(out.gene), dim=-1)
        return out
