"""Several processes (torchrun, DDP) on the CPU with gloo: the gradient of the global batch, the run, the resume.

Two processes each holding half of a batch must produce the gradient one process computes on the
whole batch; a two-process demo run must write its checkpoints once and be scorable; a two-process
run killed mid-epoch and resumed must end with the weights of an uninterrupted one. Every process
is started with a deadline, so a hang fails the test instead of blocking the suite.
"""
import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.multiprocessing as mp

from genedml import demo
from genedml import distributed
import evaluate
import train
from losses import gene_dml_loss
from model import GeneDML, GeneDMLConfig
from test_train import assert_same_tensors, eval_argv, load, read_log, train_argv

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 240  # seconds for one torchrun; a healthy one takes 20-40 s on a busy 2-core machine


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- batches

def test_sharded_batches_split_the_one_process_batches():
    one = distributed.ShardedBatchSampler(70, 16, drop_last=True, seed=3)
    halves = [distributed.ShardedBatchSampler(70, 16, drop_last=True, seed=3, rank=r, world=2) for r in (0, 1)]
    orders = []
    for epoch in (0, 1):
        for s in (one, *halves):
            s.set_epoch(epoch)
        batches = list(one)
        assert len(batches) == len(one) == 4 and all(len(b) == 16 for b in batches)
        assert len({i for b in batches for i in b}) == 64, "a spot appears twice in an epoch"
        # rank 0's share then rank 1's is the one-process batch, in its order (k-means starts from its first rows)
        assert [a + b for a, b in zip(*halves)] == batches
        orders.append(batches)
    assert orders[0] != orders[1], "the order should change with the epoch"
    short = [list(distributed.ShardedBatchSampler(7, 16, drop_last=False, seed=0, rank=r, world=2)) for r in (0, 1)]
    assert [len(b) for s in short for b in s] == [3, 3] and not set(short[0][0]) & set(short[1][0])


# ----------------------------------------------------------------------------- gradients

B, G, K = 8, 20, 4  # spots per process, genes, k-means groups
CASES = {  # name: (loss weights, gather)
    "full": (dict(w_inst=1.0, lam=0.8, w_mse=1.0), "global"),
    "no group loss": (dict(w_inst=1.0, lam=0.0, w_mse=1.0), "global"),
    "regression only": (dict(w_inst=0.0, lam=0.0, w_mse=1.0), "global"),
    "per-process batch": (dict(w_inst=1.0, lam=0.8, w_mse=1.0), "local"),
    "gather without the sum": (dict(w_inst=1.0, lam=0.8, w_mse=1.0), "global"),
}


def tiny_model(weights):
    """The demo architecture at D = 32 with the same initial weights in every process, dropout off (eval):
    BatchNorm then uses its running statistics, which one process and two agree on."""
    torch.manual_seed(0)
    model = GeneDML(GeneDMLConfig.for_cohort("demo", G, dim=32)).eval()
    train.freeze_unreached(model, argparse.Namespace(**weights))
    return model


def batch_of(rows):
    """A fixed batch of 2B spots from two sections (as model inputs), or the given rows of it."""
    g = torch.Generator().manual_seed(1)
    n = 2 * B
    xy = torch.stack(torch.meshgrid(torch.arange(5), torch.arange(5), indexing="ij"), -1).reshape(-1, 2)
    context = [(torch.rand(25, 512, generator=g), xy), (torch.rand(25, 512, generator=g), xy)]
    inputs = dict(local=torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g),
                  neighbour=torch.rand(n, 25, 512, generator=g), neighbour_mask=torch.ones(n, 25, dtype=torch.bool),
                  section=torch.arange(n) % 2, index=torch.randperm(25, generator=g)[:n] % 25,
                  expression=3 * torch.rand(n, G, generator=g))
    return {k: v[rows] for k, v in inputs.items()}, context


def step(model, rows, weights, gather):
    """Forward, the loss as train.py computes it, backward; returns (loss, gradients by name)."""
    inputs, context = batch_of(rows)
    label = inputs["expression"]
    if not (weights["w_inst"] or weights["lam"]):
        inputs["expression"] = None
    out = model(context=context, **inputs)
    if gather == "global":
        out = distributed.gather_outputs(out)
    loss, _ = gene_dml_loss(out, label, k=K, **weights)
    loss.backward()
    named = getattr(model, "module", model).named_parameters()    # the model inside DDP, if wrapped
    return loss.detach(), {n: p.grad.clone() for n, p in named if p.grad is not None}


class GatherWithoutSum(torch.autograd.Function):
    """The widely copied all-gather: backward returns this process's slice of its own incoming gradient."""

    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(torch.distributed.get_world_size())]
        torch.distributed.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        return grad.chunk(torch.distributed.get_world_size())[torch.distributed.get_rank()]


