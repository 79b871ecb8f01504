"""Tests for losses.py: properties of each loss, and parity with plain-Python loops written here."""
import math
from types import SimpleNamespace

import pytest
import torch

import losses
from losses import (gene_dml_loss, info_nce, instance_group_loss, kmeans, multi_scale_instance_loss,
                    soft_info_nce)


# ------------------------------------------------------------ plain-Python references (lists of floats)

def py_normalise(rows):
    return [[x / math.sqrt(sum(y * y for y in r)) for x in r] for r in rows]


def py_dot(a, b):
    return sum(x * y for x, y in zip(a, b))


def py_log_softmax(row):
    m = max(row)
    log_z = m + math.log(sum(math.exp(x - m) for x in row))
    return [x - log_z for x in row]


def py_transpose(m):
    return [list(col) for col in zip(*m)]


def py_info_nce(a, b, tau):
    a, b = py_normalise(a), py_normalise(b)
    logits = [[py_dot(x, y) / tau for y in b] for x in a]
    rows = [-py_log_softmax(r)[i] for i, r in enumerate(logits)]
    cols = [-py_log_softmax(c)[i] for i, c in enumerate(py_transpose(logits))]
    return (sum(rows) + sum(cols)) / (2 * len(a))


def py_soft_ce(logits, targets):
    return sum(-py_dot(t, py_log_softmax(l)) for l, t in zip(logits, targets)) / len(logits)


def py_soft_info_nce(image, gene, tau):
    v, g = py_normalise(image), py_normalise(gene)
    n = len(v)
    logits = [[py_dot(g[i], v[j]) / tau for j in range(n)] for i in range(n)]
    sim = [[(py_dot(v[i], v[j]) + py_dot(g[i], g[j])) / 2 / tau for j in range(n)] for i in range(n)]
    targets = [[math.exp(x) for x in py_log_softmax(r)] for r in sim]
    return (py_soft_ce(logits, targets) + py_soft_ce(py_transpose(logits), py_transpose(targets))) / 2


def py_kmeans(x, k, iters=10):
    k = min(k, len(x))
    centroids = [list(r) for r in x[:k]]
    for _ in range(iters):
        labels = [min(range(k), key=lambda j: sum((a - c) ** 2 for a, c in zip(p, centroids[j]))) for p in x]
        centroids = []
        for j in range(k):
            members = [p for p, l in zip(x, labels) if l == j]
            count = max(len(members), 1)              # an empty group keeps count 1
            centroids.append([sum(col) / count for col in zip(*members)] if members else [0.0] * len(x[0]))
    return labels, centroids


def py_instance_group_loss(image_z, gene_z, k, tau):
    zv, zg = py_normalise(image_z), py_normalise(gene_z)
    yg, mg = py_kmeans(zg, k)
    yv, mv = py_kmeans(zv, k)
    ce_v = [-py_log_softmax([py_dot(z, m) / tau for m in mg])[y] for z, y in zip(zv, yg)]
    ce_g = [-py_log_softmax([py_dot(z, m) / tau for m in mv])[y] for z, y in zip(zg, yv)]
    return (sum(ce_v) + sum(ce_g)) / (2 * len(zv))


# ---------------------------------------------------------------- helpers

def orthonormal_rows(n, d, seed):
    q, _ = torch.linalg.qr(torch.randn(d, n, generator=torch.Generator().manual_seed(seed)))
    return q.T.contiguous()                           # (n, d), rows orthonormal


def simplex(n, d, seed):
    """n unit vectors in R^d (d >= n) with pairwise cosine -1/(n-1): a rotated regular simplex."""
    e = torch.eye(n) - 1.0 / n                        # centred one-hot vectors
    e = e / e.norm(dim=1, keepdim=True)
    return e @ orthonormal_rows(n, d, seed)           # rotate into R^d


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- InfoNCE

@pytest.mark.parametrize("tau", [0.07, 0.5, 1.0])
def test_info_nce_identical_pairs_reach_the_analytic_minimum(tau):
    b = 8
    # Identical pairs on a regular simplex: positives at cosine 1, every negative at -1/(B-1), the
    # lowest mean cosine unit vectors allow; by convexity of exp this is the minimum of InfoNCE:
    # log(1 + (B-1)·exp(-B / ((B-1)·τ))).
    x = simplex(b, 16, seed=1)
    minimum = math.log1p((b - 1) * math.exp(-b / ((b - 1) * tau)))
    assert info_nce(x, x, tau).item() == pytest.approx(minimum, rel=1e-4, abs=1e-6)
    # Orthonormal identical pairs: negatives at cosine 0.
    e = orthonormal_rows(b, 16, seed=2)
    expected = math.log1p((b - 1) * math.exp(-1 / tau))
    assert info_nce(e, e, tau).item() == pytest.approx(expected, rel=1e-4, abs=1e-6)
    # Other identical pairs never beat the minimum, and random pairs are far worse.
    for seed in range(5):
        y = randn(b, 16, seed=seed)
        assert info_nce(y, y, tau).item() >= minimum - 1e-6
        assert info_nce(y, randn(b, 16, seed=seed + 100), tau).item() > info_nce(y, y, tau).item() + 0.1


