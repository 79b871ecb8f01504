"""The frozen encoder: the pretrained trunk whose features every image level reads.

The Gene-DML reference runs a frozen pathology foundation model (UNI, a ViT-L/16) for all three
levels; TRIPLEX, whose design this project follows by default, a ResNet18. `--encoder NAME` picks one
entry of `ENCODERS`, or `timm:<model>[,key=value...]` for any timm backbone. Each entry says

  - how the model is built: the exact `timm.create_model` arguments its publishers give (model cards,
    and the loaders of HEST-Benchmark and TRIDENT, which load the published files strictly into them);
  - its input, as its publishers' transform makes it: the resize (size, interpolation) and centre crop
    that bring a crop to its input size, and the mean/std it was trained with;
  - the resolution it was trained at (µm per pixel): crops are cut so that its input spans what it
    spanned in training (`field_of_view`; crops.at_field_of_view cuts them);
  - its outputs: a tile's feature (the CLS token; Virchow2: CLS joined with the mean patch token, as
    its model card does) for the neighbour and global levels, and the local level's tokens (the patch
    tokens of `forward_features` laid out on their h x w grid; the reference also keeps the CLS token
    among them, which has no place on a grid);
  - its widths and the precision it runs in on a GPU (autocast; float32 on a CPU).

Published weights are the user's to obtain (most are gated). `load_encoder` reads a local
`pytorch_model.bin` or `.safetensors` strictly (a file with missing, unexpected or wrongly shaped
tensors is refused, naming them), or fetches the file from the Hugging Face hub when the machine is
online. timm (and huggingface_hub for the hub) are optional extras, imported only here, only then.

Imports run one way: trunk -> encoders -> features.
"""
import ast
import dataclasses
import hashlib
import math
import re
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torchvision.transforms.functional as TF
from torchvision.transforms import InterpolationMode

from genedml.trunk import FEAT_DIM, IMAGENET_MEAN, IMAGENET_STD, ResNet18Trunk, build_trunk, check_keys, read_state_dict

PRECISIONS = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
TILE_FEATURES = ("mean", "cls", "cls+mean")


@dataclass(frozen=True)
class EncoderSpec:
    name: str                       # the --encoder value
    arch: str                       # "resnet18" (torchvision), or the timm model name
    kwargs: dict = field(default_factory=dict)  # timm.create_model arguments; layers by name (_LAYERS)
    mean: tuple = IMAGENET_MEAN     # input normalisation of the published weights
    std: tuple = IMAGENET_STD
    input_size: int | None = None   # the model's input, px (None: any size, as a CNN takes)
    resize: int | None = None       # crops are resized to this many px, then centre-cropped to input_size (None: to input_size)
    interpolation: str = "bilinear"  # of that resize: "bilinear" (torchvision's default) or "bicubic"
    um_per_px: float | None = None  # the resolution it was trained at (None: any; crops stay at the slides' own)
    tile: str = "cls"               # a tile's feature: "cls", "cls+mean" (CLS ++ mean patch token) or "mean"
    width: int | None = None        # channels of a token (the published one; None: read off the model)
    precision: str = "float16"      # autocast dtype on a GPU
    hub: tuple | None = None        # (repo id, file) of the published weights on the Hugging Face hub
    source: str = ""                # where the arguments come from


# Layer classes passed by name, so that a spec (and a checkpoint's record of it) is plain data.
_LAYERS = {"mlp_layer": ("timm.layers", ("SwiGLUPacked", "Mlp", "SwiGLU", "GluMlp")),
           "act_layer": ("torch.nn", ("SiLU", "GELU"))}
_TRIDENT = "TRIDENT trident/patch_encoder_models/load.py"

