"""``hvd_ngd.tensorflow.communicator.HorovodCommunicator`` on real ranks: expected values."""

from __future__ import annotations

import horovod.tensorflow as hvd
import numpy as np
import pytest
import tensorflow as tf

from hvd_ngd.tensorflow.communicator import HorovodCommunicator


@pytest.mark.parametrize("dtype", [tf.float32, tf.float64])
def test_communicator_collectives(dtype: tf.DType) -> None:
    comm = HorovodCommunicator()
    rank, size = comm.rank, comm.size
    assert (rank, size) == (hvd.rank(), hvd.size())
    base = np.arange(6.0).reshape(2, 3)
    x = tf.constant(base * (rank + 1), dtype=dtype)
    scale = sum(r + 1 for r in range(size))
    np.testing.assert_allclose(comm.allreduce(x, name=f"c.avg.{dtype.name}").numpy(), base * scale / size)
    np.testing.assert_allclose(comm.allreduce(x, name=f"c.sum.{dtype.name}", average=False).numpy(), base * scale)
    handle = comm.allreduce_async(x, name=f"c.async.{dtype.name}", average=False)
    np.testing.assert_allclose(comm.wait(handle).numpy(), base * scale)
    rows = tf.fill((rank + 1, 2), tf.constant(float(rank), dtype=dtype))
    expected = np.concatenate([np.full((r + 1, 2), float(r)) for r in range(size)])
    np.testing.assert_array_equal(comm.allgather(rows, name=f"c.gather.{dtype.name}").numpy(), expected)
    m = tf.constant(np.arange(size * 4.0).reshape(size, 4) * (rank + 1), dtype=dtype)
    row = comm.reducescatter(m, name=f"c.rs.{dtype.name}", average=False)
    assert row.shape == (4,)
    np.testing.assert_allclose(row.numpy(), np.arange(size * 4.0).reshape(size, 4)[rank] * scale)
    avg = comm.reducescatter(m, name=f"c.rs_avg.{dtype.name}")
    np.testing.assert_allclose(avg.numpy(), np.arange(size * 4.0).reshape(size, 4)[rank] * scale / size)
    root = size - 1
    np.testing.assert_array_equal(comm.broadcast(x, root, name=f"c.bcast.{dtype.name}").numpy(), base * size)
    np.testing.assert_array_equal(comm.wait(comm.broadcast_async(x, 0, name=f"c.bcast_a.{dtype.name}")).numpy(), base)
    assert comm.allgather_object({"r": rank}, name=f"c.obj.{dtype.name}") == [{"r": r} for r in range(size)]
    assert comm.bytes_sent > 0


@pytest.mark.np4
def test_process_set_groups_broadcast_from_global_root() -> None:
    """Groups become process sets (a second communicator finds them); roots are global ranks."""
    assert hvd.size() == 4
    groups = [[0, 1], [2, 3]]
    comm = HorovodCommunicator()
    comm.register_groups(groups + [[0], [0, 1, 2, 3]])
    again = HorovodCommunicator()
    again.register_groups(groups)  # Horovod refuses duplicates: found, not re-added
    group = groups[hvd.rank() // 2]
    x = tf.constant([float(hvd.rank())], tf.float64)
    out = again.broadcast(x, group[1], name="c.group_bcast", group=group)
    assert out.numpy()[0] == group[1]
