"""A folder of named, keyed numpy arrays that are built once and then memory-mapped.

Decoding a 9k x 10k H&E JPEG takes seconds and extracting frozen ResNet features takes minutes, so
both are done once and stored. An entry is a folder

    <root>/<name>-<hash of key>/key.json      what the arrays were built from, the array names, each
                                              array file's size and CRC-32
    <root>/<name>-<hash of key>/<array>.npy   one file per array

`ArrayCache.get(name, key, build)` returns the stored arrays when an intact entry with exactly this key
exists; otherwise it calls `build()`, writes the arrays into a temporary folder and renames it into
place (atomic), then deletes the stale entries of the same name. If `build()` raises, nothing is
left behind. Before building, an entry of another name of the same kind (the same last "-" part:
`<slide>-crops224`, `<slide>-features`) with exactly this key is reused: the key says what the
arrays were built from, so a slide of a training table read again under another name by
`evaluate.py --predict` finds its crops and features. A key holds the fingerprints of the source
files (`fingerprint`: their content, not where they lie nor when they were written), so editing a
source makes the entry stale, and moving, copying (`cp -r` as well as `cp -a`) or touching it does not.
Caches written before the keys were content-based (with modification times) are rebuilt once: the first
run after the change decodes and extracts again, and removes each old entry as stale as it replaces it.

Trust. An entry is checked when a process first opens it: each .npy's size (a zero-byte or truncated
file) and CRC-32 (bytes changed in place) against key.json; a damaged entry is rebuilt, with a warning.
The check reads each file once per process; the memory map then finds it in the page cache, when it
fits in memory. On a 1.5 GB entry (2 cores of an AMD EPYC) it takes 0.7 s from the page cache and 3.9 s
from a cold disk; writing the entry takes 1.9 s, CRC included. Two processes building one entry at once
both succeed: the one whose rename loses uses the winner's entry. A cache folder that cannot be written
(read-only, full) is a warning: the arrays are used from memory, not cached. Temporary folders of
killed processes are removed before the next build (checkpoint.remove_orphans).
"""

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import zlib
from pathlib import Path
from typing import Callable

import numpy as np

from genedml.checkpoint import no_space, remove_orphans, temp_path

log = logging.getLogger(__name__)