# Their transforms, as the model cards write them (TRIDENT's loaders the same): UNI and UNI2-h
# Resize(224) (bilinear) + CenterCrop(224); H-optimus-0 none, its tiles being 224 px (TRIDENT:
# Resize(224)); Virchow2 timm's create_transform of its config (bicubic, crop_pct 1: Resize(224,
# bicubic)); Prov-GigaPath Resize(256, bicubic) + CenterCrop(224). Resolution: 0.5 µm/px (20x) for
# all five: UNI, H-optimus-0 and Prov-GigaPath were trained there (Prov-GigaPath on 256 px tiles, of
# which its input is the central 224), UNI2-h as UNI, Virchow2 on 5x-40x including it; TRIDENT runs
# each at --mag 20. So each sees 112 µm in its 224 px.
ENCODERS = {
    "resnet18": EncoderSpec(
        "resnet18", "resnet18", tile="mean", width=FEAT_DIM, precision="bfloat16",
        source="torchvision resnet18 up to layer4 (trunk.ResNet18Trunk); TRIPLEX"),
    "uni": EncoderSpec(
        "uni", "vit_large_patch16_224",
        dict(img_size=224, patch_size=16, init_values=1e-5, num_classes=0, dynamic_img_size=True),
        input_size=224, um_per_px=0.5, width=1024, precision="float16", hub=("MahmoodLab/UNI", "pytorch_model.bin"),
        source=f"UNI model card (huggingface.co/MahmoodLab/UNI); {_TRIDENT} UNIInferenceEncoder; "
               "the Gene-DML reference's ImageEncoder_UNI"),
    "uni2-h": EncoderSpec(
        "uni2-h", "vit_giant_patch14_224",
        dict(img_size=224, patch_size=14, depth=24, num_heads=24, init_values=1e-5, embed_dim=1536,
             mlp_ratio=2.66667 * 2, num_classes=0, no_embed_class=True, mlp_layer="SwiGLUPacked",
             act_layer="SiLU", reg_tokens=8, dynamic_img_size=True),
        input_size=224, um_per_px=0.5, width=1536, precision="bfloat16", hub=("MahmoodLab/UNI2-h", "pytorch_model.bin"),
        source=f"UNI2-h model card (huggingface.co/MahmoodLab/UNI2-h); {_TRIDENT} UNIv2InferenceEncoder"),
    "h-optimus-0": EncoderSpec(
        "h-optimus-0", "vit_giant_patch14_reg4_dinov2",
        dict(num_classes=0, img_size=224, global_pool="token", init_values=1e-5, dynamic_img_size=False),
        mean=(0.707223, 0.578729, 0.703617), std=(0.211883, 0.230117, 0.177517),
        input_size=224, um_per_px=0.5, width=1536, precision="float16", hub=("bioptimus/H-optimus-0", "pytorch_model.bin"),
        source="H-optimus-0 model card (huggingface.co/bioptimus/H-optimus-0: dynamic_img_size=False); "
               f"{_TRIDENT} HOptimus0InferenceEncoder"),
    "virchow2": EncoderSpec(
        "virchow2", "vit_huge_patch14_224",
        dict(img_size=224, init_values=1e-5, num_classes=0, reg_tokens=4, mlp_ratio=5.3375, global_pool="",
             dynamic_img_size=True, mlp_layer="SwiGLUPacked", act_layer="SiLU"),
        input_size=224, interpolation="bicubic", um_per_px=0.5, tile="cls+mean", width=1280, precision="float16",
        hub=("paige-ai/Virchow2", "pytorch_model.bin"),
        source=f"Virchow2 model card (huggingface.co/paige-ai/Virchow2); {_TRIDENT} Virchow2InferenceEncoder"),
    "gigapath": EncoderSpec(
        "gigapath", "vit_giant_patch14_dinov2",
        dict(img_size=224, in_chans=3, patch_size=16, embed_dim=1536, depth=40, num_heads=24, mlp_ratio=5.33334,
             num_classes=0, dynamic_img_size=True),
        input_size=224, resize=256, interpolation="bicubic", um_per_px=0.5, width=1536, precision="float32",
        hub=("prov-gigapath/prov-gigapath", "pytorch_model.bin"),
        source="Prov-GigaPath tile encoder (huggingface.co/prov-gigapath/prov-gigapath: Resize(256, bicubic), "
               f"CenterCrop(224), float32); {_TRIDENT} GigaPathInferenceEncoder"),
}


