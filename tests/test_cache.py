"""cache.py: build once, reuse, rebuild when stale or damaged, leave nothing behind on failure, survive a
lost race and a folder that cannot be written; and the crop cache of data.py on top of it (a modified
source JPEG is decoded again, a touched or unchanged one is not, wherever it lies: a copy of the data
finds the entries of the original)."""

import errno
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from genedml import cohorts
from genedml import cache as cache_module
from genedml import checkpoint
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


def test_fingerprint_is_the_content_not_the_time_nor_the_place(tmp_path, monkeypatch):
    f = tmp_path / "f.bin"
    f.write_bytes(bytes(300_000))
    a = fingerprint(f)
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touch
    assert fingerprint(f) == a, "a touch changes no byte: the entries stay valid"
    monkeypatch.setattr(cache_module, "WHOLE", 100_000)  # a "large" file: sampled blocks, the first and last included
    sampled = fingerprint(f)
    for where in (0, 10, 150_000 - cache_module.SAMPLE // 2, 300_000 - 10):  # a same-size rewrite at either end or mid-file
        for byte, same in ((b"x", False), (b"\0", True)):  # then put back: the next place is tested alone
            with open(f, "r+b") as g:
                g.seek(where)
                g.write(byte)
            os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
            assert (fingerprint(f) == sampled) == same, f"byte {where}"
    monkeypatch.undo()
    (tmp_path / "elsewhere").mkdir()
    copy = shutil.copy(f, tmp_path / "elsewhere" / "f.bin")  # cp -r: a new modification time
    os.utime(copy, ns=(st.st_atime_ns, st.st_mtime_ns + 5 * 10**9))
    assert fingerprint(copy) == a, "the key must depend neither on where the file lies nor on when it was copied"
    f.write_bytes(bytes(299_999) + b"x")
    assert fingerprint(f) != a


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
    os.utime(s.image_path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touch: the same bytes
    touched = section_crops(s, cache, 16, progress=False)
    assert len(decodes) == 1 and touched.key == first.key
    Image.fromarray(np.zeros((80, 100, 3), np.uint8)).save(s.image_path)  # modify
    modified = section_crops(s, cache, 16, progress=False)
    assert len(decodes) == 2 and (modified.local == 0).all()
    entries = sorted(p.name.rsplit("-", 1)[0] for p in (tmp_path / "cache").iterdir())
    assert entries == ["her2st-A1-crops16", "her2st-A1-crops8", "her2st-A1-image"]  # stale ones removed


@pytest.mark.parametrize("cp", ["cp -a", "cp -r"])
def test_copied_data_and_two_checkouts_share_one_cache(tmp_path, monkeypatch, cp):
    """A copy of the data, keeping modification times (cp -a) or not (cp -r), or a second checkout
    holding one, reads the original's entries and leaves them in place; used in turn, the two never
    rebuild or evict each other's."""
    from test_data import write_her2st
    write_her2st(tmp_path / "one" / "her2st")
    shutil.copytree(tmp_path / "one", tmp_path / "two", copy_function=shutil.copy2 if cp == "cp -a" else shutil.copy)
    if cp == "cp -r":  # copied later than written: times that differ by whole seconds
        for f in (tmp_path / "two").rglob("*"):
            os.utime(f, (f.stat().st_atime + 5, f.stat().st_mtime + 5))
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


# ----------------------------------------------------------------------------- damaged entries, races, full disks

def _entry(root, name="thing"):
    (entry,) = [p for p in root.iterdir() if p.name.startswith(name + "-")]
    return entry


def _new_process(monkeypatch):
    """What a later run sees: an entry it has not checked yet."""
    monkeypatch.setattr(cache_module, "_verified", set(), raising=False)


@pytest.mark.parametrize("damage", ["same-size garbage", "zero bytes", "truncated", "empty key.json"])
def test_a_damaged_entry_is_rebuilt_not_trusted(tmp_path, monkeypatch, caplog, damage):
    calls = []
    ArrayCache(tmp_path).get("thing", {"v": 1}, _builder(calls))
    f = _entry(tmp_path) / "a.npy"
    if damage == "same-size garbage":  # bytes changed in place: the header still parses, the values are wrong
        raw = bytearray(f.read_bytes())
        raw[-8:] = np.random.default_rng(0).bytes(8)
        f.write_bytes(bytes(raw))
    elif damage == "zero bytes":
        f.write_bytes(b"")
    elif damage == "truncated":
        f.write_bytes(f.read_bytes()[:-4])
    else:
        (_entry(tmp_path) / "key.json").write_text("")
    _new_process(monkeypatch)
    with caplog.at_level("WARNING"):
        out = ArrayCache(tmp_path).get("thing", {"v": 1}, _builder(calls))
    assert len(calls) == 2 and (out["a"] == 1).all() and out["ids"].tolist() == ["x", "yy"]
    if damage != "empty key.json":
        assert "damaged" in caplog.text and "a.npy" in caplog.text
    assert [p.name for p in tmp_path.iterdir()] == [_entry(tmp_path).name], "one entry, nothing set aside left"
    _new_process(monkeypatch)
    ArrayCache(tmp_path).get("thing", {"v": 1}, _builder(calls))
    assert len(calls) == 2, "the rebuilt entry is intact"


def test_an_entry_is_checked_once_per_process(tmp_path, monkeypatch):
    ArrayCache(tmp_path).get("thing", {"v": 1}, _builder([]))
    _new_process(monkeypatch)
    crcs = []
    real = cache_module._crc32
    monkeypatch.setattr(cache_module, "_crc32", lambda p: crcs.append(p.name) or real(p))
    for _ in range(3):
        ArrayCache(tmp_path).get("thing", {"v": 1}, _builder([]))
    assert sorted(crcs) == ["a.npy", "ids.npy"]


def test_a_lost_race_uses_the_winners_entry(tmp_path, monkeypatch):
    """Another process renames the same entry into place just before this one does (ENOTEMPTY): this
    one uses the winner's entry and leaves no temporary folder."""
    real, raced = os.rename, []

    def rename(src, dst):
        if not raced and ".tmp-" in str(src):
            raced.append(1)
            ArrayCache(tmp_path).get("thing", {"v": 1}, _builder([], 3.0))  # the winner, landing first
        return real(src, dst)

    monkeypatch.setattr(cache_module.os, "rename", rename)
    out = ArrayCache(tmp_path).get("thing", {"v": 1}, _builder([]))
    assert raced and (out["a"] == 3).all(), "the winner's arrays"
    assert [p.name for p in tmp_path.iterdir()] == [_entry(tmp_path).name]


def test_two_processes_building_one_entry_both_succeed(tmp_path):
    """Two processes finish building the same entry at the same moment (each waits for the other's build
    before writing): both exit 0 with the same arrays, and one intact entry remains."""
    import subprocess
    import sys
    script = (
        "import sys, time, numpy as np\n"
        "from pathlib import Path\n"
        "from genedml.cache import ArrayCache\n"
        "root, me = Path(sys.argv[1]), sys.argv[2]\n"
        "def build():\n"
        "    (root.parent / me).touch()\n"
        "    while not all((root.parent / w).exists() for w in ('one', 'two')): time.sleep(0.01)\n"
        "    return {'a': np.arange(1000.0)}\n"
        "a = ArrayCache(root).get('thing', {'v': 1}, build)['a']\n"
        "assert (a == np.arange(1000.0)).all()\n")
    repo = Path(__file__).resolve().parents[1]
    runs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "c"), me], cwd=repo,
                             stderr=subprocess.PIPE, text=True) for me in ("one", "two")]
    for r in runs:
        assert r.wait(timeout=120) == 0, r.stderr.read()
    assert [p.name for p in (tmp_path / "c").iterdir()] == [_entry(tmp_path / "c").name]
    calls = []
    ArrayCache(tmp_path / "c").get("thing", {"v": 1}, _builder(calls))
    assert not calls


