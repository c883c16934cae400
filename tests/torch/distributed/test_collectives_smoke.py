"""The stack works: Horovod's torch collectives give the expected values on 2 ranks."""

from __future__ import annotations

import horovod.torch as hvd
import pytest
import torch


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_collectives(dtype: torch.dtype) -> None:
    rank, size = hvd.rank(), hvd.size()
    assert size == 2
    x = torch.arange(6, dtype=dtype) + 10 * rank
    total = sum(torch.arange(6, dtype=dtype) + 10 * r for r in range(size))
    assert torch.equal(hvd.allreduce(x, op=hvd.Sum, name=f"s.sum.{dtype}"), total)
    assert torch.allclose(hvd.allreduce(x, op=hvd.Average, name=f"s.avg.{dtype}"), total / size)
    b = hvd.broadcast(x, root_rank=1, name=f"s.bcast.{dtype}")
    assert torch.equal(b, torch.arange(6, dtype=dtype) + 10)
    rows = torch.full((rank + 1, 2), float(rank), dtype=dtype)  # rank 0: 1 row, rank 1: 2 rows
    g = hvd.allgather(rows, name=f"s.gather.{dtype}")
    assert torch.equal(g, torch.tensor([[0, 0], [1, 1], [1, 1]], dtype=dtype))
    m = torch.arange(8, dtype=dtype).reshape(4, 2) * (rank + 1)
    part = hvd.reducescatter(m, op=hvd.Sum, name=f"s.rs.{dtype}")
    expected = (torch.arange(8, dtype=dtype).reshape(4, 2) * 3)[2 * rank : 2 * rank + 2]
    assert torch.equal(part, expected)
