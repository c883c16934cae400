"""SGD-momentum vs K-FAC (vs Adam) on scikit-learn's digits, on N Horovod ranks.

    horovodrun -np 2 -H localhost:2 --gloo python examples/pytorch_digits.py --out results/digits_torch

A small CNN with BatchNorm; every optimizer starts from the same weights and sees the same data
order and global batch (the training set is sharded by rank). Rank 0 shows a tqdm bar, writes
``summary.json`` (epochs, steps and seconds to 97% test accuracy, final accuracy, per-step time)
and ``digits.png`` (test accuracy and training loss vs epoch and vs wall time).

Learning rates were chosen by a sweep on 2 ranks, global batch 64, 10 epochs (epochs to 97%):
SGD-momentum lr 0.05: 5, 0.1: 5, 0.2: 5, 0.4: 7; K-FAC (damping 3e-3, kl_clip 1e-2) lr 0.05: 3,
0.1: 3, 0.2: 2, 0.3: 7. The defaults are the best of each (SGD 0.1, K-FAC 0.2).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Dict, List, Sequence

import horovod.torch as hvd
import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from tqdm import tqdm

import hvd_ngd.torch as ngd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import TARGET, plot_digits  # noqa: E402

LEARNING_RATES = {"sgd": 0.1, "kfac": 0.2, "adam": 3e-3}
KFAC_CONFIG = dict(damping=3e-3, kl_clip=1e-2, factor_decay=0.95, strategy="spngd")


def build_model() -> nn.Module:
    """Conv-BN-ReLU x2, average pooling, linear classifier."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AvgPool2d(2), nn.Flatten(), nn.Linear(32 * 4 * 4, 10),
    )


def load_data(seed: int):
    """Digits scaled to [0, 1], a fixed 80/20 split."""
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.2, random_state=seed, stratify=y)
    return torch.from_numpy(xtr), torch.from_numpy(ytr), torch.from_numpy(xte), torch.from_numpy(yte)


def make_optimizer(kind: str, model: nn.Module, lr: float):
    """Horovod-distributed optimizer of the given kind."""
    if kind == "sgd":
        return hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9),
                                        named_parameters=model.named_parameters())
    if kind == "adam":
        return hvd.DistributedOptimizer(torch.optim.Adam(model.parameters(), lr=lr),
                                        named_parameters=model.named_parameters())
    if kind == "kfac":
        return ngd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9), model,
                                        lr=lr, **KFAC_CONFIG)
    raise ValueError(f"unknown optimizer {kind!r}: choose sgd, kfac or adam")


def average_buffers(model: nn.Module, tag: str) -> None:
    """Average BatchNorm running statistics over ranks (each rank saw only its shard)."""
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if buf.is_floating_point():
                buf.copy_(hvd.allreduce(buf, name=f"digits.buffer.{tag}.{name}"))


def train_one(kind: str, epochs: int, batch_size: int, seed: int, lr: float | None = None) -> Dict:
    """Train one optimizer; returns per-epoch history (identical on every rank)."""
    xtr, ytr, xte, yte = load_data(seed)
    torch.manual_seed(seed)
    model = build_model()
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    lr = lr if lr is not None else LEARNING_RATES[kind]
    opt = make_optimizer(kind, model, lr)
    local = batch_size // hvd.size()
    gen = torch.Generator().manual_seed(seed)
    history: Dict[str, List[float]] = {"epoch": [], "test_accuracy": [], "train_loss": [], "seconds": []}
    steps = 0
    step_time = 0.0
    start = time.perf_counter()
    bar = tqdm(total=epochs, desc=kind, disable=hvd.rank() != 0, leave=False)
    for epoch in range(1, epochs + 1):
        model.train()
        order = torch.randperm(len(xtr), generator=gen)
        losses = []
        for begin in range(0, len(order) - batch_size + 1, batch_size):
            idx = order[begin + hvd.rank() * local : begin + (hvd.rank() + 1) * local]
            t0 = time.perf_counter()
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(xtr[idx]), ytr[idx])
            loss.backward()
            opt.step()
            step_time += time.perf_counter() - t0
            steps += 1
            losses.append(loss.item())
        average_buffers(model, f"{kind}.{epoch}")
        model.eval()
        with torch.no_grad():
            accuracy = (model(xte).argmax(1) == yte).float().mean().item()
        mean_loss = hvd.allreduce(torch.tensor(float(np.mean(losses))), name=f"digits.loss.{kind}.{epoch}").item()
        history["epoch"].append(epoch)
        history["test_accuracy"].append(accuracy)
        history["train_loss"].append(mean_loss)
        history["seconds"].append(time.perf_counter() - start)
        bar.update(1)
        bar.set_postfix(acc=f"{accuracy:.3f}", loss=f"{mean_loss:.3f}")
    bar.close()
    reached = [i for i, a in enumerate(history["test_accuracy"]) if a >= TARGET]
    first = reached[0] if reached else None
    steps_per_epoch = steps // epochs
    return {
        "optimizer": kind,
        "lr": lr,
        "global_batch": batch_size,
        "history": history,
        "epochs_to_target": history["epoch"][first] if first is not None else None,
        "steps_to_target": (first + 1) * steps_per_epoch if first is not None else None,
        "seconds_to_target": history["seconds"][first] if first is not None else None,
        "final_accuracy": history["test_accuracy"][-1],
        "seconds_per_step": step_time / max(steps, 1),
        "params": torch.cat([p.detach().reshape(-1) for p in model.parameters()]),
    }


def run(
    optimizers: Sequence[str] = ("sgd", "kfac", "adam"),
    epochs: int = 20,
    batch_size: int = 64,
    seed: int = 0,
    lrs: Dict[str, float] | None = None,
) -> Dict[str, Dict]:
    """Train each optimizer in turn from the same initial weights (``lrs`` overrides rates)."""
    lrs = lrs or {}
    return {kind: train_one(kind, epochs, batch_size, seed, lrs.get(kind)) for kind in optimizers}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=64, help="global batch size")
    parser.add_argument("--optimizers", default="sgd,kfac,adam")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="results/digits_torch")
    parser.add_argument("--lr", default="", help="overrides, e.g. sgd=0.2,kfac=0.05")
    args = parser.parse_args()
    hvd.init()
    torch.set_num_threads(1)
    lrs = {k: float(v) for k, v in (item.split("=") for item in args.lr.split(",") if item)}
    results = run(args.optimizers.split(","), args.epochs, args.batch_size, args.seed, lrs)
    if hvd.rank() == 0:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        summary = {k: {kk: vv for kk, vv in v.items() if kk != "params"} for k, v in results.items()}
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        plot_digits(results, out / "digits.png", f"digits, PyTorch, {hvd.size()} Horovod ranks, global batch {args.batch_size}")
        for kind, res in results.items():
            print(f"{kind:>5}: epochs to {TARGET:.0%}: {res['epochs_to_target']}, final accuracy "
                  f"{res['final_accuracy']:.4f}, {1000 * res['seconds_per_step']:.1f} ms/step")
        print(f"summary: {out / 'summary.json'}\nplot: {out / 'digits.png'}")


if __name__ == "__main__":
    main()