def test_info_nce_of_random_pairs_at_tau_1_is_log_batch():
    # High-dimensional random vectors are nearly orthogonal: all logits ≈ 0, so each row is a uniform guess.
    b = 64
    loss = info_nce(randn(b, 4096, seed=0), randn(b, 4096, seed=1), tau=1.0)
    assert loss.item() == pytest.approx(math.log(b), abs=0.01)


def test_info_nce_is_symmetric_in_its_arguments():
    a, b = randn(10, 6, seed=0), randn(10, 6, seed=1)
    assert info_nce(a, b, 0.3).item() == pytest.approx(info_nce(b, a, 0.3).item(), rel=1e-6)


def test_info_nce_matches_python_loop():
    a, b = randn(7, 5, seed=3), randn(7, 5, seed=4)
    for tau in (0.07, 1.0):
        assert info_nce(a, b, tau).item() == pytest.approx(py_info_nce(a.tolist(), b.tolist(), tau), rel=1e-5)


# ---------------------------------------------------------------- soft InfoNCE

def test_soft_info_nce_matches_python_loop():
    image, gene = randn(6, 4, seed=5), randn(6, 4, seed=6)
    for tau in (0.07, 0.5, 1.0):
        expected = py_soft_info_nce(image.tolist(), gene.tolist(), tau)
        assert soft_info_nce(image, gene, tau).item() == pytest.approx(expected, rel=1e-5)


def test_soft_info_nce_equals_hard_when_within_modality_similarities_are_identity():
    # With v·vᵀ = g·gᵀ = I the target is T = softmax(I/τ) = (1 - Bε)·I + ε·(all ones), with
    # ε = 1/(e^(1/τ) + B - 1). CE_soft is linear in its target, so exactly
    #     soft = (1 - Bε)·hard + Bε·uniform,   uniform = the loss against the uniform target 1/B,
    # and soft = hard only as ε -> 0, i.e. τ -> 0 (at τ = 0.02, ε ≈ 2e-22: equal in float32).
    # The cross-modal logits g·vᵀ stay arbitrary: v and g are two unrelated orthonormal bases.
    b = 8
    v, g = orthonormal_rows(b, 12, seed=7), orthonormal_rows(b, 12, seed=8)
    assert torch.allclose(v @ v.T, torch.eye(b), atol=1e-5)
    assert torch.allclose(g @ g.T, torch.eye(b), atol=1e-5)
    assert soft_info_nce(v, g, 0.02).item() == pytest.approx(info_nce(g, v, 0.02).item(), rel=1e-6)
    for tau in (0.07, 0.3, 1.0):
        eps = 1 / (math.exp(1 / tau) + b - 1)
        logits, flat = g @ v.T / tau, torch.full((b, b), 1 / b)
        uniform = (losses.soft_cross_entropy(logits, flat) + losses.soft_cross_entropy(logits.T, flat)) / 2
        expected = (1 - b * eps) * info_nce(g, v, tau) + b * eps * uniform
        assert soft_info_nce(v, g, tau).item() == pytest.approx(expected.item(), rel=1e-5)


def test_soft_info_nce_is_swap_symmetric_exactly_when_targets_are_symmetric():
    # Image and gene enter T symmetrically, but the image->gene direction uses Tᵀ (BLEEP, METHOD.md),
    # so swapping the modalities leaves the loss unchanged when T = Tᵀ, e.g. when all within-modality
    # similarities off the diagonal are equal (orthonormal images, simplex genes) ...
    v, g = orthonormal_rows(6, 10, seed=9), simplex(6, 10, seed=10)
    for tau in (0.07, 1.0):
        assert soft_info_nce(v, g, tau).item() == pytest.approx(soft_info_nce(g, v, tau).item(), rel=1e-5)
    # ... and not in general, where T's columns do not sum to 1.
    a, b = randn(6, 3, seed=11), randn(6, 3, seed=12)
    assert abs(soft_info_nce(a, b, 1.0).item() - soft_info_nce(b, a, 1.0).item()) > 1e-4


