"""Multi-rank torch tests run under horovodrun: initialise Horovod once per rank."""

import os

os.environ.setdefault("HOROVOD_DYNAMIC_PROCESS_SETS", "1")

import horovod.torch as hvd  # noqa: E402
import pytest  # noqa: E402

hvd.init()
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def horovod():
    """The initialised ``horovod.torch`` module."""
    return hvd
