"""Checkpoints: written atomically (in the background on a GPU), read safely, and resumed only into the same run.

A fold writes `best.pt` (the model and everything evaluation needs to rebuild it: config, genes, data
settings, the frozen trunk or the record of a foundation encoder; no optimiser) whenever the selection
metric improves, and `last.pt` (best.pt's contents plus Adam's, the scheduler's and the scaler's state)
every epoch. A file appears only when complete (a temporary file, then a rename); every checkpoint is
read with torch.load(weights_only=True), so it holds primitives and tensors only (`plain`), and
evaluation checks what it holds (`check_for_evaluation`). A resumed run must be the same run: `check_resume` and `refuse_other_settings` stop, naming the flags, when not.

Integrity. torch.load does not check its zip records' CRCs, so a few bytes changed in a tensor load
silently (a table of NaN, features re-extracted for a "new" trunk). Every checkpoint holds the CRC-32 of
each tensor's bytes ("checksum"), written with it and verified by load_checkpoint, which refuses a
mismatch naming the tensor, and refuses non-finite weights. On a 235 MB state dict (2 cores of an AMD
EPYC) this adds 0.08 s to each: torch.save 0.22 -> 0.30 s, torch.load 0.14 -> 0.22 s. Checkpoints
written before the checksum load with their weights checked for being finite only.

Files written whole (`atomic_write`, used for checkpoints, CSV tables and the training log): a
temporary file `.<name>.tmp-<pid>-<random>@<host>` beside the target, renamed over it when complete and
removed when the write fails. A killed process cannot remove its own, so each write first removes the
orphans of the same target that a dead process of this host left (`remove_orphans`): a retry on a full
disk does not pile them up. A full disk is one line, "no space left on <folder>", and the previous file
is untouched.
"""
import errno
import json
import logging
import math
import os
import re
import shutil
import socket
import threading
import uuid
import zlib
from contextlib import contextmanager
from pathlib import Path

import torch

from genedml.trunk import MIN_CROP

log = logging.getLogger(__name__)

# Flags that do not change what a run computes: a re-run of --fold all may differ in these.
RUN_ONLY = {"out", "fold", "resume", "root", "cache_dir", "workers", "device", "log_every", "compile", "data_on_device"}
KEYS = ("model", "frozen_trunk", "config", "genes", "data", "selection")  # what every Gene-DML checkpoint holds


# ----------------------------------------------------------------------------- files written whole
HOST = socket.gethostname()  # a cache or run folder may be shared by several machines (NFS)
_TEMP = re.compile(r"\.(?P<target>.+)\.tmp-(?P<pid>\d+)-[0-9a-f]{8}@(?P<host>.+)")


def temp_path(path) -> Path:
    """Where `path` is written before its rename: hidden, and naming the writer, so that a later run can
    tell an orphan of a dead process (remove_orphans) from a write in progress."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}@{HOST}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: is there such a process? (sends nothing)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True


def remove_orphans(folder, target: str | None = None) -> None:
    """Remove the temporary files and folders (temp_path) that dead processes of this host left in
    `folder`, only those of `target` when given. Another host's, or a live process's, are left alone."""
    try:
        found = list(Path(folder).iterdir())
    except OSError:  # no folder (yet), or not readable: nothing of ours to remove
        return
    for p in found:
        m = _TEMP.fullmatch(p.name)
        if not m or m["host"] != HOST or (target is not None and m["target"] != target) or _alive(int(m["pid"])):
            continue
        log.info("removing %s, left by a process that no longer runs", p)
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def no_space(e: BaseException | None) -> bool:
    """Whether a full disk (or quota) caused `e`: torch.save reports the OSError of its write as the
    context of a RuntimeError of its zip writer ("unexpected pos ...")."""
    for _ in range(8):  # the chain, not a cycle
        if e is None:
            return False
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        e = e.__cause__ or e.__context__
    return False


@contextmanager
def atomic_write(path, mode="wb", **kw):
    """open() for writing `path` whole: the caller writes into a temporary file, which replaces `path`
    only when the block ends without error and is removed otherwise. A full disk stops with one line."""
    path = Path(path)
    remove_orphans(path.parent, path.name)
    tmp = temp_path(path)
    try:
        with open(tmp, mode, **kw) as f:
            yield f
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if no_space(e):
            raise SystemExit(f"error: no space left on {path.parent} (writing {path.name}; "
                             f"the previous {path.name}, if any, is untouched)") from None
        raise


def save_atomic(obj, path):
    """torch.save, written whole (atomic_write); a dict gets the CRC-32 of each tensor ("checksum"), so
    load_checkpoint can tell a damaged file. torch.save into an open file, not a path: its writes are then
    Python's, whose OSError says what failed (no_space), not only the C++ zip writer's RuntimeError."""
    if isinstance(obj, dict):
        obj = {**obj, "checksum": tensor_checksums({k: v for k, v in obj.items() if k != "checksum"})}
    with atomic_write(path) as f:
        torch.save(obj, f)


def write_csv(df, path):
    """A pandas frame as a CSV, written whole (atomic_write)."""
    with atomic_write(path, "w", newline="") as f:
        df.to_csv(f, index=False, float_format="%.5g")


def write_text(text: str, path):
    """A text file, written whole (atomic_write)."""
    with atomic_write(path, "w") as f:
        f.write(text)


# ----------------------------------------------------------------------------- reading one safely
def tensor_checksums(obj, where="") -> dict[str, int]:
    """{"model/fusion.proj.weight": CRC-32 of its bytes, ...} for every tensor in a nested dict / list.
    CRC-32 (zlib, ~3 GB/s) detects damage; it is no defence against someone forging a file."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous().reshape(-1)
        return {where: zlib.crc32(t.view(torch.uint8).numpy()) if t.numel() else 0}
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    out = {}
    for k, v in items:
        out.update(tensor_checksums(v, f"{where}/{k}" if where else str(k)))
    return out


