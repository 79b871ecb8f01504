"""The frozen encoders (encoders.py, train.py --encoder): each named entry against its published
architecture on the meta device, strict weight loading, the online frozen local level, and a tiny
UNI-shaped ViT end to end (train, evaluate, predict, external) through the path UNI's weights take.

Published facts used (none of the gated weights is downloaded):
  - timm.create_model arguments: the model cards of UNI (MahmoodLab/UNI), UNI2-h (MahmoodLab/UNI2-h),
    H-optimus-0 (bioptimus/H-optimus-0), Virchow2 (paige-ai/Virchow2), Prov-GigaPath
    (prov-gigapath/prov-gigapath), as TRIDENT's trident/patch_encoder_models/load.py writes them; each
    of those loaders reads the published file with load_state_dict(strict=True), so the published
    key names and shapes are exactly those of the model those arguments build;
  - parameter counts: UNI 303M (model card), UNI2-h 681M (UNI README), Virchow2 632M (arXiv 2408.00738),
    H-optimus-0 1.1B (model card), Prov-GigaPath's tile encoder 1.1B (Xu et al., Nature 2024);
  - widths, patch sizes and register tokens: the same model cards (UNI 1024, /16; UNI2-h 1536, /14,
    8 registers; H-optimus-0 1536, /14, 4 registers; Virchow2 1280, /14, 4 registers, tile feature
    CLS ++ mean patch token = 2560; Prov-GigaPath 1536, /16);
  - transforms: the model cards' torchvision pipelines (PUBLISHED_TRANSFORMS), and for timm:<model>
    timm's own create_transform of the model's pretrained config;
  - resolution: all five run at 20x, 0.5 µm/px, 224 px (TRIDENT runs each at --mag 20);
    Prov-GigaPath's 224 px are the centre of a 256 px tile.
"""
import contextlib
import dataclasses
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from torchvision import transforms as T

from genedml import cohorts
import data
from genedml import encoders
import evaluate
from genedml import features
import train
from genedml.cache import ArrayCache
from genedml.crops import at_field_of_view, section_crops
from model import GeneDML, GeneDMLConfig
from test_train import cache_dir, demo_root, eval_argv, load, train_argv  # noqa: F401

timm = pytest.importorskip("timm")

# UNI's entry with a tiny trunk: depth 2, width 64, 32-px input in 8-px patches (4 x 4 patch tokens), at
# 2 µm/px: its crops span 64 µm, so the demo's 32-px crops (2.74 µm/px, 88 µm) are cut from images resampled 1.37x
TINY = dataclasses.replace(encoders.ENCODERS["uni"], name="tiny-uni", input_size=32, width=64, hub=None, um_per_px=2.0,
                           kwargs=dict(encoders.ENCODERS["uni"].kwargs, depth=2, embed_dim=64, num_heads=2,
                                       img_size=32, patch_size=8))

# The published arguments, written out independently of the registry (TRIDENT's loaders), and facts
# from the model cards: (params in millions, tolerance, width, patch, registers, tile feature width).
PUBLISHED = {
    "uni": ("vit_large_patch16_224", dict(img_size=224, patch_size=16, init_values=1e-5, num_classes=0,
                                          dynamic_img_size=True), (303, .01, 1024, 16, 0, 1024)),
    "uni2-h": ("vit_giant_patch14_224", dict(img_size=224, patch_size=14, depth=24, num_heads=24, init_values=1e-5,
                                             embed_dim=1536, mlp_ratio=2.66667 * 2, num_classes=0, no_embed_class=True,
                                             mlp_layer="SwiGLUPacked", act_layer=torch.nn.SiLU, reg_tokens=8,
                                             dynamic_img_size=True), (681, .01, 1536, 14, 8, 1536)),
    "h-optimus-0": ("vit_giant_patch14_reg4_dinov2", dict(num_classes=0, img_size=224, global_pool="token",
                                                          init_values=1e-5, dynamic_img_size=False),
                    (1100, .05, 1536, 14, 4, 1536)),
    "virchow2": ("vit_huge_patch14_224", dict(img_size=224, init_values=1e-5, num_classes=0, reg_tokens=4,
                                              mlp_ratio=5.3375, global_pool="", dynamic_img_size=True,
                                              mlp_layer="SwiGLUPacked", act_layer=torch.nn.SiLU),
                 (632, .01, 1280, 14, 4, 2560)),
    "gigapath": ("vit_giant_patch14_dinov2", dict(img_size=224, in_chans=3, patch_size=16, embed_dim=1536, depth=40,
                                                  num_heads=24, mlp_ratio=5.33334, num_classes=0, dynamic_img_size=True),
                 (1100, .05, 1536, 16, 0, 1536)),
}


