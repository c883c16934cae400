"""Worker of ``test_host_failure.py``: an elastic Horovod job on the test hosts whose worker on
``host2`` is killed mid-step by the test, and which ``host2`` rejoins later.

The model, data and preconditioner config are those of ``tests/torch/elastic/elastic_worker.py``
(the same global batch at every step, split evenly over the current ranks). The state is
committed every ``--commit-every`` steps only, so a failure loses the steps since the last commit
and training goes back to it. Written into ``--out``:

- ``committed_<step>_<host>.pt`` (every rank) at every commit: model, optimizer and the committed
  preconditioner state this rank keeps;
- ``entry_<step>_<size>_<host>.pt`` (every rank) each time training (re)starts: the world, hosts,
  layer owners and the complete preconditioner state then (``kfac.state_dict()``, gathered from
  every rank);
- ``dying`` (the worker on host2, at step ``--kill-at`` between backward and ``step()``): its pid
  and host; it then waits to be killed;
- ``waiting_for_host`` (rank 0) once it has committed step ``--rejoin-at`` or later on 1 rank;
  it then waits (checking for host updates) until a host joins;
- ``final_rank<r>.pt`` and ``log_rank<r>.json`` (the ``[step, world size]`` of every step run,
  redone steps included) at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HOROVOD_DYNAMIC_PROCESS_SETS", "1")

import horovod.torch as hvd  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import hvd_ngd.torch as ngd  # noqa: E402
from hvd_ngd.torch.elastic import KFACState  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "torch" / "elastic"))
from elastic_worker import CONFIG, GLOBAL_BATCH, batches, model_fn  # noqa: E402

KILLED_HOST = "host2"
WAIT_FOR_KILL_S = 90
WAIT_FOR_HOST_S = 90


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--commit-every", type=int, default=3)
    parser.add_argument("--kill-at", type=int, default=8)
    parser.add_argument("--rejoin-at", type=int, default=12)
    parser.add_argument("--strategy", default="spngd")
    args = parser.parse_args()
    out = Path(args.out)
    host = os.environ["HOROVOD_HOSTNAME"]

    hvd.init()
    torch.set_num_threads(1)
    model = model_fn()
    opt = ngd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), model,
                                   strategy=args.strategy, **CONFIG)
    state = KFACState(model=model, optimizer=opt, step=0)
    data = batches(args.steps)
    log = []

    def commit() -> None:
        state.save()
        torch.save({"step": state.step, "model": model.state_dict(), "opt": opt.state_dict(),
                    "kfac": state.kfac_handler.committed["kfac"]}, out / f"committed_{state.step}_{host}.pt")
        if hvd.size() == 1 and state.step >= args.rejoin_at:
            if hvd.rank() == 0:
                (out / "waiting_for_host").touch()
            deadline = time.time() + WAIT_FOR_HOST_S
            while time.time() < deadline:  # raises HostsUpdatedInterrupt once a host joined
                state.check_host_updates()
                time.sleep(0.25)
            raise RuntimeError(f"no host joined within {WAIT_FOR_HOST_S}s")
        state.check_host_updates()

    @hvd.elastic.run
    def train(state: KFACState) -> None:
        snapshot = opt.kfac.state_dict()  # every rank enters together: a collective
        hosts = hvd.allgather_object(host)
        owners = dict(opt.kfac.engine.plan.layer_owner)
        torch.save({"step": state.step, "size": hvd.size(), "hosts": hosts, "kfac": snapshot, "owners": owners},
                   out / f"entry_{state.step}_{hvd.size()}_{host}.pt")
        while state.step < args.steps:
            x, y = data[state.step]
            n = GLOBAL_BATCH // hvd.size()
            lo = hvd.rank() * n
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[lo:lo + n]), y[lo:lo + n]).backward()
            if host == KILLED_HOST and state.step == args.kill_at and hvd.size() > 1:
                (out / "dying").write_text(json.dumps({"pid": os.getpid(), "host": host, "step": state.step}))
                time.sleep(WAIT_FOR_KILL_S)  # the test kills this process here
                raise RuntimeError(f"not killed within {WAIT_FOR_KILL_S}s")
            opt.step()
            state.step += 1
            log.append([state.step - 1, hvd.size()])
            if state.step % args.commit_every == 0:
                commit()

    train(state)
    rank = hvd.rank()
    torch.save({"model": model.state_dict(), "size": hvd.size(), "steps": opt.kfac.steps, "host": host},
               out / f"final_rank{rank}.pt")
    (out / f"log_rank{rank}.json").write_text(json.dumps({"steps": log, "host": host}))


if __name__ == "__main__":
    main()
