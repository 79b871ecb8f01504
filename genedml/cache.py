"""A folder of named, keyed numpy arrays that are built once and then memory-mapped.

Decoding a 9k x 10k H&E JPEG takes seconds and extracting frozen ResNet features takes minutes, so
both are done once and stored. An entry is a folder

    <root>/<name>-<hash of key>/key.json      what the arrays were built from (+ the array names)
    <root>/<name>-<hash of key>/<array>.npy   one file per array

`ArrayCache.get(name, key, build)` returns the stored arrays when an entry with exactly this key
exists; otherwise it calls `build()`, writes the arrays into a temporary folder and renames it into
place (atomic), then deletes the stale entries of the same name. If `build()` raises, nothing is
left behind. Before building, an entry of another name of the same kind (the same last "-" part:
`<slide>-crops224`, `<slide>-features`) with exactly this key is reused: the key says what the
arrays were built from, so a slide of a training table read again under another name by
`evaluate.py --predict` finds its crops and features. A key holds the fingerprints of the source
files (`fingerprint`: what the file is, not where it lies), so editing or touching a source makes
the entry stale, and moving or copying it does not.
"""

import hashlib
import json
import logging
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Callable

import numpy as np

log = logging.getLogger(__name__)


SAMPLE = 64 * 1024  # bytes hashed at each end of a source file


def fingerprint(path) -> dict:
    """What identifies a source file's content cheaply, wherever it lies: its name, size, modification
    time (whole seconds) and a SHA-1 of its first and last 64 KiB.

    Not its path: a copy that keeps modification times (`cp -a`, `rsync -a`), another mount point of
    the same files or a second checkout finds the entries valid, so two of them sharing one cache
    never evict each other's. Seconds, not nanoseconds, so a file system that keeps coarser times
    still matches; the hash catches a same-size rewrite within one second that changes either end,
    the size and time the rest (hashing a 9k x 10k JPEG whole would cost a good part of decoding it)."""
    path = Path(path)
    st = path.stat()
    h = hashlib.sha1()
    with open(path, "rb") as f:
        h.update(f.read(SAMPLE))
        if st.st_size > 2 * SAMPLE:
            f.seek(-SAMPLE, os.SEEK_END)
        h.update(f.read(SAMPLE))
    return {"name": path.name, "size": st.st_size, "mtime": st.st_mtime_ns // 10**9, "sha1": h.hexdigest()}


def _canonical(key: dict) -> str:
    return json.dumps(key, sort_keys=True)


def _short_hash(key: dict) -> str:
    return hashlib.sha1(_canonical(key).encode()).hexdigest()[:12]


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
        """The arrays of `entry` if it is complete and was built from `key`, else None."""
        try:
            meta = json.loads((entry / "key.json").read_text())
        except (OSError, ValueError):
            return None
        if _canonical(meta.get("key")) != _canonical(key):
            return None
        try:
            return {a: np.load(entry / f"{a}.npy", mmap_mode="r") for a in meta["arrays"]}
        except (OSError, ValueError):
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

        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".{entry.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            built = build()
            assert isinstance(built, dict) and built, f"build() for {name!r} must return a non-empty dict of arrays"
            tmp.mkdir()
            for a, arr in built.items():
                assert re.fullmatch(r"[A-Za-z0-9_]+", a), f"array name must be a plain identifier, got {a!r}"
                arr = np.asarray(arr)
                assert arr.dtype != object, f"array {a!r} of {name!r} has dtype object, which cannot be mapped"
                np.save(tmp / f"{a}.npy", arr)
            # key.json is written last: an entry without it is never read as complete
            (tmp / "key.json").write_text(json.dumps({"key": key, "arrays": list(built)}, sort_keys=True, indent=1))
            if entry.exists():
                if self._read(entry, key) is not None:  # another process finished first
                    shutil.rmtree(tmp)
                    return self._read(entry, key)
                shutil.rmtree(entry)  # an incomplete or corrupt leftover under the same hash
            os.rename(tmp, entry)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        for stale in self._entries(name):
            if stale != entry:
                log.info("cache: removing stale entry %s", stale)
                shutil.rmtree(stale, ignore_errors=True)
        arrays = self._read(entry, key)
        assert arrays is not None, f"cache entry {entry} unreadable right after writing it"
        return arrays