@pytest.fixture
def tiny(monkeypatch):
    monkeypatch.setitem(encoders.ENCODERS, "tiny-uni", TINY)
    return TINY


def tiny_weights(path, seed=0):
    """A tiny UNI-shaped ViT's state dict saved as UNI's is (a plain pytorch_model.bin)."""
    torch.manual_seed(seed)
    state = encoders.build_net(TINY).state_dict()
    torch.save(state, path)
    return state


# ----------------------------------------------------------------------------- the published architectures

@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_named_entry_builds_the_published_architecture_on_meta(name):
    arch, kwargs, (params_m, tol, width, patch, registers, feature_dim) = PUBLISHED[name]
    spec = encoders.ENCODERS[name]
    net = encoders.build_net(spec, "meta")
    kwargs = {k: getattr(timm.layers, v) if k == "mlp_layer" else v for k, v in kwargs.items()}
    with torch.device("meta"):
        published = timm.create_model(arch, pretrained=False, **kwargs)
    ours, theirs = net.state_dict(), published.state_dict()
    assert list(ours) == list(theirs), f"{name}: key names differ from the published loader's"
    assert all(ours[k].shape == theirs[k].shape for k in ours), f"{name}: shapes differ"
    n = sum(p.numel() for p in net.parameters()) / 1e6
    assert abs(n - params_m) <= tol * params_m, f"{name}: {n:.1f}M parameters, published {params_m}M"
    assert net.embed_dim == width and net.patch_embed.patch_size == (patch, patch)
    assert net.num_prefix_tokens == 1 + registers and ours["cls_token"].shape == (1, 1, width)
    assert ("reg_token" in ours) == (registers > 0)
    assert net.dynamic_img_size == kwargs.get("dynamic_img_size", False), f"{name}: dynamic_img_size as published"
    # on the meta device the encoder's outputs have their shapes without any compute
    enc = encoders.FrozenEncoder(spec, net, {"id": "meta"}).to("meta")
    crops = torch.zeros(2, 3, 224, 224, dtype=torch.uint8, device="meta")
    side = 224 // patch
    assert enc.tokens(crops).shape == (2, side, side, width)
    assert enc.features(crops).shape == (2, feature_dim) and enc.feature_dim == feature_dim


def test_h_optimus_0_normalises_with_its_own_statistics():
    spec = encoders.ENCODERS["h-optimus-0"]
    assert spec.mean == (0.707223, 0.578729, 0.703617) and spec.std == (0.211883, 0.230117, 0.177517)
    assert all(encoders.ENCODERS[n].mean == (0.485, 0.456, 0.406) for n in ("uni", "uni2-h", "virchow2", "gigapath"))


BICUBIC = T.InterpolationMode.BICUBIC
# The model cards' transforms of a tile (PIL image), written out independently of the registry
PUBLISHED_TRANSFORMS = {
    "uni": lambda m, s: T.Compose([T.Resize(224), T.CenterCrop(224), T.ToTensor(), T.Normalize(m, s)]),
    "uni2-h": lambda m, s: T.Compose([T.Resize(224), T.CenterCrop(224), T.ToTensor(), T.Normalize(m, s)]),
    "h-optimus-0": lambda m, s: T.Compose([T.Resize(224), T.ToTensor(), T.Normalize(m, s)]),  # TRIDENT's
    "virchow2": lambda m, s: T.Compose([T.Resize(224, interpolation=BICUBIC), T.CenterCrop(224), T.ToTensor(),
                                        T.Normalize(m, s)]),  # timm create_transform: bicubic, crop_pct 1
    "gigapath": lambda m, s: T.Compose([T.Resize(256, interpolation=BICUBIC), T.CenterCrop(224), T.ToTensor(),
                                        T.Normalize(m, s)]),
}