def _timm():
    try:
        import timm
    except ImportError:
        raise ImportError("a foundation-model encoder needs timm: pip install timm safetensors "
                           "(and huggingface_hub to fetch published weights from the hub)") from None
    return timm


def resolve_spec(name: str) -> EncoderSpec:
    """The spec of a registry name, or of `timm:<model>[,key=value,...]` (values as Python literals).

    For a plain timm model the normalisation, input size, resize and interpolation are those of its timm
    pretrained config; it has no µm/px (its crops are the slides' own resolution)."""
    if name in ENCODERS:
        return ENCODERS[name]
    if not name.startswith("timm:") or not name[5:]:
        raise ValueError(f"unknown encoder {name!r}: one of {', '.join(ENCODERS)}, or timm:<model name>")
    arch, *pairs = name[5:].split(",")
    kwargs = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or not key.isidentifier():
            raise ValueError(f"encoder {name!r}: expected timm:<model>,key=value,..., got {pair!r}")
        try:
            kwargs[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            kwargs[key] = value  # a bare word: a string
    kwargs.setdefault("num_classes", 0)
    timm = _timm()
    if arch not in timm.list_models():
        raise ValueError(f"encoder {name!r}: timm has no model {arch!r}")
    cfg = timm.models.get_pretrained_cfg(arch)
    size = int(kwargs.get("img_size", cfg.input_size[-1] if cfg is not None else 224))
    # timm's own eval transform (timm.data.create_transform of this config): on a square crop each of its
    # crop modes is Resize(floor(size / crop_pct), interpolation) then CenterCrop(size)
    data = timm.data.resolve_data_config({"img_size": size}, pretrained_cfg=cfg.to_dict() if cfg else None)
    resize = math.floor(size / data["crop_pct"])
    hub = (cfg.hf_hub_id, "model.safetensors") if cfg is not None and cfg.hf_hub_id else None
    return EncoderSpec(name, arch, kwargs, tuple(data["mean"]), tuple(data["std"]), input_size=size,
                       resize=resize if resize != size else None, interpolation=data["interpolation"],
                       tile="cls", precision="bfloat16", hub=hub, source=f"timm {arch}")


def build_net(spec: EncoderSpec, device="cpu") -> nn.Module:
    """The timm model of a spec with random weights; on device "meta" it takes no memory."""
    timm = _timm()
    kwargs = dict(spec.kwargs)
    for key, (module, allowed) in _LAYERS.items():
        if isinstance(kwargs.get(key), str):
            assert kwargs[key] in allowed, f"{spec.name}: {key}={kwargs[key]!r} is not one of {allowed}"
            kwargs[key] = getattr(__import__(module, fromlist=[kwargs[key]]), kwargs[key])
    with torch.device(device):
        return timm.create_model(spec.arch, pretrained=False, **kwargs)


# ----------------------------------------------------------------------------- weights

def file_sha256(path) -> str:
    """SHA-256 of a file, read in 16 MB pieces (a foundation model's weights are 1-5 GB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for piece in iter(lambda: f.read(1 << 24), b""):
            h.update(piece)
    return h.hexdigest()


def trunk_id(trunk: nn.Module) -> str:
    """A short hash of a module's weights (the ResNet18's): it keys the feature cache."""
    h = hashlib.sha1()
    for k, v in sorted(trunk.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def load_net(spec: EncoderSpec, path) -> nn.Module:
    """Build the spec's model without memory (meta), check the file's tensors against it, then take
    them as the model's own (assign=True: no second copy of a 1-5 GB model)."""
    net = build_net(spec, "meta")
    state = {k: v.float() if v.is_floating_point() else v for k, v in read_state_dict(path).items()}
    check_keys(net.state_dict(), state, path, f"{spec.name} ({spec.arch} {spec.kwargs})")
    net.load_state_dict(state, strict=True, assign=True)
    left = [n for n, t in list(net.named_parameters()) + list(net.named_buffers()) if t.is_meta]
    if left:  # buffers outside the state dict (none in timm's ViTs): build them for real
        real = build_net(spec, "cpu")
        real.load_state_dict(state, strict=True)
        net = real
    return net


