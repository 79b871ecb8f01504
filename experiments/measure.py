"""How the benchmarks measure, and what they measure on (benchmark.py, benchmark_scale.py).

Measuring: seconds per call with the device synchronised around the calls (`timed`), the process's
peak resident memory (`peak_rss_mb`, reset by `reset_peak_rss` where Linux allows), the seconds
k-means takes inside the loss (`counting_kmeans`), and y(N) = a·N + b·N² through two measured sizes
(`extrapolate`). Inputs: synthetic slides and sections of real sizes (`write_slide`,
`synthetic_section`), and stand-ins for the crop cache (`CropPerItem`, `FakeCrops`).
"""
import ctypes
import gc
import resource
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from genedml import cohorts
from genedml.crops import crop_image

import losses
from experiments.fold_benchmark import grid_xy

SPOT_PX = 256  # her2st: spots ~ 200-260 px apart on the full-resolution image


# ----------------------------------------------------------------------------- measuring
def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, reps=1) -> float:
    """Seconds per call of fn, averaged over reps calls (the device is synchronised around them)."""
    sync(device)
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    sync(device)
    return (time.perf_counter() - t) / reps


def _status_mb(field):
    """A memory line of /proc/self/status in MB (None off Linux)."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def reset_peak_rss():
    """Free what Python and malloc hold, then reset the high-water mark, so a peak is this step's."""
    gc.collect()
    try:  # glibc keeps freed heap pages mapped; without this a peak hides under earlier ones
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:  # "5" resets VmHWM to the current RSS (Linux >= 4.0, own process)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss_mb() -> float:
    hwm = _status_mb("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@contextmanager
def counting_kmeans(device, spent):
    """Wrap losses.kmeans (called by instance_group_loss) so its seconds add up in spent["kmeans"]."""
    original = losses.kmeans

    def kmeans(*a, **kw):
        sync(device)
        t = time.perf_counter()
        out = original(*a, **kw)
        sync(device)
        spent["kmeans"] += time.perf_counter() - t
        return out

    losses.kmeans = kmeans
    try:
        yield
    finally:
        losses.kmeans = original


def extrapolate(points, n):
    """y(n) from y = a·N + b·N² (a, b >= 0) through the last two measured (N, y); with one point, N²."""
    if len(points) == 1:
        (n1, y1), = points
        return y1 * (n / n1) ** 2
    (n1, y1), (n2, y2) = points[-2:]
    b = (y2 / n2 - y1 / n1) / (n2 - n1)
    a = y1 / n1 - b * n1
    if b < 0:
        a, b = y2 / n2, 0.0
    elif a < 0:
        a, b = 0.0, y2 / n2 ** 2
    return a * n + b * n * n


# ----------------------------------------------------------------------------- synthetic inputs
def write_slide(path, width, height, rng):
    """A pink H&E-like JPEG: low-resolution noise blown up 16x (writes fast, decodes like a real slide)."""
    small = rng.integers(0, 60, (height // 16 + 1, width // 16 + 1, 3)) + np.array([190, 130, 170])
    img = Image.fromarray(small.clip(0, 255).astype(np.uint8)).resize((width, height), Image.BILINEAR)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, quality=90)


def synthetic_section(name, image_path, n, width, height, rng, genes=20):
    """A cohorts.Section of n spots on a square grid centred on the image, at most SPOT_PX apart."""
    array_xy = grid_xy(n)
    side = array_xy.max() + 1
    step = min(SPOT_PX, min(width, height) / (side + 1))
    pixel_xy = (array_xy - (side - 1) / 2) * step + np.array([width, height]) / 2  # (n, 2)
    ids = [f"{x}x{y}" for x, y in array_xy]
    counts = pd.DataFrame(rng.poisson(5, (n, genes)).astype(np.float32), index=ids, columns=[f"G{j}" for j in range(genes)])
    return cohorts.Section("her2st", name, name[0], Path(image_path), ids, array_xy, pixel_xy.astype(np.float64), counts)


class CropPerItem:
    """Stands in for SectionCrops.local: cuts spot j's crop from the image each time it is asked."""

    def __init__(self, image, centres, size):
        self.image, self.centres, self.size = image, centres, size

    def __len__(self):
        return len(self.centres)

    def __getitem__(self, j):
        return crop_image(self.image, self.centres[j], self.size)


class FakeCrops:
    """What features.extract_features reads: n local crops and, per spot, 25 on-image random tiles."""

    def __init__(self, n, size):
        self.window = np.random.default_rng(0).integers(0, 256, (25, size, size, 3), dtype=np.uint8)
        self.local = self.window[np.arange(n) % 25]  # (n, c, c, 3)

    def tiles(self, i):
        return self.window, np.ones(25, bool)
