"""The local level's trunk: torchvision's ResNet18 without its classifier, and the weights it starts from.

`build_trunk("none" | "imagenet" | path)` gives random weights, torchvision's ImageNet weights (from
torch.hub's cache, or downloaded), or a local checkpoint (a torchvision-style state dict, or a training
checkpoint such as Ciga et al.'s self-supervised tenpercent_resnet18.ckpt), loaded strictly with
torch.load(weights_only=True). `read_state_dict` and `check_keys` read and check any encoder's weights
(encoders.py uses them too). `Preprocess` (the trunk's `preprocess`) turns uint8 crops into the
normalised floats it reads.
The frozen encoders of the other levels are chosen in encoders.py; this module needs nothing of ours.
"""
import logging
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn as nn
import torchvision

log = logging.getLogger(__name__)

FEAT_DIM = 512  # channels of ResNet18's last stage: the default width of the frozen features and tokens
MIN_CROP = 32   # px: the trunk's output stride; a smaller crop is less than one of its output positions
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LAYERS = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")  # torchvision's names


class Preprocess(nn.Module):
    """uint8 images (B,3,H,W) -> float, /255, normalised with a mean and std (ImageNet's by default).

    The mean and std are buffers, so they move with the module (`.to(device)`) and a forward pass
    creates no tensor: on CUDA a tensor made from Python numbers is a blocking host-to-device copy,
    a sync in every step. They are not persistent, so no state dict holds them."""

    def __init__(self, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.dtype == torch.uint8 and x.ndim == 4 and x.shape[1] == 3, \
            f"expected uint8 images (B,3,H,W), got {x.dtype} {tuple(x.shape)}"
        return (x.float() / 255 - self.mean) / self.std


class ResNet18Trunk(nn.Sequential):
    """torchvision's ResNet18 (He et al. 2016) up to its last feature map: (B,3,H,W) -> (B,512,H/32,W/32).

    Departures from torchvision.models.resnet18:
    - no avgpool and no fc: the local level keeps all (H/32)·(W/32) positions as tokens (7x7 at 224 px);
    - `preprocess`, the uint8 -> normalised float step its input needs (Preprocess), travels with it
      but is not run by forward (which takes the normalised floats, as torchvision's does);
    - nothing else: the modules keep torchvision's names, so its state dicts (less fc.*) load as they are.
    """

    def __init__(self):
        r = torchvision.models.resnet18(weights=None)
        super().__init__(OrderedDict((n, getattr(r, n)) for n in LAYERS))
        self.preprocess = Preprocess()  # a child after the layers: forward below runs the layers only

    def forward(self, x):  # (B, 3, H, W) normalised floats
        for name in LAYERS:
            x = self._modules[name](x)
        return x


def build_trunk(weights: str = "none", progress: bool = True) -> ResNet18Trunk:
    """A ResNet18 trunk with random ("none"), torchvision ImageNet ("imagenet") or local-file weights."""
    trunk = ResNet18Trunk()
    if weights == "none":
        return trunk
    if weights == "imagenet":
        url = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url
        cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name
        local = ("pass the path of a local ResNet18 checkpoint (a state dict, or tenpercent_resnet18.ckpt) "
                 "as the weights instead of 'imagenet' (train.py --weights PATH)")
        # Errors of the kinds train.py reports as one line (bad input, not a bug): FileNotFoundError, ValueError.
        try:  # served from torch.hub's cache when the file is already there
            state = torch.hub.load_state_dict_from_url(url, map_location="cpu", progress=progress,
                                                       weights_only=True)
        except OSError as e:  # URLError, timeouts, refused connections are all OSErrors
            raise FileNotFoundError(f"could not download the torchvision ImageNet ResNet18 weights from {url} ({e}). "
                                    f"Offline? Put that file at {cache}, or {local}.") from None
        except Exception as e:  # a cached file torch.load cannot read: truncated, or not a torch file
            raise ValueError(f"{cache}: the cached ImageNet ResNet18 weights cannot be read ({type(e).__name__}); "
                             f"delete the file to download it again, or {local}.") from None
        _load_trunk_state(trunk, state, url)
        return trunk
    path = Path(weights)
    if not path.is_file():
        raise FileNotFoundError(f"trunk weights {path}: no such file (expected 'none', 'imagenet' or a path)")
    _load_trunk_state(trunk, read_state_dict(path), path)
    return trunk


def _load_trunk_state(trunk: nn.Module, state: dict, source) -> None:
    """Load a torchvision-style ResNet18 state dict strictly, except for the classifier (fc.*)."""
    prefixes = ("model.resnet.", "module.", "resnet.")  # Ciga et al.'s SimCLR wrapper, DataParallel
    state = {next((k[len(p):] for p in prefixes if k.startswith(p)), k): v for k, v in state.items()}
    dropped = sorted(k for k in state if k.startswith("fc."))  # classifier or SimCLR projection head
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    expected = trunk.state_dict()
    # num_batches_tracked only counts BN updates; a checkpoint without it is still complete
    check_keys(expected, state, source, "a ResNet18 this trunk can load", optional="num_batches_tracked")
    trunk.load_state_dict(state, strict=False)
    log.info("loaded %d/%d tensors from %s, dropped %s", len(state), len(expected), source,
             ", ".join(dropped) or "nothing")


def read_state_dict(path) -> dict:
    """A plain state dict from a .safetensors file or a torch file (torch.load(weights_only=True));
    a training checkpoint's "state_dict" (Lightning's, such as Ciga et al.'s) is unwrapped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights {path}: no such file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except ImportError:
        raise ImportError(f"{path}: reading .safetensors needs: pip install safetensors") from None
    except Exception as e:  # pickled objects (refused by weights_only=True), a truncated or foreign file
        raise ValueError(f"{path}: cannot be read as a state dict ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                         f"if you trust the file, re-save just its state dict") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a state dict (names -> tensors), got {type(state).__name__}")
    return state


def check_keys(expected: dict, state: dict, source, what: str, optional: str | None = None) -> None:
    """Refuse a state dict whose tensors are not exactly the expected ones, naming what differs
    (a missing key that ends with `optional` is allowed)."""
    missing = [k for k in expected if k not in state and not (optional and k.endswith(optional))]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k} {tuple(state[k].shape)} (expected {tuple(expected[k].shape)})"
             for k in state if k in expected and state[k].shape != expected[k].shape]
    found = (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
    problems = [f"{kind} {len(keys)}: {', '.join(keys[:6])}{', ...' if len(keys) > 6 else ''}"
                for kind, keys in found if keys]
    if problems:
        raise ValueError(f"{source}: not the weights of {what}; {'; '.join(problems)}")


def preprocess(x: torch.Tensor) -> torch.Tensor:
    """uint8 images (B,3,H,W) -> float, /255, normalised with ImageNet's mean and std (Preprocess).
    For tests and scripts: it builds the constants at each call (on CUDA a copy that waits); a model
    or a timed step holds a Preprocess module instead, as the trunk does (ResNet18Trunk.preprocess)."""
    return Preprocess().to(x.device)(x)
