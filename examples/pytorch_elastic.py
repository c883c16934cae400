"""Elastic Horovod with K-FAC: scikit-learn digits, workers may come and go.

    printf '#!/bin/sh\\necho localhost:2\\n' > discover.sh && chmod +x discover.sh
    HOROVOD_DYNAMIC_PROCESS_SETS=1 horovodrun -np 2 --min-np 1 --max-np 2 \\
        --host-discovery-script ./discover.sh --network-interface lo --gloo \\
        python examples/pytorch_elastic.py

Edit ``discover.sh`` once the first epoch lines appear (``echo localhost:1``, later
``localhost:2`` again): Horovod resets, the preconditioner is re-planned for the new world size
with the factors of the last commit, and training goes on. (Horovod drops a host change it sees
before the workers reach ``hvd.elastic.run``; ``--network-interface`` lets an elastic job run on
one host.)
Every worker takes ``--batch / hvd.size()`` samples of the same global batch per step.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HOROVOD_DYNAMIC_PROCESS_SETS", "1")

import horovod.torch as hvd  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from torch import nn  # noqa: E402

import hvd_ngd.torch as ngd  # noqa: E402
from hvd_ngd.torch.elastic import KFACState  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch", type=int, default=64, help="global batch")
    parser.add_argument("--commit-every", type=int, default=5, help="steps between commits")
    args = parser.parse_args()

    hvd.init()
    torch.set_num_threads(1)
    x, y = load_digits(return_X_y=True)
    x = torch.from_numpy((x / 16.0).astype(np.float32))
    y = torch.from_numpy(y)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.LayerNorm(64), nn.ReLU(), nn.Linear(64, 10))
    optimizer = ngd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), model,
                                         strategy="spngd", damping=3e-3, kl_clip=1e-2)
    steps_per_epoch = len(x) // args.batch
    state = KFACState(model=model, optimizer=optimizer, epoch=0, batch=0)

    @hvd.elastic.run
    def train(state: KFACState) -> None:
        while state.epoch < args.epochs:
            order = torch.randperm(len(x), generator=torch.Generator().manual_seed(state.epoch))
            while state.batch < steps_per_epoch:
                local = args.batch // hvd.size()
                idx = order[state.batch * args.batch + hvd.rank() * local:][:local]
                optimizer.zero_grad()
                loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
                loss.backward()
                optimizer.step()
                state.batch += 1
                if state.batch % args.commit_every == 0:
                    state.commit()
            if hvd.rank() == 0:
                with torch.no_grad():
                    accuracy = (model(x).argmax(1) == y).float().mean().item()
                print(f"epoch {state.epoch}: {hvd.size()} ranks, K-FAC step {optimizer.kfac.steps}, "
                      f"train accuracy {accuracy:.3f}", flush=True)
            state.epoch += 1
            state.batch = 0
            state.commit()

    train(state)


if __name__ == "__main__":
    main()
