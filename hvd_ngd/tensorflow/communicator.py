"""``hvd_ngd.communicator.Communicator`` implemented with ``horovod.tensorflow`` collectives.

Mirrors ``hvd_ngd.torch.communicator.HorovodCommunicator``; process sets and byte accounting
come from ``hvd_ngd.horovod.communicator.HorovodCommunicatorBase``. The preconditioner calls
these eagerly (inside ``tf.py_function`` when the training step is traced) and, for graph steps,
inside the traced step (``hvd_ngd.tensorflow.graph_step``), always with explicit names and
``ignore_name_scope=True``: Horovod matches a graph collective across ranks by its node name,
and a node inside ``tf.cond`` in ``model.fit``'s train function is prefixed with a branch scope
whose counter (``cond/then/_29`` vs ``_31``) differs between ranks, so without it the ranks
wait for each other's names forever.
"""

from __future__ import annotations

from typing import Optional, Sequence

import horovod.tensorflow as hvd
import tensorflow as tf

from hvd_ngd.horovod.communicator import HorovodCommunicatorBase


class HorovodCommunicator(HorovodCommunicatorBase):
    """Horovod collectives on TF tensors; groups map to ``hvd.ProcessSet``s.

    ``horovod.tensorflow`` has no asynchronous broadcast or allreduce for eager tensors, so the
    ``*_async`` calls complete before they return: their "handle" is the result, and ``wait``
    returns it unchanged (overlap then comes only from Horovod's own background fusion).
    """

    def __init__(self) -> None:
        super().__init__(hvd, "hvd_ngd.tensorflow")

    def _count(self, x: tf.Tensor, factor: float) -> None:
        self.count(x.shape.num_elements(), x.dtype.size, factor)

    def allreduce(self, x: tf.Tensor, *, name: str, average: bool = True) -> tf.Tensor:
        self._count(x, self.ring_allreduce_factor())
        return hvd.allreduce(x, name=name, ignore_name_scope=True, op=hvd.Average if average else hvd.Sum)

    def allreduce_async(self, x: tf.Tensor, *, name: str, average: bool = True) -> tf.Tensor:
        """Synchronous in horovod.tensorflow: returns the result (``wait`` passes it through)."""
        return self.allreduce(x, name=name, average=average)

    def allgather(self, x: tf.Tensor, *, name: str) -> tf.Tensor:
        out = hvd.allgather(x, name=name, ignore_name_scope=True)
        if out.shape.num_elements() is None:  # traced: the gathered size is known at run time only
            self.count(x.shape.num_elements() * self.size, x.dtype.size, self.ring_share())
        else:
            self._count(out, self.ring_share())  # ring: every rank forwards n-1 blocks
        return out

    def reducescatter(self, x: tf.Tensor, *, name: str, average: bool = True) -> tf.Tensor:
        """Reduce ``x`` of shape (size, n); rank r receives row r with shape (n,)."""
        self._count(x, self.ring_share())
        out = hvd.reducescatter(x, name=name, ignore_name_scope=True, op=hvd.Average if average else hvd.Sum)
        return tf.reshape(out, x.shape[1:])

    def broadcast(self, x: tf.Tensor, root: int, *, name: str, group: Optional[Sequence[int]] = None) -> tf.Tensor:
        """``root``'s (a global rank) ``x`` on every rank of ``group`` (None: all ranks)."""
        self._count(x, self.ring_share(len(group) if group is not None else None))  # pipelined ring
        return hvd.broadcast(x, root, name=name, ignore_name_scope=True, process_set=self.process_set(group))

    def broadcast_async(self, x: tf.Tensor, root: int, *, name: str, group: Optional[Sequence[int]] = None) -> tf.Tensor:
        """Synchronous in horovod.tensorflow: returns the result (``wait`` passes it through)."""
        return self.broadcast(x, root, name=name, group=group)

    def wait(self, handle: tf.Tensor) -> tf.Tensor:
        """Result of an "asynchronous" collective: the tensor itself."""
        return handle