def _gradient_worker(rank, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank))
    torch.set_num_threads(1)                     # each process one core
    distributed.init(torch.device("cpu"))        # the same call train.py makes
    results = {}
    for name, (weights, gather) in CASES.items():
        if name == "gather without the sum":
            distributed.GatherRows, real = GatherWithoutSum, distributed.GatherRows
        model = tiny_model(weights)
        ddp = distributed.wrap(model, torch.device("cpu"))
        rows = slice(rank * B, (rank + 1) * B)   # this process's contiguous half of the 2B spots
        loss, grads = step(ddp, rows, weights, gather)
        distributed.check_every_parameter_trained(model)
        results[name] = (loss, grads)
        if name == "gather without the sum":
            distributed.GatherRows = real
    cpu = torch.device("cpu")
    assert distributed.broadcast(7 if rank == 0 else 0, cpu) == 7, "every process must get rank 0's early-stopping count"
    assert distributed.sum_over_processes([1.0, float(rank)], cpu) == [2.0, 1.0]
    torch.save(results, Path(out) / f"rank{rank}.pt")
    distributed.shutdown()


def reference(weights, gather):
    """One process: (loss, gradients, names of the trainable parameters) of the whole 2B-spot batch,
    or, for the per-process batch, the mean of the two halves' (what DDP's average gives)."""
    if gather == "local":
        (l0, g0), (l1, g1) = (step(tiny_model(weights), slice(r * B, (r + 1) * B), weights, "local") for r in (0, 1))
        loss, grads = (l0 + l1) / 2, {n: (g0[n] + g1[n]) / 2 for n in g0}
    else:
        loss, grads = step(tiny_model(weights), slice(0, 2 * B), weights, gather)
    return loss, grads, {n for n, p in tiny_model(weights).named_parameters() if p.requires_grad}


def test_two_processes_give_the_one_process_gradient(tmp_path):
    ctx = mp.start_processes(_gradient_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=False,
                             start_method="spawn")
    deadline = time.time() + 120
    while not ctx.join(timeout=1):
        if time.time() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("the two gradient processes did not finish in 120 s")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    report, threads = {}, torch.get_num_threads()
    torch.set_num_threads(1)   # tiny steps: a second thread only waits (20x slower on a busy machine)
    try:
        references = {name: reference(*case) for name, case in CASES.items()}
    finally:
        torch.set_num_threads(threads)
    for name, (weights, gather) in CASES.items():
        loss, ref, trained = references[name]
        assert set(ref) == trained, f"{name}: a trainable parameter got no gradient in one process"
        for rank, result in enumerate(ranks):
            grads = result[name][1]
            assert set(grads) == trained, f"{name}, rank {rank}: gradients for {set(grads) ^ trained}"
            report[name, rank] = max((grads[n] - ref[n]).abs().max().item() for n in ref)
        # the contrastive parts are the global batch's on both; each regression part is its own half's
        r_loss = (ranks[0][name][0] + ranks[1][name][0]) / 2
        assert torch.allclose(r_loss, loss, atol=1e-5), f"{name}: the processes' mean loss {r_loss} is not {loss}"
    scale = max(g.abs().max().item() for g in references["full"][1].values())
    print("max |gradient difference| from one process:", {k: f"{v:.1e}" for k, v in report.items()})
    for (name, rank), diff in report.items():
        if name == "gather without the sum":
            assert diff > 1e-2 * scale, "the test must tell the unsummed gather (half the contrastive gradient) apart"
        else:
            assert diff < 1e-5, f"{name}, rank {rank}: gradient differs from one process by {diff:.2e}"


# ----------------------------------------------------------------------------- torchrun runs