def tissue_like(n, seed=0):
    """(n, n, 3) uint8: a smooth colour field with fine noise, so the interpolation and geometry show."""
    y, x = np.mgrid[0:n, 0:n] / n
    base = np.stack([np.sin(7 * x + 3 * y), np.cos(5 * y - 2 * x), np.sin(9 * x * y)], -1) * 60 + 128
    return np.clip(base + np.random.default_rng(seed).normal(0, 25, (n, n, 3)), 0, 255).astype(np.uint8)


def assert_same_transform(enc, published, size):
    """enc.preprocess of a uint8 crop equals the published PIL transform, to within the 1 grey level by
    which torchvision's tensor resize and PIL's round differently (in uint8 levels of the input)."""
    from PIL import Image
    im = tissue_like(size)
    want = published(Image.fromarray(im))
    got = enc.preprocess(torch.from_numpy(im).permute(2, 0, 1)[None])[0]
    assert got.shape == want.shape
    levels = ((got - want).abs() * torch.tensor(enc.spec.std).view(3, 1, 1) * 255).flatten()
    assert levels.mean() < 0.5 and levels.quantile(0.99) <= 1.01, \
        f"{enc.spec.name} at {size} px: {levels.mean():.2f} levels on average, 99th percentile {levels.quantile(0.99):.2f}"


@pytest.mark.parametrize("name", sorted(PUBLISHED_TRANSFORMS))
def test_named_entries_preprocess_as_their_published_transform(name):
    spec = encoders.ENCODERS[name]
    enc = encoders.FrozenEncoder(spec, encoders.build_net(spec, "meta"), {"id": "meta"})
    for size in (160, 300):  # crops smaller and larger than the input: resized up and down
        assert_same_transform(enc, PUBLISHED_TRANSFORMS[name](spec.mean, spec.std), size)


def test_timm_entries_preprocess_as_timm_transform():
    """timm:<model> honours its config's interpolation and crop (vit_small_patch16_224: bicubic, crop_pct 0.9)."""
    from timm.data import create_transform, resolve_data_config
    spec = encoders.resolve_spec("timm:vit_small_patch16_224,depth=1")
    cfg = resolve_data_config(pretrained_cfg=timm.models.get_pretrained_cfg("vit_small_patch16_224").to_dict())
    assert (spec.resize, spec.interpolation) == (248, "bicubic") and cfg["crop_pct"] == 0.9
    enc = encoders.FrozenEncoder(spec, encoders.build_net(spec, "meta"), {"id": "meta"})
    for size in (160, 300):
        assert_same_transform(enc, create_transform(**cfg), size)


def test_gigapath_runs_in_float32_without_autocast():
    spec = encoders.ENCODERS["gigapath"]
    enc = encoders.FrozenEncoder(spec, encoders.build_net(spec, "meta"), {"id": "meta"})
    assert spec.precision == "float32" and enc.precision("cuda") == "float32"
    assert isinstance(enc.autocast(torch.device("cuda")), contextlib.nullcontext)
    assert enc.cache_key("cuda")["precision"] == "float32"


def test_the_cache_key_names_the_transform_and_the_resnet18_key_is_unchanged(tiny):
    keys = {}
    for name in ("uni", "virchow2", "gigapath"):
        spec = encoders.ENCODERS[name]
        keys[name] = encoders.FrozenEncoder(spec, encoders.build_net(spec, "meta"), {"id": "w"}).cache_key("cpu")
    assert keys["gigapath"]["resize"] == 256 and keys["virchow2"]["interpolation"] == "bicubic"
    assert keys["uni"]["interpolation"] == "bilinear" and keys["uni"]["resize"] is None
    resnet = encoders.load_encoder("resnet18", "none")
    assert set(resnet.cache_key("cpu")) == {"encoder", "weights", "input", "precision"}