def test_soft_info_nce_targets_carry_no_gradient():
    # The gradient is that of CE_soft(logits, T) with T a constant: compare with an explicit detached target.
    image, gene = randn(5, 4, seed=13).requires_grad_(), randn(5, 4, seed=14).requires_grad_()
    soft_info_nce(image, gene, 0.5).backward()
    image2, gene2 = image.detach().clone().requires_grad_(), gene.detach().clone().requires_grad_()
    v, g = torch.nn.functional.normalize(image2, dim=-1), torch.nn.functional.normalize(gene2, dim=-1)
    t = torch.softmax((v @ v.T + g @ g.T).detach() / 2 / 0.5, dim=-1)
    logits = g @ v.T / 0.5
    ((losses.soft_cross_entropy(logits, t) + losses.soft_cross_entropy(logits.T, t.T)) / 2).backward()
    assert torch.allclose(image.grad, image2.grad, atol=1e-6)
    assert torch.allclose(gene.grad, gene2.grad, atol=1e-6)


def test_multi_scale_instance_loss_is_the_mean_over_levels():
    gene = randn(6, 4, seed=15)
    levels = [randn(6, 4, seed=s) for s in (16, 17, 18)]
    expected = sum(py_soft_info_nce(v.tolist(), gene.tolist(), 0.07) for v in levels) / 3
    assert multi_scale_instance_loss(gene, levels, 0.07).item() == pytest.approx(expected, rel=1e-5)


# ---------------------------------------------------------------- k-means

def test_kmeans_matches_python_lloyd_loop():
    x = randn(30, 4, seed=19)
    for k in (3, 5):
        labels, centroids = kmeans(x, k)
        py_labels, py_centroids = py_kmeans(x.tolist(), k)
        assert labels.tolist() == py_labels
        assert torch.allclose(centroids, torch.tensor(py_centroids), atol=1e-5)


def test_kmeans_recovers_planted_clusters():
    # Four tight clusters far apart. Initialising from the first k rows needs one row of each
    # cluster among them (a shuffled training batch usually has it for k << B); here rows 0..3 do.
    centres = 10 * torch.eye(4, 8)
    truth = torch.cat([torch.arange(4), randn(36, seed=20).argsort() % 4])
    x = centres[truth] + 0.1 * randn(40, 8, seed=21)
    labels, centroids = kmeans(x, 4)
    same_truth, same_found = truth[:, None] == truth[None], labels[:, None] == labels[None]
    assert torch.equal(same_truth, same_found), "k-means should find the planted partition"
    assert torch.allclose(centroids[labels[:4].argsort()], centres, atol=0.1)  # label j found from row j


def test_kmeans_is_deterministic_clamps_k_and_survives_empty_groups():
    x = randn(50, 6, seed=22)
    first, again = kmeans(x, 7), kmeans(x.clone(), 7)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    # k above the batch size is clamped: every distinct point becomes its own group.
    labels, centroids = kmeans(x[:5], 18)
    assert centroids.shape == (5, 6) and labels.tolist() == [0, 1, 2, 3, 4]
    # Rows 0 and 1 equal: group 1 starts on top of group 0 and ties go to group 0, so after one round
    # group 1 is empty and its centroid is zero (count 1), not NaN. Later rounds may refill it.
    y = torch.cat([x[:1], x[:1], x[1:10]])
    labels, centroids = kmeans(y, 3, iters=1)
    assert (labels != 1).all() and torch.equal(centroids[1], torch.zeros(6))
    labels, centroids = kmeans(y, 3)
    assert centroids.isfinite().all() and labels.tolist() == py_kmeans(y.tolist(), 3)[0]


def test_kmeans_labels_are_constant_and_centroids_differentiable():
    x = randn(20, 4, seed=23).requires_grad_()
    labels, centroids = kmeans(x, 3)
    assert labels.dtype == torch.long and not labels.requires_grad
    centroids.sum().backward()
    # d(sum of the group means)/dx_i = 1/count of x_i's group, in every coordinate.
    counts = torch.bincount(labels, minlength=3).float()
    assert torch.allclose(x.grad, (1 / counts[labels])[:, None].expand(-1, 4))


# ---------------------------------------------------------------- instance-group

def test_instance_group_loss_matches_python_loop():
    image_z, gene_z = randn(24, 5, seed=24), randn(24, 5, seed=25)
    for k, tau in ((4, 0.07), (6, 0.5), (30, 0.07)):          # k = 30 is clamped to 24
        expected = py_instance_group_loss(image_z.tolist(), gene_z.tolist(), k, tau)
        assert instance_group_loss(image_z, gene_z, k, tau).item() == pytest.approx(expected, rel=1e-4)


