"""Tests of model.py: shapes, checkpoint loading, masking, permutation, caching, training step."""

import logging
import urllib.error
from itertools import combinations

import numpy as np
import pytest
import torch
import torchvision

from genedml import features as F_
import losses
import model as M
from genedml import packing as P
from genedml import trunk as T
from genedml.cache import ArrayCache

G, D = 12, 32  # tiny: 12 genes, width 32


def tiny_cfg(**kw):
    base = dict(n_genes=G, dim=D, neighbour_depth=1, neighbour_heads=2, global_depth=2, global_heads=2,
                head_hidden=48)
    return M.GeneDMLConfig(**{**base, **kw})


def make_batch(B=4, crop=64, seed=0):
    """Two sections (7 and 5 spots), B spots drawn from them, 25 neighbour features with a mask."""
    g = torch.Generator().manual_seed(seed)
    context = [(torch.randn(7, 512, generator=g), torch.tensor([[i % 3, i // 3] for i in range(7)])),
               (torch.randn(5, 512, generator=g), torch.tensor([[2 * i, 10 - i] for i in range(5)]))]
    mask = torch.rand(B, 25, generator=g) > 0.4
    mask[:, 12] = True  # the centre tile is always on the image
    return dict(local=torch.randint(0, 256, (B, 3, crop, crop), dtype=torch.uint8, generator=g),
                neighbour=torch.randn(B, 25, 512, generator=g), neighbour_mask=mask,
                section=torch.tensor([0, 1, 0, 1][:B]), index=torch.tensor([3, 4, 0, 1][:B]),
                context=context)


def outputs(out):
    """Every tensor of a GeneDMLOutput, by name."""
    d = {f"emb_{k}": v for k, v in out.embeddings.items()}
    d.update(image_cluster=out.image_cluster, prediction=out.prediction)
    if out.gene is not None:
        d.update(gene=out.gene, gene_cluster=out.gene_cluster)
    return d


# ----------------------------------------------------------------------------- trunk and weights
def test_trunk_shape_and_preprocess():
    trunk = T.build_trunk("none")
    assert trunk(torch.randn(2, 3, 64, 64)).shape == (2, 512, 2, 2)
    assert len(trunk.state_dict()) == 120  # torchvision's 122 less fc.weight, fc.bias
    x = torch.tensor([0, 255], dtype=torch.uint8).view(1, 1, 1, 2).expand(1, 3, 1, 2)
    y = T.preprocess(x)
    assert torch.allclose(y[0, 0, 0], torch.tensor([-0.485 / 0.229, (1 - 0.485) / 0.229]))
    with pytest.raises(AssertionError, match="uint8"):
        T.preprocess(x.float())


def assert_same_weights(trunk, reference):
    ref = reference.state_dict()
    for k, v in trunk.state_dict().items():
        assert torch.equal(v, ref[k]), k


def test_trunk_loads_torchvision_state_dict(tmp_path, caplog):
    ref = torchvision.models.resnet18(weights=None)
    torch.save(ref.state_dict(), tmp_path / "with_fc.pth")
    torch.save({k: v for k, v in ref.state_dict().items() if not k.startswith("fc.")}, tmp_path / "no_fc.pth")
    with caplog.at_level(logging.INFO, logger="genedml.trunk"):
        trunk = T.build_trunk(str(tmp_path / "with_fc.pth"))
    assert "loaded 120/120 tensors" in caplog.text and "dropped fc.bias, fc.weight" in caplog.text
    assert_same_weights(trunk, ref)
    assert_same_weights(T.build_trunk(str(tmp_path / "no_fc.pth")), ref)


def test_trunk_loads_ciga_checkpoint(tmp_path):
    """tenpercent_resnet18.ckpt: {"state_dict": {"model.resnet.<key>": ...}} with a SimCLR head under fc."""
    ref = torchvision.models.resnet18(weights=None)
    state = {f"model.resnet.{k}": v for k, v in ref.state_dict().items() if not k.startswith("fc.")}
    state["model.resnet.fc.0.weight"] = torch.randn(512, 512)
    state["model.resnet.fc.2.weight"] = torch.randn(128, 512)
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "tenpercent_resnet18.ckpt")
    assert_same_weights(T.build_trunk(str(tmp_path / "tenpercent_resnet18.ckpt")), ref)


def test_mismatching_checkpoint_is_refused(tmp_path):
    state = torchvision.models.resnet34(weights=None).state_dict()  # extra blocks: layer1.2, ...
    torch.save(state, tmp_path / "r34.pth")
    with pytest.raises(ValueError, match=r"r34\.pth.*unexpected .*layer1\.2"):
        T.build_trunk(str(tmp_path / "r34.pth"))
    state = torchvision.models.resnet18(weights=None).state_dict()
    state["layer9.weight"] = state.pop("layer4.1.bn2.weight")
    torch.save(state, tmp_path / "renamed.pth")
    with pytest.raises(ValueError, match=r"renamed\.pth.*missing 1: layer4\.1\.bn2\.weight"):
        T.build_trunk(str(tmp_path / "renamed.pth"))
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        T.build_trunk(str(tmp_path / "nope.pth"))


def test_imagenet_offline_is_a_clear_error_and_hub_cache_works(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty torch hub cache

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    # a FileNotFoundError, one of the errors train.py prints as one line, saying how to pass a local file
    with pytest.raises(FileNotFoundError, match="could not download .* ImageNet.*Offline.*--weights PATH"):
        T.build_trunk("imagenet")
    url = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url
    cached = tmp_path / "hub" / "checkpoints" / url.rsplit("/", 1)[1]
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_bytes(b"half a download")  # a cached file torch cannot read: named, with what to do
    with pytest.raises(ValueError, match=f"{cached}: the cached ImageNet .* cannot be read.*delete the file"):
        T.build_trunk("imagenet")
    # the same file already in the hub cache is used without the network
    ref = torchvision.models.resnet18(weights=None)
    torch.save(ref.state_dict(), cached)
    assert_same_weights(T.build_trunk("imagenet", progress=False), ref)


# ----------------------------------------------------------------------------- modules
def test_module_shapes():
    cfg = tiny_cfg()
    bias = M.RelativePositionBias(5, heads=2)()
    assert bias.shape == (2, 25, 25)
    assert not bias.any()  # it starts as plain attention
    with torch.no_grad():
        bias_module = M.RelativePositionBias(5, heads=2)
        bias_module.table.copy_(torch.randn(2, 25))
    bias = bias_module()
    # pairs at the same distance share a bias, in any direction: (0,0)->(1,1) is (1,1) like (2,3)->(1,2)
    assert torch.equal(bias[:, 0, 6], bias[:, 13, 7]) and torch.equal(bias[:, 0, 6], bias[:, 6, 0])
    assert not torch.equal(bias[:, 0, 6], bias[:, 0, 1])  # (1,1) is not (0,1)
    assert bias_module.table.shape == (2, 25)
    b = make_batch()
    assert M.LocalEncoder()(b["local"]).shape == (4, 4, 512)  # 64 px -> 2x2 map -> 4 tokens
    assert M.NeighbourEncoder(cfg)(b["neighbour"], b["neighbour_mask"]).shape == (4, 25, D)
    context = P.GlobalContext.of(b["context"])
    layout = context.grids.layout(b["section"], b["index"])
    n_tok = len(layout.tokens)
    assert n_tok == 12 and layout.pad.shape == (2, 7) and layout.query.shape == (2, 2)  # both sections, 7 + 5 spots
    assert M.PEG(D).packed(torch.randn(n_tok, D), layout.cell, 2, context.grids.grid).shape == (n_tok, D)
    assert M.GlobalEncoder(cfg).packed(context.feats[layout.tokens], layout, context.grids.grid).shape == (4, D)
    feats, xy = b["context"][0]
    assert M.PEG(D)(torch.randn(len(xy), D), xy).shape == (len(xy), D)  # one section on its own grid
    assert M.GlobalEncoder(cfg)(feats, xy, torch.tensor([0, 3, 3])).shape == (3, D)
    g = M.GeneEncoder(cfg)(torch.rand(4, G))
    assert g.shape == (4, D) and torch.allclose(g.norm(dim=-1), torch.ones(4))
    fusion = M.Fusion(cfg, {"local": 512, "global": D})
    ones = torch.ones(4, 5, dtype=torch.bool)
    pooled, mean = fusion({"local": torch.randn(4, 4, 512), "global": torch.randn(4, 1, D)},
                          {"local": ones[:, :4], "global": ones[:, :1]})
    assert set(pooled) == {"local", "global"} and pooled["local"].shape == mean.shape == (4, D)


@pytest.mark.parametrize("levels", [c for r in (1, 2, 3) for c in combinations(M.LEVELS, r)])
def test_gene_dml_every_level_subset(levels):
    torch.manual_seed(0)
    net = M.GeneDML(tiny_cfg(levels=levels)).eval()
    b = make_batch()
    for level, key in (("local", "local"), ("neighbour", "neighbour"), ("global", "context")):
        if level not in levels:  # a disabled level builds nothing and accepts None
            assert getattr(net, f"{level}_encoder") is None
            b[key] = None
    out = net(**b, expression=torch.rand(4, G))
    assert list(out.embeddings) == list(levels)
    for name, t in outputs(out).items():
        assert t.shape == ((4, G) if name == "prediction" else (4, D)), name
        assert torch.isfinite(t).all(), name
    for t in [*out.embeddings.values(), out.image_cluster, out.gene, out.gene_cluster]:
        assert torch.allclose(t.norm(dim=-1), torch.ones(4), atol=1e-5)
    assert net(**b).gene is None  # no expression at inference: image side only


def test_levels_are_checked_and_local_trunk_starts_from_given_weights():
    with pytest.raises(AssertionError, match="non-empty subset"):
        M.GeneDML(tiny_cfg(levels=("local", "neighbor")))
    with pytest.raises(AssertionError, match="non-empty subset"):
        M.GeneDML(tiny_cfg(levels=()))
    frozen = T.build_trunk("none")
    net = M.GeneDML(tiny_cfg(levels=("local",)))
    net.load_trunk_weights(frozen.state_dict())
    assert_same_weights(net.local_encoder.trunk, frozen)
    with torch.no_grad():  # a copy: training the local trunk leaves the frozen one alone
        next(net.local_encoder.trunk.parameters()).add_(1.0)
    assert not torch.equal(next(frozen.parameters()), next(net.local_encoder.trunk.parameters()))
    M.GeneDML(tiny_cfg(levels=("global",))).load_trunk_weights(frozen.state_dict())  # no local trunk: no-op


def test_masked_neighbour_tile_cannot_change_the_output():
    torch.manual_seed(0)
    net = M.GeneDML(tiny_cfg()).eval()
    b = make_batch()
    before = outputs(net(**b))
    masked = ~b["neighbour_mask"]
    assert masked.any()
    b["neighbour"] = b["neighbour"].clone()
    b["neighbour"][masked] = 100 * torch.randn(int(masked.sum()), 512)
    for name, t in outputs(net(**b)).items():
        assert torch.allclose(t, before[name], atol=1e-5), name
    b["neighbour"][~masked] += 1.0  # control: an on-image tile does matter
    assert not torch.allclose(net(**b).prediction, before["prediction"], atol=1e-5)


def test_spot_order_in_a_section_does_not_change_global_output():
    torch.manual_seed(0)
    net = M.GeneDML(tiny_cfg()).eval()
    b = make_batch()
    before = net(**b).embeddings["global"]
    perms = [torch.randperm(7), torch.randperm(5)]
    b["context"] = [(f[p], xy[p]) for (f, xy), p in zip(b["context"], perms)]
    # old row r now sits at new row where(p == r)
    b["index"] = torch.stack([(perms[s] == r).nonzero()[0, 0] for s, r in zip(b["section"], b["index"])])
    assert torch.allclose(net(**b).embeddings["global"], before, atol=1e-5)


@pytest.mark.parametrize("padded", [True, False], ids=["one padded call (GPU)", "a call per section (CPU)"])
@pytest.mark.parametrize("depth", [1, 3])
def test_batched_global_level_equals_each_section_on_its_own(depth, padded, monkeypatch):
    """model.GlobalEncoder.packed is GlobalEncoder.forward batched: four sections of different sizes and grid
    shapes, a batch that visits three of them unevenly (one spot twice); the packed pass gives each spot its
    section's row of the one-section definition, values and gradients, with the attention as the GPU runs it
    (one padded, masked call) and as the CPU runs it (section by section)."""
    monkeypatch.setattr(P, "PADDED_ON", ("cpu", "cuda") if padded else ())
    torch.manual_seed(0)
    net = M.GeneDML(tiny_cfg(levels=("global",), global_depth=depth)).eval()
    rng = np.random.default_rng(0)
    context = []
    for n, (w, h) in zip((9, 4, 13, 6), ((4, 3), (2, 5), (6, 6), (3, 2))):
        cells = rng.permutation(w * h)[:n]
        context.append((torch.randn(n, 512), torch.as_tensor(np.stack([cells % w, cells // w], 1) + 3 * n)))
    section, index = torch.tensor([2, 0, 2, 2, 3, 0, 2]), torch.tensor([12, 8, 0, 5, 1, 0, 12])
    got = net.global_tokens(section, index, context)
    want = torch.cat([net.global_encoder((f - net.feat_mean) / net.feat_std, xy, torch.tensor([r]))
                      for (f, xy), r in ((context[s], r) for s, r in zip(section.tolist(), index.tolist()))])
    assert torch.allclose(got, want, atol=1e-5)
    weights = torch.randn_like(got)
    grads = []
    for out in (got, want):
        net.zero_grad()
        (out * weights).sum().backward(retain_graph=True)
        grads.append({n: p.grad.clone() for n, p in net.global_encoder.named_parameters()})
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-5, rtol=1e-4), name


def test_a_batch_from_several_sections_runs_the_global_encoder_once():
    torch.manual_seed(0)
    net = M.GeneDML(tiny_cfg()).eval()
    b = make_batch()
    assert len(set(b["section"].tolist())) == 2
    calls, packed = [], net.global_encoder.packed
    net.global_encoder.packed = lambda *a: calls.append(1) or packed(*a)
    net(**b)
    assert len(calls) == 1  # one packed pass for both sections


def test_global_layout_is_checked_when_it_is_built():
    grids = P.SpotGrids.of([np.array([[0, 0], [1, 0]]), np.array([[0, 0]])])
    with pytest.raises(AssertionError, match="index outside"):
        grids.layout(np.array([1]), np.array([1]))  # section 1 has one spot
    with pytest.raises(AssertionError, match="section outside"):
        grids.layout(np.array([2]), np.array([0]))
    with pytest.raises(AssertionError, match="share an array position"):
        P.SpotGrids.of([np.array([[0, 0], [0, 0]])])


def test_optimiser_step_changes_trainable_not_frozen():
    torch.manual_seed(0)
    frozen = T.build_trunk("none").requires_grad_(False)
    frozen_before = {k: v.clone() for k, v in frozen.state_dict().items()}
    feats = F_.extract_features(frozen, FakeCrops(n=2), progress=False)  # must not touch BN statistics
    net = M.GeneDML(tiny_cfg()).train()
    b = make_batch()
    b["neighbour"] = torch.from_numpy(np.concatenate([feats["tiles"], feats["tiles"]]))
    b["neighbour_mask"] = torch.from_numpy(np.concatenate([feats["tiles"].any(-1)] * 2))
    trainable = {n: p.detach().clone() for n, p in net.named_parameters()}
    assert all(p.requires_grad for p in net.parameters())  # GeneDML holds no frozen part
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    out = net(**b, expression=torch.rand(4, G))
    loss = sum((t * torch.randn_like(t)).sum() for t in outputs(out).values())
    loss.backward()
    opt.step()
    for n, p in net.named_parameters():
        assert not torch.equal(p, trainable[n]), f"{n} did not change"
    for k, v in frozen.state_dict().items():
        assert torch.equal(v, frozen_before[k]), f"frozen {k} changed"


def test_bf16_autocast_gradients_are_finite():
    torch.manual_seed(0)
    net = M.GeneDML(tiny_cfg()).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(**make_batch(), expression=torch.rand(4, G))
        loss = out.prediction.float().pow(2).mean() - (out.gene * out.embeddings["local"]).sum() \
            - (out.image_cluster * out.gene_cluster).sum()
    loss.backward()
    grads = [p.grad for p in net.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_for_cohort():
    cfg = M.GeneDMLConfig.for_cohort("her2st", 250)
    assert (cfg.neighbour_depth, cfg.neighbour_heads, cfg.global_depth, cfg.global_heads) == (4, 4, 5, 8)
    assert M.GeneDMLConfig.for_cohort("cscc", 50, dim=64).global_heads == 16
    with pytest.raises(AssertionError, match="unknown cohort"):
        M.GeneDMLConfig.for_cohort("mouse", 250)


# ----------------------------------------------------------------------------- frozen features
class FakeCrops:
    """The SectionCrops interface: .local (N,c,c,3) uint8, .tiles(i), .key."""

    def __init__(self, n=3, c=32, seed=0):
        rng = np.random.default_rng(seed)
        self.local = rng.integers(0, 256, (n, c, c, 3), dtype=np.uint8)
        self._tiles = rng.integers(0, 256, (n, 25, c, c, 3), dtype=np.uint8)
        self._tiles[:, 12] = self.local  # the centre tile is the local crop
        self._mask = rng.random((n, 25)) > 0.5
        self._mask[:, 12] = True
        self.crop_size, self.key = c, {"fake": seed}

    def tiles(self, i):
        return self._tiles[i], self._mask[i]


def test_extract_features_shapes_zeros_and_parity():
    torch.manual_seed(0)
    trunk, crops = T.build_trunk("none"), FakeCrops()
    f = F_.extract_features(trunk, crops, batch_size=5, progress=False)  # batches span spots
    assert f["local"].shape == (3, 512) and f["tiles"].shape == (3, 25, 512)
    assert f["local"].dtype == f["tiles"].dtype == np.float32
    assert (f["tiles"][~crops._mask] == 0).all() and (np.abs(f["tiles"][crops._mask]).sum(-1) > 0).all()
    with torch.no_grad():  # one crop on its own
        x = torch.from_numpy(crops._tiles[1, 7]).permute(2, 0, 1)[None]
        alone = trunk.eval()(T.preprocess(x)).mean(dim=(2, 3))[0].numpy()
    if crops._mask[1, 7]:
        np.testing.assert_allclose(f["tiles"][1, 7], alone, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(f["tiles"][:, 12], f["local"], rtol=1e-4, atol=1e-5)


def test_section_features_builds_once(tmp_path, monkeypatch):
    calls = []
    real = F_.extract_features
    monkeypatch.setattr(F_, "extract_features", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    trunk, crops, cache = T.build_trunk("none"), FakeCrops(n=2), ArrayCache(tmp_path)
    first = F_.section_features(trunk, "none", crops, cache, "demo-A1-features", progress=False)
    second = F_.section_features(trunk, "none", crops, cache, "demo-A1-features", progress=False)
    assert len(calls) == 1
    np.testing.assert_array_equal(first["tiles"], second["tiles"])
    F_.section_features(trunk, "imagenet", crops, cache, "demo-A1-features", progress=False)
    assert len(calls) == 2  # other weights -> other features


def test_statistics_start_spots_apart_and_predictions_at_the_mean():
    # Positive, un-centred expression (every gene's log expression is > 0): without statistics the gene
    # embeddings of different spots are nearly parallel; with them they start apart, and an untrained
    # model's prediction is close to the training mean rather than to zero.
    torch.manual_seed(0)
    b = make_batch()
    expr = 3 + 0.2 * torch.randn(4, G)
    mean_cos = lambda g: (g @ g.T)[~torch.eye(len(g), dtype=torch.bool)].mean().item()
    m = M.GeneDML(tiny_cfg()).eval()
    with torch.no_grad():
        before = m(b["local"], b["neighbour"], b["neighbour_mask"], b["section"], b["index"], b["context"], expr)
        m.set_statistics(expr, torch.cat([f for f, _ in b["context"]]))
        after = m(b["local"], b["neighbour"], b["neighbour_mask"], b["section"], b["index"], b["context"], expr)
    assert mean_cos(before.gene) > 0.9
    assert mean_cos(after.gene) < 0.5
    assert torch.allclose(m.expr_mean, expr.mean(0)) and torch.allclose(m.expr_std, expr.std(0))
    err_before = (before.prediction - expr.mean(0)).abs().mean()
    err_after = (after.prediction - expr.mean(0)).abs().mean()
    assert err_after < 0.5 * err_before
    assert "expr_mean" in m.state_dict() and "feat_std" in m.state_dict()  # saved with the weights


@pytest.mark.parametrize("mode", ["trainable", "frozen", "online"])
def test_a_training_step_makes_no_tensor_from_python_data(mode, monkeypatch):
    """On CUDA a tensor made from Python data (torch.tensor, as_tensor) inside forward is a blocking
    host-to-device copy: a sync in every step. The step (forward, loss) makes none: constants live in
    buffers. The layout and context are built ahead, as the loader builds them."""
    torch.manual_seed(0)
    frozen = mode != "trainable"
    cfg = tiny_cfg(local_encoder="frozen" if frozen else "trainable",
                   frozen_tokens="online" if mode == "online" else "cached")
    net = M.GeneDML(cfg).train()
    encoder = None
    if mode == "online":  # the training step runs the frozen encoder on the crops, then the model
        from genedml.encoders import as_encoder
        encoder = as_encoder(T.build_trunk("none"))
    b = make_batch(crop=32)
    context = P.GlobalContext.of(b.pop("context"))
    layout = context.grids.layout(b["section"].numpy(), b["index"].numpy())
    if mode == "frozen":
        b["local"] = torch.randn(4, 1, 512)
    label = torch.rand(4, G)
    made = []
    for name in ("tensor", "as_tensor"):
        original = getattr(torch, name)
        monkeypatch.setattr(torch, name, lambda *a, _o=original, _n=name, **kw: (made.append(_n), _o(*a, **kw))[1])
    if encoder is not None:
        b["local"] = encoder.tokens(b["local"]).flatten(1, 2)
    out = net(**b, context=context, expression=label, layout=layout)
    loss, _ = losses.gene_dml_loss(out, label, k=2)
    assert made == [], f"the step made tensors from Python data: {made}"
    loss.backward()


@pytest.mark.parametrize("padded", [True, False], ids=["one padded call (GPU)", "a call per section (CPU)"])
def test_bucketed_layouts_leave_the_global_level_unchanged(padded, monkeypatch):
    """Padding a step's sizes to buckets (spare sections, slots, queries and tokens, for reusable
    compiled graphs) changes no value and no gradient of the global level."""
    monkeypatch.setattr(P, "PADDED_ON", ("cpu", "cuda") if padded else ())
    torch.manual_seed(0)
    net = M.GeneDML(tiny_cfg(levels=("global",), global_depth=3)).eval()
    rng = np.random.default_rng(1)
    sizes = (9, 4, 13, 6, 11, 7, 10, 5, 12)
    context = P.GlobalContext.of([(torch.randn(n, 512), torch.as_tensor(np.stack([np.arange(n) % 4, np.arange(n) // 4], 1)))
                                  for n in sizes])
    section = torch.as_tensor(rng.choice([0, 2, 3, 4, 5, 6, 8], 11))  # 7 of the 9 sections
    index = torch.as_tensor([int(rng.integers(sizes[s])) for s in section.tolist()])
    plain = context.grids.layout(section, index)
    padded_layout = context.grids.layout(section, index, buckets=True)
    S, T = plain.pad.shape[0], len(plain.tokens)
    assert padded_layout.pad.shape[0] > S and len(padded_layout.tokens) > T  # spare sections and tokens
    assert padded_layout.query.shape[1] >= plain.query.shape[1] and padded_layout.pad.shape[1] >= plain.pad.shape[1]
    assert padded_layout.key_mask.any(1).all()  # every section has a key: an all-masked attention row is NaN on a GPU
    weights = torch.randn(len(section), D)
    got = []
    for layout in (plain, padded_layout):
        net.zero_grad()
        out = net.global_tokens(section, index, context, layout)
        (out * weights).sum().backward()
        got.append((out.detach(), {n: p.grad.clone() for n, p in net.global_encoder.named_parameters()}))
    assert torch.allclose(got[0][0], got[1][0], atol=1e-5)
    for name in got[0][1]:
        assert torch.allclose(got[0][1][name], got[1][1][name], atol=1e-5, rtol=1e-4), name


def test_bucketed_layouts_of_a_her2st_fold_take_a_few_shapes():
    """60 batches of 256 from a her2st-sized fold (24 sections, 9,866 spots): the plain layouts take many
    shapes (a compiled step would compile or capture each), the bucketed ones at most two."""
    from experiments.fold_benchmark import grid_xy, section_sizes
    sizes = section_sizes(24, 9866)
    grids = P.SpotGrids.of([grid_xy(n) for n in sizes])
    rows = np.concatenate([np.stack([np.full(n, k), np.arange(n)], 1) for k, n in enumerate(sizes)])
    rng, shapes = np.random.default_rng(0), {False: set(), True: set()}
    for _ in range(60):
        b = rows[rng.choice(len(rows), 256, replace=False)]
        for buckets in shapes:
            layout = grids.layout(b[:, 0], b[:, 1], buckets)
            shapes[buckets].add((tuple(layout.pad.shape), tuple(layout.query.shape), len(layout.tokens)))
    assert len(shapes[True]) <= 2 < 8 < len(shapes[False])


def test_buckets_are_few_and_never_smaller():
    assert [P.bucket(x) for x in (1, 5, 8, 9, 19, 21, 25, 712, 9000)] == [1, 5, 8, 10, 20, 24, 28, 768, 10240]
    assert {P.bucket(x) for x in range(19, 26)} == {20, 24, 28} and all(P.bucket(x) >= x for x in range(1, 5000))


def test_a_compiled_step_agrees_with_the_eager_step():
    """--compile (runtime.compile_step) on a bucketed layout: the eager step's loss and gradients. The
    graphs are captured as inductor receives them (dynamo, then AOTAutograd) and run by the aot_eager
    backend: inductor's C++ build of even this tiny step took 386 s on this project's 2-core test
    machine. Dropout off: a compiled graph draws its own random masks."""
    if not torch._dynamo.is_dynamo_supported():
        pytest.skip("torch.compile is not supported on this Python / platform")
    from genedml import runtime
    torch.manual_seed(0)
    net = M.GeneDML(tiny_cfg(local_encoder="frozen")).train()
    for m in net.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    b = make_batch()
    b["local"] = torch.randn(4, 3, 512)
    context = P.GlobalContext.of(b.pop("context"))
    layout = context.grids.layout(b["section"].numpy(), b["index"].numpy(), buckets=True)
    label = torch.rand(4, G)
    compiled = runtime.compile_step(net, losses.gene_dml_loss, backend="aot_eager")
    got = []
    for model, loss_fn in ((net, losses.gene_dml_loss), compiled):
        net.zero_grad()
        loss, _ = loss_fn(model(**b, context=context, expression=label, layout=layout), label, k=2)
        loss.backward()
        got.append((loss.detach(), {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}))
    assert torch.allclose(got[0][0], got[1][0], atol=1e-5) and got[0][1].keys() == got[1][1].keys()
    for name in got[0][1]:
        assert torch.allclose(got[0][1][name], got[1][1][name], atol=1e-5, rtol=1e-4), name