def test_timm_names_parse_with_their_arguments():
    spec = encoders.resolve_spec("timm:vit_small_patch16_224,depth=2,img_size=64,global_pool=token")
    assert spec.arch == "vit_small_patch16_224" and spec.input_size == 64
    assert spec.kwargs == {"depth": 2, "img_size": 64, "global_pool": "token", "num_classes": 0}
    cnn = encoders.resolve_spec("timm:resnet18")  # a convnet: its map is the token grid, its mean the tile feature
    enc = encoders.FrozenEncoder(cnn, encoders.build_net(cnn), {"id": "random"})
    crops = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    assert enc.spec.tile == "mean" and enc.tokens(crops).shape == (2, 7, 7, 512)  # resized to its 224 px
    assert torch.allclose(enc.features(crops), enc.tokens(crops).mean((1, 2)))
    for bad, match in (("timm:no_such_model_xyz", "timm has no model"), ("timm:vit_small_patch16_224,depth", "key=value"),
                       ("unicorn", "unknown encoder")):
        with pytest.raises(ValueError, match=match):
            encoders.resolve_spec(bad)


# ----------------------------------------------------------------------------- weights

def test_weights_load_strictly_from_bin_and_safetensors(tiny, tmp_path):
    state = tiny_weights(tmp_path / "pytorch_model.bin")
    enc = encoders.load_encoder("tiny-uni", str(tmp_path / "pytorch_model.bin"))
    assert all(torch.equal(enc.net.state_dict()[k], v) for k, v in state.items())
    assert enc.weights["sha256"] == encoders.file_sha256(tmp_path / "pytorch_model.bin")
    assert (enc.feature_dim, enc.token_dim) == (64, 64) and not enc.net.training
    safetensors = pytest.importorskip("safetensors.torch")
    safetensors.save_file(state, str(tmp_path / "model.safetensors"))
    again = encoders.load_encoder("tiny-uni", str(tmp_path / "model.safetensors"))
    crops = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    assert torch.equal(again.features(crops), enc.features(crops))


def test_weights_with_missing_unexpected_or_misshaped_tensors_are_refused_by_name(tiny, tmp_path):
    state = tiny_weights(tmp_path / "good.bin")
    bad = dict(state)
    del bad["norm.weight"]
    bad["head.weight"] = torch.zeros(10, 64)
    bad["pos_embed"] = torch.zeros(1, 5, 64)
    torch.save(bad, tmp_path / "bad.bin")
    with pytest.raises(ValueError) as e:
        encoders.load_encoder("tiny-uni", str(tmp_path / "bad.bin"))
    msg = str(e.value)
    assert "bad.bin" in msg and "missing 1: norm.weight" in msg and "unexpected 1: head.weight" in msg
    assert "wrong shape 1: pos_embed (1, 5, 64) (expected (1, 17, 64))" in msg
    with pytest.raises(FileNotFoundError, match="no such file"):
        encoders.load_encoder("tiny-uni", str(tmp_path / "absent.bin"))


def test_offline_without_a_file_says_which_file_to_get_and_where(monkeypatch):
    hub = pytest.importorskip("huggingface_hub")

    def offline(*a, **kw):
        raise OSError("we are offline")
    monkeypatch.setattr(hub, "hf_hub_download", offline)  # nothing is downloaded, whatever the network
    with pytest.raises(FileNotFoundError) as e:
        encoders.load_encoder("uni", None)
    msg = str(e.value)
    assert "pytorch_model.bin" in msg and "https://huggingface.co/MahmoodLab/UNI" in msg and "--weights" in msg
    assert "offline" in msg
    # huggingface_hub >= 1.0 installs the `hf` command, not `huggingface-cli`
    assert "`hf download MahmoodLab/UNI pytorch_model.bin" in msg and "huggingface-cli" not in msg


# ----------------------------------------------------------------------------- magnification