def hub_file(spec: EncoderSpec, local_only: bool = False) -> Path:
    """The published weights file, from the Hugging Face hub (or only its local cache)."""
    if spec.hub is None:
        raise ValueError(f"encoder {spec.name}: no published weights on the hub; pass --weights PATH")
    repo, filename = spec.hub
    advice = (f"get {filename} from https://huggingface.co/{repo} (gated: log in there and accept its terms; "
              f"then e.g. `hf download {repo} {filename} --local-dir ~/models/{spec.name}`) "
              f"and pass --weights ~/models/{spec.name}/{filename}")
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise FileNotFoundError(f"encoder {spec.name}: no --weights file given, and fetching it needs "
                                f"pip install huggingface_hub; or {advice}") from None
    try:
        return Path(hf_hub_download(repo, filename, local_files_only=local_only))
    except Exception as e:  # offline, not logged in, licence not accepted
        raise FileNotFoundError(f"encoder {spec.name}: no --weights file given and the hub gave no {filename} "
                                f"({type(e).__name__}: {str(e).splitlines()[0][:160]}); {advice}") from None


# ----------------------------------------------------------------------------- the encoder

class FrozenEncoder(nn.Module):
    """A frozen trunk and what its spec says about it: uint8 crops in, tile features or token grids out.

    It never trains: no gradient, and `train()` leaves it in eval mode (BatchNorm keeps its running
    statistics, dropout stays off). On a GPU it runs under autocast in its spec's precision (float32:
    none).
    """

    def __init__(self, spec: EncoderSpec, net: nn.Module, weights: dict):
        super().__init__()
        assert spec.tile in TILE_FEATURES, f"{spec.name}: tile feature must be one of {TILE_FEATURES}"
        self.convnet = isinstance(net, ResNet18Trunk) or not hasattr(net, "patch_embed")
        if spec.tile != "mean" and (self.convnet or getattr(net, "cls_token", None) is None):
            assert spec.name.startswith("timm:"), f"{spec.name}: a {spec.tile} tile feature needs a CLS token"
            spec = dataclasses.replace(spec, tile="mean")  # a timm model without a CLS token: mean of its tokens
        self.spec, self.weights = spec, weights  # weights: what the weights are ({"id", and the file's facts})
        self.net = net.eval().requires_grad_(False)
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1), persistent=False)
        self.prefix = 0 if self.convnet else net.num_prefix_tokens  # CLS and register tokens
        self.token_dim = FEAT_DIM if isinstance(net, ResNet18Trunk) else net.num_features
        assert spec.width in (None, self.token_dim), f"{spec.name}: built {self.token_dim} wide, published {spec.width}"
        self.feature_dim = self.token_dim * (2 if spec.tile == "cls+mean" else 1)
        self.eval()  # from the start: frozen, its BatchNorm keeps its running statistics

    def train(self, mode: bool = True):  # always in eval mode, whatever a caller asks
        return super().train(False)

    def precision(self, device) -> str:
        """The dtype it actually runs in on this device (bf16 falls back to fp16 where unsupported)."""
        if torch.device(device).type != "cuda":
            return "float32"
        if self.spec.precision == "bfloat16" and not torch.cuda.is_bf16_supported():
            return "float16"
        return self.spec.precision

    def autocast(self, device):
        """Autocast in its precision on a GPU; none in float32 (autocast has no float32 mode) or on a CPU."""
        dtype = self.precision(device)
        return nullcontext() if dtype == "float32" else torch.autocast("cuda", dtype=PRECISIONS[dtype])

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 (B,3,c,c) -> float (B,3,s,s), as the published transform does it to a tile: Resize to the
        spec's resize (or input) size in its interpolation, antialiased and on uint8 as torchvision resizes
        a PIL image; CenterCrop to the input size; ToTensor (/255); Normalize with its mean/std."""
        assert x.dtype == torch.uint8 and x.ndim == 4 and x.shape[1] == 3, \
            f"expected uint8 images (B,3,H,W), got {x.dtype} {tuple(x.shape)}"
        size = self.spec.input_size
        if size is not None:
            scaled = self.spec.resize or size
            if x.shape[-2:] != (scaled, scaled):
                x = TF.resize(x, [scaled, scaled], InterpolationMode(self.spec.interpolation), antialias=True)
            if scaled != size:
                x = TF.center_crop(x, [size, size])
        return (x.float() / 255 - self.mean) / self.std

    def _forward(self, x):
        """-> (prefix tokens (B, p, C) or None, patch-token grid (B, h, w, C)), float32."""
        x = self.preprocess(x)
        with self.autocast(x.device):
            out = self.net(x) if isinstance(self.net, ResNet18Trunk) else self.net.forward_features(x)
        out = out.float()
        if self.convnet:  # a feature map: NCHW, or NHWC (timm's Swin)
            grid = out if out.shape[-1] == self.token_dim else out.permute(0, 2, 3, 1)
            return None, grid
        ph, pw = self.net.patch_embed.patch_size
        h, w = x.shape[-2] // ph, x.shape[-1] // pw
        assert out.shape[1] == self.prefix + h * w, f"{self.spec.name}: {out.shape[1]} tokens for a {h}x{w} grid"
        return out[:, :self.prefix], out[:, self.prefix:].reshape(len(out), h, w, -1)

    @torch.no_grad()
    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """The local level's tokens: uint8 crops (B,3,c,c) -> patch-token grid (B, h, w, token_dim)."""
        return self._forward(x)[1]

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """A tile's feature: uint8 crops (B,3,c,c) -> (B, feature_dim)."""
        prefix, grid = self._forward(x)
        mean = grid.mean(dim=(1, 2))  # (B, C)
        if self.spec.tile == "mean":
            return mean
        return prefix[:, 0] if self.spec.tile == "cls" else torch.cat([prefix[:, 0], mean], dim=1)

    def cache_key(self, device) -> dict:
        """What the cached features depend on: encoder, weights, input size, precision, and for an encoder
        with an input size its resize (the crops' own key holds the scale they were cut at)."""
        transform = {"resize": self.spec.resize, "interpolation": self.spec.interpolation} if self.spec.input_size else {}
        return {"encoder": self.spec.name, "weights": self.weights["id"], "input": self.spec.input_size,
                "precision": self.precision(device), **transform}

    def record(self) -> dict:
        """What a checkpoint keeps to rebuild this encoder (plain data, loadable with weights_only)."""
        spec = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self.spec).items()}
        return {"spec": spec, "feature_dim": self.feature_dim, "token_dim": self.token_dim, "weights": dict(self.weights)}