@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    """The demo cohort cut to a 6x6 block of spots per section, as in test_train."""
    root = demo.make_demo_cohort(tmp_path_factory.mktemp("demo"))
    for f in (root / "ST-spotfiles").glob("*_selection.tsv"):
        spots = pd.read_csv(f, sep="\t")
        spots[spots["x"].between(4, 9) & spots["y"].between(4, 9) | (spots["selected"] == 0)].to_csv(f, sep="\t", index=False)
    return root


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def torchrun(script, argv, timeout=TIMEOUT):
    """`torchrun --standalone --nproc_per_node 2 script argv` with a deadline; returns the CompletedProcess.
    It runs in its own process group, so a deadline kills the workers too."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script), *argv]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"torchrun did not finish in {timeout} s: {' '.join(cmd)}")
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def ddp_argv(demo_root, cache_dir, out, *extra):
    # 36 training spots, global batch 8: 4 steps an epoch, 4 spots per process
    return [*train_argv(demo_root, cache_dir, out, *extra), "--batch-size", "8"]


@pytest.fixture(scope="module")
def ddp_run(demo_root, cache_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    run = torchrun("train.py", ddp_argv(demo_root, cache_dir, out))
    assert run.returncode == 0, run.stderr[-3000:]
    return out, run


def test_two_process_run_writes_once_and_evaluate_scores_it(ddp_run, cache_dir):
    out, run = ddp_run
    assert (out / "best.pt").is_file() and (out / "last.pt").is_file()
    assert not [f for f in os.listdir(out) if ".tmp" in f], "a temporary checkpoint file was left behind"
    assert [line["epoch"] for line in read_log(out / "log.jsonl")] == [0, 1], "one log line per epoch, by one process"
    assert run.stdout.count("epoch 0:") == 1 and run.stdout.count("fold 0:") == 1, run.stdout
    ckpt = load(out / "last.pt")
    assert ckpt["epoch"] == 1 and ckpt["args"]["gather"] == "global"
    assert not any(k.startswith("module.") for k in ckpt["model"]), "the checkpoint holds the model, not the DDP wrapper"
    assert evaluate.main(eval_argv([out / "best.pt"], cache_dir, out / "eval")) == 0
    folds = pd.read_csv(out / "eval" / "folds.csv")
    assert len(folds) == 1 and np.isfinite(folds.loc[0, "pcc_m"])


KILLER = """
import os, signal, sys, time
sys.path.insert(0, {repo!r})
import train
real, calls = train.gene_dml_loss, []

def loss(*a, **kw):  # rank 1 dies hard at its {step}th step: mid-epoch 1 (4 steps an epoch)
    calls.append(1)
    if os.environ["RANK"] == "1" and len(calls) == {step}:
        last = os.path.join(sys.argv[sys.argv.index("--out") + 1], "last.pt")
        while not os.path.exists(last):  # rank 0 writes epoch 0's in the background, during epoch 1
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*a, **kw)

train.gene_dml_loss = loss
try:
    train.main(sys.argv[1:])
finally:
    train.distributed.shutdown()
"""


def test_killed_two_process_run_resumes_to_the_same_weights(ddp_run, demo_root, cache_dir, tmp_path):
    straight, _ = ddp_run
    killer = tmp_path / "killer.py"
    killer.write_text(KILLER.format(repo=str(REPO), step=6))
    out = tmp_path / "run"
    killed = torchrun(killer, ddp_argv(demo_root, cache_dir, out))
    assert killed.returncode != 0, "the run should have died"
    assert load(out / "last.pt")["epoch"] == 0, "last.pt should hold the one finished epoch"
    resumed = torchrun("train.py", ddp_argv(demo_root, cache_dir, out, "--resume", str(out / "last.pt")))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "=> loaded checkpoint" in resumed.stdout
    a, b = load(straight / "last.pt"), load(out / "last.pt")
    for key in ("model", "optimizer", "scheduler", "epoch", "best"):
        assert_same_tensors(a[key], b[key], key)
    from test_train import TIMING as timing  # the log fields allowed to differ between identical runs
    drop = lambda lines: [{k: v for k, v in line.items() if k not in timing} for line in lines]
    assert drop(read_log(out / "log.jsonl")) == drop(read_log(straight / "log.jsonl"))


NAN_ON_ONE = """
import os, sys
sys.path.insert(0, {repo!r})
import train
real, calls = train.gene_dml_loss, []

def loss(*a, **kw):  # rank 1 alone gets a NaN loss at its {step}th step: mid-epoch 1 (4 steps an epoch)
    calls.append(1)
    total, parts = real(*a, **kw)
    if os.environ["RANK"] == "1" and len(calls) == {step}:
        return total * float("nan"), {{**parts, "total": float("nan")}}
    return total, parts

train.gene_dml_loss = loss
try:
    train.main(sys.argv[1:])
finally:
    train.distributed.shutdown()
"""


def test_a_nonfinite_loss_on_one_process_stops_every_process(demo_root, cache_dir, tmp_path):
    """The decision is agreed first: both processes stop at the same step with the message (not one
    process alone, leaving the others in the next collective), and last.pt keeps the last finished epoch."""
    script = tmp_path / "nan_on_one.py"
    script.write_text(NAN_ON_ONE.format(repo=str(REPO), step=6))
    out = tmp_path / "run"
    run = torchrun(script, ddp_argv(demo_root, cache_dir, out))
    assert run.returncode != 0, "a NaN loss must stop the run"
    # checked at each log step and at the epoch's end: by then rank 1's NaN has reached rank 0's weights too
    said = re.findall(r"epoch 1 \(its last steps\): non-finite loss on process\(es\) \[([0-9, ]+)\] of 2", run.stderr)
    assert len(said) == 2 and said[0] == said[1] and "1" in said[0].split(", "), \
        f"every process should stop with the same message, naming rank 1:\n{run.stderr[-3000:]}"
    assert load(out / "last.pt")["epoch"] == 0
    assert [line["epoch"] for line in read_log(out / "log.jsonl")] == [0]