def test_field_of_view_is_the_encoders_tile_at_its_resolution():
    assert encoders.field_of_view(encoders.ENCODERS["uni"]) == (112.0, "encoder")  # 224 px at 0.5 µm/px
    assert encoders.field_of_view(encoders.ENCODERS["gigapath"]) == (128.0, "encoder")  # its 256-px tile; it sees 112
    assert all(encoders.field_of_view(encoders.ENCODERS[n])[0] == 112.0 for n in ("uni2-h", "h-optimus-0", "virchow2"))
    assert encoders.field_of_view(encoders.ENCODERS["resnet18"]) == (None, "native")  # TRIPLEX: the image as it is
    assert encoders.field_of_view(encoders.resolve_spec("timm:resnet18")) == (None, "native")
    assert encoders.field_of_view(encoders.ENCODERS["uni"], 150) == (150.0, "given")


def target_section(tmp_path, pitch_px):
    """A 3 x 3 ST section (spot pitch 200 µm = pitch_px px, so 200 / pitch_px µm/px) whose centre spot
    carries a black 112 µm square with a grey 56 µm square in its middle, on white."""
    from PIL import Image
    um = 200 / pitch_px
    n = 4 * pitch_px
    img = np.full((n, n, 3), 255, np.uint8)
    c = 2 * pitch_px  # the centre spot's pixel
    for side_um, value in ((112, 0), (56, 128)):
        h = round(side_um / um / 2)
        img[c - h:c + h, c - h:c + h] = value
    Image.fromarray(img).save(tmp_path / "target.png")
    array_xy = np.array([(x, y) for y in range(3) for x in range(3)], np.int64)
    pixel_xy = ((array_xy + 1) * pitch_px).astype(np.float64)
    ids = [f"{x}x{y}" for x, y in array_xy]
    return cohorts.Section("demo", "target", "P", tmp_path / "target.png", ids, array_xy, pixel_xy,
                           pd.DataFrame(np.ones((9, 1), np.float32), index=ids, columns=["G"]))


@pytest.mark.parametrize("pitch_px", [100, 400])  # 2 and 0.5 µm/px: a slide coarser than 20x, and one at it
@pytest.mark.parametrize("name", ["uni", "gigapath"])
def test_the_encoder_sees_its_field_of_view_at_its_resolution(name, pitch_px, tmp_path):
    """Cut as train.py cuts (field_of_view, at_field_of_view, section_crops at --crop-size 32) and
    preprocessed as the encoder does, the centre spot's input is 224 px at 0.5 µm/px: the 56 µm grey
    square spans 112 px, the 112 µm black square the rest, to the edges (to within one crop px, 7 input
    px, of resampling blur), and no white shows (it spans no more than 112 µm)."""
    spec = encoders.ENCODERS[name]
    crop_um, _ = encoders.field_of_view(spec)
    section = at_field_of_view(target_section(tmp_path, pitch_px), crop_um)
    assert section.um_per_px == pytest.approx(200 / pitch_px) and section.crop_um == crop_um
    crops = section_crops(section, ArrayCache(tmp_path / "cache"), 32, progress=False)
    assert crops.key["scale"] == pytest.approx(32 * 200 / pitch_px / crop_um)
    enc = encoders.FrozenEncoder(spec, encoders.build_net(spec, "meta"), {"id": "meta"})
    x = enc.preprocess(torch.from_numpy(np.array(crops.local[4:5])).permute(0, 3, 1, 2))[0, 0]  # red, (224, 224)
    levels = (x * spec.std[0] + spec.mean[0]) * 255  # back to the image's grey levels
    grey = (levels[112] - 128).abs() < 40  # the centre row
    assert abs(int(grey.sum()) - 112) <= 8 and grey[72:152].all(), f"grey over {int(grey.sum())} of 224 px, not 112"
    inner = levels[8:-8, 8:-8]
    assert inner.max() < 168, "white in the input: it spans more than 112 µm"
    assert (inner[[0, 0, -1, -1], [0, -1, 0, -1]] < 80).all(), "the corners are not the black square's"


# ----------------------------------------------------------------------------- widths and the online frozen level

