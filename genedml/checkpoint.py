"""Checkpoints: written atomically (in the background on a GPU), read safely, and resumed only into the same run.

A fold writes `best.pt` (the model and everything evaluation needs to rebuild it: config, genes, data
settings, the frozen trunk or the record of a foundation encoder; no optimiser) whenever the selection
metric improves, and `last.pt` (best.pt's contents plus Adam's, the scheduler's and the scaler's state)
every epoch. A file appears only when complete (a temporary file, then a rename); every checkpoint is
read with torch.load(weights_only=True), so it holds primitives and tensors only (`plain`), and
evaluation checks what it holds (`check_for_evaluation`). A resumed run must be the same run:
`check_resume` and `refuse_other_settings` stop, naming the flags, when not.
"""
import math
import os
import threading
from pathlib import Path

import torch

from genedml.trunk import MIN_CROP

# Flags that do not change what a run computes: a re-run of --fold all may differ in these.
RUN_ONLY = {"out", "fold", "resume", "root", "cache_dir", "workers", "device", "log_every", "compile", "data_on_device"}
KEYS = ("model", "frozen_trunk", "config", "genes", "data", "selection")  # what every Gene-DML checkpoint holds


def save_atomic(obj, path):
    tmp = Path(path).with_name(f".{Path(path).name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


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
