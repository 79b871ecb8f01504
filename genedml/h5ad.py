"""Predictions as an AnnData file (.h5ad), written with h5py alone, for scanpy and squidpy.

AnnData's on-disk format (anndata >= 0.8, "encoding-type" / "encoding-version" on every node), the
parts written here:

    X            (n_obs, n_vars) float32, dense
    obs, var     dataframes: a string `_index`, one dataset per column (numbers or strings), or a
                 categorical group (integer codes + string categories); `column-order` lists them
    obsm         spatial: (n_obs, 2) spot centres (x, y) in full-resolution pixels
    layers       measured: the labels in the same units, where the slides have counts
    uns          nested dicts of strings, numbers and arrays; uns["spatial"][slide] is one library, laid
                 out as Space Ranger's files and read by scanpy (sc.pl.spatial) and squidpy: images/hires
                 (longest side at most 2,000 px) and images/lowres (at most 600 px), uint8, and
                 scalefactors: tissue_hires_scalef / tissue_lowres_scalef (image px per full-resolution
                 px), spot_diameter_fullres and fiducial_diameter_fullres (full-resolution px)

visium_files.py reads the same format back with h5py (HEST-1k's .h5ad). h5py is an optional extra;
`write_predictions` says what to install when it is missing. anndata itself is not needed: the
tests read these files back with anndata in an environment of their own (.ci/run).
"""
import os
from pathlib import Path

import numpy as np


def _h5py(path):
    try:
        import h5py  # optional: only .h5ad output (and the .h5 / .h5ad readers of visium_files.py) need it
    except ImportError:
        raise ValueError(f"{path}: writing .h5ad needs h5py, which is not installed (pip install h5py)") from None
    return h5py


def _encoding(node, kind, version):
    node.attrs["encoding-type"] = kind
    node.attrs["encoding-version"] = version


def _write(h5py, group, name, value):
    """One value of uns, obsm or a dataframe column, encoded as anndata writes it (None: left out)."""
    if value is None:
        return
    if isinstance(value, dict):
        g = group.create_group(name)
        _encoding(g, "dict", "0.1.0")
        for k, v in value.items():
            _write(h5py, g, str(k), v)
    elif isinstance(value, str):
        _encoding(group.create_dataset(name, data=value, dtype=h5py.string_dtype()), "string", "0.2.0")
    elif isinstance(value, (bool, int, float, np.number, np.bool_)):
        _encoding(group.create_dataset(name, data=value), "numeric-scalar", "0.2.0")
    else:
        a = np.asarray(value)
        if a.dtype.kind in "USO":  # strings (None becomes "")
            a = np.array(["" if v is None else str(v) for v in a.reshape(-1)], dtype=object).reshape(a.shape)
            _encoding(group.create_dataset(name, data=a, dtype=h5py.string_dtype()), "string-array", "0.2.0")
        else:
            _encoding(group.create_dataset(name, data=a), "array", "0.2.0")


def _dataframe(h5py, group, name, index, columns: dict, categorical=()):
    g = group.create_group(name)
    _encoding(g, "dataframe", "0.2.0")
    g.attrs["_index"] = "_index"
    g.attrs.create("column-order", np.array(list(columns), dtype=object), dtype=h5py.string_dtype())
    _write(h5py, g, "_index", np.asarray(index, dtype=object))
    for c, values in columns.items():
        if c not in categorical:
            _write(h5py, g, c, values)
            continue
        values = [str(v) for v in values]
        categories = list(dict.fromkeys(values))  # in order of first appearance
        code = {v: i for i, v in enumerate(categories)}
        cg = g.create_group(c)
        _encoding(cg, "categorical", "0.2.0")
        cg.attrs["ordered"] = False
        _write(h5py, cg, "codes", np.array([code[v] for v in values], np.int32))
        _write(h5py, cg, "categories", np.array(categories, dtype=object))


def write_h5ad(path, X, obs_names, var_names, obs=None, obsm=None, layers=None, uns=None, categorical=()):
    """Write an AnnData file atomically (temporary file, then rename). obs: column -> (n_obs,) values;
    obsm / layers: name -> array; uns: nested dict; categorical: the obs columns stored as categories."""
    path = Path(path)
    h5py = _h5py(path)
    X = np.asarray(X, np.float32)
    assert X.shape == (len(obs_names), len(var_names)), f"X {X.shape} for {len(obs_names)} obs x {len(var_names)} vars"
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with h5py.File(tmp, "w") as f:
            _encoding(f, "anndata", "0.1.0")
            _write(h5py, f, "X", X)
            _dataframe(h5py, f, "obs", obs_names, obs or {}, categorical)
            _dataframe(h5py, f, "var", var_names, {})
            for part, content in (("obsm", obsm), ("varm", None), ("obsp", None), ("varp", None),
                                  ("layers", layers), ("uns", uns)):
                _write(h5py, f, part, content or {})
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