def field_of_view(spec: EncoderSpec, crop_um: float | None = None) -> tuple[float | None, str]:
    """A crop's field of view in µm, and where it comes from: crop_um if given (--crop-um, a cohort
    table's); else, for an encoder trained at a resolution, the tile its transform starts from (resize
    or input size px at its µm/px: 112 µm for UNI, 128 µm for Prov-GigaPath, whose centre crop keeps
    112); else None: crops of the slides' own resolution (the ResNet18, as TRIPLEX; timm models)."""
    if crop_um is not None:
        return float(crop_um), "given"
    if spec.um_per_px is not None:
        return (spec.resize or spec.input_size) * spec.um_per_px, "encoder"
    return None, "native"


def tag(spec: EncoderSpec) -> str:
    """A file-name-safe name for the encoder's cache entries ("" for the default ResNet18)."""
    if spec.name == "resnet18":
        return ""
    safe = spec.name if re.fullmatch(r"[A-Za-z0-9_.\-]+", spec.name) else \
        f"timm-{hashlib.sha1(spec.name.encode()).hexdigest()[:10]}"
    return f"-{safe}"


def as_encoder(trunk) -> FrozenEncoder:
    """A FrozenEncoder as it is, or a bare ResNet18 trunk wrapped as the resnet18 entry."""
    if isinstance(trunk, FrozenEncoder):
        return trunk
    assert isinstance(trunk, ResNet18Trunk), f"expected a FrozenEncoder or a ResNet18Trunk, got {type(trunk).__name__}"
    return FrozenEncoder(ENCODERS["resnet18"], trunk, {"id": trunk_id(trunk)})