@pytest.mark.parametrize("error", [errno.ENOSPC, "short write", errno.EROFS])
def test_a_full_or_read_only_cache_is_a_warning_and_leaves_nothing(tmp_path, monkeypatch, caplog, error):
    """np.save fails half-way (a full disk: ENOSPC, or numpy's short write without an errno) or at once
    (a read-only folder): the arrays are used from memory, with one warning naming the folder, and no
    half-written entry or temporary folder."""
    ArrayCache(tmp_path).get("other", {"v": 1}, _builder([]))

    def failing(path, arr):
        if error != errno.EROFS:  # what np.save leaves on a full disk
            Path(path).write_bytes(b"\x93NUMPY half")
        if error == "short write":  # what array.tofile says when the disk fills
            raise OSError(f"{arr.nbytes} requested and 10 written")
        raise OSError(error, os.strerror(error))  # OSError(EISDIR, ...) is an IsADirectoryError

    monkeypatch.setattr(cache_module.np, "save", failing)
    monkeypatch.setattr(cache_module, "_room", lambda folder: 10)
    with caplog.at_level("WARNING"):
        out = ArrayCache(tmp_path).get("thing", {"v": 1}, _builder([]))
    assert (out["a"] == 1).all() and not out["a"].flags.writeable
    assert str(tmp_path) in caplog.text and ("file system" if error == errno.EROFS else "no space left") in caplog.text
    assert [p.name for p in tmp_path.iterdir()] == [_entry(tmp_path, "other").name]
    error = errno.EISDIR  # an error that says nothing of the disk is raised
    with pytest.raises(IsADirectoryError):
        ArrayCache(tmp_path).get("thing", {"v": 1}, _builder([]))


def test_orphans_of_killed_builds_are_removed_before_the_next_build(tmp_path):
    import subprocess
    import sys
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)  # a process that has exited
    host = checkpoint.HOST
    orphan = tmp_path / f".thing-0123456789ab.tmp-{pid}-deadbeef@{host}"
    orphan.mkdir()
    (orphan / "a.npy").write_bytes(bytes(1000))
    live = tmp_path / f".thing-0123456789ab.tmp-{os.getpid()}-cafecafe@{host}"  # a build in progress: kept
    elsewhere = tmp_path / f".thing-0123456789ab.tmp-{pid}-deadbeef@another-host"  # another machine's: kept
    live.mkdir(), elsewhere.mkdir()
    ArrayCache(tmp_path).get("thing", {"v": 1}, _builder([]))
    assert not orphan.exists() and live.exists() and elsewhere.exists()
