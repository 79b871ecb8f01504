"""cache.py: build once, reuse, rebuild when stale, leave nothing behind on failure; and the crop cache
of data.py on top of it (a touched or modified source JPEG is decoded again, an unchanged one is not,
wherever it lies: a copy of the data finds the entries of the original)."""

import os
import shutil

import numpy as np
import pytest
from PIL import Image

from genedml import cohorts
import data
from genedml.cache import ArrayCache, fingerprint
from genedml import crops as crops_module
from genedml.crops import section_crops


def _builder(calls, value=1.0):
    def build():
        calls.append(1)
        return {"a": np.full((3, 2), value, np.float32), "ids": np.array(["x", "yy"])}
    return build


def test_build_once_then_memory_mapped(tmp_path):
    cache, calls = ArrayCache(tmp_path / "c"), []
    first = cache.get("thing", {"v": 1}, _builder(calls))
    again = ArrayCache(tmp_path / "c").get("thing", {"v": 1}, _builder(calls))  # a new process, same folder
    assert len(calls) == 1
    assert isinstance(again["a"], np.memmap) and not again["a"].flags.writeable
    assert np.array_equal(first["a"], again["a"]) and again["ids"].tolist() == ["x", "yy"]
    assert len(list((tmp_path / "c").iterdir())) == 1


def test_new_key_rebuilds_and_removes_stale_entry(tmp_path):
    cache, calls = ArrayCache(tmp_path), []
    cache.get("thing", {"v": 1}, _builder(calls))
    cache.get("thing-else", {"v": 1}, _builder(calls))  # another name sharing the prefix: kept
    out = cache.get("thing", {"v": 2}, _builder(calls, 2.0))
    assert len(calls) == 3 and (out["a"] == 2).all()
    names = sorted(p.name.rsplit("-", 1)[0] for p in tmp_path.iterdir())
    assert names == ["thing", "thing-else"]


def test_failed_build_leaves_nothing(tmp_path):
    def boom():
        raise RuntimeError("decoder exploded")
    with pytest.raises(RuntimeError, match="exploded"):
        ArrayCache(tmp_path / "c").get("thing", {"v": 1}, boom)
    assert not (tmp_path / "c").exists() or not list((tmp_path / "c").iterdir())
    calls = []
    ArrayCache(tmp_path / "c").get("thing", {"v": 1}, _builder(calls))
    (next((tmp_path / "c").iterdir()) / "key.json").unlink()  # an entry without key.json is incomplete
    ArrayCache(tmp_path / "c").get("thing", {"v": 1}, _builder(calls))
    assert len(calls) == 2


def test_fingerprint_changes_on_touch_and_rewrite_not_on_copy(tmp_path):
    f = tmp_path / "f.bin"
    f.write_bytes(bytes(300_000))
    a = fingerprint(f)
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert fingerprint(f)["mtime"] != a["mtime"] and fingerprint(f)["size"] == 300_000
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    for where in (10, 300_000 - 10):  # a same-size rewrite at either end, modification time put back
        with open(f, "r+b") as g:
            g.seek(where)
            g.write(b"x")
        os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert fingerprint(f) != a and fingerprint(f)["mtime"] == a["mtime"]
        with open(f, "r+b") as g:  # put the byte back: the other end's rewrite is then tested alone
            g.seek(where)
            g.write(b"\0")
        os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert fingerprint(f) == a
    (tmp_path / "elsewhere").mkdir()
    copy = shutil.copy2(f, tmp_path / "elsewhere" / "f.bin")  # cp -a keeps the modification time
    assert fingerprint(copy) == fingerprint(f), "the key must not depend on where the file lies"


def test_section_crops_rebuilt_only_when_source_changes(tmp_path, monkeypatch):
    root = tmp_path / "her2st"
    from test_data import write_her2st
    write_her2st(root)
    decodes = []
    real_decode = crops_module._decode
    monkeypatch.setattr(crops_module, "_decode", lambda p, *scale: decodes.append(p) or real_decode(p, *scale))
    cache = ArrayCache(tmp_path / "cache")
    s = cohorts.load_section("her2st", root, "A1")
    first = section_crops(s, cache, 16, progress=False)
    second = section_crops(s, cache, 16, progress=False)
    assert len(decodes) == 1 and first.key == second.key
    section_crops(s, cache, 8, progress=False)  # another crop size: new crops, same decoded image
    assert len(decodes) == 1
    st = s.image_path.stat()
    os.utime(s.image_path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touch
    touched = section_crops(s, cache, 16, progress=False)
    assert len(decodes) == 2 and touched.key != first.key
    Image.fromarray(np.zeros((80, 100, 3), np.uint8)).save(s.image_path)  # modify
    modified = section_crops(s, cache, 16, progress=False)
    assert len(decodes) == 3 and (modified.local == 0).all()
    entries = sorted(p.name.rsplit("-", 1)[0] for p in (tmp_path / "cache").iterdir())
    assert entries == ["her2st-A1-crops16", "her2st-A1-crops8", "her2st-A1-image"]  # stale ones removed


def test_copied_data_and_two_checkouts_share_one_cache(tmp_path, monkeypatch):
    """A cp -a copy of the data (or a second checkout holding one) reads the original's entries and
    leaves them in place; used in turn, the two never rebuild or evict each other's."""
    from test_data import write_her2st
    write_her2st(tmp_path / "one" / "her2st")
    shutil.copytree(tmp_path / "one", tmp_path / "two")  # copy2 keeps modification times, as cp -a does
    decodes = []
    real_decode = crops_module._decode
    monkeypatch.setattr(crops_module, "_decode", lambda p, *scale: decodes.append(p) or real_decode(p, *scale))
    cache = ArrayCache(tmp_path / "shared-cache")
    keys = []
    for checkout in ("one", "two", "one", "two"):
        s = cohorts.load_section("her2st", tmp_path / checkout / "her2st", "A1")
        keys.append(section_crops(s, cache, 16, progress=False).key)
    assert len(decodes) == 1, f"decoded {len(decodes)} times: the copy did not find the original's entries"
    assert all(k == keys[0] for k in keys)
    assert sorted(p.name.rsplit("-", 1)[0] for p in (tmp_path / "shared-cache").iterdir()) == \
        ["her2st-A1-crops16", "her2st-A1-image"]


def test_an_entry_of_the_same_kind_and_key_is_reused_under_another_name(tmp_path):
    cache, calls = ArrayCache(tmp_path), []
    cache.get("mine-S0-features", {"crops": "k", "weights": "w"}, _builder(calls))
    out = cache.get("predict-fullres-features", {"crops": "k", "weights": "w"}, _builder(calls, 2.0))
    assert len(calls) == 1 and (out["a"] == 1).all()  # found by its key: nothing rebuilt
    cache.get("predict-fullres-tokens", {"crops": "k", "weights": "w"}, _builder(calls))  # another kind: built
    cache.get("predict-fullres-features", {"crops": "k", "weights": "other"}, _builder(calls))
    assert len(calls) == 3