SAMPLE = 64 * 1024       # bytes of each block hashed in a large source file
WHOLE = 64 * 1024 ** 2   # source files up to this size are hashed whole (~40 ms)
BLOCKS = 64              # evenly spaced blocks hashed in a larger one (4 MiB read, first and last included)
NOT_WRITABLE = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def fingerprint(path) -> dict:
    """What identifies a source file's content cheaply: its size and a SHA-1 of its bytes, all of them
    up to 64 MiB, else of 64 evenly spaced 64 KiB blocks (a 9k x 10k JPEG is hashed whole; a
    multi-GB whole-slide image in 4 MiB of reads).

    Neither its path nor its modification time: a copy (`cp -r`, `cp -a`, rsync), another mount point
    of the same files or a second checkout finds the entries valid, so two of them sharing one cache
    never evict each other's. A rewrite changes the size or a hashed byte, except a same-size edit
    confined to the unhashed part of a file over 64 MiB, which goes unnoticed."""
    path = Path(path)
    size = path.stat().st_size
    h = hashlib.sha1()
    with open(path, "rb") as f:
        if size <= WHOLE:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                h.update(chunk)
        else:
            for i in range(BLOCKS):
                f.seek((size - SAMPLE) * i // (BLOCKS - 1))
                h.update(f.read(SAMPLE))
    return {"size": size, "sha1": h.hexdigest()}


def _canonical(key: dict) -> str:
    return json.dumps(key, sort_keys=True)


def _short_hash(key: dict) -> str:
    return hashlib.sha1(_canonical(key).encode()).hexdigest()[:12]


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            crc = zlib.crc32(chunk, crc)
    return crc


def _room(folder: Path) -> int:
    """Free bytes where `folder` lies. np.save reports a full disk as a short write without an errno
    ("N requested and M written"): a failed write of more than this was a full disk."""
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return 0


def _stamp(entry: Path) -> tuple:
    """Which entry, as written: a folder renamed over it (a rebuild by another process) stamps differently."""
    st = (entry / "key.json").stat()
    return str(entry), st.st_ino, st.st_mtime_ns


_verified: set = set()  # the stamps of the entries this process has checked (or written)


class ArrayCache:
    def __init__(self, root):
        self.root = Path(root)

    def _entries(self, name: str) -> list[Path]:
        """Every finished entry folder of this name, whatever its key."""
        if not self.root.is_dir():
            return []
        pattern = re.compile(re.escape(name) + r"-[0-9a-f]{12}")
        return [p for p in self.root.iterdir() if p.is_dir() and pattern.fullmatch(p.name)]

    def _read(self, entry: Path, key: dict) -> dict[str, np.ndarray] | None:
        """The arrays of `entry` if it is complete, intact and was built from `key`, else None."""
        try:
            meta = json.loads((entry / "key.json").read_text())
            if not isinstance(meta, dict) or _canonical(meta.get("key")) != _canonical(key):
                return None
            stamp = _stamp(entry)
            if stamp not in _verified:
                for a in meta["arrays"]:
                    f = entry / f"{a}.npy"
                    size = f.stat().st_size
                    if size != meta["bytes"][a] or _crc32(f) != meta["crc32"][a]:
                        log.warning("cache: %s is damaged (%s: %s); rebuilding it", entry, f.name,
                                    f"{size} bytes, not {meta['bytes'][a]}" if size != meta["bytes"][a]
                                    else "its bytes differ from the CRC-32 written with it")
                        return None
                _verified.add(stamp)
            return {a: np.load(entry / f"{a}.npy", mmap_mode="r") for a in meta["arrays"]}
        except (OSError, ValueError, EOFError, KeyError, TypeError):  # missing, half-written or foreign
            return None

    def _same_key(self, name: str, key: dict) -> dict[str, np.ndarray] | None:
        """The arrays of a complete entry of another name of the same kind built from exactly this key."""
        if not self.root.is_dir():
            return None
        suffix, kind = f"-{_short_hash(key)}", name.rsplit("-", 1)[-1]
        for entry in sorted(p for p in self.root.iterdir() if p.is_dir() and p.name.endswith(suffix)
                            and not p.name.startswith(".") and p.name[:-len(suffix)].rsplit("-", 1)[-1] == kind):
            arrays = self._read(entry, key)
            if arrays is not None:
                log.info("cache: %s holds what is asked for; reused", entry.name)
                return arrays
        return None

    def get(self, name: str, key: dict, build: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        assert re.fullmatch(r"[A-Za-z0-9_.\-]+", name), f"cache name must be a plain file name, got {name!r}"
        entry = self.root / f"{name}-{_short_hash(key)}"
        arrays = self._read(entry, key)
        if arrays is not None:
            return arrays
        elsewhere = self._same_key(name, key)
        if elsewhere is not None:
            return elsewhere

        remove_orphans(self.root)  # what killed builds left: on a full disk, the space this one needs
        built = build()
        assert isinstance(built, dict) and built, f"build() for {name!r} must return a non-empty dict of arrays"
        built = {a: np.asarray(arr) for a, arr in built.items()}
        for a, arr in built.items():
            assert re.fullmatch(r"[A-Za-z0-9_]+", a), f"array name must be a plain identifier, got {a!r}"
            assert arr.dtype != object, f"array {a!r} of {name!r} has dtype object, which cannot be mapped"
        try:
            arrays = self._write(entry, key, built)
        except OSError as e:
            full = no_space(e) or e.errno is None and _room(self.root) < sum(a.nbytes for a in built.values())
            if not full and e.errno not in NOT_WRITABLE:
                raise
            log.warning("cache: %s: %s; %s is used from memory, not cached (free space, or give another --cache-dir)",
                        self.root, "no space left" if full else e.strerror, name)
            for arr in built.values():
                arr.setflags(write=False)  # as a cached array is
            return built
        for stale in self._entries(name):
            if stale != entry:
                log.info("cache: removing stale entry %s", stale)
                shutil.rmtree(stale, ignore_errors=True)
        return arrays

    def _write(self, entry: Path, key: dict, built: dict) -> dict[str, np.ndarray]:
        """Write `built` into a temporary folder and rename it into place; the entry's arrays."""
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = temp_path(entry)
        try:
            tmp.mkdir()
            meta = {"key": key, "arrays": list(built), "bytes": {}, "crc32": {}}
            for a, arr in built.items():
                np.save(tmp / f"{a}.npy", arr)
                meta["bytes"][a], meta["crc32"][a] = (tmp / f"{a}.npy").stat().st_size, _crc32(tmp / f"{a}.npy")
            # key.json is written last: an entry without it is never read as complete
            (tmp / "key.json").write_text(json.dumps(meta, sort_keys=True, indent=1))
            for _ in range(3):
                try:
                    os.rename(tmp, entry)
                    break
                except OSError as e:
                    if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                        raise
                winner = self._read(entry, key)
                if winner is not None:  # another process built the same entry first: use its
                    shutil.rmtree(tmp, ignore_errors=True)
                    return winner
                aside = temp_path(entry)  # a damaged leftover under this name: set it aside, then retry
                try:
                    os.rename(entry, aside)
                except FileNotFoundError:  # another process set it aside first
                    pass
                shutil.rmtree(aside, ignore_errors=True)
            else:
                raise OSError(errno.EEXIST, f"{entry}: replaced by another process at each of 3 attempts")
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _verified.add(_stamp(entry))  # written and checksummed by this process just now
        arrays = self._read(entry, key)
        assert arrays is not None, f"cache entry {entry} unreadable right after writing it"
        return arrays