def test_instance_group_loss_trains_both_sides():
    image_z, gene_z = randn(16, 8, seed=26).requires_grad_(), randn(16, 8, seed=27).requires_grad_()
    instance_group_loss(image_z, gene_z, k=4).backward()
    for grad in (image_z.grad, gene_z.grad):
        assert grad.isfinite().all() and grad.abs().sum() > 0


# ---------------------------------------------------------------- gene_dml_loss

def fake_output(b=12, d=8, g=5, seed=28, with_gene=True):
    t = [randn(b, d, seed=seed + i).requires_grad_() for i in range(6)]
    norm = torch.nn.functional.normalize
    return SimpleNamespace(
        embeddings={name: norm(x, dim=-1) for name, x in zip(("local", "neighbour", "global"), t)},
        image_cluster=norm(t[3], dim=-1),
        gene=norm(t[4], dim=-1) if with_gene else None,
        gene_cluster=norm(t[5], dim=-1) if with_gene else None,
        prediction=randn(b, g, seed=seed + 10).requires_grad_(),
    ), t


def test_gene_dml_loss_total_is_the_weighted_sum_of_its_parts():
    out, _ = fake_output()
    target = randn(12, 5, seed=40)
    total, parts = gene_dml_loss(out, target, k=3, lam=0.3, w_inst=2.0, w_mse=0.5)
    inst = multi_scale_instance_loss(out.gene, list(out.embeddings.values())).item()
    group = instance_group_loss(out.image_cluster, out.gene_cluster, 3).item()
    mse = torch.nn.functional.mse_loss(out.prediction, target).item()
    assert float(parts["inst"]) == pytest.approx(inst) and float(parts["group"]) == pytest.approx(group)
    assert float(parts["mse"]) == pytest.approx(mse)
    assert float(parts["total"]) == pytest.approx(total.item())
    assert total.item() == pytest.approx(2.0 * inst + 0.5 * mse + 0.3 * group)
    assert all(torch.is_tensor(v) and v.ndim == 0 and not v.requires_grad for v in parts.values())


def test_gene_dml_loss_skips_parts_with_zero_weight(monkeypatch):
    def must_not_run(*args, **kwargs):
        raise AssertionError("a part with weight 0 was computed")
    monkeypatch.setattr(losses, "multi_scale_instance_loss", must_not_run)
    monkeypatch.setattr(losses, "instance_group_loss", must_not_run)
    out, _ = fake_output(with_gene=False)             # regression only: no gene embedding needed
    target = randn(12, 5, seed=41)
    total, parts = gene_dml_loss(out, target, lam=0.0, w_inst=0.0)
    assert parts["inst"] == 0.0 and parts["group"] == 0.0
    assert total.item() == pytest.approx(torch.nn.functional.mse_loss(out.prediction, target).item())


def test_gene_dml_loss_explains_a_missing_gene_embedding_and_a_shape_mismatch():
    out, _ = fake_output(with_gene=False)
    with pytest.raises(ValueError, match="gene embedding"):
        gene_dml_loss(out, randn(12, 5, seed=42), w_inst=0.0)     # lam = 0.8 still needs it
    out, _ = fake_output()
    with pytest.raises(ValueError, match="shape"):
        gene_dml_loss(out, randn(12, 4, seed=43))


def test_gene_dml_loss_runs_in_float32_under_bf16_autocast():
    out, leaves = fake_output()
    target = randn(12, 5, seed=44)
    lin = torch.nn.Linear(8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        # Route every embedding through a Linear so it arrives in bf16, as from a mixed-precision model.
        out.embeddings = {name: lin(e) for name, e in out.embeddings.items()}
        out.gene, out.gene_cluster = lin(out.gene), lin(out.gene_cluster)
        out.image_cluster = lin(out.image_cluster)
        assert out.gene.dtype == torch.bfloat16
        total, parts = gene_dml_loss(out, target, k=3)
    assert total.dtype == torch.float32
    # Same bf16 inputs outside autocast: identical to float32 precision, so nothing inside ran in bf16.
    assert float(gene_dml_loss(out, target, k=3)[1]["total"]) == pytest.approx(float(parts["total"]), rel=1e-6)
    total.backward()
    grads = [t.grad for t in leaves] + [out.prediction.grad, lin.weight.grad]
    assert all(g is not None and g.isfinite().all() for g in grads)