HIRES_PX, LOWRES_PX = 2000, 600  # Space Ranger's tissue_hires_image / tissue_lowres_image: their longest side
FIDUCIAL_OVER_SPOT = 144.46 / 89.43  # fiducial / spot diameter in Space Ranger's scalefactors_json.json


def shrink(image, longest: int):
    """(image, factor): an (h, w, 3) uint8 image box-filtered (each new pixel the mean of the old pixels
    it covers) so that its longest side is at most `longest` px; factor = new px per old px, 1.0 when
    it was small enough already (never enlarged). numpy alone, like the rest of this file."""
    image = np.asarray(image, np.uint8)
    h, w = image.shape[:2]
    if max(h, w) <= longest:
        return image, 1.0
    f = longest / max(h, w)
    for axis, (n, new) in enumerate(((h, max(1, round(h * f))), (w, max(1, round(w * f))))):
        starts = np.arange(new) * n // new  # the first old pixel of each new one
        sums = np.add.reduceat(image.astype(np.uint32), starts, axis=axis)
        counts = np.diff(np.append(starts, n)).reshape((-1, 1, 1) if axis == 0 else (1, -1, 1))
        image = np.rint(sums / counts).astype(np.uint8)
    return image, image.shape[1] / w


def library(s: dict) -> dict:
    """uns["spatial"][slide] for one slide dict of write_predictions: its images at Space Ranger's two
    sizes and their scale factors (slide px -> image px), the spot and fiducial diameters in slide px."""
    sizes = {"spot_diameter_fullres": float(s["spot_diameter"]),
             "fiducial_diameter_fullres": float(s["spot_diameter"]) * FIDUCIAL_OVER_SPOT}
    images = {}
    if s["image"] is not None:
        hires, f = shrink(s["image"], HIRES_PX)
        lowres, g = shrink(hires, LOWRES_PX)
        images = {"hires": hires, "lowres": lowres}
        sizes.update(tissue_hires_scalef=float(s["scale"]) * f, tissue_lowres_scalef=float(s["scale"]) * f * g)
    return {"images": images, "scalefactors": sizes, "metadata": {"source_image_path": str(s.get("image_path", ""))}}


def write_predictions(path, slides: list[dict], genes, uns: dict) -> None:
    """One AnnData for the predicted spots of every slide, one library a slide (uns["spatial"][name]),
    named in obs["library_id"] (squidpy's library_key). Each slide: name, spot_ids, X (N, G), pixel_xy
    (N, 2), array_row / array_col (N,) integers, image ((h, w, 3) uint8 of any size, or None) and scale
    (image px per slide px), spot_diameter (slide px), optional obs (column -> (N,) numbers) and measured
    (N, G). obs_names are <slide>_<spot id>: unique across files, so ad.concat of two files is valid."""
    extra = list(dict.fromkeys(c for s in slides for c in s.get("obs", {})))
    n = [len(s["spot_ids"]) for s in slides]
    obs = {"library_id": [s["name"] for s in slides for _ in s["spot_ids"]],
           "spot_id": [sid for s in slides for sid in s["spot_ids"]],
           "array_row": np.concatenate([np.asarray(s["array_row"], np.int64) for s in slides]),
           "array_col": np.concatenate([np.asarray(s["array_col"], np.int64) for s in slides]),
           "in_tissue": np.ones(sum(n), np.int64),  # every spot predicted is on the tissue (a grid's, a spot file's)
           **{c: np.concatenate([np.asarray(s["obs"][c], np.float64) if c in s.get("obs", {}) else np.full(k, np.nan)
                                 for s, k in zip(slides, n)]) for c in extra}}
    measured = [s.get("measured") for s in slides]
    write_h5ad(path, np.concatenate([s["X"] for s in slides]), [f"{s['name']}_{sid}" for s in slides for sid in s["spot_ids"]],
               list(genes), obs=obs, obsm={"spatial": np.concatenate([s["pixel_xy"] for s in slides]).astype(np.float64)},
               layers={"measured": np.concatenate(measured).astype(np.float32)} if all(m is not None for m in measured) else None,
               uns={**uns, "spatial": {s["name"]: library(s) for s in slides}}, categorical=("library_id",))
