"""Tests run by ``horovodrun -H host1:1,host2:1`` on the network-namespace test hosts
(``scripts/multihost/netns_hosts.py``): initialise Horovod once per rank."""

import os

os.environ.setdefault("HOROVOD_DYNAMIC_PROCESS_SETS", "1")

import horovod.torch as hvd  # noqa: E402
import torch  # noqa: E402

hvd.init()
torch.set_num_threads(1)
