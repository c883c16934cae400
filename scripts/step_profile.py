#!/usr/bin/env python3
"""Per-step cost of K-FAC vs SGD in one process (no Horovod), side by side in one run.

    python scripts/step_profile.py [--workload digits|mlp40] [--strategy spngd|comm-opt] [--steps 60]

Prints the median and mean step time of SGD and of K-FAC for the step types "nothing due",
"factors due" (10/100 intervals) and "every step", each relative to SGD's median, the host reads
per step, and (``--profile``) the share of linear algebra in the every-step K-FAC step.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import hvd_ngd.torch as ngd  # noqa: E402
from hvd_ngd.communicator import SingleProcessCommunicator  # noqa: E402


def digits_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AvgPool2d(2), nn.Flatten(), nn.Linear(32 * 4 * 4, 10),
    )


def mlp(depth: int = 40, width: int = 64) -> nn.Module:
    layers: List[nn.Module] = [nn.Linear(64, width), nn.ReLU()]
    for _ in range(depth - 2):
        layers += [nn.Linear(width, width), nn.ReLU()]
    layers.append(nn.Linear(width, 10))
    return nn.Sequential(*layers)


WORKLOADS = {
    "digits": (digits_cnn, lambda b: torch.randn(b, 1, 8, 8), 32),
    "mlp40": (mlp, lambda b: torch.randn(b, 64), 256),
}


def time_steps(step: Callable[[int], None], steps: int, warmup: int = 5) -> List[float]:
    for i in range(warmup):
        step(i)
    out = []
    for i in range(steps):
        t = time.perf_counter()
        step(warmup + i)
        out.append(time.perf_counter() - t)
    return out


def run(workload: str, strategy: str, steps: int) -> Dict[str, dict]:
    torch.manual_seed(0)
    build, data, batch = WORKLOADS[workload]
    x, y = data(batch), torch.randint(0, 10, (batch,))
    loss_fn = nn.CrossEntropyLoss()
    results: Dict[str, dict] = {}

    def sgd_runner():
        model = build()
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

        def step(i: int) -> None:
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()
        return step, None

    def kfac_runner(factor_every: int, inv_every: int):
        model = build()
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        kfac = ngd.KFAC(model, lr=0.01, reduce_gradients=True, communicator=SingleProcessCommunicator(),
                        strategy=strategy, factor_update_interval=factor_every, inv_update_interval=inv_every)

        def step(i: int) -> None:
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            kfac.step()
            opt.step()
        return step, kfac

    variants = {"sgd": sgd_runner, "kfac 10/100": lambda: kfac_runner(10, 100),
                "kfac nothing due": lambda: kfac_runner(10**6, 10**6), "kfac every step": lambda: kfac_runner(1, 1)}
    runners = {k: v() for k, v in variants.items()}
    times: Dict[str, List[float]] = {k: [] for k in variants}
    # interleave rounds so load noise hits every variant alike
    rounds = 4
    for _ in range(rounds):
        for k, (step, _) in runners.items():
            times[k] += time_steps(step, steps // rounds, warmup=2 if times[k] else 5)
    base = statistics.median(times["sgd"])
    for k, ts in times.items():
        results[k] = {"median_ms": 1e3 * statistics.median(ts), "mean_ms": 1e3 * statistics.mean(ts),
                      "median_vs_sgd": statistics.median(ts) / base, "mean_vs_sgd": statistics.mean(ts) / base}
    return results


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--workload", default="digits", choices=sorted(WORKLOADS))
    p.add_argument("--strategy", default="spngd")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    res = run(args.workload, args.strategy, args.steps)
    print(f"{args.workload} strategy={args.strategy}")
    for k, r in res.items():
        print(f"  {k:18s} median {r['median_ms']:7.2f} ms ({r['median_vs_sgd']:5.2f}x)  mean {r['mean_ms']:7.2f} ms ({r['mean_vs_sgd']:5.2f}x)")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
