"""The stack works: Horovod's TensorFlow collectives give the expected values on 2 ranks."""

from __future__ import annotations

import horovod.tensorflow as hvd
import numpy as np
import pytest
import tensorflow as tf


@pytest.mark.parametrize("dtype", [tf.float32, tf.float64])
def test_collectives(dtype: tf.DType) -> None:
    rank, size = hvd.rank(), hvd.size()
    assert size == 2
    base = np.arange(6.0)
    x = tf.constant(base + 10 * rank, dtype=dtype)
    total = sum(base + 10 * r for r in range(size))
    np.testing.assert_array_equal(hvd.allreduce(x, op=hvd.Sum, name=f"s.sum.{dtype.name}").numpy(), total)
    np.testing.assert_allclose(hvd.allreduce(x, op=hvd.Average, name=f"s.avg.{dtype.name}").numpy(), total / size)
    np.testing.assert_array_equal(hvd.broadcast(x, root_rank=1, name=f"s.bcast.{dtype.name}").numpy(), base + 10)
    rows = tf.fill((rank + 1, 2), tf.constant(float(rank), dtype=dtype))  # 1 row on rank 0, 2 on rank 1
    gathered = hvd.allgather(rows, name=f"s.gather.{dtype.name}").numpy()
    np.testing.assert_array_equal(gathered, [[0, 0], [1, 1], [1, 1]])
    m = tf.constant(np.arange(8.0).reshape(4, 2) * (rank + 1), dtype=dtype)
    part = hvd.reducescatter(m, op=hvd.Sum, name=f"s.rs.{dtype.name}").numpy()
    np.testing.assert_array_equal(part, (np.arange(8.0).reshape(4, 2) * 3)[2 * rank : 2 * rank + 2])
