"""Per-step costs of issue 15's features, measured side by side in one process (not a test).

    PYTHONPATH=. .venv/bin/python tests/torch/measure_coverage.py mc        # Monte-Carlo Fisher
    PYTHONPATH=. .venv/bin/python tests/torch/measure_coverage.py compile   # torch.compile
    PYTHONPATH=. .venv/bin/python tests/torch/measure_coverage.py groups    # per-group conv blocks

Each variant trains the same model on the same batches; the mean of the timed steps (after
warm-up) is reported in ms and relative to SGD measured in the same run (the median too, and for
the Monte-Carlo Fisher the time spent in its sampled backward passes). One thread.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from typing import Callable, Dict, List

import torch
from torch import nn

import hvd_ngd.torch as ngd
from hvd_ngd.communicator import SingleProcessCommunicator

torch.set_num_threads(1)


def cnn(groups: int = 1, width: int = 32) -> nn.Module:
    """Three convolutions (the middle one grouped), two BatchNorms, a pooled two-layer head."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1, groups=groups), nn.BatchNorm2d(width), nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        nn.Linear(width * 4, 64), nn.ReLU(), nn.Linear(64, 10),
    )


def batches(n: int, batch: int = 32):
    gen = torch.Generator().manual_seed(0)
    return [(torch.randn(batch, 3, 16, 16, generator=gen), torch.randint(0, 10, (batch,), generator=gen)) for _ in range(n)]


def time_steps(make_model: Callable[[], nn.Module], kfac_cfg, steps: int, warmup: int, compile_backend=None) -> Dict[str, float]:
    model = make_model()
    forward = torch.compile(model, backend=compile_backend) if compile_backend else model
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    kfac = None
    if kfac_cfg is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            kfac = ngd.KFAC(model, communicator=SingleProcessCommunicator(), strategy="comm-opt", **kfac_cfg)
    times: List[float] = []
    mc_times: List[float] = []
    if kfac is not None and kfac.mc:
        sample = kfac.sample_fisher

        def timed(output):
            t = time.perf_counter()
            sample(output)
            if i >= warmup:
                mc_times.append(time.perf_counter() - t)

        kfac.sample_fisher = timed  # the root hook calls it through the instance
    for i, (x, y) in enumerate(batches(steps + warmup)):
        t0 = time.perf_counter()
        opt.zero_grad()
        nn.functional.cross_entropy(forward(x), y).backward()
        if kfac is not None:
            kfac.step()
        opt.step()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    out = {"ms": 1e3 * statistics.mean(times), "median_ms": round(1e3 * statistics.median(times), 2)}
    if kfac is not None:
        out["layers"] = len(kfac.layers)
    if mc_times:
        out["mc_passes"] = len(mc_times)
        out["ms_per_mc_pass"] = round(1e3 * statistics.mean(mc_times), 2)
        out["mc_ms_per_step"] = round(1e3 * sum(mc_times) / len(times), 2)
    return out


def report(rows: Dict[str, Dict[str, float]]) -> None:
    base = rows["sgd"]["ms"]
    print(f"{'variant':58s} {'ms/step':>8s} {'/ SGD':>6s}  details")
    for name, row in rows.items():
        extra = {k: v for k, v in row.items() if k != "ms"}
        print(f"{name:58s} {row['ms']:8.2f} {row['ms'] / base:6.2f}  {extra if extra else ''}")


def measure_mc(steps: int) -> None:
    mc = dict(fisher_type="mc", loss_family="cross_entropy")
    variants = {
        "sgd": None,
        "kfac empirical, every step": dict(),
        "kfac mc, every step": dict(mc),
        "kfac empirical, factors every 10, inverses every 100": dict(factor_update_interval=10, inv_update_interval=100),
        "kfac mc, factors every 10, inverses every 100": dict(mc, factor_update_interval=10, inv_update_interval=100),
        "kfac empirical, adaptive": dict(interval_policy="adaptive"),
        "kfac mc, adaptive": dict(mc, interval_policy="adaptive"),
    }
    rows = {name: time_steps(cnn, cfg, steps, warmup=3) for name, cfg in variants.items()}
    report(rows)


