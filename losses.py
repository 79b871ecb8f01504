"""Gene-DML losses: two discrimination pathways plus regression, one small function per idea.

Gene-DML (Song et al., WACV 2026, https://arxiv.org/abs/2507.14670) trains on a batch of B spots,
each seen as image embeddings v_s at three levels s (local, neighbour, global) and as a gene
embedding g of its measured expression:

    L = w_inst·L_inst + w_mse·L_mse + λ·L_group

    L_inst   multi-scale instance-level discrimination: at every level, a spot's gene embedding must
             pick out the same spot's image embedding among the batch (soft-target InfoNCE, BLEEP).
    L_group  cross-level instance-group discrimination (CLD): an image instance must pick out the
             group that k-means found for its spot on the gene side, and a gene instance its
             spot's group on the image side.
    L_mse    regression of the expression itself; the only loss that matters at inference.

Read top to bottom: hard InfoNCE (CLIP) -> soft InfoNCE -> three levels -> k-means -> groups -> total.
Everything is computed in float32: logits / 0.07 reach ±14, where bf16 resolves steps of only 0.06.
"""
import torch
import torch.nn.functional as F


def info_nce(a, b, tau=0.07):
    """Symmetric InfoNCE with hard targets (CLIP): row i of `a` must pick row i of `b`, and back.

    logits = â·b̂ᵀ / τ   (â, b̂: rows L2-normalised)
    L = ½[CE(logits, I) + CE(logitsᵀ, I)]
    The reference case for soft_info_nce below.
    """
    a, b = F.normalize(a.float(), dim=-1), F.normalize(b.float(), dim=-1)
    logits = a @ b.T / tau                            # (B, B) cosine similarities / τ
    labels = torch.arange(len(a), device=a.device)    # the positive of row i is column i
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def soft_cross_entropy(logits, targets):
    """CE_soft(p, t) = −Σ_j t_j·log softmax(p)_j, averaged over the rows."""
    return -(targets * F.log_softmax(logits, dim=-1)).sum(-1).mean()


def soft_info_nce(image, gene, tau=0.07):
    """Symmetric InfoNCE with soft targets (BLEEP; Gene-DML's instance-level pathway).

    logits = g·vᵀ / τ
    T      = softmax_rows(((v·vᵀ) + (g·gᵀ)) / 2 / τ)
    L      = ½[CE_soft(logits, T) + CE_soft(logitsᵀ, Tᵀ)]
    Spots that look alike and express alike share target mass instead of being pushed apart as
    hard negatives. When v·vᵀ = g·gᵀ = I, T = softmax(I/τ), which tends to the identity as τ → 0,
    and L tends to info_nce(image, gene, τ).
    """
    v, g = F.normalize(image.float(), dim=-1), F.normalize(gene.float(), dim=-1)
    logits = g @ v.T / tau                            # (B, B) gene i against image j
    # T stands where a cross-entropy's label stands, so it is held fixed; BLEEP and the Gene-DML
    # code leave it attached, which adds a pull of the within-modality similarities toward logits.
    with torch.no_grad():
        targets = F.softmax((v @ v.T + g @ g.T) / 2 / tau, dim=-1)   # (B, B), rows sum to 1
    # As in BLEEP, the image->gene direction uses Tᵀ, whose rows (T's columns) sum to 1 only when T
    # is symmetric: the loss is symmetric under swapping image and gene only in that case.
    return (soft_cross_entropy(logits, targets) + soft_cross_entropy(logits.T, targets.T)) / 2


def multi_scale_instance_loss(gene, levels, tau=0.07):
    """L_inst = mean over the image levels s (local, neighbour, global) of soft_info_nce(v_s, g)."""
    assert len(levels) > 0, "multi_scale_instance_loss needs at least one image level"
    return sum(soft_info_nce(v, gene, tau) for v in levels) / len(levels)


def kmeans(x, k, iters=10):
    """Lloyd's k-means on the rows of x (B, D) -> labels (B,), centroids (k, D).

    Deterministic: initialised from the first k rows (k clamped to B), squared Euclidean
    assignment, `iters` rounds of assign-then-average. An empty group keeps count 1, so its
    centroid becomes the zero vector instead of 0/0 = NaN (as in the reference code).
    Labels are constants; the returned centroids are means of x and carry its gradient.
    """
    assert x.dim() == 2 and iters >= 1, f"kmeans: want x (B, D), iters >= 1, got {tuple(x.shape)}, {iters}"
    k = min(k, len(x))
    with torch.no_grad():                             # assignment is discrete: no gradient
        centroids = x[:k]
        for _ in range(iters):
            # |x - c|² = |x|² - 2 x·c + |c|², all pairs at once: (B, k)
            dist = (x * x).sum(1, keepdim=True) - 2 * x @ centroids.T + (centroids * centroids).sum(1)
            labels = dist.argmin(1)                   # (B,) nearest centroid; ties go to the lower index
            centroids = group_means(x, labels, k)
    return labels, group_means(x, labels, k)          # the final means again, now with gradient


