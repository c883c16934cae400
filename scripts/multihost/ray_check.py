#!/usr/bin/env python3
"""Horovod on Ray with hvd_ngd: ``horovod.ray.RayExecutor`` starts one Horovod worker per Ray CPU
slot, each trains a small float64 MLP with ``hvd_ngd.torch.DistributedOptimizer`` on its half of
a batch, and the check is that every worker ends with the same parameters and that the job spans
``--expect-hosts`` hosts. Ray is not one of the project's pins: ``pip install ray`` first.

    python scripts/multihost/ray_check.py                       # a local Ray instance
    python scripts/multihost/ray_check.py --address host1:6379 --expect-hosts 2   # a running cluster

docs/multihost.md shows how to run it on the network-namespace test hosts.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("HOROVOD_DYNAMIC_PROCESS_SETS", "1")


def train() -> dict:
    import socket

    import horovod.torch as hvd
    import torch
    from torch import nn

    import hvd_ngd.torch as ngd

    hvd.init()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    opt = ngd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, damping=0.01)
    gen = torch.Generator().manual_seed(1)
    local = 4
    for _ in range(3):
        x = torch.randn(local * hvd.size(), 6, generator=gen, dtype=torch.float64)
        y = torch.randint(0, 3, (local * hvd.size(),), generator=gen)
        lo = hvd.rank() * local
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[lo:lo + local]), y[lo:lo + local]).backward()
        opt.step()
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    everyone = hvd.allgather(flat.unsqueeze(0), name="ray_check.params")
    return {"rank": hvd.rank(), "size": hvd.size(), "cross_size": hvd.cross_size(), "host": socket.gethostname(),
            "identical": all(torch.equal(everyone[r], everyone[0]) for r in range(hvd.size()))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--address", default=None, help="Ray cluster address (default: start a local instance)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--expect-hosts", type=int, default=1)
    args = parser.parse_args()
    try:
        import ray
        from horovod.ray import RayExecutor
    except ImportError as err:
        print(f"ray_check: {err}; install Ray first (pip install ray)", file=sys.stderr)
        return 2
    start = time.time()
    ray.init(address=args.address, **({} if args.address else {"num_cpus": args.workers, "include_dashboard": False}))
    executor = RayExecutor(RayExecutor.create_settings(timeout_s=120), num_workers=args.workers, cpus_per_worker=1,
                           use_gpu=False)
    try:
        executor.start()
        results = executor.run(train)
    finally:
        executor.shutdown()
        ray.shutdown()
    for r in sorted(results, key=lambda r: r["rank"]):
        print(r)
    hosts = {r["host"] for r in results}
    ok = all(r["identical"] and r["size"] == args.workers for r in results) and len(hosts) == args.expect_hosts
    print(f"ray_check: {'OK' if ok else 'FAILED'}: {args.workers} workers on {len(hosts)} host(s) {sorted(hosts)}, "
          f"parameters identical: {all(r['identical'] for r in results)} ({time.time() - start:.1f}s)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