def _finite(t: torch.Tensor) -> bool:
    """Every value finite. A non-finite value makes the sum non-finite, so the sum (in float32, which finite
    weights do not overflow; 20x faster than isfinite(t).all() on a CPU) settles it unless it is not finite."""
    wide = torch.float64 if t.dtype == torch.float64 else torch.float32
    return bool(torch.isfinite(t.sum(dtype=wide))) or bool(torch.isfinite(t).all())


def _verify(ckpt: dict, path: Path) -> None:
    """Refuse a checkpoint whose tensors differ from the checksums saved with them, or whose weights are
    not finite (checkpoints written before the checksum are checked for the latter only)."""
    if "checksum" in ckpt:
        saved = ckpt["checksum"] if isinstance(ckpt["checksum"], dict) else {}
        now = tensor_checksums({k: v for k, v in ckpt.items() if k != "checksum"})
        bad = sorted(k for k in saved.keys() | now.keys() if saved.get(k) != now.get(k))
        if bad:
            raise ValueError(f"{path}: damaged: {len(bad)} tensor(s) differ from the checksums written with the "
                             f"file ({', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}); use another copy or retrain")
    for part in ("model", "frozen_trunk"):
        for name, t in (ckpt.get(part) or {}).items():
            if isinstance(t, torch.Tensor) and t.is_floating_point() and not _finite(t):
                raise ValueError(f"{path}: non-finite weights in {part}/{name}; use an earlier checkpoint or retrain")



