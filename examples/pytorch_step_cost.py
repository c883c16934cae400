"""Per-step cost of K-FAC relative to SGD, by step type, measured side by side in one run.

    python examples/pytorch_step_cost.py                              # 1 process
    horovodrun -np 2 -H localhost:2 --gloo python examples/pytorch_step_cost.py --out results/bench/step_cost_np2.json

Workloads: the digits CNN of ``pytorch_digits.py`` (batch 32 per rank) and a 40-layer MLP
(width 64, batch 256 per rank). Step types, each against SGD-momentum with Horovod-averaged
gradients in the same process, rounds interleaved so machine noise hits every variant alike:

- ``nothing due``: factors and inverses are fresh (the hot path of stale statistics);
- ``factors due``: every statistic is recomputed and communicated, no inverse;
- ``inverses due``: factors and every inverse (every-step K-FAC);
- ``10/100``: factors every 10 steps, inverses every 100 (what a user runs).

Clocks: ``--clock cpu`` (default) counts the main thread's CPU time (``time.thread_time``):
with one torch thread the compute runs there, so other processes on a shared machine do not
enter the ratios; ``--clock wall`` is what a user waits (on several ranks it includes the
collectives' waits, which the CPU clock does not see).

Beside each row: device-to-host reads per step (counted on the engine's ``ArrayOps``) and, for
``inverses due``, the share of the K-FAC step spent in eigh and matmul (timed on the ops) and
the time outside linear algebra relative to an SGD step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List

import horovod.torch as hvd
import torch
from torch import nn

import hvd_ngd.torch as ngd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pytorch_digits import build_model as digits_cnn  # noqa: E402


def mlp(depth: int = 40, width: int = 64) -> nn.Module:
    """A deep MLP (default init: gradients vanish towards the input, factors span 30 decades)."""
    layers: List[nn.Module] = [nn.Linear(64, width), nn.ReLU()]
    for _ in range(depth - 2):
        layers += [nn.Linear(width, width), nn.ReLU()]
    layers.append(nn.Linear(width, 10))
    return nn.Sequential(*layers)


WORKLOADS = {"digits": (digits_cnn, (1, 8, 8), 32), "mlp40": (mlp, (64,), 256)}
STEP_TYPES = {  # name -> (factor interval, inverse interval)
    "nothing due": (10**9, 10**9),
    "factors due": (1, 10**9),
    "inverses due": (1, 1),
    "10/100": (10, 100),
}


class OpsMeter:
    """Counts host reads and times eigh/matmul on a KFAC's ops (wrapping its methods)."""

    READS = ("to_numpy", "to_float", "all_finite")

    def __init__(self, kfac: ngd.KFAC) -> None:
        self.reads = 0
        self.seconds = {"eigh": 0.0, "matmul": 0.0}
        ops = kfac.ops
        for name in self.READS:
            setattr(ops, name, self._counted(getattr(ops, name)))
        for name in self.seconds:
            setattr(ops, name, self._timed(name, getattr(ops, name)))

    def _counted(self, fn: Callable) -> Callable:
        def wrapper(*a, **k):
            self.reads += 1
            return fn(*a, **k)
        return wrapper

    def _timed(self, name: str, fn: Callable) -> Callable:
        def wrapper(*a, **k):
            start = CLOCK()
            out = fn(*a, **k)
            self.seconds[name] += CLOCK() - start
            return out
        return wrapper


def make_runner(workload: str, variant: str, strategy: str):
    torch.manual_seed(0)
    build, shape, batch = WORKLOADS[workload]
    model = build()
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    x = torch.randn(batch, *shape)
    y = torch.randint(0, 10, (batch,))
    sgd = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    meter = None
    if variant == "sgd":
        opt = hvd.DistributedOptimizer(sgd, named_parameters=model.named_parameters())
    else:
        factor_every, inv_every = STEP_TYPES[variant]
        opt = ngd.DistributedOptimizer(sgd, model, strategy=strategy, lr=0.01, damping=1e-3,
                                       factor_update_interval=factor_every, inv_update_interval=inv_every)
        meter = OpsMeter(opt.kfac)
    timing = {"kfac": 0.0}

    def step() -> None:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    return step, meter


CLOCK = time.thread_time


def run(workload: str, strategy: str, steps: int, rounds: int) -> Dict[str, dict]:
    runners = {"sgd": make_runner(workload, "sgd", strategy)}
    for variant in STEP_TYPES:
        runners[variant] = make_runner(workload, variant, strategy)
    times: Dict[str, List[float]] = {k: [] for k in runners}
    reads: Dict[str, int] = {k: 0 for k in runners}
    linalg: Dict[str, float] = {k: 0.0 for k in runners}
    for step_fn, _ in runners.values():  # warm up: first decompositions, plans, caches
        for _ in range(3):
            step_fn()
    for _ in range(rounds):
        for name, (step_fn, meter) in runners.items():
            r0 = meter.reads if meter else 0
            l0 = sum(meter.seconds.values()) if meter else 0.0
            for _ in range(steps // rounds):
                t = CLOCK()
                step_fn()
                times[name].append(CLOCK() - t)
            if meter:
                reads[name] += meter.reads - r0
                linalg[name] += sum(meter.seconds.values()) - l0
    n = len(times["sgd"])
    base = statistics.median(times["sgd"])
    out = {}
    for name, ts in times.items():
        row = {"median_ms": 1e3 * statistics.median(ts), "mean_ms": 1e3 * statistics.mean(ts),
               "median_vs_sgd": statistics.median(ts) / base, "mean_vs_sgd": statistics.mean(ts) / base,
               "host_reads_per_step": reads[name] / n}
        if name != "sgd":
            la = linalg[name] / n
            row["linalg_ms"] = 1e3 * la
            extra = statistics.mean(ts) - statistics.mean(times["sgd"])
            row["linalg_share_of_kfac_extra"] = la / extra if extra > 0 else float("nan")
            row["outside_linalg_vs_sgd"] = (statistics.mean(ts) - la) / statistics.mean(times["sgd"])
        out[name] = row
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workloads", default="digits,mlp40")
    p.add_argument("--strategies", default="spngd,comm-opt")
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--out", default=None)
    p.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    args = p.parse_args()
    global CLOCK
    CLOCK = time.thread_time if args.clock == "cpu" else time.perf_counter
    hvd.init()
    torch.set_num_threads(1)
    results = []
    for workload in args.workloads.split(","):
        for strategy in args.strategies.split(","):
            rows = run(workload, strategy, args.steps, args.rounds)
            results.append({"workload": workload, "strategy": strategy, "ranks": hvd.size(), "clock": args.clock, "rows": rows})
            if hvd.rank() == 0:
                print(f"\n{workload}, {strategy}, {hvd.size()} rank(s), {args.clock} clock")
                for name, r in rows.items():
                    extra = ""
                    if name == "inverses due":
                        extra = (f"  eigh+matmul {r['linalg_ms']:.1f} ms = {r['linalg_share_of_kfac_extra']:.0%} of the "
                                 f"extra over SGD; outside them {r['outside_linalg_vs_sgd']:.2f}x SGD")
                    print(f"  {name:13s} median {r['median_ms']:7.2f} ms {r['median_vs_sgd']:5.2f}x  mean "
                          f"{r['mean_ms']:7.2f} ms {r['mean_vs_sgd']:5.2f}x  reads/step {r['host_reads_per_step']:.1f}{extra}")
    if args.out and hvd.rank() == 0:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
