"""Predictions as an AnnData file (.h5ad), written with h5py alone, for scanpy and squidpy.

AnnData's on-disk format (anndata >= 0.8, "encoding-type" / "encoding-version" on every node), the
parts written here:

    X            (n_obs, n_vars) float32, dense
    obs, var     dataframes: a string `_index`, one dataset per column (numbers or strings), or a
                 categorical group (integer codes + string categories); `column-order` lists them
    obsm         spatial: (n_obs, 2) spot centres (x, y) in full-resolution pixels
    layers       measured: the labels in the same units, where the slides have counts
    uns          nested dicts of strings, numbers and arrays; uns["spatial"][slide] holds what
                 squidpy's spatial_scatter reads: images/hires (a downsampled H&E, uint8) and
                 scalefactors/tissue_hires_scalef (image px per full-resolution px)

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


def write_predictions(path, slides: list[dict], genes, uns: dict) -> None:
    """One AnnData for the predicted spots of every slide. Each slide: name, spot_ids, X (N, G),
    pixel_xy (N, 2), array_xy (N, 2), image ((h, w, 3) uint8 or None) and scale (image px per slide px),
    spot_diameter (slide px), optional obs (column -> (N,) values) and measured (N, G)."""
    one = len(slides) == 1
    names = [sid if one else f"{s['name']}_{sid}" for s in slides for sid in s["spot_ids"]]
    extra = list(dict.fromkeys(c for s in slides for c in s.get("obs", {})))
    n = [len(s["spot_ids"]) for s in slides]
    obs = {"section": [s["name"] for s in slides for _ in s["spot_ids"]],
           "spot_id": [sid for s in slides for sid in s["spot_ids"]],
           "array_x": np.concatenate([s["array_xy"][:, 0] for s in slides]).astype(np.int64),
           "array_y": np.concatenate([s["array_xy"][:, 1] for s in slides]).astype(np.int64),
           **{c: np.concatenate([np.asarray(s["obs"][c], np.float64) if c in s.get("obs", {}) else np.full(k, np.nan)
                                 for s, k in zip(slides, n)]) for c in extra}}
    spatial = {s["name"]: {"images": {"hires": np.asarray(s["image"], np.uint8)} if s["image"] is not None else {},
                           "scalefactors": {"tissue_hires_scalef": float(s["scale"] or 1.0),
                                            "spot_diameter_fullres": float(s["spot_diameter"])},
                           "metadata": {"source_image_path": str(s.get("image_path", ""))}} for s in slides}
    measured = [s.get("measured") for s in slides]
    write_h5ad(path, np.concatenate([s["X"] for s in slides]), names, list(genes), obs=obs,
               obsm={"spatial": np.concatenate([s["pixel_xy"] for s in slides]).astype(np.float64)},
               layers={"measured": np.concatenate(measured).astype(np.float32)} if all(m is not None for m in measured) else None,
               uns={**uns, "spatial": spatial}, categorical=("section",))