def test_widths_other_than_512_run_through_every_level():
    cfg = GeneDMLConfig.for_cohort("demo", 12, dim=32, local_encoder="frozen", feat_dim=2560, token_dim=1280)
    model = GeneDML(cfg).eval()
    assert model.neighbour_encoder.proj.in_features == model.global_encoder.proj.in_features == 2560
    assert model.fusion.proj["local"].in_features == 1280 and model.feat_mean.shape == (2560,)
    B, n = 3, 40
    context = [(torch.randn(n, 2560), torch.stack([torch.arange(n) % 8, torch.arange(n) // 8], 1))]
    out = model(torch.randn(B, 256, 1280), torch.randn(B, 25, 2560), torch.ones(B, 25, dtype=torch.bool),
                torch.zeros(B, dtype=torch.long), torch.tensor([0, 5, 9]), context)
    assert out.prediction.shape == (B, 12)
    with pytest.raises(AssertionError, match=r"expected neighbour features \(B,25,2560\)"):
        model(torch.randn(B, 256, 1280), torch.randn(B, 25, 512), torch.ones(B, 25, dtype=torch.bool),
              torch.zeros(B, dtype=torch.long), torch.tensor([0, 5, 9]), context)


@pytest.mark.parametrize("which", ["tiny-uni", "resnet18"])
def test_online_frozen_level_sees_the_augmented_crop(which, tiny, demo_root, tmp_path):
    """Online, the training step feeds the model the frozen encoder's tokens of each augmented crop
    (encoder.tokens, under no_grad, outside the model): the output moves with the augmentation (issue 15,
    item 1: in cached mode the grid turn was invisible), and the encoder stays frozen and unsaved."""
    tiny_weights(tmp_path / "w.bin")
    enc = encoders.load_encoder(which, str(tmp_path / "w.bin") if which == "tiny-uni" else "none")
    section = cohorts.load_section("demo", demo_root, "A1")
    crops = section_crops(section, ArrayCache(tmp_path / "cache"), 32, progress=False)
    feats = [{"tiles": np.zeros((len(section.spot_ids), 25, enc.feature_dim), np.float32)}]
    plain = data.SpotDataset([section], [crops], ["TUM01"], feats)
    augmented = data.SpotDataset([section], [crops], ["TUM01"], feats, augment=True)
    torch.manual_seed(0)
    model = GeneDML(GeneDMLConfig.for_cohort("demo", 1, dim=32, levels=("local",), local_encoder="frozen",
                                             frozen_tokens="online", feat_dim=enc.feature_dim, token_dim=enc.token_dim))
    model.local_encoder.token_std.uniform_(0.5, 2.0)  # as set_statistics would
    model.train()
    assert not enc.training and not enc.net.training, "model.train() must leave the frozen encoder in eval mode"
    assert not {id(p) for p in enc.parameters()} & {id(p) for p in model.parameters()}, "the encoder is never optimised"
    assert not any("net." in k for k in model.state_dict())
    model.eval()
    x = plain[0]["local"][None]  # (1, 3, 32, 32) uint8
    tokens = enc.tokens(x).flatten(1, 2)
    assert not tokens.requires_grad and tokens.shape[-1] == enc.token_dim
    moved = 0
    for seed in range(8):
        torch.manual_seed(seed)
        item = augmented[0]["local"][None]
        with torch.no_grad():
            got = model(enc.tokens(item).flatten(1, 2), None, None, None, None, None).prediction
            before = model(tokens, None, None, None, None, None).prediction
        moved += not torch.equal(item, x) and not torch.allclose(got, before, atol=1e-6)
    assert moved >= 3, f"the augmentation should move the prediction (moved {moved} of 8 draws)"


def test_online_token_statistics_equal_those_of_the_cached_tokens(tiny, demo_root, tmp_path):
    tiny_weights(tmp_path / "w.bin")
    enc = encoders.load_encoder("tiny-uni", str(tmp_path / "w.bin"))
    sections = [cohorts.load_section("demo", demo_root, n) for n in ("A1", "B1")]
    cache = ArrayCache(tmp_path / "cache")
    split = data.prepare_split(sections, ["TUM01"], 32, enc, cache, "cpu", augment=True, local_tokens=True)  # a training split
    assert split.tokens[0].shape == (len(sections[0].spot_ids), 8, 4, 4, 64) and split.tokens[0].dtype == np.float16
    mean, std = features.online_token_statistics(enc, split, cache, "cpu", progress=False)
    want_mean, want_std = features.token_statistics(split.tokens)  # float16-rounded tokens: close, not equal
    assert np.allclose(mean, want_mean, atol=2e-3) and np.allclose(std, want_std, rtol=2e-3, atol=2e-3)
    # every cache entry names its encoder: the ResNet18's are not evicted by another encoder's
    data.prepare_split(sections[:1], ["TUM01"], 32, encoders.load_encoder("resnet18", "none", "cpu"), cache, "cpu")
    names = {p.name.rsplit("-", 1)[0] for p in (tmp_path / "cache").iterdir()}
    assert {"demo-A1-features", "demo-A1-tiny-uni-features", "demo-A1-tiny-uni-tokens",
            "demo-A1-tiny-uni-token-moments"} <= names


# ----------------------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def tiny_run(demo_root, cache_dir, tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setitem(encoders.ENCODERS, "tiny-uni", TINY)
    out = tmp_path_factory.mktemp("tiny_uni")
    tiny_weights(out / "pytorch_model.bin")
    assert train.main(train_argv(demo_root, cache_dir, out / "run", "--encoder", "tiny-uni", "--weights",
                                 str(out / "pytorch_model.bin"), "--local-encoder", "frozen", epochs=1)) == out / "run" / "best.pt"
    yield out
    mp.undo()


def test_tiny_uni_trains_records_its_encoder_and_evaluates(tiny_run, cache_dir):
    ckpt = load(tiny_run / "run" / "best.pt")
    rec = ckpt["encoder"]
    assert rec["spec"]["name"] == "tiny-uni" and rec["feature_dim"] == rec["token_dim"] == 64
    assert rec["spec"]["mean"] == [0.485, 0.456, 0.406] and rec["weights"]["name"] == "pytorch_model.bin"
    assert rec["weights"]["sha256"] == encoders.file_sha256(tiny_run / "pytorch_model.bin")
    assert ckpt["frozen_trunk"] is None, "a foundation model's weights stay in their file"
    assert ckpt["config"]["frozen_tokens"] == "online" and ckpt["config"]["feat_dim"] == 64
    # the demo (200 µm pitch at 73 px: 2.74 µm/px) is cut at the encoder's 2 µm/px: 32 px span 64 µm
    assert ckpt["data"]["crop_um"] == 64.0 and ckpt["data"]["crop_from"] == "encoder"
    assert any(p.name.startswith("demo-C1-x1.3") and "-crops32-" in p.name for p in cache_dir.iterdir()), "cut at 1.37x"
    assert ckpt["model"]["neighbour_encoder.proj.weight"].shape[1] == 64
    assert not any(k.startswith("local_encoder.encoder") for k in ckpt["model"])
    assert evaluate.main(eval_argv([tiny_run / "run" / "best.pt"], cache_dir, tiny_run / "eval")) == 0
    folds = pd.read_csv(tiny_run / "eval" / "folds.csv")
    assert folds.loc[0, "test"] == "A1" and np.isfinite(folds.loc[0, "pcc_m"])


def test_tiny_uni_predicts_and_runs_an_external_test(tiny_run, demo_root, cache_dir, tmp_path):
    best = tiny_run / "run" / "best.pt"
    (image,) = (demo_root / "ST-imgs" / "D" / "D1").glob("*.jpg")
    spots = demo_root / "ST-spotfiles" / "D1_selection.tsv"
    assert evaluate.main(eval_argv([best], cache_dir, tmp_path / "p", "--predict", str(image), str(spots))) == 0
    pred = pd.read_csv(tmp_path / "p" / "predictions.csv")
    assert np.isfinite(pred[load(best)["genes"]].to_numpy()).all()
    assert evaluate.main(eval_argv([best], cache_dir, tmp_path / "x", "--external", "demo", "--root", str(demo_root),
                                   "--external-sections", "D1")) == 0
    assert np.isfinite(pd.read_csv(tmp_path / "x" / "folds.csv").loc[0, "pcc_m"])


def test_evaluation_asks_for_a_moved_weights_file_by_name_and_checks_it(tiny_run, cache_dir, tmp_path, capsys):
    moved = tmp_path / "elsewhere" / "pytorch_model.bin"
    moved.parent.mkdir()
    shutil.copy(tiny_run / "pytorch_model.bin", moved)
    run = tmp_path / "run"
    shutil.copytree(tiny_run / "run", run)
    ckpt = load(run / "best.pt")
    ckpt["encoder"]["weights"]["file"] = str(tmp_path / "gone" / "pytorch_model.bin")  # as if the file moved
    torch.save(ckpt, run / "best.pt")
    assert evaluate.main(eval_argv([run / "best.pt"], cache_dir, tmp_path / "e")) == 2
    err = capsys.readouterr().err
    assert "tiny-uni needs its weights file pytorch_model.bin" in err and "--weights" in err
    assert evaluate.main(eval_argv([run / "best.pt"], cache_dir, tmp_path / "e", "--weights", str(moved))) == 0
    tiny_weights(tmp_path / "other.bin", seed=1)
    assert evaluate.main(eval_argv([run / "best.pt"], cache_dir, tmp_path / "e", "--weights", str(tmp_path / "other.bin"))) == 2
    assert "not the weights this checkpoint was trained with" in capsys.readouterr().err


def test_a_foundation_encoder_refuses_a_trainable_local_level(tiny, demo_root, cache_dir, tmp_path):
    argv = train_argv(demo_root, cache_dir, tmp_path, "--encoder", "tiny-uni", "--weights", "x.bin")
    with pytest.raises(SystemExit):  # train_argv asks for --local-encoder trainable
        train.get_args(argv)


def test_tiny_uni_with_cached_tokens_trains_and_evaluates(tiny_run, demo_root, cache_dir, tmp_path):
    mp = pytest.MonkeyPatch()
    mp.setitem(encoders.ENCODERS, "tiny-uni", TINY)
    try:
        train.main(train_argv(demo_root, cache_dir, tmp_path, "--encoder", "tiny-uni", "--weights",
                              str(tiny_run / "pytorch_model.bin"), "--local-encoder", "frozen",
                              "--frozen-tokens", "cached", epochs=1))
    finally:
        mp.undo()
    ckpt = load(tmp_path / "best.pt")
    assert ckpt["config"]["frozen_tokens"] == "cached" and ckpt["config"]["token_dim"] == 64
    assert ckpt["model"]["local_encoder.token_std"].shape == (64,) and ckpt["model"]["local_encoder.token_std"].min() > 0
    assert evaluate.main(eval_argv([tmp_path / "best.pt"], cache_dir, tmp_path / "eval")) == 0


def test_hub_weights_are_fetched_through_hf_hub_download(tiny, tmp_path, monkeypatch):
    hub = pytest.importorskip("huggingface_hub")
    tiny_weights(tmp_path / "w.bin")
    asked = []

    def fake_download(repo, filename, local_files_only=False):  # stands in for the network
        asked.append((repo, filename, local_files_only))
        return str(tmp_path / "w.bin")
    monkeypatch.setattr(hub, "hf_hub_download", fake_download)
    enc = encoders.load_encoder("tiny-uni", "hub:someone/tiny-vit:w.bin")
    assert asked == [("someone/tiny-vit", "w.bin", False)] and enc.weights["hub"] == "someone/tiny-vit:w.bin"
    # a checkpoint whose file is gone finds it again in the hub's local cache, and nowhere else
    record = dict(enc.record(), weights=dict(enc.weights, file=str(tmp_path / "gone.bin")))
    again = encoders.rebuild_encoder(record, None)
    assert asked[1:] == [("someone/tiny-vit", "w.bin", True)] and again.weights["sha256"] == enc.weights["sha256"]