def group_means(x, labels, k):
    """Mean of the rows of x (B, D) in each of k groups -> (k, D); an empty group has count 1."""
    one_hot = F.one_hot(labels, k).to(x.dtype)        # (B, k); a matmul, so deterministic on GPU too
    counts = one_hot.sum(0).clamp(min=1)              # (k,)
    return one_hot.T @ x / counts[:, None]


def instance_group_loss(image_z, gene_z, k, tau_group=0.07):
    """Cross-level instance-group discrimination (CLD, Wang et al. CVPR 2021), Gene-DML's 2nd pathway.

    k-means groups the batch twice, on the gene side (labels y_g, centroids M_g) and on the image
    side (y_v, M_v). Each image instance must then recognise its own spot's gene-side group, and
    each gene instance its own spot's image-side group:
        L_group = ½[CE(z_v·M_gᵀ / τ_g, y_g) + CE(z_g·M_vᵀ / τ_g, y_v)]
    z_v, z_g are the shared clustering head's L2-normalised outputs, so instances and centroids
    live in one space, as in CLD. (The reference code scores the un-normalised mean fused token and
    the plain gene embedding against centroids from the clustering head's space: two spaces.)
    Centroids are plain means, not re-normalised, as in CLD's and Gene-DML's code: a loose group
    has a shorter centroid, hence a weaker pull. Gradients: labels are constants and centroids are
    means of their own side, so the first term trains the image side directly and the gene side
    through M_g, the second the reverse: each modality learns both to find the other's groups and
    to form groups the other can find.
    """
    z_v, z_g = F.normalize(image_z.float(), dim=-1), F.normalize(gene_z.float(), dim=-1)
    y_g, m_g = kmeans(z_g, k)                         # (B,), (k, D) gene-side groups
    y_v, m_v = kmeans(z_v, k)                         # image-side groups, found separately
    image_to_gene_groups = z_v @ m_g.T / tau_group    # (B, k)
    gene_to_image_groups = z_g @ m_v.T / tau_group    # (B, k)
    return (F.cross_entropy(image_to_gene_groups, y_g)
            + F.cross_entropy(gene_to_image_groups, y_v)) / 2


def gene_dml_loss(out, target, *, tau=0.07, tau_group=0.07, k=18, lam=0.8, w_inst=1.0, w_mse=1.0):
    """L = w_inst·L_inst + w_mse·L_mse + λ·L_group  ->  (total, {"inst", "group", "mse", "total"}).

    `out` has .embeddings (level -> (B, D)), .gene, .image_cluster, .gene_cluster, .prediction (B, G);
    target is (B, G). A part whose weight is 0 is not computed and reported as 0.0 (ablations; a
    regression-only run costs nothing extra). τ = τ_g = 0.07 (MoCo's value); k = 18 groups for
    her2st (25 cSCC, 90 STNet). λ = 0.8 is the paper's value: the reference code's command line
    defaults to λ = 1.0 and τ_g = 0.1, its model class to λ = 0.8 and τ_g = 0.07.
    The parts are detached 0-d tensors: a training step sums them where they are and never waits for
    the device to log them (float(part) when a number is wanted).
    """
    if (w_inst or lam) and (out.gene is None or out.gene_cluster is None):
        raise ValueError(f"gene_dml_loss: w_inst={w_inst} and lam={lam} need the gene embedding, but "
                         "out.gene (or out.gene_cluster) is None: run the model with expression=..., "
                         "or set both weights to 0")
    if out.prediction.shape != target.shape:
        raise ValueError(f"gene_dml_loss: prediction {tuple(out.prediction.shape)} and target "
                         f"{tuple(target.shape)} differ in shape")
    zero = torch.zeros((), device=target.device)
    with torch.autocast(target.device.type, enabled=False):   # float32 even in a mixed-precision step
        levels = list(out.embeddings.values())        # [(B, D)]: local, neighbour, global
        inst = multi_scale_instance_loss(out.gene, levels, tau) if w_inst else zero
        group = instance_group_loss(out.image_cluster, out.gene_cluster, k, tau_group) if lam else zero
        mse = F.mse_loss(out.prediction.float(), target.float()) if w_mse else zero
        total = w_inst * inst + w_mse * mse + lam * group
    return total, {"inst": inst.detach(), "group": group.detach(), "mse": mse.detach(), "total": total.detach()}