def measure_compile(steps: int) -> None:
    """Eager vs ``torch.compile`` (inductor), with and without KFAC, steps interleaved (one step
    of each variant in turn, so machine load hits all alike). Every KFAC is built before any
    compiled call (hook guards on), so each compiled model gets its own graphs."""
    import torch._dynamo

    torch._dynamo.reset()
    variants = {}
    for compiled in (False, True):
        tag = "compiled (inductor)" if compiled else "eager"
        for name, cfg in (("sgd", None), ("kfac every step", dict()),
                          ("kfac factors/10 inverses/100", dict(factor_update_interval=10, inv_update_interval=100))):
            model = cnn()
            kfac = None
            if cfg is not None:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    kfac = ngd.KFAC(model, communicator=SingleProcessCommunicator(), strategy="comm-opt", **cfg)
            variants[f"{name}, {tag}"] = (model, torch.compile(model) if compiled else model, kfac,
                                         torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9))
    times: Dict[str, List[float]] = {name: [] for name in variants}
    forward_times: Dict[str, List[float]] = {name: [] for name in variants}
    for i, (x, y) in enumerate(batches(steps + 5)):
        for name, (model, forward, kfac, opt) in variants.items():
            t0 = time.perf_counter()
            opt.zero_grad()
            out = forward(x)
            t1 = time.perf_counter()
            nn.functional.cross_entropy(out, y).backward()
            if kfac is not None:
                kfac.step()
            opt.step()
            if i >= 5:
                times[name].append(time.perf_counter() - t0)
                forward_times[name].append(t1 - t0)
    rows = {"sgd": None}
    for name in variants:
        rows["sgd" if name == "sgd, eager" else name] = {
            "ms": 1e3 * statistics.mean(times[name]), "median_ms": round(1e3 * statistics.median(times[name]), 2),
            "forward_ms": round(1e3 * statistics.mean(forward_times[name]), 2)}
    report(rows)
    print("dynamo frames compiled:", dict(torch._dynamo.utils.counters["frames"]))
    torch._dynamo.reset()
    model = cnn()
    plain = torch._dynamo.explain(model)(batches(1)[0][0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kfac = ngd.KFAC(model, communicator=SingleProcessCommunicator(), strategy="comm-opt")
    hooked = torch._dynamo.explain(model)(batches(1)[0][0])
    print(f"forward graphs without KFAC: {plain.graph_count} ({plain.graph_break_count} breaks); with KFAC's "
          f"hooks on {len(kfac.layers)} layers: {hooked.graph_count} graphs ({hooked.graph_break_count} breaks)")
    for reason in hooked.break_reasons[:2]:
        print("  break:", str(reason.reason).splitlines()[0][:160])


def measure_groups(steps: int) -> None:
    """Per-group blocks of a grouped middle conv (groups 1, 4, 32 = depthwise), steps
    interleaved across variants; medians, relative to SGD on the same model."""
    variants = {}
    for groups in (1, 4, 32):
        for name, cfg in (("sgd", None), ("kfac every step", dict()),
                          ("kfac factors/10 inverses/100", dict(factor_update_interval=10, inv_update_interval=100))):
            model = cnn(groups)
            kfac = None
            if cfg is not None:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    kfac = ngd.KFAC(model, communicator=SingleProcessCommunicator(), strategy="comm-opt", **cfg)
            variants[(groups, name)] = (model, kfac, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9))
    times = {key: [] for key in variants}
    for i, (x, y) in enumerate(batches(steps + 3)):
        for key, (model, kfac, opt) in variants.items():
            t0 = time.perf_counter()
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            if kfac is not None:
                kfac.step()
            opt.step()
            if i >= 3:
                times[key].append(time.perf_counter() - t0)
    print(f"{'middle conv':12s} {'variant':32s} {'median ms':>9s} {'mean ms':>8s} {'/ its SGD (median)':>19s} layers")
    for (groups, name), t in times.items():
        base = statistics.median(times[(groups, "sgd")])
        kfac = variants[(groups, name)][1]
        print(f"groups={groups:<5d} {name:32s} {1e3 * statistics.median(t):9.2f} {1e3 * statistics.mean(t):8.2f} "
              f"{statistics.median(t) / base:19.2f} {len(kfac.layers) if kfac else ''}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("what", choices=["mc", "compile", "groups"])
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    {"mc": measure_mc, "compile": measure_compile, "groups": measure_groups}[args.what](args.steps)


if __name__ == "__main__":
    main()