def _timm_weights(spec: EncoderSpec, weights: str | None) -> Path:
    """The weights file: a path, "hub" (None) for the published file, or "hub:<repo id>[:<file>]"."""
    if weights in (None, "hub"):
        return hub_file(spec)
    if weights.startswith("hub:"):
        repo, _, filename = weights[4:].partition(":")
        return hub_file(dataclasses.replace(spec, hub=(repo, filename or (spec.hub or (None, "pytorch_model.bin"))[1])))
    if weights in ("none", "imagenet"):
        raise ValueError(f"encoder {spec.name}: --weights {weights} is for resnet18; a foundation model needs "
                         f"its published weights: --weights PATH (pytorch_model.bin or .safetensors) or hub")
    return Path(weights).expanduser()


def load_encoder(name: str, weights: str | None, device="cpu") -> FrozenEncoder:
    """The frozen encoder `name` with its weights: for resnet18 "none" (a fixed random init, seed 0,
    so runs of any seed share one feature cache), "imagenet" or a file; for the others a file,
    "hub" (None) to fetch the published one, or "hub:<repo id>[:<file>]" another hub repository's."""
    spec = resolve_spec(name)
    if spec.arch == "resnet18":
        with torch.random.fork_rng():
            torch.manual_seed(0)
            trunk = build_trunk(weights or "none")
        return as_encoder(trunk).to(device)
    path = _timm_weights(spec, weights)
    net = load_net(spec, path)
    sha = file_sha256(path)
    facts = {"id": sha[:16], "sha256": sha, "file": str(path.resolve()), "name": path.name,
             "bytes": path.stat().st_size, "hub": weights[4:] if weights and weights.startswith("hub:") else
             ":".join(spec.hub) if spec.hub and weights in (None, "hub") else None}
    return FrozenEncoder(spec, net, facts).to(device)


def rebuild_encoder(record: dict | None, trunk_state: dict | None, weights: str | None = None, device="cpu") -> FrozenEncoder:
    """The encoder of a checkpoint: its record (None: an older checkpoint, the ResNet18) and, for the
    ResNet18, the trunk weights it carries; a foundation model's weights are read from their file
    (`weights`, else where it was at training time, else the hub's local cache) and must be that file."""
    spec = EncoderSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in record["spec"].items()}) \
        if record else ENCODERS["resnet18"]
    if spec.arch == "resnet18":
        trunk = build_trunk("none")
        trunk.load_state_dict(trunk_state)
        return as_encoder(trunk).to(device)
    want = record["weights"]
    path = Path(weights).expanduser() if weights else Path(want["file"])
    if not path.is_file() and not weights and want.get("hub"):
        repo, _, filename = want["hub"].partition(":")
        try:
            path = hub_file(dataclasses.replace(spec, hub=(repo, filename or want["name"])), local_only=True)
        except FileNotFoundError:
            pass
    if not path.is_file():
        raise FileNotFoundError(f"the checkpoint's frozen encoder {spec.name} needs its weights file {want['name']} "
                                f"({want['bytes']:,} bytes, sha256 {want['sha256'][:16]}...), which was at {want['file']} "
                                f"when it was trained: pass its path with --weights")
    sha = file_sha256(path)
    if sha != want["sha256"]:
        raise ValueError(f"{path}: not the weights this checkpoint was trained with (sha256 {sha[:16]}..., "
                         f"expected {want['sha256'][:16]}... of {want['name']})")
    return FrozenEncoder(spec, load_net(spec, path), dict(want, file=str(path.resolve()))).to(device)