def load_checkpoint(path):
    """Load a Gene-DML checkpoint safely, with an error that names the file and the problem."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle refused by weights_only, truncated file, not a torch file...
        raise ValueError(f"{path}: not a loadable Gene-DML checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    missing = [k for k in KEYS if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise ValueError(f"{path}: not a Gene-DML checkpoint (missing {', '.join(missing)})")
    _verify(ckpt, path)
    return ckpt


def check_for_evaluation(ckpt: dict, path, held_out: bool = True) -> None:
    """Refuse, naming the file and every problem, a checkpoint (from load_checkpoint, which checked
    its keys) whose contents evaluation cannot use: a gene list that does not name the model's
    outputs, a crop size the trunk cannot read, no held-out sections to score (held_out: needed
    unless the slides come from elsewhere, --predict or --external). Such a file was edited or
    written by something else; without this it fails deep inside, with a traceback."""
    config, data, genes = ckpt["config"], ckpt["data"], ckpt["genes"]
    if not isinstance(config, dict) or not isinstance(data, dict):
        raise ValueError(f"{path}: cannot be evaluated: its config and data are not dicts")
    problems = []
    n_genes = config.get("n_genes")
    if not isinstance(genes, list) or not all(isinstance(g, str) for g in genes) or len(set(genes)) < len(genes):
        problems.append("its gene list is not a list of distinct gene names")
    elif len(genes) != n_genes:
        problems.append(f"its gene list has {len(genes)} genes, its model predicts {n_genes}")
    crop = data.get("crop_size")
    if not isinstance(crop, int) or crop < MIN_CROP:  # the local trunk's stride: at 0 px its first convolution fails
        problems.append(f"crop size {crop!r} px, below the {MIN_CROP} px the ResNet18 trunk needs")
    crop_um = data.get("crop_um")
    if crop_um is not None and not (isinstance(crop_um, (int, float)) and math.isfinite(crop_um) and crop_um > 0):
        problems.append(f"crop field of view {crop_um!r} µm is not a positive number")
    sections = data.get("sections")
    test = sections.get("test") if isinstance(sections, dict) else None
    if held_out and not (isinstance(test, list) and test and all(isinstance(n, str) for n in test)):
        problems.append(f"it names no held-out sections to score (data.sections.test is {test!r})")
    if problems:
        raise ValueError(f"{path}: cannot be evaluated: {'; '.join(problems)}")


class CheckpointWriter:
    """Writes a checkpoint in a background thread, so the next epoch trains while it is written: the
    loop waits only for a copy of the tensors to the host (the snapshot of this epoch; training then
    changes the originals) and, if the previous write is still going, for that. A write that failed
    raises at the next save or at wait(); the file appears only when complete (save_atomic). Off the
    background (the CPU's default: its epochs take minutes, a write a second) save() writes at once,
    so a run killed in the next epoch always leaves this epoch's checkpoint."""

    def __init__(self, background: bool = True):
        self.background, self.thread, self.error = background, None, None

    def save(self, obj, path):
        self.wait()
        if not self.background:
            return save_atomic(obj, path)
        snapshot = _to_host(obj)

        def write():
            try:
                save_atomic(snapshot, path)
            except BaseException as e:  # re-raised in the training loop by wait()
                self.error = e

        self.thread = threading.Thread(target=write, name=f"write {Path(path).name}", daemon=False)
        self.thread.start()

    def wait(self):
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        if self.error is not None:
            error, self.error = self.error, None
            raise error


def _to_host(obj):
    """A copy of every tensor in a nested dict / list on the CPU (a copy even when it is already there)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_host(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_host(v) for v in obj)
    return obj


def plain(x):
    """Arguments as checkpoint-safe primitives (weights_only=True loads no Path or Namespace)."""
    return {k: (list(v) if isinstance(v, tuple) else str(v) if isinstance(v, Path) else v) for k, v in vars(x).items()}


def refuse_other_settings(saved: dict, args, source, allowed=RUN_ONLY):
    """Stop, naming the flags, when args differ from the saved run's (a checkpoint's "args") outside `allowed`."""
    now = plain(args)
    changed = sorted(k for k in now if k not in allowed and saved.get(k) != now[k])
    if changed:
        was = ", ".join(f"--{k.replace('_', '-')} {saved.get(k)!r} (now {now[k]!r})" for k in changed)
        raise SystemExit(f"{source} was trained with other settings ({was}); re-run with those, or give another --out")


def check_resume(resume: dict, args, names: dict) -> None:
    """Stop unless `resume` (a last.pt) continues this very run: the same encoder, local encoder,
    sections and settings (--epochs and --patience may change), with the optimiser state to go on."""
    was = ((resume.get("encoder") or {}).get("spec") or {}).get("name", "resnet18")
    if was != args.encoder:
        raise SystemExit(f"--resume {args.resume} was trained with --encoder {was}, not {args.encoder}")
    if resume["config"].get("local_encoder", "trainable") != args.local_encoder:
        raise SystemExit(f"--resume {args.resume} has a {resume['config'].get('local_encoder', 'trainable')} "
                         f"local encoder, not {args.local_encoder}: pass the same --local-encoder")
    if "optimizer" not in resume:
        raise SystemExit(f"--resume {args.resume} holds the model only (a best.pt): resume from the run's last.pt")
    if resume["data"]["sections"] != names:
        raise SystemExit(f"--resume {args.resume} was trained on {resume['data']['sections']}, not {names}")
    # as --fold all's re-run does: other settings would silently change the run mid-way
    refuse_other_settings(resume["args"], args, args.resume, RUN_ONLY | {"epochs", "patience"})


def resume_log(path, resume: dict) -> None:
    """Rewrite log.jsonl (whole) as an uninterrupted run leaves it up to `resume` (a last.pt): the lines
    of its epochs, each once. A line of a later epoch (a kill after the append, before last.pt landed:
    the GPU writes it in the background) goes; the checkpoint's own line, when a kill came between the
    rename of last.pt and the append, comes back from last.pt ("log"). A torn last line (a kill during
    the append) is dropped and reported; any other unreadable line is an error naming the file."""
    path = Path(path)
    lines = path.read_text().splitlines() if path.exists() else []
    kept = []
    for i, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
            epoch = record["epoch"]
        except (ValueError, KeyError, TypeError):
            if i == len(lines):
                print(f"{path}: dropped its last line, torn by the kill ({line[:40]!r}...)")
                break
            raise ValueError(f"{path}: line {i} is not a log record ({line[:60]!r}); remove it and resume again") from None
        if epoch <= resume["epoch"]:
            kept.append(record)
    if resume.get("log") and not any(r["epoch"] == resume["epoch"] for r in kept):
        kept.append(resume["log"])
    write_text("".join(json.dumps(r) + "\n" for r in kept), path)
